"""RecurrentGemma against KerasHub's Gemma as the generated length grows.

    python tools/benchmark_vs_gemma.py --backend jax --config cpu --plot
    python tools/benchmark_vs_gemma.py --backend jax --config 2b --plot  # GPU
    python tools/benchmark_vs_gemma.py --plot --from-json docs/X.json  # redraw

The RecurrentGemma report's Figure 1: from a 2K-token prompt, RecurrentGemma-2B
samples at a flat rate as the number of generated tokens grows, while
Gemma-2B slows down, because Gemma's KV cache grows and Griffin's state
(a recurrence plus a local-attention window) does not.

Two causal LMs with random weights, `GemmaCausalLM` (KerasHub) and
`RecurrentGemmaCausalLM` (ours), same backend, dtype and batch, greedy, no
stop token, are measured by one run. Each model runs in a fresh process
(so that its peaks are its own), through every length, shortest first:

- `sampling[]`, per generated length `N` in `--lengths` (prompt
  `--prompt-length`, `max_length` = prompt + N):
  `generate_s`, the median of `--repeats` timed `generate` calls after one
  untimed call that compiles (`compile_and_first_s`); `first_token_s`, the
  same call (same `max_length`, same cache shapes) stopped after its first
  token with `stop_token_ids` set to the tokens greedy picks first: the
  prompt's processing plus one step. `ms_per_token` =
  (generate_s - first_token_s) / (N - 1): the time of one sampling step at
  that length, prompt excluded; `sampling_tokens_per_s` = batch / that
  (the paper's throughput); `tokens_per_s` = batch * N / generate_s, what a
  user waits for, prompt included.
  KerasHub's Gemma fills its cache by running the whole `max_length` buffer
  (prompt and the empty slots after it) and attends over all of it at every
  step; ours absorbs the prompt only and keeps a window. Both are measured
  as they ship.
- `memory[]`, per total length (prompt + N): the peak during the first
  timed `generate` of that length (after the untimed call compiled it),
  absolute and over the memory just before it: resident memory (RSS) on a
  CPU, with `VmHWM` reset first; device memory in use on a GPU. Earlier,
  shorter lengths ran in the same process, so read the absolute peak; an
  allocator that keeps freed pages makes the part over the baseline small.
- `prefill`: prompt tokens/s of a `generate` of one token from the prompt
  (batch * prompt / time), both models.

`--config cpu` is the released pair scaled by 1/8 in both depth and width
(so each keeps its depth-to-width ratio) with the released vocabulary and
a window of 2048 / 16 = 128, prompt 256, out to 16 windows generated.
`--config 2b` is the released pair (Gemma-2B from KerasHub's `gemma_2b_en`
config, RecurrentGemma-2B from the official one) in bfloat16, for a GPU.
`--config tiny` is the CI smoke setting. Floats are rounded; times are
seconds unless named `_ms`.
"""

import argparse
import json
import os
import pathlib
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

TOOLS = pathlib.Path(__file__).resolve().parent
DOCS = TOOLS.parent / "docs"
GRIFFIN = ["recurrent", "recurrent", "attention"]

CONFIGS = {
    "2b": dict(
        gemma=dict(
            vocabulary_size=256_000,
            num_layers=18,
            num_query_heads=8,
            num_key_value_heads=1,
            hidden_dim=2048,
            intermediate_dim=32768,  # KerasHub counts both MLP branches.
            head_dim=256,
        ),
        ours=dict(
            vocabulary_size=256_000,
            hidden_dim=2560,
            intermediate_dim=3 * 2560,
            num_heads=10,
            lru_width=2560,
            block_types=(GRIFFIN * 9)[:26],
            attention_window_size=2048,
        ),
        prompt_length=2048,
        lengths=[256, 1024, 4096, 8192, 16384, 32768],
        batch=1,
        dtype="bfloat16",
    ),
    # Depth and width / 8: Gemma 18 -> 2 layers of 256, ours 26 -> 3 blocks
    # of 320 (one Griffin pattern); heads kept, head width / 8. The window is
    # 2048 / 16, so that 16 windows (2048 tokens) are generated in minutes on
    # a busy 2-core machine.
    "cpu": dict(
        gemma=dict(
            vocabulary_size=256_000,
            num_layers=2,
            num_query_heads=8,
            num_key_value_heads=1,
            hidden_dim=256,
            intermediate_dim=4096,
            head_dim=32,
        ),
        ours=dict(
            vocabulary_size=256_000,
            hidden_dim=320,
            intermediate_dim=960,
            num_heads=10,
            lru_width=320,
            block_types=GRIFFIN,
            attention_window_size=128,
        ),
        prompt_length=256,
        lengths=[128, 512, 2048],
        batch=1,
        dtype="float32",
    ),
    "tiny": dict(
        gemma=dict(
            vocabulary_size=512,
            num_layers=1,
            num_query_heads=2,
            num_key_value_heads=1,
            hidden_dim=32,
            intermediate_dim=128,
            head_dim=16,
        ),
        ours=dict(
            vocabulary_size=512,
            hidden_dim=32,
            intermediate_dim=64,
            num_heads=2,
            lru_width=32,
            block_types=GRIFFIN,
            attention_window_size=8,
        ),
        prompt_length=16,
        lengths=[4, 8],
        batch=1,
        dtype="float32",
    ),
}
MODELS = ("gemma", "ours")


# --- One model, one length (a child process) ----------------------------------


def build(model, config, dtype, seed):
    import keras

    keras.utils.set_random_seed(seed)
    if model == "gemma":
        import keras_hub

        backbone = keras_hub.models.GemmaBackbone(**config["gemma"], dtype=dtype)
        lm = keras_hub.models.GemmaCausalLM(backbone, preprocessor=None)
    else:
        from keras_recurrentgemma import RecurrentGemmaBackbone
        from keras_recurrentgemma import RecurrentGemmaCausalLM

        backbone = RecurrentGemmaBackbone(**config["ours"], dtype=dtype)
        lm = RecurrentGemmaCausalLM(backbone, preprocessor=None)
    lm.compile(sampler="greedy")
    return lm


def accelerator():
    import keras

    backend = keras.config.backend()
    if backend == "jax":
        import jax

        return "gpu" if jax.devices()[0].platform == "gpu" else "cpu"
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    import tensorflow as tf

    return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"


class PeakMemory:
    """Peak memory of one call: RSS on a CPU, device memory on a GPU."""

    def __init__(self, kind):
        self.kind = kind

    def __enter__(self):
        import keras

        sys.path.insert(0, str(TOOLS))
        if self.kind == "cpu":
            from benchmark_long_prefill import RssMonitor
            from benchmark_long_prefill import _status_bytes

            self.baseline = _status_bytes("VmRSS")
            self._monitor = RssMonitor()
            self._monitor.start()
        else:
            from benchmark_generate import _reset_device_peak

            self.baseline = _reset_device_peak(keras.config.backend())
        return self

    def __exit__(self, *exc):
        import keras

        if self.kind == "cpu":
            self.peak, _ = self._monitor.stop()
            self.measure = f"peak RSS ({self._monitor.method})"
        else:
            from benchmark_generate import _device_peak

            self.peak = _device_peak(keras.config.backend())
            self.measure = "peak device memory in use"


def synchronize():
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()
    except ImportError:
        pass


def generate(lm, prompt, new_tokens, stop_token_ids=None):
    """`(seconds, [batch, new_tokens] ids, count of new tokens per row)`."""
    from keras import ops

    b, p = prompt.shape
    ids = np.zeros((b, p + new_tokens), "int32")
    ids[:, :p] = prompt
    mask = np.zeros((b, p + new_tokens), "int32")
    mask[:, :p] = 1
    synchronize()
    start = time.perf_counter()
    out = lm.generate(
        {"token_ids": ids, "padding_mask": mask}, stop_token_ids=stop_token_ids
    )
    tokens = ops.convert_to_numpy(out["token_ids"])
    synchronize()
    seconds = time.perf_counter() - start
    kept = ops.convert_to_numpy(out["padding_mask"]).astype(bool).sum(axis=1) - p
    return seconds, tokens[:, p:], kept


def measure_model(args):
    """Times one model at every length, shortest first; the child's records."""
    config = CONFIGS[args.config]
    lm = build(args.child_model, config, args.dtype, args.seed)
    vocab = config["ours"]["vocabulary_size"]
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, vocab, (args.batch, args.prompt_length)).astype("int32")
    kind = accelerator()
    records = []
    for n in [1, *args.lengths]:
        records.append(measure_length(lm, prompt, n, kind, args.repeats))
        print(f"{args.child_model}: {n}", file=sys.stderr, flush=True)
    return {
        "model": args.child_model,
        "device": kind,
        "parameters": int(lm.count_params()),
        "points": records,
    }


def measure_length(lm, prompt, n, kind, repeats):
    record = {"new_tokens": n, "total_length": prompt.shape[1] + n}
    record["compile_and_first_s"], tokens, _ = generate(lm, prompt, n)
    # After the call above compiled this shape, so that compilation's memory
    # is not counted; the reset makes the peak this call's own.
    with PeakMemory(kind) as memory:
        times = [generate(lm, prompt, n)[0]]
    times += [generate(lm, prompt, n)[0] for _ in range(repeats - 1)]
    record.update(
        times_s=[round(t, 4) for t in times],
        generate_s=round(statistics.median(times), 4),
        memory=dict(
            measure=memory.measure,
            peak_bytes=int(memory.peak),
            baseline_bytes=int(memory.baseline),
            peak_over_baseline_bytes=int(memory.peak - memory.baseline),
        ),
    )
    if n > 1:
        # Greedy picks these again, so the loop ends after one step; a new
        # static stop tuple compiles once more, untimed.
        stop = tuple(sorted({int(t) for t in tokens[:, 0]}))
        generate(lm, prompt, n, stop)
        first = [generate(lm, prompt, n, stop) for _ in range(repeats)]
        if any(kept.max() != 1 for _, _, kept in first):
            raise RuntimeError("the first-token call did not stop after one token")
        record["first_token_s"] = round(statistics.median(t for t, _, _ in first), 4)
    return record


# --- The parent: all points, side by side ----------------------------------


def run_child(argv, model):
    child = [sys.executable, os.path.abspath(__file__), *argv, "--child-model", model]
    out = subprocess.run(child, stdout=subprocess.PIPE, text=True)
    if out.returncode:
        raise RuntimeError(f"the {model} child failed (its stderr is above)")
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(children, args):
    b = args.batch
    points = {(m, p["new_tokens"]): p for m in MODELS for p in children[m]["points"]}
    sampling, memory = [], []
    for n in args.lengths:
        row = {"new_tokens": n, "total_length": args.prompt_length + n}
        for model in MODELS:
            p = points[model, n]
            step = (p["generate_s"] - p["first_token_s"]) / (n - 1)
            row[model] = dict(
                generate_s=p["generate_s"],
                first_token_s=p["first_token_s"],
                compile_and_first_s=round(p["compile_and_first_s"], 3),
                ms_per_token=round(1e3 * step, 4),
                sampling_tokens_per_s=round(b / step, 2) if step > 0 else None,
                tokens_per_s=round(b * n / p["generate_s"], 2),
            )
        sampling.append(row)
    for n in [1, *args.lengths]:
        row = {"total_length": args.prompt_length + n}
        row.update({m: points[m, n]["memory"] for m in MODELS})
        memory.append(row)
    prefill = {}
    for m in MODELS:
        seconds = points[m, 1]["generate_s"]
        prefill[m] = dict(
            seconds=seconds, tokens_per_s=round(b * args.prompt_length / seconds, 1)
        )
    return sampling, memory, prefill


def run(args, argv):
    # One fresh process per model, so each peak is that model's alone; the
    # lengths run shortest first inside it.
    children = {m: run_child(argv, m) for m in MODELS}
    sampling, memory, prefill = summarize(children, args)
    config = CONFIGS[args.config]
    return {
        "benchmark": "benchmark_vs_gemma",
        "backend": os.environ["KERAS_BACKEND"],
        "device": children["ours"]["device"],
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "config": args.config,
        "dtype": args.dtype,
        "batch": args.batch,
        "prompt_length": args.prompt_length,
        "repeats": args.repeats,
        "attention_window_size": config["ours"]["attention_window_size"],
        "models": {m: config[m] for m in MODELS},
        "parameters": {m: children[m]["parameters"] for m in MODELS},
        "sampling": sampling,
        "memory": memory,
        "prefill": prefill,
        "versions": versions(),
    }


def versions():
    import importlib.metadata as md

    out = {}
    for name in ("keras", "keras-hub", "jax", "tensorflow", "torch"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


# --- The plot ----------------------------------------------------------------


LABELS = {"gemma": "Gemma (KerasHub)", "ours": "RecurrentGemma (ours)"}


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(18, 4.2))
    n = [row["new_tokens"] for row in result["sampling"]]
    total = [row["total_length"] for row in result["memory"]]
    for model in MODELS:
        rows = [row[model] for row in result["sampling"]]
        axes[0].plot(n, [r["sampling_tokens_per_s"] for r in rows], "o-")
        axes[1].plot(n, [r["ms_per_token"] for r in rows], "o-")
        mib = [row[model]["peak_bytes"] / 2**20 for row in result["memory"]]
        axes[2].plot(total, mib, "o-", label=LABELS[model])
    axes[3].bar(
        [LABELS[m] for m in MODELS],
        [result["prefill"][m]["tokens_per_s"] for m in MODELS],
        color=["C0", "C1"],
    )
    window = result["attention_window_size"]
    titles = [
        "sampling throughput (tokens/s)",
        "time per sampled token (ms)",
        "peak memory (MiB) vs total length",
        f"prefill of {result['prompt_length']} tokens (tokens/s)",
    ]
    for ax, title in zip(axes, titles, strict=True):
        ax.set_title(title, fontsize=10)
    for ax in axes[:2]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"generated tokens (prompt {result['prompt_length']})")
        ax.axvline(window, color="grey", ls=":", lw=1)
    axes[2].set_xscale("log", base=2)
    axes[2].set_xlabel("prompt + generated tokens")
    axes[2].legend(fontsize=8)
    axes[3].tick_params(axis="x", labelsize=8)
    fig.suptitle(
        f"{result['config']} pair, {result['backend']} on {result['device']} "
        f"({result['machine']}), {result['dtype']}, batch {result['batch']}, "
        f"greedy; dotted line: attention window {window}",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --- Main --------------------------------------------------------------------


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="cpu")
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        help="Keras backend; defaults to KERAS_BACKEND, else jax.",
    )
    parser.add_argument("--lengths", type=int, nargs="+", help="generated tokens")
    parser.add_argument("--prompt-length", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--dtype")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=pathlib.Path, help="also write the JSON")
    parser.add_argument(
        "--plot",
        nargs="?",
        const="",
        type=str,
        help="draw a PNG (default docs/benchmark_vs_gemma_<config>_<backend>.png)",
    )
    parser.add_argument(
        "--from-json", type=pathlib.Path, help="redraw a saved run; measure nothing"
    )
    parser.add_argument("--child-model", choices=MODELS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = CONFIGS[args.config]
    for name in ("lengths", "prompt_length", "batch", "dtype"):
        if getattr(args, name) is None:
            setattr(args, name, config[name])
    if min(args.lengths) < 2 or args.repeats < 1:
        parser.error("each length must be at least 2 tokens; --repeats at least 1")
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.backend:
        os.environ["KERAS_BACKEND"] = args.backend
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    # Measured peaks mean nothing if JAX or TensorFlow take the GPU up front.
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    os.environ.setdefault("TF_FORCE_GPU_ALLOW_GROWTH", "true")
    if args.child_model:
        print(json.dumps(measure_model(args)))
        return None
    if args.from_json:
        result = json.loads(args.from_json.read_text())
    else:
        result = run(args, argv)
        text = json.dumps(result, indent=1)
        print(text)
        if args.output:
            args.output.parent.mkdir(parents=True, exist_ok=True)
            args.output.write_text(text + "\n")
    if args.plot is not None:
        name = f"benchmark_vs_gemma_{result['config']}_{result['backend']}.png"
        path = pathlib.Path(args.plot) if args.plot else DOCS / name
        plot(result, path)
        print(f"plot: {path}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
