"""The command line: `python -m keras_recurrentgemma generate|chat`.

Keras reads `KERAS_BACKEND` once, when it is first imported, so this module
imports nothing that imports Keras until `--backend` has been applied; the
package's `__init__` is lazy for the same reason. The arguments, and the
parser that reads them, are in `cli_parser`.
"""

import os
import sys

# `noqa`: names defined in `cli_parser` that other modules import from here.
from keras_recurrentgemma.cli_parser import BACKENDS  # noqa: F401
from keras_recurrentgemma.cli_parser import DEFAULT_CHAT_MAX_LENGTH  # noqa: F401
from keras_recurrentgemma.cli_parser import DEFAULT_MAX_LENGTH  # noqa: F401
from keras_recurrentgemma.cli_parser import PROG
from keras_recurrentgemma.cli_parser import _backend_option
from keras_recurrentgemma.cli_parser import build_parser


class CLIError(Exception):
    """A failure to report as `error: <message>`, without a traceback."""


def main(argv=None):
    """Runs the command line; returns the exit status.

    Args:
        argv: list of str, the arguments after the program name. Defaults to
            `sys.argv[1:]`.

    Returns:
        int: 0 on success, 1 on an error reported on stderr, 2 for a usage
        error (from argparse), 130 when interrupted.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        # Before anything imports Keras, including the preset registry that
        # the full parser's help text names.
        _select_backend(_backend_option(argv))
        args = build_parser().parse_args(argv)
        if args.command == "generate":
            return _generate_command(args)
        return _chat_command(args)
    except CLIError as error:
        _flush_stdout()
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        _flush_stdout()
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader (e.g. `| head`) went away: stop quietly, and keep
        # Python from complaining again when it flushes stdout at exit.
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


# --- Backend ------------------------------------------------------------------


def _select_backend(backend):
    if backend is None:
        return
    if "keras" in sys.modules:
        import keras

        current = keras.config.backend()
        if current != backend:
            raise CLIError(
                f"Keras is already imported with the {current} backend in this "
                f"process, so --backend {backend} cannot take effect. Run "
                f"`{PROG} --backend {backend} ...` in a new process, or set "
                f"KERAS_BACKEND={backend} before Keras is imported."
            )
        return
    os.environ["KERAS_BACKEND"] = backend


# --- Commands -----------------------------------------------------------------


def _generate_command(args):
    prompt = args.prompt
    if prompt is None or prompt == "-":
        prompt = sys.stdin.read()
        # `echo` ends its text with a newline that is not part of it.
        prompt = prompt[:-1] if prompt.endswith("\n") else prompt
    causal_lm = _load(args.preset)
    reply = _start(causal_lm, prompt, args.max_length, args, "auto")
    if not args.strip_prompt:
        _write(prompt)
    _print_reply(reply)
    if reply.prompt_length >= args.max_length:
        print(
            f"note: the prompt fills --max-length {args.max_length}; nothing "
            "was generated.",
            file=sys.stderr,
        )
    return 0


def _chat_command(args):
    causal_lm = _load(args.preset)
    if not causal_lm.instruction_tuned and not args.force:
        raise CLIError(
            f"preset {args.preset!r} is not instruction-tuned "
            "(its causal LM has instruction_tuned=False), so it was not trained "
            f"to chat. Use `{PROG} generate` to continue text, or pass --force "
            "to chat anyway."
        )
    tokenizer = causal_lm.preprocessor.tokenizer
    if tokenizer.end_of_turn_id is None:
        raise CLIError(
            f"the vocabulary of preset {args.preset!r} has no <end_of_turn> "
            "token, so it cannot mark the end of a turn."
        )
    from keras_recurrentgemma.generation import chat_stop_token_ids

    # As `RecurrentGemmaCausalLM.chat`: a reply ends at either.
    stops = chat_stop_token_ids(tokenizer)
    history = []
    if args.message is not None:
        _chat_turn(causal_lm, history, args.message, stops, args)
        return 0
    interactive = sys.stdin.isatty()
    if interactive:
        print(
            f"Chatting with {args.preset}. One message per line; end with Ctrl-D.",
            file=sys.stderr,
        )
    while True:
        line = _read_turn(interactive)
        if line is None:
            return 0
        if not line.strip():
            continue
        try:
            _chat_turn(causal_lm, history, line, stops, args)
        except CLIError as error:
            # One message that cannot be answered ends nothing else.
            _flush_stdout()
            print(f"error: {error}", file=sys.stderr)


def _read_turn(interactive):
    if interactive:
        try:
            return input("> ")
        except EOFError:
            print(file=sys.stderr)
            return None
    line = sys.stdin.readline()
    if not line:
        return None
    return line.rstrip("\r\n")


def _chat_turn(causal_lm, history, message, stops, args):
    """Answers `message`, appending both turns to `history` on success."""
    from keras_recurrentgemma.chat import format_chat

    system = [{"role": "system", "content": args.system}] if args.system else []
    turns = history + [{"role": "user", "content": message}]
    dropped = _fit_conversation(causal_lm, system, turns, args.max_length)
    if dropped:
        del history[:dropped]
        turns = turns[dropped:]
        print(
            f"note: dropped the oldest {dropped} turns so the conversation fits "
            f"--max-length {args.max_length}.",
            file=sys.stderr,
        )
    prompt = format_chat(system + turns)
    reply = _start(causal_lm, prompt, args.max_length, args, stops)
    _print_reply(reply)
    if reply.finish_reason == "length":
        print(
            f"note: the reply was cut off at --max-length {args.max_length}.",
            file=sys.stderr,
        )
    history.append(turns[-1])
    history.append({"role": "model", "content": reply.text})


def _fit_conversation(causal_lm, system, turns, max_length):
    """How many of the oldest `turns` to drop so the rest leave room to reply.

    Whole user/model pairs go, oldest first, until the prompt leaves a
    quarter of `max_length` for the reply; the last user turn always stays
    as long as one reply token fits after it.

    Raises:
        CLIError: if the last user turn alone leaves no room.
    """
    from keras_recurrentgemma.chat import format_chat
    from keras_recurrentgemma.streaming import prompt_token_ids

    def length(kept):
        return len(prompt_token_ids(causal_lm, format_chat(system + kept)))

    room = max(1, max_length // 4)
    dropped = 0
    while dropped < len(turns) - 1 and length(turns[dropped:]) > max_length - room:
        dropped += 2
    last = length(turns[dropped:])
    if last >= max_length:
        raise CLIError(
            f"this message makes a prompt of {last} tokens (with the chat "
            f"format{' and --system' if system else ''}), leaving no room for a "
            f"reply within --max-length {max_length}. Shorten it or raise "
            "--max-length."
        )
    return dropped


# --- Generation ---------------------------------------------------------------


def _load(preset):
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    try:
        causal_lm = RecurrentGemmaCausalLM.from_preset(preset)
    except Exception as error:  # the library's message says what was wrong
        raise CLIError(f"cannot load preset {preset!r}: {error}") from error
    if causal_lm.preprocessor is None:
        raise CLIError(f"preset {preset!r} has no preprocessor (tokenizer).")
    return causal_lm


def _sampler(args):
    """The sampler of `--sampler` and its options, for this command's calls."""
    from keras_recurrentgemma.generation import get_sampler

    k = {"beam": "num_beams"}.get(args.sampler, "k")
    config = {"temperature": args.temperature}
    if args.sampler in ("top_k", "top_p", "contrastive", "beam"):
        config[k] = args.k
    if args.sampler == "top_p":
        config["p"] = args.p
    return get_sampler(args.sampler, seed=args.seed, **config)


def _start(causal_lm, prompt, max_length, args, stop_token_ids):
    """The reply, through the public calls: a `TextStream` from
    `stream_generate`, or `_Generated` text from `generate` with this
    command's sampler for the one call (beam and contrastive search cannot
    stream; `--no-stream`)."""
    from keras_recurrentgemma.generation import STREAMING_SAMPLERS
    from keras_recurrentgemma.streaming import prompt_token_ids
    from keras_recurrentgemma.streaming import stream_generate
    from keras_recurrentgemma.tokenizer import END_OF_TURN

    prompt_length = len(prompt_token_ids(causal_lm, prompt))
    if prompt_length > max_length:
        raise CLIError(
            f"the prompt is {prompt_length} tokens long (with <bos>), more "
            f"than --max-length {max_length} (prompt plus new tokens). Raise "
            "--max-length or shorten the prompt."
        )
    sampler = _sampler(args)
    if not args.no_stream and args.sampler in STREAMING_SAMPLERS:
        return stream_generate(
            causal_lm, prompt, max_length, sampler, stop_token_ids=stop_token_ids
        )
    text = causal_lm.generate(
        prompt,
        max_length=max_length,
        stop_token_ids=stop_token_ids,
        strip_prompt=True,
        sampler=sampler,
    )
    # Unlike `<eos>`, `<end_of_turn>` is not special: its text is cut off
    # here, as `chat` does.
    tokenizer = causal_lm.preprocessor.tokenizer
    end = text.find(END_OF_TURN)
    stops = causal_lm.resolve_stop_token_ids(stop_token_ids) or ()
    if end >= 0 and tokenizer.end_of_turn_id in stops:
        text = text[:end]
    return _Generated(causal_lm, text, prompt_length, max_length)


class _Generated:
    """A reply generated at once, read in one piece. `generate` returns
    text, so `finish_reason` is estimated from the text re-tokenized:
    `"length"` when prompt and reply fill `max_length`, else `"stop"`."""

    def __init__(self, causal_lm, text, prompt_length, max_length):
        self.text = text
        self.prompt_length = prompt_length
        num_tokens = prompt_length + len(causal_lm.preprocessor.tokenizer(text))
        self.finish_reason = "length" if num_tokens >= max_length else "stop"

    def __iter__(self):
        return iter([self.text] if self.text else [])


def _print_reply(reply):
    for piece in reply:
        _write(piece)
    if not reply.text.endswith("\n"):
        _write("\n")


# --- Output -------------------------------------------------------------------


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def _flush_stdout():
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
