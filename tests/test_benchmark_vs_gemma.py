"""tools/benchmark_vs_gemma.py runs end to end, in its tiny setting.

The tool is run as a program (it starts one process per model) on this
process's backend, over two generated lengths; the figures themselves come
from a full run (see the README), here only their shape and sanity count.
"""

import importlib.util
import json
import math
import os
import pathlib
import subprocess
import sys

import keras
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "benchmark_vs_gemma.py"
LENGTHS = [3, 6]
PROMPT = 8
MODELS = ("gemma", "ours")


def positive(x):
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    # One backend keeps the tool from rotting (issue 22 asks for one); the
    # others would add about a minute each to the suite.
    if keras.config.backend() != "torch":
        pytest.skip("the tiny benchmark run is tested on torch")
    directory = tmp_path_factory.mktemp("vs_gemma")
    output, png = directory / "run.json", directory / "run.png"
    argv = [sys.executable, str(TOOL), "--config", "tiny"]
    argv += ["--backend", keras.config.backend(), "--prompt-length", str(PROMPT)]
    argv += ["--lengths", *map(str, LENGTHS), "--output", str(output)]
    have_matplotlib = importlib.util.find_spec("matplotlib") is not None
    if have_matplotlib:
        argv += ["--plot", str(png)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", OMP_NUM_THREADS="1")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    return printed, json.loads(output.read_text()), png if have_matplotlib else None


def test_json_is_printed_and_written(run):
    printed, written, _ = run
    assert printed == written
    assert written["backend"] == keras.config.backend()
    assert written["config"] == "tiny" and written["prompt_length"] == PROMPT
    assert set(written["models"]) == set(MODELS)
    assert all(positive(written["parameters"][m]) for m in MODELS)


def test_sampling_rows(run):
    _, result, _ = run
    rows = result["sampling"]
    assert [row["new_tokens"] for row in rows] == LENGTHS
    for row in rows:
        assert row["total_length"] == PROMPT + row["new_tokens"]
        for model in MODELS:
            m = row[model]
            for key in ("generate_s", "first_token_s", "tokens_per_s"):
                assert positive(m[key]), (model, key, m[key])
            # The first-token call is the same call stopped early: it cannot
            # take longer than the whole one by more than timing noise, but a
            # busy machine may still invert two tiny times, so the derived
            # per-token figures need only be finite.
            assert math.isfinite(m["ms_per_token"])
            assert m["compile_and_first_s"] >= 0


def test_memory_and_prefill(run):
    _, result, _ = run
    totals = [row["total_length"] for row in result["memory"]]
    assert totals == [PROMPT + 1] + [PROMPT + n for n in LENGTHS]
    for row in result["memory"]:
        for model in MODELS:
            assert positive(row[model]["peak_bytes"])
            assert row[model]["peak_bytes"] >= row[model]["baseline_bytes"] > 0
    for model in MODELS:
        assert positive(result["prefill"][model]["tokens_per_s"])


def test_plot_is_a_png(run):
    _, _, png = run
    if png is None:
        pytest.skip("matplotlib is not installed")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_plot_redraws_from_json(run, tmp_path):
    pytest.importorskip("matplotlib")
    _, result, _ = run
    saved, png = tmp_path / "saved.json", tmp_path / "again.png"
    saved.write_text(json.dumps(result))
    argv = [sys.executable, str(TOOL), "--from-json", str(saved), "--plot", str(png)]
    subprocess.run(argv, check=True, capture_output=True, cwd=ROOT)
    assert png.read_bytes().startswith(b"\x89PNG")
