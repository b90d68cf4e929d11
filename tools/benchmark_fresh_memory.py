"""How fast this machine fills memory written for the first time.

    python tools/benchmark_fresh_memory.py --gib 8

A load that copies a checkpoint into new arrays writes every page of them
for the first time, and what that costs depends on the machine more than
on the loader: a virtual machine that hands freed memory back to its host
(`page_reporting`) makes the host fault each page in again. HF's
`from_pretrained` maps the file and writes nothing, so its load time does
not show this, and ours (JAX's, for the tensors XLA cannot take as the
file holds them) does. This fills `--gib` GiB in new arrays of
`--chunk-gib` GiB each, with `--threads` threads as the loader reads, then
fills the same arrays again, and prints one JSON object: GB/s per array,
first and second time. The gap between the two is the price of fresh
memory; run it just before a load benchmark to read that one's times.
"""

import argparse
import concurrent.futures
import json
import time

import numpy as np


def fill(arrays, threads, value):
    """Seconds of writing `value` over each array, split among `threads`."""
    seconds = []
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for array in arrays:
            parts = np.array_split(array, threads)
            start = time.perf_counter()
            list(pool.map(lambda part: part.fill(value), parts))
            seconds.append(time.perf_counter() - start)
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gib", type=float, default=8.0)
    parser.add_argument("--chunk-gib", type=float, default=1.0)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    count = max(1, round(args.gib / args.chunk_gib))
    # Unwritten: `np.empty` of this size is a fresh anonymous mapping.
    arrays = [np.empty(int(args.chunk_gib * 2**30), np.uint8) for _ in range(count)]
    first = fill(arrays, args.threads, 1)
    again = fill(arrays, args.threads, 2)
    gb = arrays[0].nbytes / 1e9
    report = {
        "gib": count * args.chunk_gib,
        "threads": args.threads,
        "first_write_gbps": [round(gb / t, 2) for t in first],
        "second_write_gbps": [round(gb / t, 2) for t in again],
        "first_write_s": round(sum(first), 3),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
