"""RecurrentGemma against KerasHub's Gemma as the generated length grows.

    python tools/benchmark_vs_gemma.py --backend jax --config cpu --plot
    python tools/benchmark_vs_gemma.py --backend jax --config 2b --plot  # GPU
    python tools/benchmark_vs_gemma.py --plot --from-json docs/X.json  # redraw

The RecurrentGemma report's Figure 1: from a 2K-token prompt, RecurrentGemma-2B
samples at a flat rate as the output grows while Gemma-2B slows down (Gemma's
KV cache grows; Griffin's recurrence and local-attention window do not).
`GemmaCausalLM` (KerasHub) and ours, random weights, same backend, dtype and
batch, greedy, no stop token; each model in a fresh process (its peaks its
own), through every length, shortest first. Measured, per generated length N
(`max_length` = `--prompt-length` + N):

- `sampling[]`: `generate_s`, the median of `--repeats` timed `generate`
  calls after an untimed one that compiles (`compile_and_first_s`);
  `first_token_s`, the same call (same shapes) stopped after one token by
  `stop_token_ids` = the tokens greedy picks first. `ms_per_token` =
  (generate_s - first_token_s) / (N - 1), one sampling step, prompt excluded;
  `sampling_tokens_per_s` = batch / that (the paper's throughput);
  `tokens_per_s` = batch * N / generate_s, prompt included. KerasHub's Gemma
  runs the whole `max_length` buffer to fill its cache and attends over all of
  it at every step; ours keeps a window and absorbs the prompt in one chunk of
  min(max_length, `prefill_chunk_size` = 1024) columns where the graph is
  compiled (JAX, TensorFlow), the prompt's only on torch. Both as they ship.
- `memory[]`, per total length: the peak of the first timed `generate`
  (compilation excluded), absolute and over the memory just before it: RSS on
  a CPU (`VmHWM` reset first), device memory on a GPU. Shorter lengths ran
  before in the same process, and allocators keep freed pages: read the
  absolute peak.
- `prefill`: batch * prompt / time of a one-token `generate`.

`--config cpu`: the released pair scaled by 1/8 in depth and width (each keeps
its depth-to-width ratio), the released vocabulary, window 2048 / 16 = 128,
prompt 256, out to 16 windows. `--config 2b`: the released pair (Gemma-2B as
KerasHub's `gemma_2b_en`, RecurrentGemma-2B as the official config), bfloat16,
for a GPU. `--config tiny`: the CI smoke setting. Times are in seconds unless
named `_ms`.
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
# Helpers shared with the other benchmarks (this folder is not a package).
sys.path.insert(0, str(TOOLS))
DOCS = TOOLS.parent / "docs"
GRIFFIN = ["recurrent", "recurrent", "attention"]


def gemma(vocabulary, layers, heads, width, mlp, head_width):
    """A `GemmaBackbone` config; multi-query attention, as in Gemma-2B."""
    return dict(
        vocabulary_size=vocabulary,
        num_layers=layers,
        num_query_heads=heads,
        num_key_value_heads=1,
        hidden_dim=width,
        intermediate_dim=mlp,  # KerasHub's counts both MLP branches.
        head_dim=head_width,
    )


def ours(vocabulary, width, mlp, heads, blocks, window):
    """A `RecurrentGemmaBackbone` config (`mlp`: one branch's width)."""
    return dict(
        vocabulary_size=vocabulary,
        hidden_dim=width,
        intermediate_dim=mlp,
        num_heads=heads,
        lru_width=width,
        block_types=blocks,
        attention_window_size=window,
    )


CONFIGS = {
    "2b": dict(
        gemma=gemma(256_000, 18, 8, 2048, 32768, 256),
        ours=ours(256_000, 2560, 7680, 10, (GRIFFIN * 9)[:26], 2048),
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
        gemma=gemma(256_000, 2, 8, 256, 4096, 32),
        ours=ours(256_000, 320, 960, 10, GRIFFIN, 128),
        prompt_length=256,
        lengths=[128, 512, 2048],
        batch=1,
        dtype="float32",
    ),
    "tiny": dict(
        gemma=gemma(512, 1, 2, 32, 128, 16),
        ours=ours(512, 32, 64, 2, GRIFFIN, 8),
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


def with_peak_memory(kind, call):
    """`(call(), memory record)`: RSS on a CPU, device memory on a GPU."""
    import keras
    from benchmark_generate import _device_peak
    from benchmark_generate import _reset_device_peak
    from benchmark_long_prefill import RssMonitor
    from benchmark_long_prefill import _status_bytes

    backend = keras.config.backend()
    if kind == "cpu":
        baseline, monitor = _status_bytes("VmRSS"), RssMonitor()
        monitor.start()
        result = call()
        peak, measure = monitor.stop()[0], f"peak RSS ({monitor.method})"
    else:
        baseline = _reset_device_peak(backend)
        result = call()
        peak, measure = _device_peak(backend), "peak device memory in use"
    memory = dict(measure=measure, peak_bytes=int(peak), baseline_bytes=int(baseline))
    memory["peak_over_baseline_bytes"] = int(peak - baseline)
    return result, memory


def generate(lm, prompt, new_tokens, stop_token_ids=None):
    """`(seconds, [batch, new_tokens] ids, count of new tokens per row)`."""
    from benchmark_generate import synchronize
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
    import keras
    from benchmark_generate import accelerator

    config = CONFIGS[args.config]
    lm = build(args.child_model, config, args.dtype, args.seed)
    vocab = config["ours"]["vocabulary_size"]
    rng = np.random.default_rng(args.seed)
    prompt = rng.integers(3, vocab, (args.batch, args.prompt_length)).astype("int32")
    kind = accelerator(keras.config.backend())
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
    (first, _, _), memory = with_peak_memory(kind, lambda: generate(lm, prompt, n))
    times = [first] + [generate(lm, prompt, n)[0] for _ in range(repeats - 1)]
    record.update(
        times_s=[round(t, 4) for t in times],
        generate_s=round(statistics.median(times), 4),
        memory=memory,
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
    from benchmark_generate import versions

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
        "versions": versions(),  # benchmark_generate's
    }


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
    # A PNG; with no path, docs/benchmark_vs_gemma_<config>_<backend>.png.
    parser.add_argument("--plot", nargs="?", const="")
    parser.add_argument("--from-json", type=pathlib.Path, help="redraw; no run")
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
        # Its import loads Triton, where installed, before anything loads
        # TensorFlow: the other order aborts in LLVM (see its comment).
        import benchmark_generate  # noqa: F401

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
