"""`save_to_preset` never loses the previous preset, however it is stopped."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaTokenizer
from tests.models import randomize
from tests.models import tiny_causal_lm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def snapshot(directory):
    """Every file under `directory` with its bytes."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                files[os.path.relpath(path, directory)] = f.read()
    return files


def leftovers(parent):
    return [name for name in os.listdir(parent) if name.startswith(".")]


def logits(causal_lm):
    ids = np.array([[2, 5, 9, 14]], "int32")
    return ops.convert_to_numpy(causal_lm.score(ids))


@pytest.fixture
def saved(tmp_path):
    """A saved causal LM, and a second one with other weights."""
    old = tiny_causal_lm("hawk", seed=0)
    new = tiny_causal_lm("hawk", seed=1)
    preset = tmp_path / "preset"
    old.save_to_preset(str(preset))
    return old, new, preset


def test_interrupted_save_leaves_the_previous_preset(saved, monkeypatch):
    old, new, preset = saved
    before = snapshot(preset)

    def interrupted(self, filepath, *args, **kwargs):
        with open(filepath, "wb") as f:
            f.write(b"half a weights file")
        raise KeyboardInterrupt

    monkeypatch.setattr(RecurrentGemmaBackbone, "save_weights", interrupted)
    with pytest.raises(KeyboardInterrupt):
        new.save_to_preset(str(preset))
    monkeypatch.undo()

    assert snapshot(preset) == before
    assert leftovers(preset.parent) == []
    reloaded = RecurrentGemmaCausalLM.from_preset(str(preset))
    np.testing.assert_array_equal(logits(reloaded), logits(old))


def test_killed_save_leaves_the_previous_preset(saved):
    # A process killed outright runs no cleanup at all: the previous preset
    # must still be whole.
    old, _, preset = saved
    before = snapshot(preset)
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {ROOT!r})
        from keras_recurrentgemma import RecurrentGemmaBackbone
        from tests.models import tiny_causal_lm

        def stalled(self, filepath, *args, **kwargs):
            with open(filepath, "wb") as f:
                f.write(b"half a weights file")
            print("writing", flush=True)
            time.sleep(600)

        RecurrentGemmaBackbone.save_weights = stalled
        tiny_causal_lm("hawk", seed=1).save_to_preset({str(preset)!r})
        """
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout.readline().strip() == "writing"
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert snapshot(preset) == before
    # Only the unfinished temporary directory is left, hidden and named.
    assert all(".preset.saving-" in name for name in leftovers(preset.parent))
    reloaded = RecurrentGemmaCausalLM.from_preset(str(preset))
    np.testing.assert_array_equal(logits(reloaded), logits(old))


def test_save_replaces_the_preset_and_keeps_other_files(saved):
    _, new, preset = saved
    (preset / "notes.txt").write_text("kept")
    (preset / "lora").mkdir()
    (preset / "lora" / "adapter.lora.h5").write_bytes(b"adapter")
    new.save_to_preset(str(preset))
    assert (preset / "notes.txt").read_text() == "kept"
    assert (preset / "lora" / "adapter.lora.h5").read_bytes() == b"adapter"
    assert leftovers(preset.parent) == []
    assert oct(os.stat(preset).st_mode & 0o777) != oct(0o700)
    reloaded = RecurrentGemmaCausalLM.from_preset(str(preset))
    np.testing.assert_array_equal(logits(reloaded), logits(new))


def test_backbone_saved_after_the_tokenizer_keeps_the_tokenizer(tmp_path):
    # KerasHub's documented way to build a preset: save the pieces one by
    # one into the same directory.
    causal_lm = tiny_causal_lm("hawk")
    preset = tmp_path / "pieces"
    causal_lm.preprocessor.tokenizer.save_to_preset(str(preset))
    causal_lm.backbone.save_to_preset(str(preset))
    causal_lm.preprocessor.save_to_preset(str(preset))
    tokenizer = RecurrentGemmaTokenizer.from_preset(str(preset))
    assert tokenizer.vocabulary_size() == causal_lm.backbone.vocabulary_size
    RecurrentGemmaBackbone.from_preset(str(preset))
    assert (preset / "preprocessor.json").exists()
    assert leftovers(tmp_path) == []


def test_stale_weight_shards_are_not_kept(saved):
    _, new, preset = saved
    # As if the previous save had been sharded.
    (preset / "model.weights.json").write_text("{}")
    (preset / "model_00000.weights.h5").write_bytes(b"old shard")
    new.backbone.save_to_preset(str(preset))
    assert not (preset / "model.weights.json").exists()
    assert not (preset / "model_00000.weights.h5").exists()
    backbone = RecurrentGemmaBackbone.from_preset(str(preset))
    for a, b in zip(backbone.weights, new.backbone.weights, strict=True):
        np.testing.assert_array_equal(ops.convert_to_numpy(a), ops.convert_to_numpy(b))


def test_refuses_a_file_or_a_directory_of_other_files(tmp_path):
    backbone = RecurrentGemmaBackbone(
        vocabulary_size=11,
        hidden_dim=8,
        intermediate_dim=8,
        num_heads=2,
        block_types=["recurrent"],
        attention_window_size=4,
    )
    randomize(backbone)
    a_file = tmp_path / "weights.bin"
    a_file.write_bytes(b"x")
    with pytest.raises(ValueError, match="is a file"):
        backbone.save_to_preset(str(a_file))
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="holds other files"):
        backbone.save_to_preset(str(home))
    assert os.listdir(home) == ["thesis.tex"]
    empty = tmp_path / "empty"
    empty.mkdir()
    backbone.save_to_preset(str(empty))
    assert (empty / "config.json").exists()


def test_metadata_names_the_kerashub_task_kind(saved, tmp_path):
    # KerasHub lists a task by its first base class, for ours the preset
    # mixin; its own models say "CausalLM".
    old, _, preset = saved
    with open(preset / "metadata.json") as f:
        assert json.load(f)["tasks"] == ["CausalLM"]
    old.backbone.save_to_preset(str(tmp_path / "backbone"))
    with open(tmp_path / "backbone" / "metadata.json") as f:
        metadata = json.load(f)
    assert metadata["tasks"] == ["CausalLM"]
    assert metadata["parameter_count"] == old.backbone.count_params()
