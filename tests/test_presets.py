"""`from_preset` on every class and from every source, and the preset registry.

Downloads are tested with the real downloaders answering from their real
cache layouts (`huggingface_hub` with `HF_HUB_OFFLINE=1`, `kagglehub` with a
versioned handle and `KAGGLEHUB_CACHE`): no network is needed, and what is
read is exactly what a download would have left. Refusals the servers would
give (gated model, missing credentials) are raised with the downloaders' own
exception classes.
"""

import importlib
import json
import os
import shutil

import keras
import numpy as np
import pytest

import keras_recurrentgemma as krg
from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor
from keras_recurrentgemma import RecurrentGemmaTokenizer
from keras_recurrentgemma import presets
from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from tests.conftest import TINY_CONFIGS
from tests.models import assert_same_weights
from tests.models import tiny_causal_lm
from tests.models import write_tiny_hf_checkpoint
from tests.tolerances import LORA_MERGED
from tests.vocab import tiny_proto

PROMPT = "The quick brown fox"
CLASSES = (
    RecurrentGemmaBackbone,
    RecurrentGemmaCausalLM,
    RecurrentGemmaCausalLMPreprocessor,
    RecurrentGemmaTokenizer,
)


def greedy(causal_lm, max_length=22):
    causal_lm.compile(sampler="greedy")
    return causal_lm.generate(PROMPT, max_length=max_length)


# --- the registry ----------------------------------------------------------


def official_param_count(config):
    """Parameters of a Griffin config, counted from the layer shapes."""
    d, m = config["hidden_dim"], config["intermediate_dim"]
    lru = config.get("lru_width") or d
    heads = config["num_heads"]
    width = config.get("conv1d_temporal_width", 4)
    total = config["vocabulary_size"] * d + d  # embedding, final norm
    for block_type in config["block_types"]:
        total += 2 * d + 2 * d * m + 2 * m + m * d + d  # norms, MLP
        if block_type == "attention":
            head_dim = d // heads
            total += d * d + 2 * d * head_dim + d * d + d
        else:
            total += 2 * (d * lru + lru) + lru * d + d  # linear_x, _y, _out
            total += width * lru + lru + lru  # conv1d, a_param
            total += 2 * (heads * (lru // heads) ** 2 + lru)  # gates
    return total


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_param_count_formula_matches_the_backbone(name):
    config = TINY_CONFIGS[name]
    assert (
        official_param_count(config) == RecurrentGemmaBackbone(**config).count_params()
    )


@pytest.mark.parametrize("cls", CLASSES)
def test_every_class_lists_the_presets(cls):
    assert set(cls.presets) == set(presets.PRESETS)
    assert presets.DEFAULT_PRESET in cls.presets


@pytest.mark.parametrize(
    "name", [n for n in presets.PRESETS if presets.PRESETS[n]["metadata"]["official"]]
)
def test_official_presets(name):
    entry = presets.PRESETS[name]
    metadata = entry["metadata"]
    size = "9b" if "9b" in name else "2b"
    assert metadata["config"]["hidden_dim"] == {"2b": 2560, "9b": 4096}[size]
    assert len(metadata["config"]["block_types"]) == {"2b": 26, "9b": 38}[size]
    assert metadata["params"] == official_param_count(metadata["config"])
    suffix = "-it" if metadata["instruction_tuned"] else ""
    assert entry["handle"] == f"hf://google/recurrentgemma-{size}{suffix}"
    assert (
        entry["kaggle_handle"] == f"kaggle://google/recurrentgemma/flax/{size}{suffix}"
    )
    assert ("instruct" in name) == metadata["instruction_tuned"]


def test_unknown_name_lists_the_known_presets():
    with pytest.raises(ValueError, match="Known presets: .*griffin_tiny_pydocs_en"):
        RecurrentGemmaCausalLM.from_preset("recurrentgemma_7b_en")


@pytest.mark.parametrize("bad", ["s3://bucket/model", 42])
def test_unsupported_handles(bad):
    with pytest.raises(ValueError, match="preset"):
        RecurrentGemmaBackbone.from_preset(bad)


# --- Keras presets: save_to_preset -> from_preset --------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    causal_lm = tiny_causal_lm("griffin", sequence_length=24)
    path = str(tmp_path_factory.mktemp("keras_preset"))
    causal_lm.save_to_preset(path)
    return causal_lm, path


def test_round_trip_is_bit_exact(saved):
    causal_lm, path = saved
    loaded = RecurrentGemmaCausalLM.from_preset(path)
    assert_same_weights(causal_lm, loaded)
    assert loaded.preprocessor.sequence_length == 24
    assert loaded.get_config()["instruction_tuned"] is False
    assert greedy(loaded) == greedy(causal_lm)
    assert_same_weights(causal_lm.backbone, RecurrentGemmaBackbone.from_preset(path))


def test_tokenizer_and_preprocessor_from_keras_preset(saved):
    causal_lm, path = saved
    tokenizer = RecurrentGemmaTokenizer.from_preset(path)
    assert tokenizer.proto == causal_lm.preprocessor.tokenizer.proto
    preprocessor = RecurrentGemmaCausalLMPreprocessor.from_preset(path)
    assert preprocessor.sequence_length == 24
    assert (
        tokenizer(PROMPT).tolist() == causal_lm.preprocessor.tokenizer(PROMPT).tolist()
    )


def test_load_weights_false_keeps_the_architecture(saved):
    causal_lm, path = saved
    fresh = RecurrentGemmaBackbone.from_preset(path, load_weights=False)
    assert fresh.get_config() == causal_lm.backbone.get_config()


def test_round_trip_after_lora_saves_merged_kernels(tmp_path):
    causal_lm = tiny_causal_lm("griffin")
    backbone = causal_lm.backbone
    backbone.enable_lora(2, target_layer_names=["linear_x", "proj_q"])
    lora_layers = [
        layer
        for layer in backbone._flatten_layers()
        if getattr(layer, "lora_enabled", 0)
    ]
    assert lora_layers
    rng = np.random.default_rng(1)
    for layer in lora_layers:  # lora_kernel_b starts at zero
        layer.lora_kernel_b.assign(
            rng.normal(size=layer.lora_kernel_b.shape).astype("float32")
        )
    # Keyed by variable path: every block has its own `linear_x`.
    merged = {
        layer._kernel.path: np.asarray(keras.ops.convert_to_numpy(layer.kernel))
        for layer in lora_layers
    }
    expected_logits = keras.ops.convert_to_numpy(
        causal_lm.score(np.array([[2, 5, 9, 14, 7]]))
    )
    causal_lm.save_to_preset(str(tmp_path))
    loaded = RecurrentGemmaCausalLM.from_preset(str(tmp_path))
    loaded_kernels = {
        layer._kernel.path: keras.ops.convert_to_numpy(layer.kernel)
        for layer in loaded.backbone._flatten_layers()
        if getattr(layer, "_kernel", None) is not None
    }
    for path, kernel in merged.items():
        np.testing.assert_array_equal(loaded_kernels[path], kernel, err_msg=path)
    assert not any(
        getattr(layer, "lora_enabled", False)
        for layer in loaded.backbone._flatten_layers()
    )
    logits = keras.ops.convert_to_numpy(loaded.score(np.array([[2, 5, 9, 14, 7]])))
    # Merged kernels compute x @ (k + a b) instead of x @ k + (x @ a) @ b.
    np.testing.assert_allclose(logits, expected_logits, **LORA_MERGED["float32"])


def test_dtype_override(saved):
    _, path = saved
    backbone = RecurrentGemmaBackbone.from_preset(path, dtype="bfloat16")
    assert backbone.token_embedding.embeddings.dtype == "bfloat16"


def test_truncated_weights_file_is_a_clear_error(saved, tmp_path):
    _, path = saved
    broken = shutil.copytree(path, tmp_path / "broken")
    weights = broken / "model.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.weights.h5"):
        RecurrentGemmaCausalLM.from_preset(str(broken))


def test_config_that_disagrees_with_the_weights(saved, tmp_path):
    _, path = saved
    broken = shutil.copytree(path, tmp_path / "broken")
    config = json.loads((broken / "config.json").read_text())
    config["config"]["intermediate_dim"] += 8
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="model.weights.h5.*config.json"):
        RecurrentGemmaBackbone.from_preset(str(broken))


def test_directory_in_no_known_format(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match=r"not a checkpoint.*notes\.txt"):
        RecurrentGemmaCausalLM.from_preset(str(tmp_path))


def test_other_hugging_face_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="'llama'"):
        RecurrentGemmaBackbone.from_preset(str(tmp_path))


def test_a_file_instead_of_a_directory(saved):
    _, path = saved
    with pytest.raises(ValueError, match="is a file"):
        RecurrentGemmaBackbone.from_preset(os.path.join(path, "config.json"))


# --- Hugging Face checkpoints, converted on load ---------------------------


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf") / "tiny")


def test_huggingface_directory_on_every_class(hf_dir):
    expected = backbone_from_huggingface(hf_dir)
    causal_lm = RecurrentGemmaCausalLM.from_preset(hf_dir)
    assert_same_weights(causal_lm.backbone, expected)
    assert_same_weights(RecurrentGemmaBackbone.from_preset(hf_dir), expected)
    tokenizer = RecurrentGemmaTokenizer.from_preset(hf_dir)
    assert tokenizer.proto == tiny_proto()
    preprocessor = RecurrentGemmaCausalLMPreprocessor.from_preset(
        hf_dir, sequence_length=16
    )
    assert preprocessor.sequence_length == 16
    assert len(greedy(causal_lm)) > len(PROMPT)


def test_huggingface_to_keras_preset_round_trip(hf_dir, tmp_path):
    causal_lm = RecurrentGemmaCausalLM.from_preset(hf_dir, instruction_tuned=True)
    causal_lm.save_to_preset(str(tmp_path))
    loaded = RecurrentGemmaCausalLM.from_preset(str(tmp_path))
    assert_same_weights(loaded, causal_lm)
    assert loaded.instruction_tuned


def test_huggingface_directory_without_tokenizer(hf_dir, tmp_path):
    path = shutil.copytree(hf_dir, tmp_path / "no_tokenizer")
    os.remove(path / "tokenizer.model")
    RecurrentGemmaBackbone.from_preset(str(path))  # weights alone are fine
    with pytest.raises(ValueError, match="no `tokenizer.model`"):
        RecurrentGemmaCausalLM.from_preset(str(path))


# --- hf:// handles through huggingface_hub's cache -------------------------


def put_in_hf_cache(cache, repo_id, source_dir, revision="0" * 40):
    """Lays `source_dir` out as `huggingface_hub` caches a downloaded repo."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(source_dir, repo / "snapshots" / revision)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def test_hf_handle_converts_a_transformers_repo(hf_dir, hf_cache):
    put_in_hf_cache(hf_cache, "someone/recurrentgemma-tiny", hf_dir)
    causal_lm = RecurrentGemmaCausalLM.from_preset("hf://someone/recurrentgemma-tiny")
    assert_same_weights(causal_lm.backbone, backbone_from_huggingface(hf_dir))


def test_hf_handle_of_a_keras_preset(saved, hf_cache):
    causal_lm, path = saved
    put_in_hf_cache(hf_cache, "someone/keras-tiny", path)
    loaded = RecurrentGemmaCausalLM.from_preset("hf://someone/keras-tiny")
    assert_same_weights(loaded, causal_lm)


def test_named_official_preset_downloads_from_hugging_face(hf_dir, hf_cache):
    # A tiny stand-in in the cache under the real repository name: the name
    # resolves to the handle, is converted, and marks the -it model as such.
    put_in_hf_cache(hf_cache, "google/recurrentgemma-2b-it", hf_dir)
    causal_lm = RecurrentGemmaCausalLM.from_preset("recurrentgemma_instruct_2b_en")
    assert causal_lm.instruction_tuned
    assert_same_weights(causal_lm.backbone, backbone_from_huggingface(hf_dir))


def test_hf_offline_and_not_cached(hf_cache):
    with pytest.raises(ValueError, match="not in the local Hugging Face cache"):
        RecurrentGemmaCausalLM.from_preset("recurrentgemma_2b_en")


def test_hf_gated_repo_says_to_accept_the_licence(monkeypatch):
    import huggingface_hub
    from huggingface_hub import errors

    # huggingface_hub's own HTTP client (httpx or its fork), whichever it uses.
    http = importlib.import_module(errors.Response.__module__.split(".")[0])

    def refuse(repo_id, **kwargs):
        url = f"https://huggingface.co/{repo_id}"
        response = http.Response(401, request=http.Request("GET", url))
        raise errors.GatedRepoError("401: access restricted", response=response)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", refuse)
    with pytest.raises(ValueError, match="accept its licence.*HF_TOKEN"):
        RecurrentGemmaBackbone.from_preset("hf://google/recurrentgemma-2b")


def test_hf_bad_handle():
    with pytest.raises(ValueError, match="hf://org/name"):
        RecurrentGemmaBackbone.from_preset("hf://not/a/valid//repo")


# --- kaggle:// handles through kagglehub's cache ---------------------------


@pytest.fixture
def kaggle_cache(tmp_path, monkeypatch):
    cache = tmp_path / "kaggle_cache"
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(cache))
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    return cache


def put_in_kaggle_cache(cache, handle, source_dir):
    """Lays `source_dir` out as `kagglehub` caches a downloaded model version."""
    owner, model, framework, variation, version = handle.split("/")
    base = cache / "models" / owner / model / framework / variation
    shutil.copytree(source_dir, base / version)
    (base / f"{version}.complete").touch()


def test_kaggle_handle_of_a_keras_preset(saved, kaggle_cache):
    causal_lm, path = saved
    put_in_kaggle_cache(kaggle_cache, "someone/griffin/keras/tiny/2", path)
    loaded = RecurrentGemmaCausalLM.from_preset("kaggle://someone/griffin/keras/tiny/2")
    assert_same_weights(loaded, causal_lm)


def test_kaggle_handle_converts_a_transformers_checkpoint(hf_dir, kaggle_cache):
    put_in_kaggle_cache(kaggle_cache, "someone/griffin/transformers/tiny/1", hf_dir)
    backbone = RecurrentGemmaBackbone.from_preset(
        "kaggle://someone/griffin/transformers/tiny/1"
    )
    assert_same_weights(backbone, backbone_from_huggingface(hf_dir))


def test_kaggle_offline_and_not_cached(kaggle_cache):
    # Without a version, kagglehub must ask Kaggle for the latest one.
    with pytest.raises(ValueError, match="cannot reach Kaggle"):
        RecurrentGemmaBackbone.from_preset("kaggle://google/recurrentgemma/flax/2b")


@pytest.mark.parametrize(
    "status, match", [(403, "Accept the model's licence"), (401, "KAGGLE_KEY")]
)
def test_kaggle_refusals(monkeypatch, status, match):
    import kagglehub
    import requests
    from kagglehub import exceptions

    def refuse(handle, *args, **kwargs):
        response = requests.Response()
        response.status_code = status
        raise exceptions.KaggleApiHTTPError(f"{status} Client Error", response=response)

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(ValueError, match=match):
        RecurrentGemmaBackbone.from_preset("kaggle://google/recurrentgemma/flax/2b")


def test_kaggle_missing_credentials(monkeypatch):
    import kagglehub
    from kagglehub import exceptions

    def refuse(handle, *args, **kwargs):
        raise exceptions.UnauthenticatedError()

    monkeypatch.setattr(kagglehub, "model_download", refuse)
    with pytest.raises(ValueError, match="no Kaggle credentials.*KAGGLE_USERNAME"):
        RecurrentGemmaBackbone.from_preset("kaggle://google/recurrentgemma/flax/2b")


def test_kaggle_malformed_handle():
    with pytest.raises(ValueError, match="owner/model/framework/variation"):
        RecurrentGemmaBackbone.from_preset("kaggle://google/recurrentgemma")


def test_package_is_lazy():
    # `import keras_recurrentgemma` must not import keras (the CLI sets the
    # backend first); checked in a fresh interpreter.
    import subprocess
    import sys

    code = (
        "import sys, keras_recurrentgemma as k; "
        "assert 'keras' not in sys.modules, 'keras imported'; "
        "k.RecurrentGemmaBackbone; assert 'keras' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
    assert krg.__version__
