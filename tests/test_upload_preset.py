"""`keras_hub.upload_preset` accepts our preset directories.

Everything `upload_preset` does before it reaches the network is run for
real: its local checks of the directory and, for Hugging Face, the model
card it writes from our `config.json` and `task.json`. The network calls
(`kagglehub.model_upload`; `huggingface_hub.create_repo`, `file_exists`,
`upload_folder`) are replaced by recorders that also look at what would
have been uploaded.
"""

import os
import shutil
import types

import keras_hub
import pytest
from keras_hub.src.utils import preset_utils

from keras_recurrentgemma import presets
from tests.models import tiny_causal_lm

SHIPPED = presets.preset_directory(presets.DEFAULT_PRESET)


class FakeHubs:
    """Stands in for `kagglehub` and `huggingface_hub`; records each call."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.kagglehub = types.SimpleNamespace(model_upload=self._kaggle_upload)
        self.huggingface_hub = types.SimpleNamespace(
            create_repo=self._create_repo,
            file_exists=lambda repo_id, filename: False,
            upload_folder=self._upload_folder,
        )
        monkeypatch.setattr(preset_utils, "kagglehub", self.kagglehub, raising=False)
        monkeypatch.setattr(
            preset_utils, "huggingface_hub", self.huggingface_hub, raising=False
        )

    def _kaggle_upload(self, handle, preset):
        self.calls.append(("kaggle", handle, sorted(os.listdir(preset)), None))

    def _create_repo(self, repo_id, exist_ok):
        return types.SimpleNamespace(repo_id=repo_id)

    def _upload_folder(self, repo_id, folder_path):
        # KerasHub writes a model card when the repo has none, and deletes
        # it again after the upload: read it while it is there.
        with open(os.path.join(folder_path, "README.md"), encoding="utf-8") as f:
            card = f.read()
        self.calls.append(("hf", repo_id, sorted(os.listdir(folder_path)), card))


@pytest.fixture
def saved_preset(tmp_path):
    causal_lm = tiny_causal_lm("griffin")
    causal_lm.save_to_preset(str(tmp_path / "preset"))
    return str(tmp_path / "preset")


@pytest.fixture
def shipped_copy(tmp_path):
    # A copy: the Hugging Face path writes and deletes README.md in the
    # directory, which must not touch the package's own files.
    if SHIPPED is None or not os.path.isdir(SHIPPED):
        pytest.skip("the shipped preset is not in this checkout")
    return shutil.copytree(SHIPPED, tmp_path / "shipped")


def test_saved_preset_passes_validation_for_kaggle(saved_preset, monkeypatch):
    hubs = FakeHubs(monkeypatch)
    keras_hub.upload_preset("kaggle://user/recurrentgemma/keras/tiny", saved_preset)
    ((hub, handle, files, _),) = hubs.calls
    assert (hub, handle) == ("kaggle", "user/recurrentgemma/keras/tiny")
    assert {"config.json", "model.weights.h5", "task.json"} <= set(files)


@pytest.mark.parametrize("source", ["saved_preset", "shipped_copy"])
def test_preset_passes_validation_for_hugging_face(source, request, monkeypatch):
    preset = str(request.getfixturevalue(source))
    had_readme = os.path.exists(os.path.join(preset, "README.md"))
    hubs = FakeHubs(monkeypatch)
    keras_hub.upload_preset("hf://user/recurrentgemma-tiny", preset)
    ((hub, repo, files, card),) = hubs.calls
    assert (hub, repo) == ("hf", "user/recurrentgemma-tiny")
    assert "model.weights.h5" in files
    # The card KerasHub generates from our config: model and task named.
    assert "pipeline_tag: text-generation" in card
    assert "RecurrentGemma" in card
    assert "hidden_dim" in card
    # KerasHub deletes its generated card afterwards. It writes that card
    # over a README already in the directory, so the shipped preset's own
    # README is uploaded as the generated card and then gone: the README
    # says to create the repo and its card first (then none is generated).
    assert not os.path.exists(os.path.join(preset, "README.md"))
    assert had_readme == (source == "shipped_copy")


def test_shipped_preset_passes_validation_for_kaggle(shipped_copy, monkeypatch):
    hubs = FakeHubs(monkeypatch)
    keras_hub.upload_preset(
        "kaggle://user/recurrentgemma/keras/pydocs", str(shipped_copy)
    )
    assert [call[:2] for call in hubs.calls] == [
        ("kaggle", "user/recurrentgemma/keras/pydocs")
    ]


def test_incomplete_preset_fails_before_the_network(saved_preset, monkeypatch):
    hubs = FakeHubs(monkeypatch)
    os.remove(os.path.join(saved_preset, "model.weights.h5"))
    with pytest.raises(FileNotFoundError, match="weights file is missing"):
        keras_hub.upload_preset("kaggle://user/recurrentgemma/keras/tiny", saved_preset)
    assert hubs.calls == []
