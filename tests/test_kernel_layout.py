"""Projection kernels are stored `[out, in]`, as `nn.Linear` and the HF
checkpoints store them (`layers.dense.Dense`).

A decode step's products read each kernel along its rows, the order every
backend's CPU library multiplies one row fastest in. What the layout changes
for a user: kernel shapes and LoRA factor shapes; values after loading,
quantization and every forward pass must be those of `y = x Wᵀ + b`.
`tools/benchmark_real_size.py` measures the speed at the released size.
"""

import json

import h5py
import keras
import ml_dtypes
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import lora
from keras_recurrentgemma.convert import safetensors_reader
from keras_recurrentgemma.layers import kernel_layout
from keras_recurrentgemma.layers.dense import Dense
from tests.conftest import TINY_CONFIGS
from tests.models import assert_same_weights
from tests.models import randomize
from tests.models import write_tiny_hf_checkpoint


def dense_layers(backbone):
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, Dense)
    ]


def test_kernels_are_output_by_input():
    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**config)
    block = backbone.residual_blocks[0]
    d = config["hidden_dim"]
    mlp = block.mlp_block
    f = mlp.ffw_gate.units
    assert tuple(mlp.ffw_gate.kernel.shape) == (f, d)
    assert tuple(mlp.ffw_down.kernel.shape) == (d, f)
    assert tuple(mlp.ffw_down.bias.shape) == (d,)
    for layer in dense_layers(backbone):
        kernel = layer.kernel
        assert kernel.shape[0] == layer.units, layer.path


@pytest.mark.parametrize("use_bias", [True, False])
def test_dense_computes_x_times_kernel_transposed(use_bias):
    layer = Dense(5, use_bias=use_bias, bias_initializer="random_normal")
    x = np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    w = keras.ops.convert_to_numpy(layer.kernel)
    want = x @ w.T
    if use_bias:
        want = want + keras.ops.convert_to_numpy(layer.bias)
    assert w.shape == (5, 4)
    np.testing.assert_allclose(y, want, rtol=1e-5, atol=1e-6)


def test_initialization_counts_the_input_width_as_fan_in():
    """The official init is a normal of variance `1 / i`: Keras must count
    the kernel's second axis, not its first, as the fan-in."""
    config = dict(TINY_CONFIGS["griffin"], hidden_dim=64, intermediate_dim=2048)
    backbone = RecurrentGemmaBackbone(**config)
    mlp = backbone.residual_blocks[0].mlp_block
    down, gate = mlp.ffw_down, mlp.ffw_gate  # [64, 2048], [2048, 64]
    down_scale = mlp.final_w_init_variance_scale
    for layer, fan_in, scale in ((down, 2048, down_scale), (gate, 64, 1.0)):
        w = keras.ops.convert_to_numpy(layer.kernel).astype("float64")
        # Within 10% of `scale / fan_in`; the other width is 32 times off.
        ratio = w.var() * fan_in / scale
        assert 0.9 < ratio < 1.1, (layer.path, ratio)


def test_checkpoint_values_load_bit_for_bit(tmp_path):
    hf_dir = write_tiny_hf_checkpoint(tmp_path)
    tensors = safetensors_reader.read_checkpoint_tensors(hf_dir)
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16")
    layer = backbone.residual_blocks[0].mlp_block.ffw_down
    source = np.asarray(tensors["model.layers.0.mlp_block.down_proj.weight"])
    loaded = keras.ops.convert_to_numpy(layer.kernel)
    np.testing.assert_array_equal(
        loaded.view(np.uint16), source.astype(ml_dtypes.bfloat16).view(np.uint16)
    )


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_kernels_compute_the_same_product(mode):
    backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"])
    layer = backbone.residual_blocks[0].mlp_block.ffw_up
    x = np.random.default_rng(1).normal(size=(1, 4, layer.kernel.shape[1]))
    x = x.astype("float32")
    before = keras.ops.convert_to_numpy(layer(x))
    backbone.quantize(mode)
    assert layer.quantization_mode == mode
    after = keras.ops.convert_to_numpy(layer(x))
    error = np.abs(after - before).max() / np.abs(before).max()
    assert error < (0.02 if mode == "int8" else 0.2), error


# --- Files written before the `[out, in]` layout -----------------------------------


def as_earlier_layout(path):
    """Rewrites a weights file (or a preset's) as version 0.1 wrote it: no
    layout entry, kernels `[in, out]`, LoRA factors `A' = Bᵀ`, `B' = Aᵀ`."""

    def replace(group, key, value):
        attrs = dict(group[key].attrs)
        del group[key]
        group.create_dataset(key, data=value)
        group[key].attrs.update(attrs)

    with h5py.File(path, "r+") as f:
        groups = []
        f.visititems(
            lambda name, obj: (
                groups.append(obj)
                if isinstance(obj, h5py.Group) and kernel_layout.KEY in obj
                else None
            )
        )
        assert groups
        for group in groups:
            del group[kernel_layout.KEY]
            for key in ("0", "unmerged_kernel"):
                if key in group:
                    replace(group, key, group[key][()].T)
            if "lora_kernel_a" in group:
                a, b = group["lora_kernel_a"][()], group["lora_kernel_b"][()]
                replace(group, "lora_kernel_a", b.T)
                replace(group, "lora_kernel_b", a.T)


def square_griffin():
    """Every projection square (`hidden_dim == lru_width`, a square MLP):
    shapes alone cannot tell the layouts apart, as for the 2B's `proj_q`."""
    config = dict(TINY_CONFIGS["griffin"], hidden_dim=32, lru_width=32)
    config["intermediate_dim"] = 32
    backbone = RecurrentGemmaBackbone(**config)
    randomize(backbone, seed=5)
    return config, backbone


def test_weights_files_of_the_earlier_layout_load_transposed(tmp_path):
    config, backbone = square_griffin()
    path = str(tmp_path / "model.weights.h5")
    backbone.save_weights(path)
    as_earlier_layout(path)
    loaded = RecurrentGemmaBackbone(**config)
    loaded.load_weights(path)
    assert_same_weights(backbone, loaded)


def test_lora_checkpoints_of_the_earlier_layout_resume_exactly(tmp_path):
    config, backbone = square_griffin()
    backbone.enable_lora(2)
    randomize(backbone, seed=6)  # factors too, so that B is not zero
    path = str(tmp_path / "ckpt.weights.h5")
    backbone.save_weights(path)
    as_earlier_layout(path)
    loaded = RecurrentGemmaBackbone(**config)
    loaded.enable_lora(2)
    loaded.load_weights(path)
    assert_same_weights(backbone, loaded)


def test_presets_of_the_earlier_layout_load_and_quantize_on_load(tmp_path):
    config, backbone = square_griffin()
    current, earlier = str(tmp_path / "current"), str(tmp_path / "earlier")
    backbone.save_to_preset(current)
    backbone.save_to_preset(earlier)
    as_earlier_layout(f"{earlier}/model.weights.h5")
    assert_same_weights(backbone, RecurrentGemmaBackbone.from_preset(earlier))
    assert_same_weights(
        RecurrentGemmaBackbone.from_preset(current, quantize="int8"),
        RecurrentGemmaBackbone.from_preset(earlier, quantize="int8"),
    )


def test_quantized_files_of_the_earlier_layout_are_an_error(tmp_path):
    config, backbone = square_griffin()
    backbone.quantize("int8")
    path = str(tmp_path / "model.weights.h5")
    backbone.save_weights(path)
    with h5py.File(path, "r+") as f:
        f.visititems(
            lambda name, obj: (
                obj.__delitem__(kernel_layout.KEY)
                if isinstance(obj, h5py.Group) and kernel_layout.KEY in obj
                else None
            )
        )
    loaded = RecurrentGemmaBackbone(**config)
    loaded.quantize("int8")
    with pytest.raises(ValueError, match=r"quantized layer `\S+`.*quantize it again"):
        loaded.load_weights(path)


def test_lora_files_of_the_earlier_layout_load_transposed(tmp_path):
    config, backbone = square_griffin()
    backbone.enable_lora(2)
    randomize(backbone, seed=7)
    path = str(tmp_path / "adapter.lora.h5")
    backbone.save_lora_weights(path)
    with h5py.File(path, "r+") as f:
        metadata = json.loads(f.attrs[lora.METADATA_KEY])
        del metadata["kernel_layout"]
        f.attrs[lora.METADATA_KEY] = json.dumps(metadata)
        for key in f["lora"]:
            if key.isdigit():
                group = f[f"lora/{key}/vars"]
                a, b = group["lora_kernel_a"][()], group["lora_kernel_b"][()]
                del group["lora_kernel_a"], group["lora_kernel_b"]
                group["lora_kernel_a"], group["lora_kernel_b"] = b.T, a.T
    loaded = RecurrentGemmaBackbone(**config)
    frozen = {v.path: v for v in backbone.weights}
    for variable in loaded.weights:
        variable.assign(frozen[variable.path])
    loaded.load_lora_weights(path)
    assert_same_weights(backbone, loaded)
