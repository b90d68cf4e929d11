"""Peak memory and speed of chunked prefill on a very long input, on CPU.

    KERAS_BACKEND=jax python tools/benchmark_long_prefill.py \\
        --lengths 10000 100000 1000000 --chunk-size 4096

For each length, a fresh process builds a tiny random Griffin (`TINY_CONFIG`,
printed in the output), draws random int32 ids into a numpy array, and runs
`prefill(ids, chunk_size=...)` on the backend of `KERAS_BACKEND`. It reports:

- `peak_over_baseline_bytes`: the process's peak resident memory during the
  prefill above what it held just before. The baseline is taken after a
  warm-up prefill of a full chunk and of the last, shorter one, so kernels
  compiled or cached once per chunk shape are in it; so is the input array
  (`input_bytes`, 4 MB at a million tokens), which the caller owns.
- `resting_over_baseline_by_tenth_bytes`: the lowest resident memory in each
  tenth of the prefill, over the baseline: what stays between chunks. A
  climb from the first tenth to the last is memory kept per chunk.
- `prefill_s` and `tokens_per_s` for that prefill.
- `final_state_max_relative_error`: the final cache against a second prefill
  of the same ids with `--reference-chunk-size`, per float leaf
  `max|a - b| / max|b|`, worst leaf named; integer leaves (positions, token
  counts) must match exactly (`integer_leaves_equal`).

The summary compares the shortest and the longest length: flat memory means
`peak_over_baseline_growth` (their ratio) near 1, `peak_rss_growth_bytes`
(their absolute peaks' difference, the input's growth included) near
`input_growth_bytes`, and `resting_growth_in_second_half_bytes` (the
longest run's resting memory at its end minus at its middle) near 0. The
baselines of two processes differ by tens of MB on some backends, so a
small peak-over-baseline makes the ratio noisy; the bytes are the measure.

Children run on the CPU even where an accelerator is visible: resident
memory is the measure.
"""

import argparse
import gc
import json
import os
import subprocess
import sys
import threading
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# Griffin's block pattern at a width and window small enough that a CPU
# absorbs a million tokens in minutes; the window is far shorter than the
# input, so the attention ring buffer wraps thousands of times.
TINY_CONFIG = dict(
    vocabulary_size=256,
    hidden_dim=64,
    intermediate_dim=192,
    num_heads=2,
    block_types=["recurrent", "recurrent", "attention"],
    attention_window_size=128,
)


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


class RssMonitor:
    """Resident memory while a call runs: its peak, and its trend.

    `ru_maxrss` and `VmHWM` hold the whole process's lifetime peak, which
    model building or the warm-up may have set. Writing "5" to
    `/proc/self/clear_refs` resets `VmHWM` to the current RSS, which makes the
    peak exact; where that is refused, the peak is the highest of the
    samples, which can miss a spike shorter than the sampling interval.

    A thread samples `VmRSS` every 5 ms. Each chunk's work rises and falls
    again, so the lowest sample of each tenth of the run is the memory that
    stays between chunks: if that climbs, something is kept per chunk. Only
    the lowest sample of each half second is stored, so that the monitor's
    own memory does not climb with the run's length.
    """

    def __init__(self, interval=0.005, bucket_s=0.5):
        self.method = None
        self._interval = interval
        self._bucket_s = bucket_s
        self._lowest = []  # Per bucket of `bucket_s` seconds.
        self._peak = 0
        self._start = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.method = "VmHWM reset through /proc/self/clear_refs"
        except OSError:
            self.method = "highest VmRSS sample (every 5 ms)"
        self._start = time.perf_counter()
        self._record()
        self._thread.start()

    def _record(self):
        rss = _status_bytes("VmRSS")
        bucket = int((time.perf_counter() - self._start) / self._bucket_s)
        while len(self._lowest) <= bucket:
            self._lowest.append(rss)
        self._lowest[bucket] = min(self._lowest[bucket], rss)
        self._peak = max(self._peak, rss)

    def _sample(self):
        while not self._stop.wait(self._interval):
            self._record()

    def stop(self):
        """Returns `(peak bytes, lowest sample in each tenth of the run)`.

        A run shorter than five seconds has fewer than ten buckets; the
        tenths that fall between them are `None`.
        """
        self._stop.set()
        self._thread.join()
        self._record()
        peak = self._peak
        if self.method.startswith("VmHWM"):
            peak = max(peak, _status_bytes("VmHWM"))
        n = len(self._lowest)
        tenths = [[] for _ in range(10)]
        for i, rss in enumerate(self._lowest):
            tenths[min(10 * i // n, 9)].append(rss)
        return peak, [min(rss) if rss else None for rss in tenths]


def build_model(seed):
    import keras

    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    keras.utils.set_random_seed(seed)
    return RecurrentGemmaCausalLM(RecurrentGemmaBackbone(**TINY_CONFIG))


def named_leaves(cache):
    """`(name, numpy array)` for every leaf of a `RecurrentGemmaCache`."""
    from keras import ops

    leaves = [("num_tokens", cache.num_tokens), ("hidden", cache.hidden)]
    for i, block in enumerate(cache.blocks):
        leaves += [(f"blocks[{i}].{k}", v) for k, v in block._asdict().items()]
    return [(name, ops.convert_to_numpy(leaf)) for name, leaf in leaves]


def compare_caches(actual, expected):
    """Worst float-leaf relative error and whether integer leaves match."""
    import numpy as np

    worst, worst_name, ints_equal = 0.0, None, True
    for (name, a), (_, e) in zip(actual, expected, strict=True):
        if np.issubdtype(e.dtype, np.integer):
            ints_equal = ints_equal and bool(np.array_equal(a, e))
            continue
        a, e = a.astype(np.float64), e.astype(np.float64)
        scale = np.max(np.abs(e))
        error = (
            float(np.max(np.abs(a - e)) / scale) if scale else float(np.max(np.abs(a)))
        )
        if error >= worst:
            worst, worst_name = error, name
    return worst, worst_name, ints_equal


def measure(args):
    """One length's prefill in this process: memory, time, final state."""
    import keras
    import numpy as np

    length, chunk = args.child_length, args.chunk_size
    causal_lm = build_model(args.seed)
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, TINY_CONFIG["vocabulary_size"], (args.batch_size, length))
    ids = ids.astype("int32")
    mask = np.ones_like(ids) if args.padding_mask else None
    input_bytes = ids.nbytes + (0 if mask is None else mask.nbytes)

    # Every chunk has one of these two shapes.
    warm_up = [slice(0, chunk)]
    if length % chunk:
        warm_up.append(slice(length - length % chunk, length))
    for part in warm_up:
        causal_lm.prefill(
            ids[:, part],
            None if mask is None else mask[:, part],
            chunk_size=chunk,
        )
    gc.collect()

    monitor = RssMonitor()
    baseline = _status_bytes("VmRSS")
    monitor.start()
    start = time.perf_counter()
    cache = causal_lm.prefill(ids, mask, chunk_size=chunk)
    leaves = named_leaves(cache)  # Waits for asynchronous backends.
    prefill_s = time.perf_counter() - start
    peak_bytes, resting = monitor.stop()

    record = {
        "backend": keras.config.backend(),
        "length": length,
        "input_bytes": input_bytes,
        "rss_baseline_bytes": baseline,
        "peak_rss_bytes": peak_bytes,
        "peak_over_baseline_bytes": peak_bytes - baseline,
        "peak_method": monitor.method,
        "resting_over_baseline_by_tenth_bytes": [
            None if rss is None else rss - baseline for rss in resting
        ],
        "prefill_s": round(prefill_s, 2),
        "tokens_per_s": round(args.batch_size * length / prefill_s),
        "num_tokens": leaves[0][1].tolist(),
    }
    if args.reference_chunk_size:
        start = time.perf_counter()
        reference = causal_lm.prefill(ids, mask, chunk_size=args.reference_chunk_size)
        reference = named_leaves(reference)
        record["reference_s"] = round(time.perf_counter() - start, 2)
        error, name, ints_equal = compare_caches(leaves, reference)
        record["final_state_max_relative_error"] = error
        record["final_state_worst_leaf"] = name
        record["integer_leaves_equal"] = ints_equal
    return record


def run_child(argv, length):
    child = [sys.executable, os.path.abspath(__file__), *argv]
    child += ["--child-length", str(length)]
    # Resident memory is a host measure: keep every backend off any GPU.
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    out = subprocess.run(child, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(records, args):
    """The run's settings, its records, and how memory grew with length."""
    first, last = records[0], records[-1]
    tenths = last["resting_over_baseline_by_tenth_bytes"]
    # The second half only: the first chunks may still settle the allocator.
    halfway = next(r for r in tenths[4::-1] if r is not None)
    end = next(r for r in tenths[::-1] if r is not None)
    return {
        "backend": first["backend"],
        "device": f"cpu, {os.cpu_count()} cores",
        "config": TINY_CONFIG,
        "chunk_size": args.chunk_size,
        "reference_chunk_size": args.reference_chunk_size,
        "batch_size": args.batch_size,
        "padding_mask": args.padding_mask,
        "measure": "peak RSS of a fresh process per length, over its RSS "
        "after a warm-up prefill",
        "note": "the input ids (input_bytes; 4 MB per million int32 tokens, "
        "doubled with --padding-mask) are allocated before the baseline and "
        "are expected; peak_over_baseline_bytes is the prefill's own memory",
        "results": records,
        "growth_lengths": [first["length"], last["length"]],
        "peak_over_baseline_growth": round(
            last["peak_over_baseline_bytes"]
            / max(first["peak_over_baseline_bytes"], 1),
            2,
        ),
        "peak_over_baseline_growth_bytes": last["peak_over_baseline_bytes"]
        - first["peak_over_baseline_bytes"],
        "peak_rss_growth_bytes": last["peak_rss_bytes"] - first["peak_rss_bytes"],
        "input_growth_bytes": last["input_bytes"] - first["input_bytes"],
        "resting_growth_in_second_half_bytes": end - halfway,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--lengths", type=int, nargs="+", default=[10_000, 100_000, 1_000_000]
    )
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument(
        "--reference-chunk-size",
        type=int,
        default=1000,
        help="chunk size of the second prefill the final state is compared "
        "with; 0 skips it",
    )
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument(
        "--padding-mask",
        action="store_true",
        help="also pass an all-ones numpy padding_mask",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--child-length", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child_length is not None:
        print(json.dumps(measure(args)), flush=True)
        return None
    argv = list(sys.argv[1:] if argv is None else argv)
    records = []
    for length in args.lengths:
        record = run_child(argv, length)
        print(json.dumps(record), file=sys.stderr, flush=True)
        records.append(record)
    summary = summarize(records, args)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
