"""The command line's arguments: the parser of `generate` and `chat`.

`build_parser` builds the full parser, whose help text and sampler choices
import the preset registry and `keras_recurrentgemma.generation`, so
`keras_recurrentgemma.cli` first finds `--backend` with `_backend_option`,
which imports nothing, and applies it. Also here: the argument types
(`_positive`, `_probability`) and the defaults the help text shows.
"""

import argparse

PROG = "python -m keras_recurrentgemma"
BACKENDS = ("jax", "tensorflow", "torch")
DEFAULT_MAX_LENGTH = 128
DEFAULT_CHAT_MAX_LENGTH = 512


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


def _backend_option(argv):
    """The value of `--backend` in `argv`, found without the full parser.

    Values that are not a backend are left to the full parser to refuse.
    """
    pre = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    pre.add_argument("--backend")
    known, _ = pre.parse_known_args(argv)
    return known.backend if known.backend in BACKENDS else None


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
