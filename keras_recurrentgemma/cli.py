"""The command line: `python -m keras_recurrentgemma generate|chat`.

Keras reads `KERAS_BACKEND` once, when it is first imported, so this module
imports nothing that imports Keras until `--backend` has been applied; the
package's `__init__` is lazy for the same reason.
"""

import argparse
import os
import sys

PROG = "python -m keras_recurrentgemma"
BACKENDS = ("jax", "tensorflow", "torch")
DEFAULT_MAX_LENGTH = 128
DEFAULT_CHAT_MAX_LENGTH = 512


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


def build_parser():
    """The `argparse` parser of both commands (after `--backend` is applied:
    the sampler names come from `keras_recurrentgemma.generation`)."""
    from keras_recurrentgemma.presets import DEFAULT_PRESET

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Generate text with RecurrentGemma (Griffin), streamed to "
        "stdout as it is produced.",
        epilog=f"See `{PROG} COMMAND --help` for each command's options.",
        parents=[_common_options(DEFAULT_PRESET, suppress=False)],
        allow_abbrev=False,
    )
    # The shared options go before or after the command. The command's
    # copies default to nothing, so they override only what they are given.
    common = _common_options(DEFAULT_PRESET, suppress=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    generate = commands.add_parser(
        "generate",
        parents=[common],
        allow_abbrev=False,
        help="continue a prompt",
        description="Continue PROMPT and print it with its continuation. "
        "Generation stops at <eos> (and <end_of_turn> for instruction-tuned "
        "presets) or after --max-length tokens.",
    )
    generate.add_argument(
        "prompt",
        nargs="?",
        help="the text to continue; '-' or none reads it from stdin (less one "
        "final newline)",
    )
    generate.add_argument(
        "--max-length",
        type=_positive(int),
        default=DEFAULT_MAX_LENGTH,
        help="prompt (with <bos>) plus new tokens (default: %(default)s)",
    )
    generate.add_argument(
        "--strip-prompt",
        action="store_true",
        help="print only the continuation, not the prompt before it",
    )
    chat = commands.add_parser(
        "chat",
        parents=[common],
        allow_abbrev=False,
        help="talk with an instruction-tuned preset",
        description="Talk with an instruction-tuned preset. Reads one user turn "
        "per line of stdin until end of file (with a '> ' prompt on a "
        "terminal) and prints each reply as it is produced; or answers the "
        "one MESSAGE given. When the conversation outgrows --max-length, the "
        "oldest turns are dropped, with a note on stderr.",
    )
    chat.add_argument("message", nargs="?", help="answer this one message and exit")
    chat.add_argument(
        "--max-length",
        type=_positive(int),
        default=DEFAULT_CHAT_MAX_LENGTH,
        help="conversation so far (with <bos>) plus the reply, in tokens "
        "(default: %(default)s)",
    )
    chat.add_argument(
        "--system",
        help="instructions put before the first user turn (the format has no "
        "system role)",
    )
    chat.add_argument(
        "--force",
        action="store_true",
        help="chat even with a preset that is not instruction-tuned",
    )
    return parser


def _common_options(default_preset, suppress):
    """The options of both commands, as a parent parser.

    With `suppress`, an option that is not given sets nothing.
    """

    def default(value):
        return argparse.SUPPRESS if suppress else value

    from keras_recurrentgemma.generation import SAMPLERS

    common = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    common.add_argument(
        "--preset",
        default=default(default_preset),
        help="preset name or preset directory, passed to "
        f"RecurrentGemmaCausalLM.from_preset (default: {default_preset})",
    )
    common.add_argument(
        "--backend",
        choices=BACKENDS,
        default=default(None),
        help="Keras backend; overrides KERAS_BACKEND (default: KERAS_BACKEND, "
        "else Keras's own default)",
    )
    common.add_argument(
        "--sampler",
        choices=SAMPLERS,
        default=default("greedy"),
        help="how each token is chosen (default: greedy); beam and contrastive "
        "cannot stream, so their text is printed when complete",
    )
    common.add_argument(
        "--seed",
        type=int,
        default=default(None),
        help="seed of the random samplers (default: unseeded)",
    )
    common.add_argument(
        "--temperature",
        type=_positive(float),
        default=default(None),
        help="softmax temperature of the sampler (default: 1.0)",
    )
    common.add_argument(
        "--k",
        type=_positive(int),
        default=default(None),
        help="candidates kept by top_k (default 5), top_p (default: all), beam "
        "(beams, default 5) and contrastive (default 5)",
    )
    common.add_argument(
        "--p",
        type=_probability,
        default=default(None),
        help="cumulative probability kept by top_p (default 0.1)",
    )
    common.add_argument(
        "--no-stream",
        action="store_true",
        default=default(False),
        help="print the text once it is complete, generating with "
        "RecurrentGemmaCausalLM.generate",
    )
    return common


# --- Backend ------------------------------------------------------------------


def _backend_option(argv):
    """The value of `--backend` in `argv`, found without the full parser.

    Values that are not a backend are left to the full parser to refuse.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--backend")
    known, _ = pre.parse_known_args(argv)
    return known.backend if known.backend in BACKENDS else None


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


# --- Output and argument types ------------------------------------------------


def _write(text):
    sys.stdout.write(text)
    sys.stdout.flush()


def _flush_stdout():
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass


def _positive(kind):
    def parse(value):
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {kind.__name__}; got {value!r}"
            ) from None
        if number <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0; got {value}")
        return number

    parse.__name__ = kind.__name__
    return parse


def _probability(value):
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a float; got {value!r}") from None
    if not 0 < number <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1]; got {value}")
    return number
