"""Reduced-precision policies against float32: logit error, greedy agreement
over long generations, and a search for NaN/Inf, as JSON.

For each model and each policy in `--policies`, the same weights are loaded
under the policy and compared with the float32 model:

- `logits`: over the float32 model's greedy sequences (prompt plus
  `--new-tokens` tokens), teacher-forced: `max_abs_error`,
  `relative_error = max|p - f| / max|f|` (the test suite's measure) and
  `argmax_agreement`, how often the policy's next-token choice at a new
  position equals the float32 model's.
- `greedy`: the policy's own greedy run from the same prompts:
  `agreement` position by position with the float32 run (after a first
  difference the runs usually part ways) and the mean index of the
  `first_difference` (`--new-tokens` where none differs).
- `finite`: whether every logit, every residual-stream activation and every
  cache tensor after the run is finite; `max_abs_activation` is the largest
  residual-stream value, to compare with float16's 65504.

Models: `small`, the shipped preset `griffin_tiny_pydocs_en` (trained), and
`tiny`, a Griffin with its initializers' random weights on the preset's
tokenizer.

    KERAS_BACKEND=jax python tools/benchmark_numerics.py
    KERAS_BACKEND=torch python tools/benchmark_numerics.py --models small
"""

import argparse
import json
import os
import platform

import numpy as np
from benchmark_quantize import TEXTS
from benchmark_quantize import TINY_CONFIG
from benchmark_quantize import tokenize

POLICIES = ("float16", "mixed_float16", "bfloat16", "mixed_bfloat16")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--models", nargs="+", choices=("small", "tiny"), default=["small", "tiny"]
    )
    parser.add_argument("--preset", default="griffin_tiny_pydocs_en")
    parser.add_argument("--policies", nargs="+", choices=POLICIES, default=POLICIES)
    parser.add_argument("--prompt-length", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0, help="tiny model's weights")
    args = parser.parse_args(argv)
    if args.prompt_length < 1 or args.new_tokens < 1:
        parser.error("--prompt-length and --new-tokens must be >= 1")
    return args


def load(args, model, dtype):
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    small = RecurrentGemmaCausalLM.from_preset(args.preset, dtype=dtype)
    if model == "small":
        return small
    keras.utils.set_random_seed(args.seed)
    tokenizer = small.preprocessor.tokenizer
    backbone = RecurrentGemmaBackbone(
        vocabulary_size=tokenizer.vocabulary_size(), **TINY_CONFIG, dtype=dtype
    )
    return RecurrentGemmaCausalLM(backbone, small.preprocessor)


def greedy(causal_lm, prompts, args):
    from keras import ops

    max_length = args.prompt_length + args.new_tokens
    token_ids = np.zeros((len(prompts), max_length), "int32")
    token_ids[:, : args.prompt_length] = prompts
    mask = np.zeros_like(token_ids)
    mask[:, : args.prompt_length] = 1
    causal_lm.compile(sampler="greedy")
    generate = causal_lm.make_generate_function()
    out = generate({"token_ids": token_ids, "padding_mask": mask}, None)
    return ops.convert_to_numpy(out["token_ids"])


def forward(causal_lm, sequences):
    """Teacher-forced logits, the residual stream's largest value, finiteness."""
    from keras import ops

    largest = [0.0]
    finite = [True]

    def watch(x, i):
        values = ops.convert_to_numpy(ops.cast(x, "float32"))
        finite[0] &= bool(np.isfinite(values).all())
        largest[0] = max(largest[0], float(np.abs(values).max()))
        return x

    logits = ops.convert_to_numpy(
        ops.cast(causal_lm.score(sequences, layer_intercept_fn=watch), "float32")
    )
    cache = causal_lm.prefill(sequences)
    cache_finite = all(
        bool(np.isfinite(ops.convert_to_numpy(ops.cast(t, "float32"))).all())
        for t in _leaves(cache)
        if "float" in str(t.dtype)
    )
    return np.asarray(logits, np.float64), largest[0], finite[0], cache_finite


def _leaves(tree):
    import keras

    return keras.tree.flatten(tree)


def compare(args, model):
    reference = load(args, model, "float32")
    token_ids, _ = tokenize(reference.preprocessor.tokenizer, args.prompt_length)
    sequences = greedy(reference, token_ids, args)
    f, f_max, _, _ = forward(reference, sequences)
    start = args.prompt_length
    positions = slice(start - 1, -1)  # logits that chose the new tokens
    results = {
        "params": int(reference.backbone.count_params()),
        "float32_max_abs_activation": f_max,
    }
    for policy in args.policies:
        candidate = load(args, model, policy)
        candidate.backbone.set_weights(reference.backbone.get_weights())
        p, p_max, activations_finite, cache_finite = forward(candidate, sequences)
        own = greedy(candidate, token_ids, args)
        same = own[:, start:] == sequences[:, start:]
        first = [int(np.argmin(row)) if not row.all() else row.size for row in same]
        diff = np.abs(p - f)
        results[policy] = {
            "logits": {
                "max_abs_error": float(diff.max()),
                "relative_error": float(diff.max() / np.abs(f).max()),
                "argmax_agreement": float(
                    np.mean(p[:, positions].argmax(-1) == sequences[:, start:])
                ),
            },
            "greedy": {
                "agreement": float(same.mean()),
                "first_difference": float(np.mean(first)),
            },
            "finite": {
                "logits": bool(np.isfinite(p).all()),
                "activations": activations_finite,
                "cache": cache_finite,
            },
            "max_abs_activation": p_max,
        }
    return results


def main(argv=None):
    args = parse_args(argv)
    import keras

    report = {
        "backend": keras.config.backend(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "prompts": len(TEXTS),
        "prompt_length": args.prompt_length,
        "new_tokens": args.new_tokens,
    }
    for model in args.models:
        report[model] = compare(args, model)
    print(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
