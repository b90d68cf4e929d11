"""One decode step's products on a CPU: ours on JAX against torch's.

    KERAS_BACKEND=jax python tools/benchmark_products.py            # the 9B
    KERAS_BACKEND=jax python tools/benchmark_products.py --config 2b

A decode step multiplies one row by every bfloat16 weight matrix `[out,
in]`: at the released sizes it is most of the step's time, and its speed is
the product kernel's. For each matrix shape of the config, this times
`ops.xla_cpu.matmul_transposed` (what our layers call; XLA's library, in
the order `matrix_first` measured faster) under `jax.jit`, and torch's
`nn.functional.linear` (oneDNN; what HF and our torch backend run) on the
same numbers, each the least of `--repeats` calls, each side in a process
of its own (in one process, each library's idle threads spin on the cores
the other is using: torch measured 40% slower beside JAX). It prints one JSON
object: per shape, both times in ms and `ratio` (ours over torch's); and
`step_ms`, each side's products of one token summed over the layers (a
recurrent block: three `[w, w]`; an attention block: `[w, w]` twice and
`[h, w]` twice for the key and value; every block's MLP: two `[m, w]` and
one `[w, m]`; and the tied logits `[v, w]`), the floor of a decode step
that the rest of it adds to. The shapes come from the released config that
`benchmark_real_size.py` writes, read by our Hugging Face converter.
"""

import argparse
import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

# The released configs, as the real-size benchmark writes them (a sibling
# script: `tools/` is this script's first import path).
from benchmark_real_size import CONFIGS  # noqa: E402
from benchmark_real_size import hf_config  # noqa: E402


def least_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def time_side(side, shapes, repeats):
    """`{shape: least ms}` for one side ("ours" or "torch"), in this process,
    for each `[out, in]` of `shapes`."""
    rng = np.random.default_rng(0)
    if side == "ours":
        import jax

        from keras_recurrentgemma.ops import xla_cpu

        product = jax.jit(xla_cpu.matmul_transposed)
    else:
        import torch
    times = {}
    for out, inn in shapes:
        matrix = (rng.standard_normal((out, inn), np.float32) / 64).astype(
            ml_dtypes.bfloat16
        )
        row = rng.standard_normal((1, inn), np.float32).astype(ml_dtypes.bfloat16)
        if side == "ours":
            m, x = jax.numpy.asarray(matrix), jax.numpy.asarray(row)
            times[f"{out}x{inn}"] = least_ms(
                lambda x=x, m=m: product(x, m).block_until_ready(), repeats
            )
        else:
            m = torch.from_numpy(matrix.view(np.int16)).view(torch.bfloat16)
            x = torch.from_numpy(row.view(np.int16)).view(torch.bfloat16)
            with torch.no_grad():
                times[f"{out}x{inn}"] = least_ms(
                    lambda x=x, m=m: torch.nn.functional.linear(x, m), repeats
                )
    return times


def products(config):
    """`{(out, in): products per token}` of a decode step at `config`, from
    the backbone config our converter reads from its HF config."""
    from keras_recurrentgemma.convert.huggingface import config_from_huggingface

    c = config_from_huggingface(hf_config(config).to_dict())
    w, m, lru = c["hidden_dim"], c["intermediate_dim"], c["lru_width"]
    h = w // c["num_heads"]  # one key/value head
    counts = {}
    per_block = {
        "recurrent": [(lru, w), (lru, w), (w, lru)],
        "attention": [(w, w), (h, w), (h, w), (w, w)],
    }
    for block_type in c["block_types"]:
        for shape in per_block[block_type] + [(m, w), (m, w), (w, m)]:
            counts[shape] = counts.get(shape, 0) + 1
    counts[(c["vocabulary_size"], w)] = 1  # the tied logits
    return counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="9b")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    parser.add_argument("--shapes", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        shapes = json.loads(args.shapes)
        print(json.dumps(time_side(args.side, shapes, args.repeats)))
        return
    counts = products(args.config)
    sides = {}
    for side in ("ours", "torch"):
        command = [sys.executable, __file__, "--side", side]
        command += ["--shapes", json.dumps(list(counts))]
        command += ["--repeats", str(args.repeats)]
        env = dict(os.environ, KERAS_BACKEND="jax")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        sides[side] = json.loads(done.stdout.splitlines()[-1])
    shapes, step = {}, {"ours": 0.0, "torch": 0.0}
    for (out, inn), count in counts.items():
        key = f"{out}x{inn}"
        ours, theirs = sides["ours"][key], sides["torch"][key]
        shapes[key] = {
            "count_per_token": count,
            "ours_ms": ours,
            "torch_ms": theirs,
            "ratio": ours / theirs,
        }
        step["ours"] += count * ours
        step["torch"] += count * theirs
    report = {"config": args.config, "cpus": os.cpu_count(), "shapes": shapes}
    report.update(step_ms=step, step_ratio=step["ours"] / step["torch"])
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
