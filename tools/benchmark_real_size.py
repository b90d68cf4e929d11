"""The released sizes, measured beside Hugging Face `transformers` in one run.

Writes a real-format Hugging Face checkpoint of a released config with random
weights (the 2B through `transformers`' own `save_pretrained`; the 9B tensor
by tensor, since it does not fit in memory twice), then runs each
measurement in a fresh process and prints one JSON report:

- HF `from_pretrained` and our `from_preset` (per backend): seconds and
  peak host memory (VmHWM) while loading;
- peak host memory during greedy `generate` (the peak is reset after
  loading) and decode seconds per token, from the difference between
  generating `--new-tokens` and 1 token after a prompt of `--prompt` tokens;
- `--quantize int8|int4`: our loads quantize tensor by tensor as they
  read (the embedding a slice of rows at a time), against the loading bound
  applied to the quantized weights (1.3 x them + 1.5 GiB);
- `--lora BACKEND...`: one LoRA `fit` step of the checkpoint per backend
  (rank 4, batch 1, `--lora-tokens` tokens, bf16 weights; `--remat` for
  `remat=True`): its peak host memory, against weights + 3 GiB, and time;
- `--parity` (2B): float32 logits of ours (JAX) against HF's on the same
  checkpoint over `--parity-tokens` tokens inside the window (relative
  error, the largest |difference| over the largest |logit|), and the first
  32 greedy tokens of each.

The bounds the numbers are read against (issue 18): loading within 1.3 x the
weights + 1.5 GiB and 4x HF's time; generating within 1.3 x the weights +
2.5 GiB; decoding no slower than HF; a LoRA step within the weights + 3 GiB.

    python tools/benchmark_real_size.py --config 2b --parity
    python tools/benchmark_real_size.py --config 9b --backends jax torch \
        --skip-generate jax
    python tools/benchmark_real_size.py --config 9b --backends torch --quantize int8
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

GIB = 2**30
CONFIGS = {
    # transformers' class defaults are not the released 2B: its MLP width is
    # 3 x 2560 (HF stores twice that) and it has one key/value head.
    "2b": dict(hidden_size=2560, intermediate_size=15360, num_hidden_layers=26,
               num_attention_heads=10, num_key_value_heads=1, lru_width=2560),
    "9b": dict(hidden_size=4096, intermediate_size=24576, num_hidden_layers=38,
               num_attention_heads=16, num_key_value_heads=1, lru_width=4096),
}  # fmt: skip


def peak_gib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM"):
                return int(line.split()[1]) * 1024 / GIB
    return float("nan")


def reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def hf_config(name):
    import transformers

    return transformers.RecurrentGemmaConfig(**CONFIGS[name])


def write_checkpoint(name, directory, seed=0):
    """A random-weight checkpoint in the format `save_pretrained` writes."""
    import torch
    import transformers

    config = hf_config(name)
    if name == "2b":
        torch.manual_seed(seed)
        model = transformers.RecurrentGemmaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory)
        return
    # Too large to build: names and shapes from a model on the meta device,
    # values drawn and written one tensor at a time, in 4 GiB shards.
    import ml_dtypes

    with torch.device("meta"):
        model = transformers.RecurrentGemmaForCausalLM(config)
    shapes = {
        k: tuple(v.shape)
        for k, v in model.state_dict().items()
        if k != "lm_head.weight"  # tied, as save_pretrained drops it
    }
    shards, current, size = [], [], 0
    for key, shape in shapes.items():
        nbytes = 2 * int(np.prod(shape))
        if current and size + nbytes > 4 * GIB:
            shards.append(current)
            current, size = [], 0
        current.append(key)
        size += nbytes
    shards.append(current)
    rng = np.random.default_rng(seed)
    os.makedirs(directory, exist_ok=True)
    weight_map = {}
    for i, keys in enumerate(shards):
        filename = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, offset = {"__metadata__": {"format": "pt"}}, 0
        for key in keys:
            nbytes = 2 * int(np.prod(shapes[key]))
            header[key] = dict(dtype="BF16", shape=list(shapes[key]),
                               data_offsets=[offset, offset + nbytes])  # fmt: skip
            offset += nbytes
            weight_map[key] = filename
        text = json.dumps(header).encode()
        text += b" " * (-len(text) % 8)
        with open(os.path.join(directory, filename), "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            for key in keys:
                shape = shapes[key]
                scale = 1 / np.sqrt(shape[-1]) if len(shape) > 1 else 0.1
                values = rng.standard_normal(shape, np.float32) * scale
                f.write(values.astype(ml_dtypes.bfloat16).tobytes())
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    config.save_pretrained(directory)


def prompt_ids(length, seed=0, vocabulary_size=256000):
    return np.random.default_rng(seed).integers(10, vocabulary_size, length)


# --- Children: each runs in a fresh process and prints one JSON line. -------


# Decode steps run before the timed calls, in calls of `--new-tokens`: past
# `compiled_decode.AUTO_MIN_STEPS` (64), after which torch's default CPU
# decode mode has traced its step.
WARMUP_STEPS = 128


def measure_generate(greedy, args):
    """Peak memory of greedy generation and decode seconds per token.

    `greedy(n)` generates `n` tokens. The first calls, one of 1 token and
    one of `--new-tokens`, are timed together as `first_calls_s`: JAX
    compiles, and TensorFlow traces, `generate` once per padded length,
    and HF reads its mapped weights on first use. More calls of
    `--new-tokens` follow until `WARMUP_STEPS` decode steps have run, so
    that the timed calls find each implementation as repeated calls do:
    torch's default CPU mode (`"auto"`) traces its decode step once a
    signature has decoded `AUTO_MIN_STEPS` tokens. The time of one token is
    then taken off that of `--new-tokens`, leaving the decode steps.
    """
    reset_peak()
    start = time.perf_counter()
    greedy(1)
    greedy(args.new_tokens)
    first_calls = time.perf_counter() - start
    steps = args.new_tokens - 1
    warmup_calls = 1
    while warmup_calls * steps < WARMUP_STEPS:
        greedy(args.new_tokens)
        warmup_calls += 1
    start = time.perf_counter()
    greedy(1)
    one = time.perf_counter() - start
    start = time.perf_counter()
    tokens = greedy(args.new_tokens)
    many = time.perf_counter() - start
    return {
        "greedy": tokens,
        "generate_peak_gib": peak_gib(),
        "decode_s_per_token": (many - one) / (args.new_tokens - 1),
        "first_calls_s": first_calls,
        "warmup_calls": warmup_calls,
    }


def child_hf(args):
    import torch
    import transformers

    # Inference only; a context, not the process-wide switch, since tests
    # call this in their own process.
    with torch.no_grad():
        dtype = torch.float32 if args.float32 else torch.bfloat16
        # The model's class is imported before the clock starts, as ours is
        # (`child_ours`): through `AutoModelForCausalLM` its module is imported
        # inside `from_pretrained`, 2.6 s of a cold 9B load timed at 5.5.
        model_class = transformers.RecurrentGemmaForCausalLM
        start = time.perf_counter()
        model = model_class.from_pretrained(args.dir, dtype=dtype)
        report = {"load_s": time.perf_counter() - start, "load_peak_gib": peak_gib()}
        if args.float32:
            ids = torch.tensor(prompt_ids(args.parity_tokens)[None])
            np.save(args.out, model(ids).logits[0].float().numpy())
            report["greedy"] = greedy_hf(model, ids[:, : args.prompt], 32)
            return report
        if args.generate:
            ids = torch.tensor(prompt_ids(args.prompt)[None])
            report.update(measure_generate(lambda n: greedy_hf(model, ids, n), args))
        return report


def greedy_hf(model, ids, n):
    out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
    return out[0, ids.shape[1] :].tolist()


def child_ours(args):
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    dtype = "float32" if args.float32 else "bfloat16"
    start = time.perf_counter()
    kwargs = {"quantize": args.quantize} if args.quantize else {}
    backbone = RecurrentGemmaBackbone.from_preset(args.dir, dtype=dtype, **kwargs)
    report = {
        "backend": keras.config.backend(),
        "load_s": time.perf_counter() - start,
        "load_peak_gib": peak_gib(),
    }
    if args.quantize:
        report.update(quantized_bound(backbone, args.quantize))
    lm = RecurrentGemmaCausalLM(backbone, preprocessor=None)
    if os.environ.get("BENCHMARK_NO_XLA"):
        lm.compile(jit_compile=False)
        report["jit_compile"] = False
    if args.torch_decode_mode and keras.config.backend() == "torch":
        lm.torch_decode_mode = args.torch_decode_mode
        report["torch_decode_mode"] = args.torch_decode_mode
    if args.float32:
        ids = prompt_ids(args.parity_tokens)[None].astype("int32")
        hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
        logits = backbone.token_embedding(hidden, reverse=True)[0]
        ours = keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))
        theirs = np.load(args.out)
        report["logits_relative_error"] = float(
            np.abs(ours - theirs).max() / np.abs(theirs).max()
        )
        report["greedy"] = greedy_ours(lm, ids[0, : args.prompt], 32)
        return report
    if args.generate:
        ids = prompt_ids(args.prompt)
        report.update(measure_generate(lambda n: greedy_ours(lm, ids, n), args))
    return report


def quantized_bound(backbone, mode):
    """The quantized weights' size and issue 18's loading bound for them:
    1.3 x the quantized weights + 1.5 GiB + the largest single float
    tensor (the embedding, which the loader reads a slice of rows at a
    time; the largest one read whole, a Dense kernel, is reported too)."""
    import keras

    from keras_recurrentgemma.convert.quantize_on_load import quantized_targets

    weights = (
        sum(
            np.prod(v.shape)
            * np.dtype(keras.backend.standardize_dtype(v.dtype)).itemsize
            for v in backbone.weights
        )
        / GIB
    )
    targets = list(quantized_targets(backbone).values())

    def float_gib(target):
        return np.prod(target.float_shape) * np.dtype(target.float_dtype).itemsize / GIB

    largest = max(float_gib(t) for t in targets)
    largest_kernel = max(
        float_gib(t) for t in targets if not isinstance(t.layer, keras.layers.Embedding)
    )
    return {
        "quantize": mode,
        "weights_gib": float(weights),
        "largest_float_tensor_gib": float(largest),
        "largest_float_kernel_gib": float(largest_kernel),
        "load_bound_gib": float(1.3 * weights + 1.5 + largest),
        "generate_bound_gib": float(1.3 * weights + 2.5),
    }


def child_lora(args):
    """One LoRA `fit` step of the loaded checkpoint (rank 4, batch 1,
    `--lora-tokens` tokens, bf16 weights, Adam): its peak host memory and
    time. The first step traces (torch builds, JAX compiles); the second is
    timed too."""
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    backbone = RecurrentGemmaBackbone.from_preset(
        args.dir, dtype="bfloat16", remat=args.remat
    )
    lm = RecurrentGemmaCausalLM(backbone, preprocessor=None)
    backbone.enable_lora(4)
    lm.compile(optimizer=keras.optimizers.Adam(1e-4), weighted_metrics=[])
    ids = prompt_ids(args.lora_tokens + 1, vocabulary_size=backbone.vocabulary_size)
    ids = ids[None].astype("int32")
    x = {"token_ids": ids[:, :-1], "padding_mask": np.ones_like(ids[:, :-1])}
    reset_peak()
    times = []
    for _ in range(2):
        start = time.perf_counter()
        loss = lm.train_on_batch(x, ids[:, 1:])
        times.append(time.perf_counter() - start)
    return {
        "backend": keras.config.backend(),
        "remat": args.remat,
        "tokens": args.lora_tokens,
        "first_step_s": times[0],
        "step_s": times[1],
        "step_peak_gib": peak_gib(),
        "loss": float(np.asarray(loss).ravel()[0]),
    }


def child_convert(args):
    """Writes the Keras preset of the checkpoint (`--out`), as users would."""
    from keras_recurrentgemma import RecurrentGemmaBackbone

    backbone = RecurrentGemmaBackbone.from_preset(args.dir, dtype="bfloat16")
    backbone.save_to_preset(args.out)
    return {"written": args.out}


def greedy_ours(lm, ids, n):
    length = len(ids) + n
    token_ids = np.zeros((1, length), "int32")
    token_ids[0, : len(ids)] = ids
    mask = np.arange(length)[None] < len(ids)
    out = lm.generate(
        {"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None
    )
    return np.asarray(out["token_ids"])[0, len(ids) :].tolist()


# --- Parent. ----------------------------------------------------------------


def drop_page_cache():
    """Empties the kernel's page cache, so that each load reads the disk.

    A checkpoint is cached or not depending on what ran before it (the 9B
    does not fit in this machine's memory beside its own weights), which
    made load times of the same command differ by 2x; a cold cache is a
    user's first load. Needs root (`/proc/sys/vm/drop_caches`).
    """
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("1\n")


def run_child(kind, args, backend=None, extra=()):
    env = dict(os.environ)
    if backend:
        # "tensorflow-no-xla": generate compiled by tf.function without XLA.
        env["KERAS_BACKEND"] = backend.removesuffix("-no-xla")
        if backend.endswith("-no-xla"):
            env["BENCHMARK_NO_XLA"] = "1"
    command = [sys.executable, __file__, "--child", kind, "--dir", args.dir]
    command += ["--prompt", str(args.prompt), "--new-tokens", str(args.new_tokens)]
    command += ["--parity-tokens", str(args.parity_tokens), *extra]
    if args.torch_decode_mode:
        command += ["--torch-decode-mode", args.torch_decode_mode]
    if args.quantize and kind == "ours" and "--float32" not in extra:
        command += ["--quantize", args.quantize]
    if args.cold:
        drop_page_cache()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"error": f"exit {done.returncode}", "stderr": done.stderr[-1500:]}
    return json.loads(lines[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="2b")
    parser.add_argument("--workdir", default="/tmp/recurrentgemma_real_size")
    parser.add_argument("--backends", nargs="+", default=["jax", "torch", "tensorflow"])
    parser.add_argument(
        "--skip-generate", nargs="*", default=[], help="backends (or hf) not to run"
    )
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=40)
    parser.add_argument("--parity", action="store_true")
    parser.add_argument("--parity-tokens", type=int, default=256)
    parser.add_argument(
        "--keras-preset",
        nargs="*",
        default=[],
        help="backends that also load the Keras preset (model.weights.h5) of it",
    )
    parser.add_argument(
        "--quantize",
        choices=["int8", "int4"],
        help="our loads quantize while loading (`from_preset(..., quantize=)`)",
    )
    parser.add_argument(
        "--lora",
        nargs="*",
        default=[],
        help="backends that also run one LoRA fit step (rank 4, batch 1)",
    )
    parser.add_argument(
        "--torch-decode-mode",
        choices=["auto", "eager", "graph", "inductor"],
        help="`causal_lm.torch_decode_mode` of the torch runs (default: its own)",
    )
    parser.add_argument("--lora-tokens", type=int, default=512)
    parser.add_argument(
        "--cold",
        action="store_true",
        help="drop the page cache before each process (root only), so that "
        "every load reads the checkpoint from disk",
    )
    parser.add_argument(
        "--remat", action="store_true", help="the LoRA step with `remat=True`"
    )
    parser.add_argument(
        "--child", choices=["hf", "ours", "convert", "lora"], help=argparse.SUPPRESS
    )
    parser.add_argument("--dir", help=argparse.SUPPRESS)
    parser.add_argument("--generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--float32", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child = {
            "hf": child_hf,
            "ours": child_ours,
            "convert": child_convert,
            "lora": child_lora,
        }
        print(json.dumps(child[args.child](args)))
        return

    args.dir = os.path.join(args.workdir, f"hf_{args.config}")
    report = {"config": args.config, "checkpoint": args.dir, "cold": args.cold}
    if not os.path.isdir(args.dir):
        start = time.perf_counter()
        write_checkpoint(args.config, args.dir)
        report["write_s"] = time.perf_counter() - start
    report["checkpoint_bytes"] = sum(
        os.path.getsize(os.path.join(args.dir, f))
        for f in os.listdir(args.dir)
        if f.endswith(".safetensors")
    )
    weights_gib = report["checkpoint_bytes"] / GIB
    report["bounds_gib"] = {
        "load": 1.3 * weights_gib + 1.5,
        "generate": 1.3 * weights_gib + 2.5,
        "lora_step": weights_gib + 3,
    }
    runs = [("hf", None)] + [("ours", b) for b in args.backends]
    for kind, backend in runs:
        name = backend or "hf"
        extra = () if name in args.skip_generate else ("--generate",)
        report[name] = run_child(kind, args, backend, extra)
        print(json.dumps({name: report[name]}), file=sys.stderr, flush=True)
    if args.keras_preset:
        preset = os.path.join(args.workdir, f"keras_{args.config}")
        if not os.path.isdir(preset):
            run_child("convert", args, "jax", ("--out", preset))
        keras_args = argparse.Namespace(**{**vars(args), "dir": preset})
        for backend in args.keras_preset:
            result = run_child("ours", keras_args, backend)
            report[f"{backend}_keras_preset"] = result
            print(json.dumps({f"{backend}_keras_preset": result}), file=sys.stderr)
    for backend in args.lora:
        extra = ("--lora-tokens", str(args.lora_tokens))
        extra += ("--remat",) if args.remat else ()
        report[f"{backend}_lora"] = run_child("lora", args, backend, extra)
        print(
            json.dumps({f"{backend}_lora": report[f"{backend}_lora"]}), file=sys.stderr
        )
    hf = report["hf"]
    for backend in args.backends:
        ours = report[backend]
        if "load_s" in ours and "load_s" in hf:
            ours["load_time_vs_hf"] = ours["load_s"] / hf["load_s"]
        if "decode_s_per_token" in ours and "decode_s_per_token" in hf:
            ours["decode_vs_hf"] = ours["decode_s_per_token"] / hf["decode_s_per_token"]
    if args.parity:
        out = os.path.join(args.workdir, "hf_logits.npy")
        flags = ("--float32", "--out", out)
        hf32 = run_child("hf", args, None, flags)
        ours32 = run_child("ours", args, "jax", flags)
        report["parity_float32"] = {
            "tokens": args.parity_tokens,
            "logits_relative_error": ours32.get("logits_relative_error"),
            "greedy_32_identical": hf32.get("greedy") == ours32.get("greedy"),
            "hf": hf32,
            "ours": ours32,
        }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
