"""`python -m keras_recurrentgemma export PRESET OUT --format ...`."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import pytest

from keras_recurrentgemma.export import FORMATS
from keras_recurrentgemma.export import writers
from keras_recurrentgemma.export.cli import main

BACKEND = keras.config.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESET = os.path.join(ROOT, "presets", "griffin_tiny_pydocs_en")
# The format each backend exports fastest.
FORMAT = {"torch": "onnx", "tensorflow": "tf_saved_model", "jax": "tf_saved_model"}


def test_export_shipped_preset_and_generate(tmp_path, capsys):
    format = FORMAT[BACKEND]
    pytest.importorskip("onnxruntime" if format == "onnx" else "tensorflow")
    out = tmp_path / "artifact"
    code = main([PRESET, str(out), "--format", format, "--backend", BACKEND])
    assert code == 0, capsys.readouterr().err
    assert f"as {format} to {out}" in capsys.readouterr().out
    meta = json.loads((out / "generation.json").read_text())
    assert meta["format"] == format and meta["vocabulary_size"] == 4096
    assert os.listdir(tmp_path) == ["artifact"]

    from keras_recurrentgemma.serving import load_exported

    text = load_exported(str(out)).generate("def add(a, b):", max_new_tokens=8)
    assert isinstance(text, str) and text


def test_refuses_existing_output(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    format = FORMAT[BACKEND]
    code = main([PRESET, str(out), "--format", format, "--backend", BACKEND])
    assert code == 2
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    assert os.listdir(out) == ["keep.txt"]


def test_format_not_on_this_backend(tmp_path, capsys):
    other = [f for f in FORMATS if BACKEND not in writers(f)]
    if not other:
        pytest.skip(f"{BACKEND} writes every generation format")
    out = tmp_path / "out"
    code = main([PRESET, str(out), "--format", other[0], "--backend", BACKEND])
    assert code == 2
    can = " or ".join(writers(other[0]))
    assert f"use {can}" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_unknown_format_is_a_usage_error(tmp_path):
    # argparse rejects it before anything is imported or written.
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_recurrentgemma",
            "export",
            PRESET,
            str(tmp_path / "out"),
            "--format",
            "gguf",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )
    assert result.returncode == 2
    assert "invalid choice: 'gguf'" in result.stderr
    assert not os.listdir(tmp_path)


def test_transformers_format(tmp_path, capsys):
    if importlib.util.find_spec("keras_recurrentgemma.convert.to_transformers") is None:
        pytest.skip("keras_recurrentgemma.convert.to_transformers is not written yet")
    out = tmp_path / "hf"
    code = main([PRESET, str(out), "--format", "transformers", "--backend", BACKEND])
    assert code == 0, capsys.readouterr().err
    assert (out / "config.json").is_file()
    assert os.listdir(tmp_path) == ["hf"]
