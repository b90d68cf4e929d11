"""Peak memory of one LoRA training step, with and without `remat`, and
with and without the chunked loss.

    KERAS_BACKEND=jax python tools/benchmark_lora_memory.py --config 2b \\
        --seq-lens 4096 8192

`--chunked-loss on|off|both` (default `on`, what `fit` does) picks
`compile(loss_chunk_size=...)`: `on` computes the loss `--loss-chunk-size`
tokens at a time from the hidden states, `off` from the full
`[batch, seq, vocabulary]` logits (`loss_chunk_size=None`); each record says
which (`loss_chunk_size`, `null` for off). To see what the chunked loss saves
at the released 2B's size (here `--remat off`; add `--measure rss` with
`KERAS_BACKEND=torch` on a machine without a GPU, see below):

    KERAS_BACKEND=jax python tools/benchmark_lora_memory.py --config 2b \\
        --seq-lens 512 --batch-size 1 --rank 4 --dtype bfloat16 \\
        --remat off --chunked-loss both

Builds the backbone (random weights; `--config 2b` is the released 2B's
architecture), enables LoRA, and compiles Keras's own JAX train step (the
function `fit` runs) for a batch of `--batch-size` rows of each sequence
length. Prints one JSON object per line and a summary:

- `xla_peak_bytes`: XLA's buffer assignment for the compiled step:
  arguments + outputs - donated (aliased) buffers + temporaries. This is
  what the compiler plans for the device it compiled for; on a CPU-only
  machine it is the CPU compiler's plan (the record says which device), an
  estimate of, not a measurement on, a GPU.
- `measured_peak_bytes` (with `--execute`, on a GPU): the device allocator's
  `peak_bytes_in_use` after running the step.

XLA's CPU compiler drops the barrier a plain `jax.checkpoint` relies on and
computes the recomputed activations early, so on its own it saves nothing
in the CPU plan; our blocks' remat (`ops.remat`) ties each recomputation to
the block's incoming gradient, and the plan shows what it saves (`--config
scaled`, 4096 tokens: 2.68 GB of temporaries without remat, 0.96 GB with
it). To measure resident memory instead, `--measure rss` runs one real
`train_on_batch` per setting, each in a fresh process, and reports the
process's peak resident memory above what it held before the step; with
`KERAS_BACKEND=torch` too:

    KERAS_BACKEND=torch python tools/benchmark_lora_memory.py --config scaled \
        --measure rss --seq-lens 4096 8192
"""

import argparse
import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# The 2B's depth pattern, window and head size at a fifth of its width and an
# eighth of its vocabulary, so a CPU runs a step at 8192 tokens in seconds.
SCALED_CONFIG = dict(
    vocabulary_size=32_000,
    hidden_dim=512,
    intermediate_dim=1536,
    num_heads=2,
    block_types=["recurrent", "recurrent", "attention"] * 2,
    attention_window_size=2048,
)

SMALL_CONFIG = dict(
    vocabulary_size=8192,
    hidden_dim=256,
    intermediate_dim=768,
    num_heads=4,
    block_types=["recurrent", "recurrent", "attention"] * 2,
    attention_window_size=256,
)


def backbone_config(name):
    if name == "small":
        return dict(SMALL_CONFIG)
    if name == "scaled":
        return dict(SCALED_CONFIG)
    from keras_recurrentgemma.presets import PRESETS

    return dict(PRESETS[f"recurrentgemma_{name}_en"]["metadata"]["config"])


def random_batch(vocabulary_size, batch_size, seq_len):
    """Seeded `(x, y)`: random non-special token ids, no padding."""
    import numpy as np

    rng = np.random.default_rng(0)
    shape = (batch_size, seq_len)
    x = {
        "token_ids": rng.integers(3, vocabulary_size, shape, dtype="int32"),
        "padding_mask": np.ones(shape, "int32"),
    }
    return x, rng.integers(3, vocabulary_size, shape, dtype="int32")


def step_memory(causal_lm, batch_size, seq_len, execute):
    """Memory of `causal_lm`'s compiled train step on one batch."""
    import jax
    import numpy as np

    x, y = random_batch(causal_lm.backbone.vocabulary_size, batch_size, seq_len)
    # Explicit, so the traced step has the same inputs `pack` gives `fit`.
    x["segment_pos"] = np.tile(np.arange(seq_len, dtype="int32"), (batch_size, 1))
    sample_weight = np.ones((batch_size, seq_len), "float32")
    data = (x, y, sample_weight)
    state = causal_lm._get_jax_state(
        trainable_variables=True,
        non_trainable_variables=True,
        optimizer_variables=True,
        metrics_variables=True,
    )
    step = jax.jit(causal_lm.train_step, donate_argnums=0)
    start = time.perf_counter()
    compiled = step.lower(state, data).compile()
    compile_s = time.perf_counter() - start
    stats = compiled.memory_analysis()
    record = {
        "arguments_bytes": int(stats.argument_size_in_bytes),
        "outputs_bytes": int(stats.output_size_in_bytes),
        "aliased_bytes": int(stats.alias_size_in_bytes),
        "temp_bytes": int(stats.temp_size_in_bytes),
        "xla_peak_bytes": int(
            stats.argument_size_in_bytes
            + stats.output_size_in_bytes
            - stats.alias_size_in_bytes
            + stats.temp_size_in_bytes
        ),
        "compile_s": round(compile_s, 1),
    }
    if execute:
        device = jax.devices()[0]
        # Copies, because the step donates (frees) its state arguments.
        state = jax.tree.map(lambda a: a.copy(), state)
        start = time.perf_counter()
        logs, _ = compiled(state, data)
        jax.block_until_ready(logs)
        record["step_s"] = round(time.perf_counter() - start, 2)
        memory = device.memory_stats() or {}
        if "peak_bytes_in_use" in memory:
            record["measured_peak_bytes"] = int(memory["peak_bytes_in_use"])
    return record


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def _peak_rss_bytes():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_rss(args):
    """One real training step in this process; its peak RSS over the start."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(0)
    loss_chunk_size = args.child_loss_chunk_size or None
    causal_lm = build(
        args, remat=bool(args.child_remat), loss_chunk_size=loss_chunk_size
    )
    seq_len = args.child_seq_len
    x, y = random_batch(causal_lm.backbone.vocabulary_size, args.batch_size, seq_len)
    before = _rss_bytes()
    start = time.perf_counter()
    loss = causal_lm.train_on_batch(x, y)
    return {
        "backend": keras.config.backend(),
        "seq_len": seq_len,
        "remat": bool(args.child_remat),
        "loss_chunk_size": loss_chunk_size,
        "rss_before_step_bytes": before,
        "peak_rss_bytes": _peak_rss_bytes(),
        "step_peak_over_start_bytes": _peak_rss_bytes() - before,
        "step_s": round(time.perf_counter() - start, 1),
        "loss": float(np.asarray(loss).ravel()[0]),
    }


def build(args, remat=False, loss_chunk_size=None):
    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    backbone = RecurrentGemmaBackbone(
        **backbone_config(args.config), dtype=args.dtype, remat=remat
    )
    causal_lm = RecurrentGemmaCausalLM(backbone)
    backbone.enable_lora(args.rank)
    compile_loss(causal_lm, loss_chunk_size)
    return causal_lm


def compile_loss(causal_lm, loss_chunk_size):
    """Compiles for a LoRA step whose loss is chunked (or not, for `None`)."""
    import keras

    causal_lm.compile(
        optimizer=keras.optimizers.AdamW(1e-4),
        weighted_metrics=[],
        sampler="greedy",
        loss_chunk_size=loss_chunk_size,
    )
    causal_lm.optimizer.build(causal_lm.trainable_variables)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--config", choices=["2b", "9b", "scaled", "small"], default="2b"
    )
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[4096, 8192])
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--remat", choices=["off", "on", "both"], default="both", help="block remat"
    )
    parser.add_argument(
        "--chunked-loss",
        choices=["off", "on", "both"],
        default="on",
        help="the loss a chunk of tokens at a time (on, as fit does) or from "
        "the full logits (off)",
    )
    parser.add_argument(
        "--loss-chunk-size",
        type=int,
        default=256,
        help="tokens per chunk of logits with --chunked-loss on",
    )
    parser.add_argument(
        "--execute", action="store_true", help="also run the step (GPU: peak bytes)"
    )
    parser.add_argument(
        "--measure",
        choices=["xla", "rss"],
        default="xla",
        help="xla: the compiled step's memory plan (JAX); rss: run it (any backend)",
    )
    parser.add_argument("--child-seq-len", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-remat", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--child-loss-chunk-size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.loss_chunk_size < 1:
        parser.error(f"--loss-chunk-size must be >= 1; got {args.loss_chunk_size}")
    remat_settings = {"off": [False], "on": [True], "both": [False, True]}[args.remat]
    chunk_settings = {
        "off": [None],
        "on": [args.loss_chunk_size],
        "both": [None, args.loss_chunk_size],
    }[args.chunked_loss]
    settings = [(r, c) for r in remat_settings for c in chunk_settings]

    if args.child_seq_len is not None:
        print(json.dumps(measure_rss(args)), flush=True)
        return None
    if args.measure == "rss":
        import subprocess

        argv = list(sys.argv[1:] if argv is None else argv)
        records = []
        for seq_len in args.seq_lens:
            for remat, loss_chunk_size in settings:
                child = [sys.executable, os.path.abspath(__file__), *argv]
                child += ["--child-seq-len", str(seq_len)]
                child += ["--child-remat", str(int(remat))]
                child += ["--child-loss-chunk-size", str(loss_chunk_size or 0)]
                out = subprocess.run(child, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(out.stderr[-3000:])
                record = {
                    "config": args.config,
                    "dtype": args.dtype,
                    "lora_rank": args.rank,
                    "batch_size": args.batch_size,
                    "measure": "peak RSS of a fresh process (CPU)",
                    **json.loads(out.stdout.strip().splitlines()[-1]),
                }
                record["step_peak_over_start_gib"] = round(
                    record["step_peak_over_start_bytes"] / 2**30, 2
                )
                print(json.dumps(record), flush=True)
                records.append(record)
        return records

    import jax
    import keras

    if keras.config.backend() != "jax":
        sys.exit("--measure xla needs KERAS_BACKEND=jax; use --measure rss.")

    start = time.perf_counter()
    causal_lm = build(args)
    backbone = causal_lm.backbone
    build_s = time.perf_counter() - start
    device = jax.devices()[0]
    common = {
        "config": args.config,
        "parameters": int(backbone.count_params()),
        "lora_parameters": int(
            sum(int(v.numpy().size) for v in causal_lm.trainable_variables)
        ),
        "lora_rank": args.rank,
        "dtype": args.dtype,
        "batch_size": args.batch_size,
        "device": f"{device.platform}:{device.device_kind}",
        "jax": jax.__version__,
        "build_s": round(build_s, 1),
    }
    records = []
    for seq_len in args.seq_lens:
        for remat, loss_chunk_size in settings:
            # Read when the step is traced, so one model serves every setting.
            for block in backbone.residual_blocks:
                block.remat = remat
            compile_loss(causal_lm, loss_chunk_size)
            record = {
                **common,
                "seq_len": seq_len,
                "remat": remat,
                "loss_chunk_size": loss_chunk_size,
                **step_memory(causal_lm, args.batch_size, seq_len, args.execute),
            }
            record["xla_peak_gib"] = round(record["xla_peak_bytes"] / 2**30, 2)
            print(json.dumps(record), flush=True)
            records.append(record)
    return records


if __name__ == "__main__":
    main()
