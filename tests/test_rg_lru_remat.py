"""The RG-LRU rematerialised in training: same values and gradients, less kept."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.layers.rg_lru import RGLRU
from keras_recurrentgemma.ops import rg_lru
from tests.backend_grad import value_and_grad


def inputs(b=2, t=24, l=16, seed=0):
    rng = np.random.default_rng(seed)
    x, gate_x, gate_a = (rng.normal(size=(b, t, l)).astype("float32") for _ in range(3))
    a_param = rng.normal(size=(l,)).astype("float32")
    # A document restarting mid-row and right padding: the masks go through
    # the recomputation as constants.
    segment_pos = np.tile(np.arange(t, dtype="int32"), (b, 1))
    segment_pos[0, 10:] -= 10
    segment_pos[-1, -3:] = -1
    return (x, gate_x, gate_a, a_param), segment_pos


@pytest.mark.parametrize("rematerialise", [False, True])
def test_rematerialised_unit_has_the_same_values_and_gradients(rematerialise):
    tensors, segment_pos = inputs()
    weights = np.random.default_rng(1).normal(size=tensors[0].shape).astype("float32")

    def loss(x, gate_x, gate_a, a_param, rematerialise):
        y, h_last = rg_lru(
            x, gate_x, gate_a, a_param, segment_pos, rematerialise=rematerialise
        )
        return ops.sum(y * ops.convert_to_tensor(weights)) + ops.sum(h_last)

    value, grads = value_and_grad(lambda *a: loss(*a, rematerialise), *tensors)
    plain_value, plain_grads = value_and_grad(lambda *a: loss(*a, False), *tensors)
    # The same float32 arithmetic in the same order, forward and backward.
    np.testing.assert_allclose(value, plain_value, rtol=1e-6)
    for grad, plain in zip(grads, plain_grads, strict=True):
        np.testing.assert_allclose(grad, plain, rtol=1e-5, atol=1e-6)


def test_the_layer_rematerialises_calls_without_a_state(monkeypatch):
    import importlib

    module = importlib.import_module("keras_recurrentgemma.ops.rg_lru")
    calls = []
    original = module.remat_function
    monkeypatch.setattr(
        module, "remat_function", lambda *a: calls.append(1) or original(*a)
    )
    layer = RGLRU(num_heads=2)
    (x, *_), segment_pos = inputs()
    rematerialised = layer(x, segment_pos)
    assert calls == [1]
    # A state carried in (generation) is never rematerialised.
    layer(x, segment_pos, ops.zeros((2, 16)))
    assert calls == [1]
    layer.rematerialise = False
    plain = layer(x, segment_pos)
    assert calls == [1]
    for a, b in zip(rematerialised, plain, strict=True):
        np.testing.assert_array_equal(
            ops.convert_to_numpy(ops.stop_gradient(a)),
            ops.convert_to_numpy(ops.stop_gradient(b)),
        )


def test_a_block_rematerialised_whole_does_not_rematerialise_its_rg_lru():
    from tests.models import tiny_causal_lm

    for remat in (False, True):
        backbone = tiny_causal_lm("griffin", remat=remat).backbone
        units = [
            block.temporal_block.rg_lru
            for block in backbone.residual_blocks
            if block.block_type == "recurrent"
        ]
        assert units and all(unit.rematerialise is not remat for unit in units)


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="counts torch's saved tensors"
)
def test_training_keeps_no_float32_intermediates():
    import torch

    tensors, segment_pos = inputs(b=1, t=64, l=32)

    def kept(rematerialise):
        args = [torch.tensor(a, requires_grad=True) for a in tensors]
        sizes = []

        def pack(t):
            sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            rg_lru(*args, segment_pos, rematerialise=rematerialise)
        # Only `[b, t, l]`-sized ones: the masks and `a_param` are small.
        return sum(n for n in sizes if n >= 64 * 32)

    # The inputs alone (three `[b, t, l]`), against the gates' and the
    # scan's float32 intermediates.
    assert kept(True) <= 3 * 64 * 32 < kept(False) / 4


@pytest.mark.skipif(keras.config.backend() != "jax", reason="reads XLA's memory plan")
def test_training_keeps_less_across_a_stack_on_jax():
    import jax
    import jax.numpy as jnp

    (x, *_), segment_pos = inputs(b=1, t=128, l=256)
    scales = [np.float32(0.5 + i / 10) for i in range(6)]

    def scratch_bytes(rematerialise):
        def loss(a_params, x):
            for a_param in a_params:
                y, _ = rg_lru(
                    x,
                    0.5 * x,
                    0.25 * x,
                    a_param,
                    segment_pos,
                    rematerialise=rematerialise,
                )
                x = x + 0.9 * y
            return jnp.sum(x**2)

        a_params = [jnp.full((256,), s) for s in scales]
        compiled = jax.jit(jax.grad(loss)).lower(a_params, jnp.asarray(x)).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    # Six units: each one's float32 intermediates live until the backward
    # pass reaches it, against one unit's at a time (the 2B's width, 512
    # tokens, eight units: 551 MiB against 115).
    assert scratch_bytes(True) < 0.5 * scratch_bytes(False)
