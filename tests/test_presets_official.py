"""`from_preset` and `tools/convert_checkpoint.py` on the official formats.

The checkpoints are laid out as the Kaggle downloads are — an Orbax folder
`2b/` (written by `orbax.checkpoint.PyTreeCheckpointer`) or a `2b.pt`
(written by `torch.save` of the official PyTorch state dict) next to
`tokenizer.model` — with tiny random weights and the tiny vocabulary. The
released checkpoints do not record the attention window, so these load with
the released models' 2048.
"""

import shutil

import pytest

pytest.importorskip("orbax.checkpoint")
pytest.importorskip("recurrentgemma")
torch = pytest.importorskip("torch")

import orbax.checkpoint as ocp  # noqa: E402
from recurrentgemma.conversion import flax_params_to_pytorch_state_dict  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaBackbone  # noqa: E402
from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402
from keras_recurrentgemma import RecurrentGemmaTokenizer  # noqa: E402
from keras_recurrentgemma.convert.official import backbone_from_official  # noqa: E402
from keras_recurrentgemma.convert.reference import griffin_config  # noqa: E402
from tests.conftest import TINY_CONFIGS  # noqa: E402
from tests.models import assert_same_weights  # noqa: E402
from tests.models import tiny_tokenizer  # noqa: E402
from tests.test_convert_checkpoint import tool  # noqa: E402
from tests.test_official_parity import random_official_params  # noqa: E402
from tests.test_presets import kaggle_cache  # noqa: E402, F401  (fixture)
from tests.test_presets import put_in_kaggle_cache  # noqa: E402
from tests.vocab import tiny_proto  # noqa: E402

CONFIG = {
    **TINY_CONFIGS["griffin"],
    "vocabulary_size": tiny_tokenizer().vocabulary_size(),
    "attention_window_size": 2048,
}


@pytest.fixture(scope="module")
def params():
    return random_official_params(griffin_config(CONFIG), seed=5)


@pytest.fixture(scope="module")
def expected(params):
    return backbone_from_official(params)


def kaggle_download(root, params, fmt):
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.model").write_bytes(tiny_proto())
    if fmt == "orbax":
        ocp.PyTreeCheckpointer().save(str(root / "2b"), params)
    else:
        torch.save(flax_params_to_pytorch_state_dict(params), root / "2b.pt")
    return root


@pytest.fixture(scope="module", params=["orbax", "official_torch"])
def download(request, params, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param) / "recurrentgemma-2b"
    return request.param, kaggle_download(root, params, request.param)


def test_task_from_an_official_download(download, expected):
    _, folder = download
    causal_lm = RecurrentGemmaCausalLM.from_preset(str(folder))
    assert_same_weights(causal_lm.backbone, expected)
    assert causal_lm.preprocessor.tokenizer.proto == tiny_proto()
    causal_lm.compile(sampler="greedy")
    assert causal_lm.generate("The quick", max_length=12).startswith("The quick")


def test_backbone_and_tokenizer_from_an_official_download(download, expected):
    _, folder = download
    backbone = RecurrentGemmaBackbone.from_preset(str(folder), attention_window_size=5)
    assert backbone.attention_window_size == 5
    assert_same_weights(backbone, expected)
    fresh = RecurrentGemmaBackbone.from_preset(str(folder), load_weights=False)
    config, want = fresh.get_config(), expected.get_config()
    config.pop("name"), want.pop("name")  # Keras numbers layer names
    assert config == want
    assert RecurrentGemmaTokenizer.from_preset(str(folder)).proto == tiny_proto()


def test_kaggle_handle_of_an_official_checkpoint(download, expected, kaggle_cache):  # noqa: F811
    fmt, folder = download
    framework = "flax" if fmt == "orbax" else "pyTorch"
    handle = f"google/recurrentgemma/{framework}/2b/1"
    put_in_kaggle_cache(kaggle_cache, handle, folder)
    backbone = RecurrentGemmaBackbone.from_preset(f"kaggle://{handle}")
    assert_same_weights(backbone, expected)


def test_convert_tool_with_check(download, expected, tmp_path, capsys):
    fmt, folder = download
    output = tmp_path / "preset"
    assert tool.main([str(folder), str(output), "--check", "--format", fmt]) == 0
    assert f"check: max |ours - {fmt}|" in capsys.readouterr().out
    assert_same_weights(
        RecurrentGemmaCausalLM.from_preset(str(output)).backbone, expected
    )


def test_convert_tool_window_override(download, tmp_path):
    _, folder = download
    output = tmp_path / "preset"
    assert tool.main([str(folder), str(output), "--attention-window-size", "5"]) == 0
    backbone = RecurrentGemmaBackbone.from_preset(str(output))
    assert backbone.attention_window_size == 5


def test_tokenizer_larger_than_the_embedding(tmp_path):
    small_vocab = {**TINY_CONFIGS["griffin"], "attention_window_size": 2048}
    assert small_vocab["vocabulary_size"] < CONFIG["vocabulary_size"]
    params = random_official_params(griffin_config(small_vocab), seed=1)
    folder = kaggle_download(tmp_path / "download", params, "official_torch")
    RecurrentGemmaBackbone.from_preset(str(folder))  # the weights alone are fine
    with pytest.raises(ValueError, match="tokenizer.model.*pieces.*embedding"):
        RecurrentGemmaCausalLM.from_preset(str(folder))


def test_truncated_official_checkpoint_names_the_file(download, tmp_path):
    fmt, folder = download
    broken = shutil.copytree(folder, tmp_path / "broken")
    if fmt == "orbax":
        data = max(
            (p for p in (broken / "2b").rglob("*") if p.is_file()),
            key=lambda p: p.stat().st_size,
        )
        match = "2b"
    else:
        data = broken / "2b.pt"
        match = "2b.pt"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    with pytest.raises(ValueError, match=match):
        RecurrentGemmaCausalLM.from_preset(str(broken))
