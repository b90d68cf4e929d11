"""`format_chat`, `RecurrentGemmaCausalLM.chat` and `instruction_tuned`.

Proves that `format_chat` writes the official turn format exactly
(`<start_of_turn>{role}\\n{text}<end_of_turn>\\n`, then the generation prompt
`<start_of_turn>model\\n`, no `<bos>`), accepts `assistant` for `model`,
folds a leading system turn into the first user turn, takes `(role, content)`
pairs, and refuses malformed conversations; that `chat()` is `generate` on
the formatted turns with `<eos>`/`<end_of_turn>` as stops, the prompt
stripped and the reply cut at the marker; and that `stop_token_ids="auto"`
stops at `<end_of_turn>` exactly when the model is `instruction_tuned`.

The tiny model has random weights, so no test predicts its text. To make
the stop behaviour observable, one test swaps two rows of the tied
embedding: the token the model would emit first after a prompt and
`<end_of_turn>`. Neither occurs in the prompt, so the prompt's hidden state
is unchanged and greedy decoding now emits `<end_of_turn>` first.
"""

import copy

import keras
import numpy as np
import pytest
from keras_hub.samplers import GreedySampler

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import format_chat
from keras_recurrentgemma.tokenizer import END_OF_TURN
from keras_recurrentgemma.tokenizer import START_OF_TURN
from tests.models import tiny_causal_lm

# Every generation below runs at the preprocessor's sequence_length, so each
# model compiles once per set of stop ids (JAX compiles are slow on CPU).
SEQUENCE_LENGTH = 48
# Plain prompts for the stop test; one whose first greedy token is usable
# (see `_prompt_and_first_token`) is picked at run time.
PROMPTS = ["The quick brown fox", "Rain fell on the", "Hello world", "A letter"]


@pytest.fixture(scope="module")
def causal_lm():
    lm = tiny_causal_lm(sequence_length=SEQUENCE_LENGTH)
    # The stop test relies on greedy decoding, the default sampler.
    assert isinstance(lm.sampler, GreedySampler)
    return lm


@pytest.fixture(scope="module")
def it_causal_lm(causal_lm):
    # The same backbone and preprocessor, flagged instruction-tuned.
    return RecurrentGemmaCausalLM(
        causal_lm.backbone, causal_lm.preprocessor, instruction_tuned=True
    )


@pytest.fixture(scope="module")
def ids(causal_lm):
    tokenizer = causal_lm.preprocessor.tokenizer
    assert tokenizer.end_of_turn_id is not None
    return {
        "pad": tokenizer.pad_token_id,
        "eos": tokenizer.end_token_id,
        "bos": tokenizer.start_token_id,
        "sot": tokenizer.start_of_turn_id,
        "eot": tokenizer.end_of_turn_id,
    }


# --- format_chat -------------------------------------------------------------


def test_format_chat_one_user_turn():
    turns = [{"role": "user", "content": "Write a haiku about rain."}]
    assert format_chat(turns) == (
        "<start_of_turn>user\nWrite a haiku about rain.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_format_chat_multi_turn():
    turns = [
        {"role": "user", "content": "Hi!"},
        {"role": "model", "content": "Hello. How can I help?"},
        {"role": "user", "content": "Tell me a joke.\nA short one."},
    ]
    assert format_chat(turns) == (
        "<start_of_turn>user\nHi!<end_of_turn>\n"
        "<start_of_turn>model\nHello. How can I help?<end_of_turn>\n"
        "<start_of_turn>user\nTell me a joke.\nA short one.<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    # The markers are the tokenizer's, and no <bos> is written.
    assert format_chat(turns).startswith(START_OF_TURN)
    assert "<bos>" not in format_chat(turns)


def test_format_chat_without_generation_prompt():
    turns = [("user", "Hi"), ("model", "Hello")]
    assert format_chat(turns, add_generation_prompt=False) == (
        "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
    )


def test_format_chat_assistant_is_model():
    with_assistant = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    with_model = copy.deepcopy(with_assistant)
    with_model[1]["role"] = "model"
    assert format_chat(with_assistant) == format_chat(with_model)
    assert "assistant" not in format_chat(with_assistant)


def test_format_chat_system_turn_is_merged_into_first_user_turn():
    turns = [
        {"role": "system", "content": "Answer in French."},
        {"role": "user", "content": "Hello"},
        {"role": "model", "content": "Bonjour"},
        {"role": "user", "content": "Thanks"},
    ]
    assert format_chat(turns) == (
        "<start_of_turn>user\nAnswer in French.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nBonjour<end_of_turn>\n"
        "<start_of_turn>user\nThanks<end_of_turn>\n"
        "<start_of_turn>model\n"
    )


def test_format_chat_accepts_pairs():
    as_dicts = [
        {"role": "user", "content": "Hi"},
        {"role": "model", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ]
    as_tuples = [("user", "Hi"), ("model", "Hello"), ("user", "Bye")]
    as_lists = [["user", "Hi"], ["assistant", "Hello"], ["user", "Bye"]]
    assert format_chat(as_tuples) == format_chat(as_dicts)
    assert format_chat(as_lists) == format_chat(as_dicts)


@pytest.mark.parametrize(
    "turns, match",
    [
        ([], "non-empty"),
        ((), "non-empty"),
        ("Hello", "non-empty"),
        ({"role": "user", "content": "Hi"}, "non-empty"),
        ([{"role": "robot", "content": "Hi"}], "Unknown role"),
        ([("user", "Hi"), ("system", "Be brief.")], "Unknown role"),
        ([{"role": "model", "content": "Hi"}], "alternate"),
        ([("user", "Hi"), ("user", "Again")], "alternate"),
        ([("user", "Hi"), ("model", "Hey"), ("model", "Again")], "alternate"),
        ([("system", "Be brief.")], "followed by a user turn"),
        ([("system", "Be brief."), ("model", "Hi")], "alternate"),
        ([{"role": "user", "content": None}], "string"),
        ([{"role": "user", "content": 42}], "string"),
        ([("user", ["Hi"])], "string"),
        ([{"role": "user"}], "content"),
        ([{"content": "Hi"}], "role"),
        ([("user", "Hi", "extra")], "pair"),
        (["user: Hi"], "pair"),
    ],
)
def test_format_chat_errors(turns, match):
    with pytest.raises(ValueError, match=match):
        format_chat(turns)


# --- chat() ------------------------------------------------------------------


def _cut(text):
    end = text.find(END_OF_TURN)
    return text if end < 0 else text[:end]


@pytest.mark.parametrize(
    "turns",
    [
        [{"role": "user", "content": "Hi"}],
        [("user", "Hi"), ("model", "Hello"), ("user", "Bye")],
    ],
)
def test_chat_is_generate_on_the_formatted_turns(causal_lm, ids, turns):
    reply = causal_lm.chat(turns)
    assert isinstance(reply, str)
    assert END_OF_TURN not in reply
    expected = causal_lm.generate(
        format_chat(turns),
        stop_token_ids=(ids["eos"], ids["eot"]),
        strip_prompt=True,
    )
    assert reply == _cut(expected)


class _FakeGenerate:
    """Stands in for `generate`: records its arguments, returns a reply."""

    def __init__(self, reply):
        self.reply = reply
        self.calls = []

    def __call__(self, inputs, max_length=None, stop_token_ids="auto", **kwargs):
        self.calls.append(
            dict(inputs=inputs, max_length=max_length, stop_token_ids=stop_token_ids)
        )
        self.calls[-1].update(kwargs)
        return self.reply


def test_chat_passes_stops_and_cuts_at_the_marker(causal_lm, ids, monkeypatch):
    # With random weights the model rarely emits <end_of_turn>; a stand-in
    # for generate shows what chat() asks for and does with the answer.
    turns = [("user", "Hi"), ("model", "Hello"), ("user", "Bye")]
    fake = _FakeGenerate(f"See you.{END_OF_TURN}{START_OF_TURN}user\nmore")
    monkeypatch.setattr(causal_lm, "generate", fake)
    assert causal_lm.chat(turns, max_length=24) == "See you."
    (call,) = fake.calls
    assert call["inputs"] == format_chat(turns)
    assert call["max_length"] == 24
    assert tuple(call["stop_token_ids"]) == (ids["eos"], ids["eot"])
    assert call["strip_prompt"] is True

    fake.reply = "No marker here."
    assert causal_lm.chat(turns) == "No marker here."
    assert fake.calls[-1]["max_length"] is None


def test_chat_without_end_of_turn_in_vocabulary_stops_at_eos(
    causal_lm, ids, monkeypatch
):
    fake = _FakeGenerate("Hello")
    monkeypatch.setattr(causal_lm, "generate", fake)
    monkeypatch.setattr(causal_lm.preprocessor.tokenizer, "end_of_turn_id", None)
    assert causal_lm.chat([("user", "Hi")]) == "Hello"
    assert tuple(fake.calls[-1]["stop_token_ids"]) == (ids["eos"],)


def test_chat_needs_a_preprocessor(causal_lm):
    bare = RecurrentGemmaCausalLM(causal_lm.backbone, preprocessor=None)
    with pytest.raises(ValueError, match="preprocessor"):
        bare.chat([("user", "Hi")])


def test_chat_refuses_bad_turns_before_generating(causal_lm):
    with pytest.raises(ValueError, match="alternate"):
        causal_lm.chat([("model", "Hi")])


# --- stop_token_ids="auto" and instruction_tuned -----------------------------


class _Recorder:
    """Wraps `generate_postprocess` to keep the token ids generation made."""

    def __init__(self, preprocessor):
        self.postprocess = preprocessor.generate_postprocess
        self.outputs = []

    def __call__(self, x):
        self.outputs.append({k: keras.ops.convert_to_numpy(v) for k, v in x.items()})
        return self.postprocess(x)

    def last(self):
        """(token ids, kept length) of the last single-prompt generation."""
        out = self.outputs[-1]
        return out["token_ids"][0].tolist(), int(out["padding_mask"][0].sum())


def _prompt_and_first_token(causal_lm, recorder, ids):
    """A prompt and the token greedy decoding emits first after it.

    The token must not occur in the prompt (swapping its embedding row would
    change the prompt) and must be no special or turn token.
    """
    tokenizer = causal_lm.preprocessor.tokenizer
    for prompt in PROMPTS:
        prompt_ids = [ids["bos"]] + np.asarray(tokenizer(prompt)).tolist()
        causal_lm.generate(prompt)  # "auto": (<eos>,) for this model
        token_ids, _ = recorder.last()
        first = token_ids[len(prompt_ids)]
        if first not in prompt_ids and first not in ids.values():
            return prompt, prompt_ids, first
    pytest.fail("no candidate prompt has a usable first token")


def _swap_rows(variable, i, j):
    values = keras.ops.convert_to_numpy(variable).copy()
    values[[i, j]] = values[[j, i]]
    variable.assign(values)


def test_auto_stops_at_end_of_turn_only_when_instruction_tuned(
    causal_lm, it_causal_lm, ids, monkeypatch
):
    preprocessor = causal_lm.preprocessor
    recorder = _Recorder(preprocessor)
    monkeypatch.setattr(preprocessor, "generate_postprocess", recorder)
    prompt, prompt_ids, first = _prompt_and_first_token(causal_lm, recorder, ids)
    n = len(prompt_ids)

    embeddings = causal_lm.backbone.token_embedding.embeddings
    _swap_rows(embeddings, first, ids["eot"])
    try:
        # Both models now emit <end_of_turn> right after the prompt.
        it_text = it_causal_lm.generate(prompt)
        it_tokens, it_kept = recorder.last()
        base_text = causal_lm.generate(prompt)
        base_tokens, base_kept = recorder.last()
        # The same stops given explicitly, on the other model each.
        explicit_it = causal_lm.generate(
            prompt, stop_token_ids=(ids["eos"], ids["eot"])
        )
        explicit_base = causal_lm.generate(prompt, stop_token_ids=(ids["eos"],))
    finally:
        _swap_rows(embeddings, first, ids["eot"])

    assert it_tokens[n] == ids["eot"] and base_tokens[n] == ids["eot"]
    # instruction_tuned: "auto" ends the output at the marker...
    assert it_kept == n + 1
    assert it_text == prompt + END_OF_TURN
    # ...a base model's "auto" (<eos> only) generates past it.
    assert base_kept > n + 1
    assert base_text.startswith(it_text) and len(base_text) > len(it_text)
    # "auto" is exactly the explicit stop ids.
    assert explicit_it == it_text
    assert explicit_base == base_text


def test_instruction_tuned_needs_end_of_turn_for_auto(
    it_causal_lm, causal_lm, ids, monkeypatch
):
    monkeypatch.setattr(causal_lm.preprocessor.tokenizer, "end_of_turn_id", None)
    with pytest.raises(ValueError, match=END_OF_TURN):
        it_causal_lm.generate("Hello")


def test_instruction_tuned_defaults_to_false(causal_lm, it_causal_lm):
    assert causal_lm.instruction_tuned is False
    assert it_causal_lm.instruction_tuned is True


@pytest.mark.parametrize("instruction_tuned", [True, False])
def test_instruction_tuned_survives_config_round_trip(causal_lm, instruction_tuned):
    lm = RecurrentGemmaCausalLM(
        causal_lm.backbone,
        causal_lm.preprocessor,
        instruction_tuned=instruction_tuned,
        prefill_chunk_size=8,
    )
    config = lm.get_config()
    assert config["instruction_tuned"] is instruction_tuned
    # from_config deserializes the sub-layers inside the dict it is given.
    restored = RecurrentGemmaCausalLM.from_config(copy.deepcopy(config))
    assert restored.instruction_tuned is instruction_tuned
    assert restored.prefill_chunk_size == 8
    assert restored.get_config()["instruction_tuned"] is instruction_tuned
