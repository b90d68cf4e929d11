"""Memory of the exported generator over 10,000 new tokens.

Exports a preset (the shipped tiny one by default) for generation, then, in a
fresh interpreter that imports only the runtime, numpy and sentencepiece,
streams `--tokens` greedy tokens and reads the resident set size
(`/proc/self/status` VmRSS) along the way. A fixed-size state means the RSS
after warm-up stays flat; the JSON printed at the end says by how much it
moved.

    python tools/benchmark_serving.py --backend torch --format onnx
    python tools/benchmark_serving.py --backend tensorflow --format tf_saved_model

Prints one JSON object: format, backend, tokens, RSS (MiB) at each
checkpoint, growth from the first checkpoint to the last, tokens per second,
and which of Keras/KerasHub/JAX/torch the runtime process had imported.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "presets", "griffin_tiny_pydocs_en")

RUNTIME = r"""
import json, sys, time
from keras_recurrentgemma.serving import load_exported

def rss_mib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024

path, tokens = sys.argv[1], int(sys.argv[2])
generator = load_exported(path)
checkpoints = sorted({100, 1000, tokens // 2, tokens})
rss, start = {}, None
stream = generator.stream_ids(["def main():"], tokens, stop_token_ids=None)
for count, _ in enumerate(stream, start=1):
    if count == 1:
        start = time.perf_counter()
    if count in checkpoints:
        rss[count] = round(rss_mib(), 1)
elapsed = time.perf_counter() - start
frameworks = sorted(
    m for m in ("keras", "keras_hub", "jax", "torch")
    if any(k == m or k.startswith(m + ".") for k in sys.modules)
)
print(json.dumps({
    "rss_mib": rss,
    "tokens_per_s": round((tokens - 1) / elapsed, 1),
    "frameworks_imported": frameworks,
}))
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--backend", default="torch", choices=("jax", "tensorflow", "torch")
    )
    parser.add_argument(
        "--format", default="onnx", choices=("onnx", "tf_saved_model", "litert")
    )
    parser.add_argument("--preset", default=PRESET)
    parser.add_argument("--tokens", type=int, default=10_000)
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as scratch:
        out = os.path.join(scratch, "artifact")
        env = {**os.environ, "PYTHONPATH": ROOT}
        export = [
            sys.executable,
            "-m",
            "keras_recurrentgemma",
            "export",
            args.preset,
            out,
            "--format",
            args.format,
            "--backend",
            args.backend,
        ]
        subprocess.run(export, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)
        env.pop("KERAS_BACKEND", None)
        result = subprocess.run(
            [sys.executable, "-c", RUNTIME, out, str(args.tokens)],
            check=True,
            env=env,
            capture_output=True,
            text=True,
        )
    report = json.loads(result.stdout.strip().splitlines()[-1])
    values = list(report["rss_mib"].values())
    report = {
        "format": args.format,
        "backend": args.backend,
        "tokens": args.tokens,
        **report,
        "rss_growth_mib": round(values[-1] - values[0], 1),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
