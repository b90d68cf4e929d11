"""The turn format of the instruction-tuned RecurrentGemma models."""

from keras_recurrentgemma.tokenizer import END_OF_TURN
from keras_recurrentgemma.tokenizer import START_OF_TURN

_ROLE_ALIASES = {"user": "user", "model": "model", "assistant": "model"}


def _normalize_turn(turn, index):
    if isinstance(turn, dict):
        missing = {"role", "content"} - set(turn)
        if missing:
            raise ValueError(f"Turn {index} lacks {sorted(missing)}: {turn!r}.")
        role, content = turn["role"], turn["content"]
    elif isinstance(turn, (tuple, list)) and len(turn) == 2:
        role, content = turn
    else:
        raise ValueError(
            f"Turn {index} must be a dict with 'role' and 'content' or a "
            f"(role, content) pair; got {turn!r}."
        )
    if not isinstance(content, str):
        raise ValueError(f"Turn {index} content must be a string; got {content!r}.")
    return role, content


def format_chat(turns, add_generation_prompt=True):
    """Turns a conversation into the prompt the -it models were trained on.

    Each turn becomes `<start_of_turn>{role}\\n{content}<end_of_turn>\\n` with
    role `user` or `model` (`assistant` is accepted for `model`), and the
    generation prompt `<start_of_turn>model\\n` follows the last one. The
    format has no system role: a leading `system` turn's text is put at the
    start of the first user turn, separated by a blank line. `<bos>` is not
    included; the preprocessor adds it.

    Args:
        turns: list of `{"role": ..., "content": ...}` dicts or
            `(role, content)` pairs, starting with a user turn and
            alternating.
        add_generation_prompt: bool. Append `<start_of_turn>model\\n`.
            Defaults to `True`.

    Returns:
        str.

    Raises:
        ValueError: for an empty conversation, an unknown role, or turns
            that do not alternate user/model starting with user.
    """
    if isinstance(turns, (str, dict)) or not turns:
        raise ValueError(
            "`turns` must be a non-empty list of turns, e.g. "
            '[{"role": "user", "content": "Hello"}].'
        )
    turns = [_normalize_turn(turn, i) for i, turn in enumerate(turns)]
    system = None
    if turns[0][0] == "system":
        system, turns = turns[0][1], turns[1:]
        if not turns:
            raise ValueError("A system turn must be followed by a user turn.")
    parts = []
    for i, (role, content) in enumerate(turns):
        if role not in _ROLE_ALIASES:
            raise ValueError(
                f"Unknown role {role!r} in turn {i}; expected one of "
                f"{sorted(_ROLE_ALIASES)} (and 'system' only first)."
            )
        role = _ROLE_ALIASES[role]
        expected = "user" if i % 2 == 0 else "model"
        if role != expected:
            raise ValueError(
                f"Turn {i} has role {role!r} but turns must alternate user, "
                "model, user, ... starting with user."
            )
        if system is not None and i == 0:
            content = f"{system}\n\n{content}"
        parts.append(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n")
    if add_generation_prompt:
        parts.append(f"{START_OF_TURN}model\n")
    return "".join(parts)
