"""`tools/convert_checkpoint.py` on each source format, written by the real tools."""

import os
import pathlib
import shutil
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from tests.models import assert_same_weights
from tests.models import write_tiny_hf_checkpoint
from tests.scripts import load_script

ROOT = pathlib.Path(__file__).resolve().parents[1]
TOOL = ROOT / "tools" / "convert_checkpoint.py"


tool = load_script(TOOL, "convert_checkpoint")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


def test_huggingface_with_check(hf_dir, tmp_path, capsys):
    output = tmp_path / "preset"
    assert tool.main([hf_dir, str(output), "--check", "--instruction-tuned"]) == 0
    assert "check: max |ours - huggingface|" in capsys.readouterr().out
    causal_lm = RecurrentGemmaCausalLM.from_preset(str(output))
    assert causal_lm.instruction_tuned
    assert_same_weights(causal_lm.backbone, backbone_from_huggingface(hf_dir))
    assert sorted(os.listdir(output / "assets" / "tokenizer")) == ["vocabulary.spm"]


def test_bfloat16_output(hf_dir, tmp_path):
    output = tmp_path / "preset"
    assert tool.main([hf_dir, str(output), "--dtype", "bfloat16"]) == 0
    backbone = RecurrentGemmaCausalLM.from_preset(str(output), dtype=None).backbone
    expected = backbone_from_huggingface(hf_dir, dtype="bfloat16")
    for a, b in zip(backbone.weights, expected.weights, strict=True):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(keras.ops.cast(a, "float32")),
            keras.ops.convert_to_numpy(keras.ops.cast(b, "float32")),
        )


def test_refuses_to_overwrite(hf_dir, tmp_path, capsys):
    output = tmp_path / "preset"
    output.mkdir()
    (output / "mine.txt").write_text("keep me")
    assert tool.main([hf_dir, str(output)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (output / "mine.txt").read_text() == "keep me"


def test_wrong_format_flag(hf_dir, tmp_path, capsys):
    assert tool.main([hf_dir, str(tmp_path / "o"), "--format", "orbax"]) == 2
    assert "holds a huggingface checkpoint, not orbax" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_bad_source_leaves_nothing_behind(tmp_path, capsys):
    (tmp_path / "src").mkdir()
    assert tool.main([str(tmp_path / "src"), str(tmp_path / "o")]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_truncated_safetensors(hf_dir, tmp_path, capsys):
    source = shutil.copytree(hf_dir, tmp_path / "src")
    weights = source / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    assert tool.main([str(source), str(tmp_path / "o")]) == 2
    assert "model.safetensors" in capsys.readouterr().err


def test_runs_as_a_script(hf_dir, tmp_path):
    result = subprocess.run(
        [sys.executable, str(TOOL), hf_dir, str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env={**os.environ, "KERAS_BACKEND": keras.backend.backend()},
    )
    assert result.returncode == 0, result.stderr
    assert "Loading weights" in result.stderr  # the progress bar
    assert (tmp_path / "o" / "model.weights.h5").is_file()
