"""int8 ONNX artifact against the float one: size, logit error, top token.

Exports a preset (the shipped one by default) twice through
`python -m keras_recurrentgemma export ... --format onnx`, once with
`--quantize int8`, then runs both with the runtime only
(`keras_recurrentgemma.serving`) over the held-out texts of
`tools/benchmark_quantize.py`, teacher-forced: the first token through
`prefill`, every later one through `decode_step`, so the state of every
step is compared too. Prints one JSON object: each artifact's size, the
largest logit difference relative to the largest float logit, and how often
the top token agrees.

    python tools/benchmark_onnx_int8.py --backend torch
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
sys.path.insert(0, ROOT)
PRESET = os.path.join(ROOT, "presets", "griffin_tiny_pydocs_en")


def export(preset, out, backend, quantize):
    command = [sys.executable, "-m", "keras_recurrentgemma", "export", preset, out]
    command += ["--format", "onnx", "--backend", backend]
    if quantize:
        command += ["--quantize", "int8"]
    env = {**os.environ, "PYTHONPATH": ROOT, "KERAS_BACKEND": backend}
    subprocess.run(command, check=True, env=env, cwd=ROOT, stdout=subprocess.DEVNULL)


def size_mib(directory):
    names = [n for n in os.listdir(directory) if n.endswith(".onnx")]
    return sum(os.path.getsize(os.path.join(directory, n)) for n in names) / 2**20


def forced_logits(generator, ids):
    """Logits `[len(ids), v]` after each token of `ids`, one row at a time."""
    logits, state = generator.prefill([ids[:1]])
    rows = [logits[0]]
    for token in ids[1:]:
        logits, state = generator.decode_step([token], state)
        rows.append(logits[0])
    return np.stack(rows)


def main(argv=None):
    from benchmark_quantize import TEXTS

    from keras_recurrentgemma.serving import load_exported

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=("torch", "tensorflow"))
    parser.add_argument("--preset", default=PRESET)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        paths = {k: os.path.join(scratch, k) for k in ("float32", "int8")}
        for kind, path in paths.items():
            export(args.preset, path, args.backend, kind == "int8")
        generators = {k: load_exported(p) for k, p in paths.items()}
        sizes = {k: round(size_mib(p), 2) for k, p in paths.items()}
        ids = generators["float32"].tokenize(list(TEXTS))
        errors, agree, total = [], 0, 0
        for row in ids:
            ref = forced_logits(generators["float32"], row)
            got = forced_logits(generators["int8"], row)
            errors.append(float(np.max(np.abs(got - ref)) / np.max(np.abs(ref))))
            agree += int(np.sum(ref.argmax(-1) == got.argmax(-1)))
            total += len(row)
    report = {
        "preset": os.path.basename(os.path.normpath(args.preset)),
        "backend": args.backend,
        "size_mib": sizes,
        "texts": len(ids),
        "positions": total,
        "max_relative_logit_error": round(max(errors), 4),
        "top1_agreement": round(agree / total, 4),
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
