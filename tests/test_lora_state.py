"""Our `Dense`: what its weights entries hold with LoRA on, and how they load.

The whole-model behaviour (fit, resume, presets) is in test_resume_lora.py;
here one layer and a dict standing in for Keras's weights store.
"""

import keras
import numpy as np
import pytest

from keras_recurrentgemma.layers import kernel_layout
from keras_recurrentgemma.layers.dense import Dense
from keras_recurrentgemma.layers.lora_state import merged_weights_only
from tests.tolerances import SELF_CONSISTENCY

IN, OUT = 6, 5


def to_numpy(x):
    return np.asarray(keras.ops.convert_to_numpy(x))


def lora_dense(rank=2, seed=0, quantize=None):
    """A built `Dense` with random kernel, bias and (non-zero) factors."""
    layer = Dense(OUT)
    layer.build((None, None, IN))
    rng = np.random.default_rng(seed)
    layer.kernel.assign(rng.normal(size=(OUT, IN)).astype("float32"))
    layer.bias.assign(rng.normal(size=(OUT,)).astype("float32"))
    if quantize:
        layer.quantize(quantize, type_check=False)  # as our `quantize` calls it
    if rank:
        layer.enable_lora(rank)
        for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
            factor.assign(rng.normal(size=factor.shape).astype("float32"))
    return layer


def saved(layer):
    store = {}
    layer.save_own_variables(store)
    return {key: to_numpy(value) for key, value in store.items()}


def entries(store):
    """The store's keys but the layout mark every entry has
    (`layers.kernel_layout`)."""
    return sorted(key for key in store if key != kernel_layout.KEY)


def raw_state(layer):
    """Every variable as stored, the frozen kernel unmerged."""
    return {v.path.rsplit("/", 1)[-1]: to_numpy(v) for v in layer.weights}


X = np.random.default_rng(9).normal(size=(1, 3, IN)).astype("float32")


def test_entries_hold_the_merged_kernel_first_and_the_factors_apart():
    layer = lora_dense()
    store = saved(layer)
    assert entries(store) == [
        "0",
        "1",
        "lora_kernel_a",
        "lora_kernel_b",
        "unmerged_kernel",
    ]
    np.testing.assert_array_equal(store["0"], to_numpy(layer.kernel))  # merged
    np.testing.assert_array_equal(store["unmerged_kernel"], to_numpy(layer._kernel))
    with merged_weights_only():
        assert entries(saved(layer)) == ["0", "1"]
    # Without LoRA the entries are exactly Keras's.
    assert entries(saved(lora_dense(rank=0))) == ["0", "1"]


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_lora_layer_loads_kernel_and_factors_exactly(quantize):
    source = lora_dense(seed=0, quantize=quantize)
    target = lora_dense(seed=1, quantize=quantize)
    target.load_own_variables(saved(source))
    expected, actual = raw_state(source), raw_state(target)
    assert sorted(actual) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(actual[name], value, err_msg=name)


def test_layer_without_lora_loads_the_merged_kernel():
    source = lora_dense()
    plain = lora_dense(rank=0, seed=1)
    plain.load_own_variables(saved(source))
    np.testing.assert_allclose(
        to_numpy(plain(X)), to_numpy(source(X)), **SELF_CONSISTENCY["float32"]
    )


def test_file_without_factors_keeps_the_model_and_a_trainable_adapter():
    plain_file = saved(lora_dense(rank=0, seed=3))
    layer = lora_dense(seed=1)
    a_before = to_numpy(layer.lora_kernel_a)
    layer.load_own_variables(plain_file)
    np.testing.assert_array_equal(to_numpy(layer._kernel), plain_file["0"])
    np.testing.assert_array_equal(to_numpy(layer.lora_kernel_b), 0.0)
    # Keras would zero A too, leaving both gradients zero for good.
    np.testing.assert_array_equal(to_numpy(layer.lora_kernel_a), a_before)


def test_another_rank_or_a_partial_entry_is_an_error_naming_the_layer():
    store = saved(lora_dense(rank=2))
    with pytest.raises(ValueError, match=r"lora_kernel_a.*dense.*another LoRA rank"):
        lora_dense(rank=3).load_own_variables(store)
    del store["unmerged_kernel"]
    with pytest.raises(ValueError, match=r"dense.*lack \['unmerged_kernel'\]"):
        lora_dense(rank=2).load_own_variables(store)
