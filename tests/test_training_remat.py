"""Training passes keep 16-bit tensors, not their float32 copies: the norms,
a LoRA factor's product and the GELU gates recompute their arithmetic in
the backward pass. Same values and gradients; less kept (torch's count)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.layers.dense import Dense
from keras_recurrentgemma.layers.mlp import gelu_gate
from keras_recurrentgemma.layers.rms_normalization import RMSNormalization
from keras_recurrentgemma.ops import remat
from tests.backend_grad import value_and_grad

TORCH = keras.config.backend() == "torch"
B, T, D, R = 1, 32, 64, 4


def normal(shape, seed):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def norm_layer(rematerialise):
    layer = RMSNormalization(dtype="bfloat16")
    layer.build((B, T, D))
    layer.scale.assign(normal((D,), 1) * 0.1)
    layer.rematerialise = rematerialise
    return layer


def lora_layer(rematerialise):
    layer = Dense(48, dtype="bfloat16")
    layer.build((B, T, D))
    layer.enable_lora(R)
    # Fixed values: Keras draws `A` at random, and `B` starts at zero.
    layer._kernel.assign(normal((48, D), 6) * 0.1)
    layer.lora_kernel_a.assign(normal((48, R), 7))
    layer.lora_kernel_b.assign(normal((R, D), 2))
    layer.rematerialise = rematerialise
    return layer


def loss_of(fn):
    """A scalar of `fn`'s bfloat16 output for a float32 input."""
    weights = normal((B, T, 48 if fn.__name__ == "lora" else D), 3)

    def loss(*args):
        y = fn(*(ops.cast(a, "bfloat16") for a in args))
        return ops.sum(ops.cast(y, "float32") * ops.convert_to_tensor(weights))

    return loss


def cases(rematerialise):
    norm, dense = norm_layer(rematerialise), lora_layer(rematerialise)

    def norm_case(x):
        return norm(x)

    def lora(x):
        return dense(x)

    def gate(g, v):
        return gelu_gate(g, v, rematerialise)

    return {"norm": (norm_case, 1), "lora": (lora, 1), "gate": (gate, 2)}


@pytest.mark.parametrize("name", ["norm", "lora", "gate"])
def test_rematerialised_values_and_input_gradients_are_the_same(name):
    (on, arity), (off, _) = cases(True)[name], cases(False)[name]
    args = [normal((B, T, D), 10 + i) for i in range(arity)]
    value, grads = value_and_grad(loss_of(on), *args)
    plain_value, plain_grads = value_and_grad(loss_of(off), *args)
    # The same arithmetic in the same order, forward and recomputed.
    np.testing.assert_array_equal(value, plain_value)
    for grad, plain in zip(grads, plain_grads, strict=True):
        np.testing.assert_array_equal(grad, plain)


def test_a_rematerialised_lora_product_has_the_factors_gradients():
    x = ops.cast(normal((B, T, D), 4), "bfloat16")
    weights = ops.convert_to_tensor(normal((B, T, 48), 5))
    grads = []
    for rematerialise in (True, False):
        layer = lora_layer(rematerialise)
        factors = [layer.lora_kernel_a, layer.lora_kernel_b]

        def loss(values, layer=layer, factors=factors):
            with keras.StatelessScope(
                state_mapping=list(zip(factors, values, strict=True))
            ):
                y = layer(x)
            return ops.sum(ops.cast(y, "float32") * weights)

        values = [ops.convert_to_numpy(f) for f in factors]
        _, got = value_and_grad(lambda a, b: loss([a, b]), *values)
        grads.append(got)
    for got, plain in zip(*grads, strict=True):
        assert np.abs(plain).max() > 0
        np.testing.assert_array_equal(got, plain)


@pytest.mark.skipif(not TORCH, reason="counts torch's saved tensors")
@pytest.mark.parametrize("name", ["norm", "lora", "gate"])
def test_training_keeps_no_float32_copy_and_fewer_tensors(name):
    import torch

    def kept(rematerialise):
        fn, arity = cases(rematerialise)[name]
        args = [
            torch.tensor(normal((B, T, D), i), requires_grad=True).bfloat16()
            for i in range(arity)
        ]
        saved = {}

        def pack(t):
            if t.numel() >= T * D:  # `[b, t, ·]`-sized; weights are smaller.
                saved[t.untyped_storage().data_ptr()] = (t.dtype, t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*args)
        return list(saved.values())

    on, off = kept(True), kept(False)
    assert all(dtype == torch.bfloat16 for dtype, _ in on)
    if name == "gate":
        # `gate` and `value`, not `gelu(gate)` too.
        assert len(on) == 2 < len(off) == 3
    else:
        assert any(dtype == torch.float32 for dtype, _ in off)
        assert sum(n * 2 for _, n in on) < sum(
            n * (4 if d == torch.float32 else 2) for d, n in off
        )


@pytest.mark.skipif(not TORCH, reason="torch's grad mode")
def test_torch_outside_grad_mode_calls_the_function_directly(monkeypatch):
    import torch

    def refuse(_):
        raise AssertionError("checkpointed under no_grad")

    monkeypatch.setattr(keras, "remat", refuse)
    x = torch.ones(3)
    with torch.no_grad():
        assert remat.remat_function(lambda x: x * 2, (x,)).tolist() == [2.0] * 3
    with pytest.raises(AssertionError, match="checkpointed"):
        remat.remat_function(lambda x: x * 2, (x.requires_grad_(),))
