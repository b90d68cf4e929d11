"""The fused RG-LRU Pallas kernel (gates and scan) against the `keras.ops` one.

The reference is `rg_lru_gates` followed by `rg_lru_scan_reference`, the path
every backend takes without the kernel. Kernels run in the Pallas interpreter
on CPU, both platform variants; lowering each for its platform (no device
needed) runs the block-shape checks of Triton and Mosaic.
"""

import keras
import numpy as np
import pytest

if keras.config.backend() != "jax":
    pytest.skip("Pallas kernels are JAX only", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from keras_recurrentgemma.ops import rg_lru  # noqa: E402
from keras_recurrentgemma.ops import rg_lru_gates  # noqa: E402
from keras_recurrentgemma.ops import rg_lru_scan_reference  # noqa: E402
from keras_recurrentgemma.ops.pallas_rg_lru import rg_lru_pallas  # noqa: E402
from tests.models import document_positions  # noqa: E402
from tests.tolerances import KERNEL  # noqa: E402
from tests.tolerances import SELF_CONSISTENCY  # noqa: E402
from tests.tolerances import relative_error  # noqa: E402

TOL = SELF_CONSISTENCY["float32"]
BFLOAT16_RELATIVE = KERNEL["bfloat16_relative"]


def random_inputs(b, t, l, seed, dtype="float32"):
    rng = np.random.default_rng(seed)
    # Pre-activations around the gates' working range; a_param as initialised.
    x, gate_x, gate_a = (
        jnp.asarray(rng.normal(size=(b, t, l)), dtype) for _ in range(3)
    )
    a_param = jnp.asarray(rng.normal(size=(l,)), dtype)
    h0 = jnp.asarray(rng.normal(size=(b, l)), "float32")
    return (x, gate_x, gate_a, a_param, document_positions(b, t, seed), h0)


def vjp(fn, inputs, with_h0, seed=0):
    x, gate_x, gate_a, a_param, pos, h0 = inputs
    b, t, l = x.shape
    rng = np.random.default_rng(seed + 1)
    dy = jnp.asarray(rng.normal(size=(b, t, l)), "float32")
    dh_last = jnp.asarray(rng.normal(size=(b, l)), "float32")
    differentiable = (x, gate_x, gate_a, a_param) + ((h0,) if with_h0 else ())

    def call(*args):
        return fn(*args[:4], pos, args[4] if with_h0 else None)

    outputs, pullback = jax.vjp(call, *differentiable)
    return list(outputs), list(pullback((dy, dh_last)))


def reference(x, gate_x, gate_a, a_param, pos, h0):
    a, normalized_x = rg_lru_gates(x, gate_x, gate_a, a_param, pos)
    return rg_lru_scan_reference(a, normalized_x, h0)


def interpreted(platform):
    """Whether `platform`'s kernel needs the interpreter here: always on CPU;
    on a GPU or TPU (tools/gpu_check.py) only the other platform's does."""
    return platform != jax.default_backend()


def kernel(**kwargs):
    interpret = kwargs.pop("interpret", interpreted(kwargs.get("platform")))

    def fn(*args):
        return rg_lru_pallas(*args, interpret=interpret, **kwargs)

    return fn


def assert_close(actual, expected, tol=TOL):
    for act, exp in zip(actual, expected, strict=True):
        assert act.shape == exp.shape and act.dtype == exp.dtype
        np.testing.assert_allclose(
            np.asarray(act, "float32"), np.asarray(exp, "float32"), **tol
        )


# (platform, b, t, l, with_h0, kwargs): T = 1, batch 1, widths that are not a
# multiple of 128 or of the block, and on TPU time chunks with the last one
# padded, under the interpreter that poisons unwritten memory.
CASES = [
    ("gpu", 1, 1, 5, True, {}),
    ("gpu", 3, 33, 130, False, {"block_width": 256}),
    ("gpu", 2, 7, 130, True, {}),
    ("tpu", 1, 1, 5, False, {}),
    ("tpu", 2, 7, 130, True, {}),
    ("tpu", 1, 33, 5, True, {"time_block": 8}),
    (
        "tpu",
        2,
        17,
        1030,
        True,
        {"block_width": 1024, "time_block": 8, "interpret": pltpu.InterpretParams()},
    ),
]


@pytest.mark.parametrize("platform, b, t, l, with_h0, kwargs", CASES)
def test_values_and_gradients_match_the_reference(platform, b, t, l, with_h0, kwargs):
    inputs = random_inputs(b, t, l, seed=t + l)
    fused = vjp(kernel(platform=platform, **kwargs), inputs, with_h0)
    expected = vjp(reference, inputs, with_h0)
    assert fused[0][0].dtype == jnp.float32 and fused[0][0].shape == (b, t, l)
    assert_close(fused[0], expected[0])
    assert_close(fused[1], expected[1])


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
def test_bfloat16_inputs(platform):
    inputs = random_inputs(2, 17, 130, seed=3, dtype="bfloat16")
    outputs, grads = vjp(kernel(platform=platform), inputs, with_h0=True)
    expected_outputs, expected_grads = vjp(reference, inputs, with_h0=True)
    # The gates and the recurrence run in float32 on the rounded inputs.
    assert_close(outputs, expected_outputs)
    # Gradients come back in their inputs' dtypes, each rounded once.
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected.dtype
        assert relative_error(grad, expected) <= BFLOAT16_RELATIVE


def test_padding_and_resets():
    x, gate_x, gate_a, a_param, _, h0 = random_inputs(1, 6, 4, seed=5)
    pos = np.array([[7, 8, -1, 0, 1, -1]], "int32")
    (y, h_last), (dx, dgx, dga, dlam, dh0) = vjp(
        kernel(platform="gpu"), (x, gate_x, gate_a, a_param, pos, h0), True
    )
    y = np.asarray(y)
    # Padding carries the state; a reset forgets it, and the last padded
    # step leaves h_last at the last real token's state.
    np.testing.assert_array_equal(y[:, 2], y[:, 1])
    np.testing.assert_array_equal(np.asarray(h_last), y[:, 4])
    for grad in (dx, dgx, dga):
        np.testing.assert_array_equal(np.asarray(grad)[:, [2, 5]], 0.0)
    np.testing.assert_array_equal(np.asarray(dga)[:, 3], 0.0)  # a_3 is unused.
    # Nothing before the reset at step 3 reaches y_3 onwards.
    x_changed = x.at[:, :3].add(10.0)
    (y_changed, _), _ = vjp(
        kernel(platform="gpu"), (x_changed, gate_x, gate_a, a_param, pos, h0), True
    )
    np.testing.assert_array_equal(np.asarray(y_changed)[:, 3:], y[:, 3:])


def test_dispatch_runs_the_kernel_in_the_interpreter(monkeypatch):
    monkeypatch.setenv("KERAS_RECURRENTGEMMA_INTERPRET", "1")
    inputs = random_inputs(2, 9, 12, seed=7)
    calls = []
    import keras_recurrentgemma.ops.pallas_rg_lru as module

    original = module.rg_lru_pallas
    monkeypatch.setattr(
        module,
        "rg_lru_pallas",
        lambda *args, **kwargs: calls.append(kwargs) or original(*args, **kwargs),
    )
    fused = rg_lru(*inputs, implementation="pallas")
    assert calls == [{"interpret": True}]
    assert_close(list(fused), list(reference(*inputs)))


@pytest.mark.parametrize(
    "platform, lowering, kwargs",
    [
        ("gpu", "cuda", {}),
        ("tpu", "tpu", {}),
        ("tpu", "tpu", {"block_width": 1024, "time_block": 8}),
    ],
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_lowers_for_its_platform(platform, lowering, kwargs, dtype):
    x = jnp.ones((2, 11, 1030), dtype)
    pos = jnp.zeros((2, 11), "int32")

    def loss(x, gate_x, gate_a, a_param, h0):
        y, h_last = rg_lru_pallas(
            x, gate_x, gate_a, a_param, pos, h0, platform=platform, **kwargs
        )
        return jnp.sum(y) + jnp.sum(h_last)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    args = (x, x, x, x[0, 0], x[:, 0].astype("float32"))
    text = grad.trace(*args).lower(lowering_platforms=(lowering,)).as_text()
    target = "__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call"
    assert text.count(target) == 2  # the forward and the backward kernel


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gate_x": np.ones((1, 3, 5))}, "`gate_x` must have the shape of `x`"),
        ({"a_param": np.ones((5,))}, r"`a_param` must have shape \(4,\)"),
        ({"segment_pos": np.zeros((1, 4), "int32")}, "`segment_pos` must have"),
        ({"segment_pos": np.zeros((1, 3))}, "`segment_pos` must be integer"),
        ({"h0": np.ones((2, 4))}, "`h0` must have shape"),
        ({"x": np.ones((1, 0, 4))}, "nonzero shape"),
    ],
)
def test_rejects_bad_inputs(change, message):
    args = {
        "x": np.ones((1, 3, 4), "float32"),
        "gate_x": np.ones((1, 3, 4), "float32"),
        "gate_a": np.ones((1, 3, 4), "float32"),
        "a_param": np.ones((4,), "float32"),
        "segment_pos": np.zeros((1, 3), "int32"),
        "h0": None,
    }
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        rg_lru_pallas(**args, interpret=True)
