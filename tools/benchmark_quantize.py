"""What `quantize` saves and costs: weight bytes, logit error, perplexity,
greedy agreement and generate time, before and after, as JSON.

Each mode of `--modes` (default int8 and int4) quantizes its own fresh copy
of the model, and is compared with the same float measurements.

Two models: the shipped preset `griffin_tiny_pydocs_en` (trained) and a tiny
Griffin with the initializers' random weights on the preset's tokenizer. The
text below was written for this script, so the preset never trained on it;
it is in the style of its Python documentation corpus.

Logit error is over real (unpadded) positions of the whole text batch:
`max_abs_error`, and `relative_error = max|q - f| / max|f|` (the test suite's
measure); `top1_agreement` is how often the quantized model's argmax equals
the float model's on the same context. Greedy generation appends
`--new-tokens` tokens to the first `--prompt-length` tokens of each text:
`agreement` compares the two runs position by position (after a first
difference they usually part ways), `first_difference` is the mean index of
the first differing new token (`--new-tokens` where none differs), and
`float_choice_agreement` is how often the float model, given the int8 run's
prefix, would have picked the int8 run's next token.
`float_repeats_previous_token` flags a degenerate float model (near 1: it
only repeats the last token, and agreement means little). `perplexity` is
`exp` of the mean next-token cross-entropy over the texts' real tokens, for
the float and the quantized model alike. `generate_s` is
the median of `--repeats` calls after a first, compiling one.

    KERAS_BACKEND=jax python tools/benchmark_quantize.py
    KERAS_BACKEND=torch python tools/benchmark_quantize.py --models tiny --modes int8
"""

import argparse
import json
import os
import platform
import statistics
import time

import numpy as np

TEXTS = (
    "The function returns a new list containing the items of the iterable in "
    "sorted order. The optional key argument specifies a function of one "
    "argument that is used to extract a comparison key from each element.",
    "When the file is opened in text mode, the contents are returned as a "
    "string, decoded using the encoding given by the caller or the platform "
    "default. Reading past the end of the file returns an empty string.",
    "A dictionary maps hashable keys to arbitrary objects. Lookups, "
    "insertions and deletions take constant time on average, and the order "
    "in which keys were inserted is preserved when the mapping is iterated.",
    "If the timeout is not given or is None, the call blocks until the "
    "operation completes. Otherwise an exception is raised when the timeout "
    "expires before the thread has finished its work.",
)
TINY_CONFIG = dict(
    hidden_dim=64,
    intermediate_dim=192,
    num_heads=4,
    block_types=["recurrent", "recurrent", "attention"],
    attention_window_size=16,
)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "--models",
        nargs="+",
        choices=("preset", "tiny"),
        default=["preset", "tiny"],
    )
    parser.add_argument("--preset", default="griffin_tiny_pydocs_en")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=("int8", "int4"),
        default=["int8", "int4"],
        help="quantization modes, each on a fresh copy (default int8 int4)",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=48,
        help="tokens per text for the logit comparison (default 48)",
    )
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed generate calls after warm-up"
    )
    parser.add_argument("--seed", type=int, default=0, help="tiny model's weights")
    args = parser.parse_args(argv)
    for name in ("sequence_length", "prompt_length", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.prompt_length > args.sequence_length:
        parser.error("--prompt-length must not exceed --sequence-length")
    return args


def weight_bytes(model):
    return int(
        sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.weights)
    )


def tokenize(tokenizer, length):
    """Each text as `<bos>` + its first `length - 1` tokens, right padded."""
    token_ids = np.zeros((len(TEXTS), length), "int32")
    padding_mask = np.zeros((len(TEXTS), length), "int32")
    for i, text in enumerate(TEXTS):
        ids = [tokenizer.start_token_id]
        ids += [int(t) for t in np.asarray(tokenizer.tokenize(text))]
        ids = ids[:length]
        token_ids[i, : len(ids)] = ids
        padding_mask[i, : len(ids)] = 1
    return token_ids, padding_mask


def measure(causal_lm, token_ids, padding_mask, args):
    """Logits on the text batch, greedy continuations and generate times."""
    from keras import ops

    logits = ops.convert_to_numpy(causal_lm.score(token_ids, padding_mask))
    max_length = args.prompt_length + args.new_tokens
    prompts = np.zeros((len(TEXTS), max_length), "int32")
    prompts[:, : args.prompt_length] = token_ids[:, : args.prompt_length]
    mask = np.zeros_like(prompts)
    mask[:, : args.prompt_length] = 1
    inputs = {"token_ids": prompts, "padding_mask": mask}
    generate = causal_lm.make_generate_function()
    times = []
    for _ in range(args.repeats + 1):
        start = time.perf_counter()
        out = ops.convert_to_numpy(generate(inputs, stop_token_ids=None)["token_ids"])
        times.append(time.perf_counter() - start)
    return {
        "logits": np.asarray(logits, np.float64),
        "generated": out,
        "first_generate_s": round(times[0], 3),
        "generate_s": round(statistics.median(times[1:]), 4),
    }


def perplexity(logits, token_ids, padding_mask):
    """`exp` of the mean cross-entropy of each real token given its prefix."""
    logits = logits[:, :-1]
    targets = token_ids[:, 1:]
    real = padding_mask[:, 1:].astype(bool)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    picked = np.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    return float(np.exp(-picked[real].mean()))


def compare(before, reference, quantized, mode, inputs, args):
    """Quantizes `quantized` (a copy of `reference`) and measures both.

    `before` is `measure(reference, ...)`, shared by every mode.
    """
    from keras import ops

    token_ids, padding_mask = inputs
    quantized.compile(sampler="greedy")
    float_bytes = weight_bytes(quantized.backbone)
    params = int(quantized.backbone.count_params())
    quantized.quantize(mode)
    after = measure(quantized, token_ids, padding_mask, args)

    real = padding_mask.astype(bool)
    f, q = before["logits"][real], after["logits"][real]
    diff = np.abs(q - f)
    start = args.prompt_length
    float_new = before["generated"][:, start:]
    quantized_new = after["generated"][:, start:]
    same = float_new == quantized_new
    first = [int(np.argmin(row)) if not row.all() else row.size for row in same]
    # The float model's greedy choice after each prefix of the quantized run.
    choices = ops.convert_to_numpy(reference.score(after["generated"])).argmax(-1)
    quantized_bytes = weight_bytes(quantized.backbone)
    return {
        "params": params,
        "weight_bytes": {
            "float": float_bytes,
            "quantized": quantized_bytes,
            "ratio": round(quantized_bytes / float_bytes, 4),
        },
        "perplexity": {
            "float": perplexity(before["logits"], token_ids, padding_mask),
            "quantized": perplexity(after["logits"], token_ids, padding_mask),
        },
        "logits": {
            "positions": int(real.sum()),
            "max_abs_error": float(diff.max()),
            "relative_error": float(diff.max() / np.abs(f).max()),
            "max_abs_float_logit": float(np.abs(f).max()),
            "top1_agreement": float(np.mean(q.argmax(-1) == f.argmax(-1))),
        },
        "greedy": {
            "prompts": len(TEXTS),
            "new_tokens": args.new_tokens,
            "agreement": float(same.mean()),
            "first_difference": float(np.mean(first)),
            "float_choice_agreement": float(
                np.mean(quantized_new == choices[:, start - 1 : -1])
            ),
            "float_repeats_previous_token": float(
                np.mean(float_new == before["generated"][:, start - 1 : -1])
            ),
        },
        "generate_s": {
            "float": before["generate_s"],
            "quantized": after["generate_s"],
            "float_first_call": before["first_generate_s"],
            "quantized_first_call": after["first_generate_s"],
        },
    }


def compare_modes(make_model, args):
    """`{mode: compare(...)}`: one float model, one fresh copy per mode."""
    reference = make_model()
    inputs = tokenize(reference.preprocessor.tokenizer, args.sequence_length)
    if inputs[1].sum(axis=1).min() < args.prompt_length:
        raise ValueError(
            f"A text is shorter than --prompt-length={args.prompt_length}."
        )
    reference.compile(sampler="greedy")
    before = measure(reference, *inputs, args)
    return {
        mode: compare(before, reference, make_model(), mode, inputs, args)
        for mode in args.modes
    }


def tiny_model(preset, seed):
    """A random Griffin on the preset's tokenizer, so the texts tokenize."""
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM
    from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor

    preprocessor = RecurrentGemmaCausalLMPreprocessor.from_preset(preset)
    keras.utils.set_random_seed(seed)
    backbone = RecurrentGemmaBackbone(
        vocabulary_size=preprocessor.tokenizer.vocabulary_size(), **TINY_CONFIG
    )
    return RecurrentGemmaCausalLM(backbone, preprocessor)


def main(argv=None):
    args = parse_args(argv)
    import keras

    from keras_recurrentgemma import RecurrentGemmaCausalLM

    results = {
        "backend": keras.config.backend(),
        "keras": keras.__version__,
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "modes": list(args.modes),
        "models": {},
    }
    for name in args.models:
        if name == "preset":

            def make_model():
                return RecurrentGemmaCausalLM.from_preset(args.preset)

            key = args.preset
        else:

            def make_model():
                return tiny_model(args.preset, args.seed)

            key = f"tiny_random_seed{args.seed}"
        results["models"][key] = compare_modes(make_model, args)
    print(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
