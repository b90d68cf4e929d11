"""Loading Hugging Face `transformers` checkpoints, and logits parity with HF.

The oracle is `transformers.RecurrentGemmaForCausalLM` with every parameter
randomised, saved with `save_pretrained` and loaded through
`RecurrentGemmaBackbone.from_preset`. HF is a valid reference only while a
sequence fits in the attention window: past it, HF attends causally without
a window (SPEC §6), so every comparison here uses at most
`attention_window_size - 1` tokens.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from keras_recurrentgemma.convert.huggingface import config_from_huggingface
from tests.conftest import TINY_CONFIGS
from tests.tolerances import PARITY
from tests.tolerances import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# HF's RecurrentGemma was refactored several times; these tests rely on the
# behaviour (and the `save_pretrained` layout) of exactly this version.
HF_VERSION = "5.23.0"
if transformers.__version__ != HF_VERSION:
    pytest.skip(
        f"HF parity is pinned to transformers=={HF_VERSION}; found "
        f"{transformers.__version__}.",
        allow_module_level=True,
    )

from transformers import RecurrentGemmaConfig  # noqa: E402
from transformers import RecurrentGemmaForCausalLM  # noqa: E402

WEIGHTS = "model.safetensors"

# Our tiny configs, plus one where HF repeats a shorter pattern to fill
# num_hidden_layers (R, A, R).
CASES = {name: (cfg, cfg["block_types"]) for name, cfg in TINY_CONFIGS.items()}
CASES["repeated_pattern"] = (
    {**TINY_CONFIGS["griffin"], "block_types": ["recurrent", "attention", "recurrent"]},
    ["recurrent", "attention"],
)


def make_hf_model(config, pattern, seed=0):
    """An HF model matching our `config`, every parameter drawn at random.

    HF's init zeroes norms, biases and `embed_tokens[0]`, which would hide a
    mapping that swaps or drops them; values stay O(0.2) so the logits are
    neither saturated by the soft cap nor tiny.
    """
    hf_config = RecurrentGemmaConfig(
        num_hidden_layers=len(config["block_types"]),
        vocab_size=config["vocabulary_size"],
        hidden_size=config["hidden_dim"],
        # HF stores twice our MLP width.
        intermediate_size=2 * config["intermediate_dim"],
        num_attention_heads=config["num_heads"],
        num_key_value_heads=1,
        lru_width=config.get("lru_width"),
        attention_window_size=config["attention_window_size"],
        block_types=list(pattern),
    )
    model = RecurrentGemmaForCausalLM(hf_config).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    return model


def token_ids(config, length, batch=2, seed=0):
    # Includes id 0, whose embedding row HF's init would have zeroed.
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config["vocabulary_size"], size=(batch, length))
    ids[0, 0] = 0
    return ids.astype("int32")


def hf_logits(model, ids):
    with torch.no_grad():
        return (
            model(torch.tensor(ids, dtype=torch.long), use_cache=False)
            .logits.float()
            .numpy()
        )


def our_logits(backbone, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if keras.config.backend() == "jax":
        # Eager JAX compiles every op for every new shape; one compiled
        # `predict` is several times faster. Elsewhere eager is the faster.
        hidden = backbone.predict(inputs, batch_size=len(ids), verbose=0)
    else:
        hidden = backbone(inputs)
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def max_parity_error(backbone, model, config):
    """Relative error of logits on the longest sequence HF is valid for.

    Both models are causal, so the logits of a length `window - 1` sequence
    also cover every shorter prefix of it.
    """
    ids = token_ids(config, config["attention_window_size"] - 1)
    return relative_error(our_logits(backbone, ids), hf_logits(model, ids))


def rewrite_weights(path, edit):
    """Applies `edit(dict of numpy arrays)` to `path/model.safetensors`."""
    from safetensors.numpy import load_file
    from safetensors.numpy import save_file

    filename = os.path.join(path, WEIGHTS)
    tensors = load_file(filename)
    edit(tensors)
    save_file(tensors, filename, metadata={"format": "pt"})


def edit_config(path, edit):
    filename = os.path.join(path, "config.json")
    with open(filename) as f:
        config = json.load(f)
    edit(config)
    with open(filename, "w") as f:
        json.dump(config, f)


@pytest.fixture(scope="module")
def griffin_model():
    return make_hf_model(
        TINY_CONFIGS["griffin"], TINY_CONFIGS["griffin"]["block_types"]
    )


@pytest.fixture
def griffin_dir(griffin_model, tmp_path):
    griffin_model.save_pretrained(tmp_path)
    return str(tmp_path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fp32_parity(name, tmp_path):
    config, pattern = CASES[name]
    model = make_hf_model(config, pattern)
    model.save_pretrained(tmp_path)
    backbone = RecurrentGemmaBackbone.from_preset(str(tmp_path))
    assert backbone.block_types == config["block_types"]
    assert backbone.lru_width == config.get("lru_width", config["hidden_dim"])
    assert backbone.dtype_policy.name == "float32"
    error = max_parity_error(backbone, model, config)
    assert error <= PARITY["float32"]["relative"], error


def test_underscore_block_types(griffin_model, griffin_dir):
    # Early hub configs stored the pattern as `_block_types`. The file is
    # given a pattern that differs from HF's default so it must be read.
    def use_underscore_key(config):
        config["_block_types"] = config.pop("block_types")

    edit_config(griffin_dir, use_underscore_key)
    backbone = RecurrentGemmaBackbone.from_preset(griffin_dir)
    assert backbone.block_types == TINY_CONFIGS["griffin"]["block_types"]
    error = max_parity_error(backbone, griffin_model, TINY_CONFIGS["griffin"])
    assert error <= PARITY["float32"]["relative"], error


def test_conflicting_block_types(griffin_dir):
    edit_config(griffin_dir, lambda c: c.update(_block_types=["attention"]))
    with pytest.raises(ValueError, match="_block_types"):
        backbone_from_huggingface(griffin_dir)


def test_tied_lm_head_present(griffin_model, griffin_dir):
    def add_lm_head(tensors):
        assert "lm_head.weight" not in tensors  # save_pretrained drops it.
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].copy()

    rewrite_weights(griffin_dir, add_lm_head)
    backbone = RecurrentGemmaBackbone.from_preset(griffin_dir)
    error = max_parity_error(backbone, griffin_model, TINY_CONFIGS["griffin"])
    assert error <= PARITY["float32"]["relative"], error


def test_untied_lm_head_rejected(griffin_dir):
    def add_other_lm_head(tensors):
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"] + 1.0

    rewrite_weights(griffin_dir, add_other_lm_head)
    with pytest.raises(ValueError, match="lm_head.weight"):
        RecurrentGemmaBackbone.from_preset(griffin_dir)


def test_sharded_checkpoint(griffin_model, tmp_path):
    griffin_model.save_pretrained(tmp_path, max_shard_size="8KB")
    shards = [f for f in os.listdir(tmp_path) if f.startswith("model-0")]
    assert len(shards) > 1 and not os.path.exists(tmp_path / WEIGHTS)
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    backbone = RecurrentGemmaBackbone.from_preset(str(tmp_path))
    error = max_parity_error(backbone, griffin_model, TINY_CONFIGS["griffin"])
    assert error <= PARITY["float32"]["relative"], error


def test_missing_shard(griffin_model, tmp_path):
    griffin_model.save_pretrained(tmp_path, max_shard_size="8KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.startswith("model-0"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ValueError, match=shard):
        backbone_from_huggingface(tmp_path)


def test_bfloat16_checkpoint(tmp_path):
    config = TINY_CONFIGS["griffin"]
    model = make_hf_model(config, config["block_types"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    backbone = RecurrentGemmaBackbone.from_preset(str(tmp_path), dtype="bfloat16")
    assert backbone.dtype_policy.name == "bfloat16"
    # The loaded values must be the checkpoint's bf16 values, bit for bit.
    embedding = model.model.embed_tokens.weight.detach().float().numpy()
    loaded = keras.ops.convert_to_numpy(
        keras.ops.cast(backbone.token_embedding.embeddings, "float32")
    )
    np.testing.assert_array_equal(loaded, embedding)
    ids = token_ids(config, config["attention_window_size"] - 1)
    np.testing.assert_allclose(
        our_logits(backbone, ids), hf_logits(model, ids), **PARITY["bfloat16"]
    )


def test_bfloat16_checkpoint_loads_as_float32_by_default(tmp_path):
    config = TINY_CONFIGS["hawk"]
    model = make_hf_model(config, config["block_types"]).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    backbone = RecurrentGemmaBackbone.from_preset(str(tmp_path))
    assert backbone.dtype_policy.name == "float32"
    # Same weights as an fp32 HF model holding the bf16-rounded values.
    model = model.float()
    error = max_parity_error(backbone, model, config)
    assert error <= PARITY["float32"]["relative"], error


def test_load_weights_false(griffin_dir):
    backbone = RecurrentGemmaBackbone.from_preset(griffin_dir, load_weights=False)
    loaded = RecurrentGemmaBackbone.from_preset(griffin_dir)
    drop_name = lambda c: {k: v for k, v in c.items() if k != "name"}  # noqa: E731
    assert drop_name(backbone.get_config()) == drop_name(loaded.get_config())
    random_embedding = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)
    loaded_embedding = keras.ops.convert_to_numpy(loaded.token_embedding.embeddings)
    assert not np.allclose(random_embedding, loaded_embedding)


# === Bad input ===


def test_no_config(griffin_dir):
    os.remove(os.path.join(griffin_dir, "config.json"))
    with pytest.raises(ValueError, match="config.json"):
        backbone_from_huggingface(griffin_dir)


def test_no_weights(griffin_dir):
    os.remove(os.path.join(griffin_dir, WEIGHTS))
    with pytest.raises(ValueError, match="no weights"):
        backbone_from_huggingface(griffin_dir)


def test_other_model_type(griffin_dir):
    edit_config(griffin_dir, lambda c: c.update(model_type="gemma"))
    with pytest.raises(ValueError, match="config.json.*model_type.*gemma"):
        backbone_from_huggingface(griffin_dir)


@pytest.mark.parametrize(
    "key, value",
    [
        ("num_key_value_heads", 2),
        ("num_key_value_heads", None),  # HF then uses one per query head.
        ("hidden_activation", "gelu"),
        ("attention_bias", True),
        ("tie_word_embeddings", False),
        ("embeddings_scale_by_sqrt_dim", False),
        ("partial_rotary_factor", 1.0),
        ("rope_type", "linear"),
        ("logits_soft_cap", 0.0),
    ],
)
def test_unsupported_config(griffin_dir, key, value):
    with open(os.path.join(griffin_dir, "config.json")) as f:
        hf_config = json.load(f)
    config_from_huggingface(hf_config)  # The unedited config is fine.
    if key in ("partial_rotary_factor", "rope_type"):
        hf_config["rope_parameters"][key] = value
    else:
        hf_config[key] = value
    with pytest.raises(ValueError, match=key):
        config_from_huggingface(hf_config)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("model.layers.0.temporal_block.linear_x.weight", (48, 31)),
        ("model.layers.1.temporal_block.rg_lru.input_gate_weight", (4, 12, 11)),
        ("model.layers.2.temporal_block.k_proj.weight", (16, 32)),
        ("model.layers.0.temporal_block.conv_1d.weight", (48, 2, 4)),
    ],
)
def test_misshaped_tensor(griffin_dir, key, shape):
    def reshape(tensors):
        assert tensors[key].shape != shape
        tensors[key] = np.zeros(shape, np.float32)

    rewrite_weights(griffin_dir, reshape)
    with pytest.raises(ValueError, match=f"`{key}` has shape"):
        backbone_from_huggingface(griffin_dir)


def test_missing_tensor(griffin_dir):
    key = "model.layers.1.temporal_block.rg_lru.recurrent_param"
    rewrite_weights(griffin_dir, lambda tensors: tensors.pop(key))
    with pytest.raises(ValueError, match=f"missing tensor `{key}`"):
        backbone_from_huggingface(griffin_dir)


def test_unexpected_tensor(griffin_dir):
    key = "model.layers.3.mlp_block.gate_proj.weight"

    def add(tensors):
        tensors[key] = np.zeros((48, 32), np.float32)

    rewrite_weights(griffin_dir, add)
    with pytest.raises(ValueError, match=f"unexpected tensors.*{key}"):
        backbone_from_huggingface(griffin_dir)


def test_truncated_safetensors(griffin_dir):
    filename = os.path.join(griffin_dir, WEIGHTS)
    with open(filename, "rb") as f:
        data = f.read()
    with open(filename, "wb") as f:
        f.write(data[: len(data) // 2])
    with pytest.raises(ValueError, match=WEIGHTS):
        backbone_from_huggingface(griffin_dir)
