"""Continue prompts with a RecurrentGemma preset, on any Keras backend.

    KERAS_BACKEND=jax python examples/generate.py
    KERAS_BACKEND=torch python examples/generate.py --sampler top_k --seed 1
    python examples/generate.py --prompt "A list is" --prompt "The module"
    python examples/generate.py --preset recurrentgemma_2b_en --max-length 128

The default preset, `griffin_tiny_pydocs_en`, ships with the package: a small
Griffin trained on the Python documentation, so this runs offline in
seconds and writes Python-docs English. The official presets download from
Hugging Face once their licence is accepted (see the README).

Repeat `--prompt` to generate a batch. `--max-length` counts each prompt
(with `<bos>`) plus its new tokens. The first `generate` after `compile`
traces and compiles the sampling loop; later calls with the same
`--max-length` reuse it.
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import keras_hub  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402

DEFAULT_PROMPTS = ["The function", "A list is"]
SAMPLERS = ("greedy", "top_k", "top_p", "random", "beam", "contrastive")
SEEDED_SAMPLERS = ("top_k", "top_p", "random")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset",
        default="griffin_tiny_pydocs_en",
        help="preset name, preset directory, hf:// or kaggle:// handle "
        "(default: %(default)s)",
    )
    parser.add_argument(
        "--prompt",
        action="append",
        help=f"text to continue; repeat for a batch (default: {DEFAULT_PROMPTS})",
    )
    parser.add_argument(
        "--max-length",
        type=int,
        default=64,
        help="prompt plus new tokens (default: %(default)s)",
    )
    parser.add_argument("--sampler", choices=SAMPLERS, default="greedy")
    parser.add_argument(
        "--seed", type=int, default=None, help="seed of top_k, top_p and random"
    )
    args = parser.parse_args(argv)
    args.prompt = args.prompt or list(DEFAULT_PROMPTS)
    return args


def make_sampler(name, seed=None):
    """A `keras_hub.samplers.Sampler`; only the random ones take a seed."""
    config = {"seed": seed} if name in SEEDED_SAMPLERS and seed is not None else {}
    return keras_hub.samplers.get({"class_name": name, "config": config})


def main(argv=None):
    """Generates from each prompt and prints the texts; returns them."""
    args = parse_args(argv)
    causal_lm = RecurrentGemmaCausalLM.from_preset(args.preset)
    causal_lm.compile(sampler=make_sampler(args.sampler, args.seed))
    print(f"{args.preset} on {keras.config.backend()}, sampler {args.sampler}")

    start = time.perf_counter()
    texts = causal_lm.generate(args.prompt, max_length=args.max_length)
    seconds = time.perf_counter() - start
    for text in texts:
        print("-" * 72)
        print(text)
    print("-" * 72)
    print(f"{len(texts)} prompt(s) in {seconds:.1f}s, compilation included")
    return texts


if __name__ == "__main__":
    main()
