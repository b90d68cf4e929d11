"""Dense kernels are stored in the layout the backend multiplies fastest.

On torch on a CPU a bfloat16 kernel is column-major (`ops.matmul_layout`): the
same shape and values, a faster decode product. Everything a user sees must
be unchanged: values after loading, configs, saving, LoRA and quantization.
`tools/benchmark_real_size.py` measures the speed at the released size.
"""

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.convert import common
from keras_recurrentgemma.convert import safetensors_reader
from keras_recurrentgemma.layers.dense import Dense
from keras_recurrentgemma.layers.initialization import skip_random_initialization
from keras_recurrentgemma.ops import matmul_layout
from tests.conftest import TINY_CONFIGS
from tests.models import write_tiny_hf_checkpoint

TORCH = keras.config.backend() == "torch"


def dense_layers(backbone):
    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, Dense)
    ]


def test_bfloat16_kernels_are_column_major_on_torch_only():
    backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"], dtype="bfloat16")
    layers = dense_layers(backbone)
    assert layers
    for layer in layers:
        assert matmul_layout.stored_column_major(layer.kernel) is TORCH, layer.path
        if layer.bias is not None:
            assert not matmul_layout.stored_column_major(layer.bias)
        # Configs keep Keras's initializer: nothing of the layout is saved.
        assert "VarianceScaling" in str(layer.get_config()["kernel_initializer"])
    # `assign` keeps the layout (torch copies in place).
    kernel = layers[0].kernel
    kernel.assign(np.ones(kernel.shape, "float32"))
    assert matmul_layout.stored_column_major(kernel) is TORCH
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(kernel), 1)


def test_load_placeholders_are_column_major_without_a_transpose(monkeypatch):
    """Zeros for a load are made `[o, i]` and viewed transposed: copying
    them into the layout took half of the 2B's load on torch."""
    if TORCH:
        import torch

        def no_copy(self, *args, **kwargs):
            raise AssertionError("a placeholder was copied into its layout")

        monkeypatch.setattr(torch.Tensor, "contiguous", no_copy)
    with skip_random_initialization():
        backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"], dtype="bfloat16")
    monkeypatch.undo()
    for layer in dense_layers(backbone):
        assert matmul_layout.stored_column_major(layer.kernel) is TORCH, layer.path
        assert not np.any(keras.ops.convert_to_numpy(layer.kernel).astype("float32"))


def test_float32_kernels_keep_keras_layout():
    # Row-major is torch's faster float32 layout (see `ops.matmul_layout`).
    backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"], dtype="float32")
    for layer in dense_layers(backbone):
        assert not matmul_layout.stored_column_major(layer.kernel), layer.path


def test_quantized_kernels_keep_keras_layout():
    backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"])
    backbone.quantize("int8")
    for layer in dense_layers(backbone):
        assert layer.kernel.dtype == "int8"
        assert not matmul_layout.stored_column_major(layer.kernel)


def test_checkpoint_values_load_into_the_layout_bit_for_bit(tmp_path):
    hf_dir = write_tiny_hf_checkpoint(tmp_path)
    tensors = safetensors_reader.read_checkpoint_tensors(hf_dir)
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16")
    layer = backbone.residual_blocks[0].mlp_block.ffw_down
    assert matmul_layout.stored_column_major(layer.kernel) is TORCH
    source = np.asarray(tensors["model.layers.0.mlp_block.down_proj.weight"])
    loaded = keras.ops.convert_to_numpy(layer.kernel)
    np.testing.assert_array_equal(
        loaded.view(np.uint16), source.astype(ml_dtypes.bfloat16).T.view(np.uint16)
    )


@pytest.mark.parametrize("shape", [(3, 700), (1, 1)])
def test_host_copy_in_fortran_order_of_a_transpose_is_free(shape):
    source = np.random.default_rng(0).normal(size=shape).astype(ml_dtypes.bfloat16)
    copy = common.host_copy(source.T, ml_dtypes.bfloat16, order="F")
    assert copy.flags.f_contiguous
    assert np.shares_memory(copy, source)  # writable and in dtype: no copy
    np.testing.assert_array_equal(copy, source.T)
    source.setflags(write=False)  # like a memory-mapped file: copied once
    copy = common.host_copy(source.T, np.float32, order="F")
    assert copy.flags.f_contiguous and copy.flags.writeable
    assert not np.shares_memory(copy, source)
    np.testing.assert_array_equal(copy, source.T.astype(np.float32))
