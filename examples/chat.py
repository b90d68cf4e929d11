"""Hold a conversation with an instruction-tuned RecurrentGemma preset.

    python examples/chat.py --preset recurrentgemma_instruct_2b_en
    python examples/chat.py --preset recurrentgemma_instruct_2b_en --interactive
    python examples/chat.py --force     # the shipped tiny model: the API only

Each turn calls `RecurrentGemmaCausalLM.chat(turns, max_length)`: it formats
the conversation with `keras_recurrentgemma.format_chat` (the
`<start_of_turn>user ... <end_of_turn>` format the -it models were trained
on), generates until `<end_of_turn>` and returns the reply alone. The
script keeps the list of turns, and drops the oldest exchanges when the
conversation no longer leaves room for a reply within `--max-length`; a
message too long to answer at all is reported and skipped.

Without `--interactive` it plays the `--message`s given (or three built-in
ones). The default preset, `griffin_tiny_pydocs_en`, is NOT instruction-tuned:
it only continues Python-docs prose and has never seen a turn marker, so its
"replies" are not answers. It is refused unless `--force`, which runs the
same code to show the API offline.
"""

import argparse
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402
from keras_recurrentgemma import format_chat  # noqa: E402

DEFAULT_MESSAGES = [
    "What does the len() function return?",
    "And for a dictionary?",
    "Thanks! Summarise both answers in one sentence.",
]


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="griffin_tiny_pydocs_en")
    parser.add_argument(
        "--message",
        action="append",
        help="a user turn; repeat for several (default: three built-in turns)",
    )
    parser.add_argument(
        "--interactive",
        action="store_true",
        help="read one user turn per line of stdin until end of file",
    )
    parser.add_argument("--system", help="instructions put before the first user turn")
    parser.add_argument(
        "--max-length",
        type=int,
        default=256,
        help="conversation so far plus the reply, in tokens (default: %(default)s)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="chat even with a preset that is not instruction-tuned",
    )
    args = parser.parse_args(argv)
    args.message = args.message or list(DEFAULT_MESSAGES)
    return args


def prompt_length(causal_lm, turns):
    """Tokens of the prompt `chat` would build from `turns`, `<bos>` included."""
    ids = causal_lm.preprocessor.tokenizer(format_chat(turns))
    return int(np.asarray(ids).size) + 1


def trim(causal_lm, system, turns, max_length):
    """Drops the oldest user/model pairs until a quarter of `max_length` is free.

    The turns must stay user-first and alternating, so pairs go together; the
    newest user turn is never dropped.
    """
    room = max_length - max_length // 4
    while len(turns) > 1 and prompt_length(causal_lm, system + turns) > room:
        turns = turns[2:]
    return turns


def user_turns(args):
    if not args.interactive:
        yield from args.message
        return
    for line in sys.stdin:
        if line.strip():
            yield line.rstrip("\n")


def main(argv=None):
    """Runs the conversation; returns its turns, system turn excluded."""
    args = parse_args(argv)
    causal_lm = RecurrentGemmaCausalLM.from_preset(args.preset)
    if not causal_lm.instruction_tuned:
        note = (
            f"{args.preset} is not instruction-tuned: it was never trained on "
            "conversations, so its replies will not answer anything."
        )
        if not args.force:
            sys.exit(
                f"{note} Pass an -it preset (e.g. --preset "
                "recurrentgemma_instruct_2b_en), or --force to run anyway."
            )
        print(f"note: {note} Running anyway (--force).\n", file=sys.stderr)

    system = [{"role": "system", "content": args.system}] if args.system else []
    history = []
    for message in user_turns(args):
        turns = history + [{"role": "user", "content": message}]
        turns = trim(causal_lm, system, turns, args.max_length)
        try:
            reply = causal_lm.chat(system + turns, max_length=args.max_length)
        except ValueError as error:  # a message that alone fills --max-length
            print(f"error: {error}", file=sys.stderr)
            continue
        history = turns + [{"role": "model", "content": reply}]
        print(f"user> {message}")
        print(f"model> {reply.strip()}\n")
    return history


if __name__ == "__main__":
    main()
