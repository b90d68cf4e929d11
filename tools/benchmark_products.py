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
that the rest of it adds to.
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

# width, MLP width, key/value width, vocabulary, layers (recurrent, attention).
CONFIGS = {
    "2b": dict(w=2560, m=7680, h=256, v=256000, recurrent=18, attention=8),
    "9b": dict(w=4096, m=12288, h=256, v=256000, recurrent=26, attention=12),
}


def least_ms(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def time_side(side, config, repeats):
    """`{shape: least ms}` for one side ("ours" or "torch"), in this process."""
    rng = np.random.default_rng(0)
    if side == "ours":
        import jax

        from keras_recurrentgemma.ops import xla_cpu

        product = jax.jit(xla_cpu.matmul_transposed)
    else:
        import torch
    times = {}
    for out, inn in products(config):
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
    """`{(out, in): products per token}` of a decode step at `config`."""
    c = CONFIGS[config]
    w, m, h, v = c["w"], c["m"], c["h"], c["v"]
    return {
        (w, w): 3 * c["recurrent"] + 2 * c["attention"],
        (h, w): 2 * c["attention"],
        (m, w): 2 * (c["recurrent"] + c["attention"]),
        (w, m): c["recurrent"] + c["attention"],
        (v, w): 1,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="9b")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--side", choices=["ours", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(time_side(args.side, args.config, args.repeats)))
        return
    sides = {}
    for side in ("ours", "torch"):
        command = [sys.executable, __file__, "--side", side]
        command += ["--config", args.config, "--repeats", str(args.repeats)]
        env = dict(os.environ, KERAS_BACKEND="jax")
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        sides[side] = json.loads(done.stdout.splitlines()[-1])
    shapes, step = {}, {"ours": 0.0, "torch": 0.0}
    for (out, inn), count in products(args.config).items():
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
