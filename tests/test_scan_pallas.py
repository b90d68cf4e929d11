"""The unfused Pallas scan kernels (tools/) against the reference and a float64 loop.

The kernels of the bare recurrence, which `tools/benchmark_scan.py` measures
the fused kernel against; they share its block layout (`ops.pallas_layout`).

Kernels run with the Pallas interpreter on CPU; both the GPU (Triton) and the
TPU (Mosaic) variants interpret here. Lowering each variant for its platform
(no device needed) checks the block shapes the compilers would reject.
"""

import subprocess
import sys

import keras
import numpy as np
import pytest

if keras.config.backend() != "jax":
    pytest.skip("Pallas kernels are JAX only", allow_module_level=True)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import tpu as pltpu  # noqa: E402

from keras_recurrentgemma.ops import pallas_layout  # noqa: E402
from keras_recurrentgemma.ops import rg_lru_scan_reference  # noqa: E402
from tests.tolerances import KERNEL  # noqa: E402
from tests.tolerances import SELF_CONSISTENCY  # noqa: E402
from tools.pallas_scan_unfused import rg_lru_scan_pallas  # noqa: E402

TOL = SELF_CONSISTENCY["float32"]
# One rounding of a 16-bit result; two for `da` with a bfloat16 `y`, which
# reads the rounded stored state.
BFLOAT16_TOL = KERNEL["bfloat16"]
STORED_STATE_TOL = KERNEL["bfloat16_stored_state"]

# The interpreter that models TPU memory: buffers start as NaN and
# out-of-bounds reads raise, so a carry across time chunks that is read
# before it is written, or a boundary row fetched from outside the array,
# fails the test instead of passing by luck.
TPU_MEMORY_MODEL = pltpu.InterpretParams()


def random_inputs(b, t, l, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.0, (b, t, l)).astype("float32")
    a[:, rng.integers(0, t, size=max(1, t // 4))] = 0.0  # resets
    x = rng.normal(size=(b, t, l)).astype("float32")
    h0 = rng.normal(size=(b, l)).astype("float32")
    dy = rng.normal(size=(b, t, l)).astype("float32")
    dh_last = rng.normal(size=(b, l)).astype("float32")
    return a, x, h0, dy, dh_last


def float64_scan_and_grads(a, x, h0, dy, dh_last):
    """Forward and reverse loops in float64: `(y, h_last), (da, dx, dh0)`."""
    a, x, dy = (np.asarray(v, np.float64) for v in (a, x, dy))
    b, t, l = a.shape
    h = np.zeros((b, l)) if h0 is None else np.asarray(h0, np.float64)
    h_before = np.empty_like(a)
    y = np.empty_like(a)
    for i in range(t):
        h_before[:, i] = h
        h = a[:, i] * h + x[:, i]
        y[:, i] = h
    carry = np.asarray(dh_last, np.float64)
    dx = np.empty_like(a)
    for i in reversed(range(t)):
        dx[:, i] = dy[:, i] + carry
        carry = a[:, i] * dx[:, i]
    return (y, h), (dx * h_before, dx, carry)


def pallas_vjp(a, x, h0, dy, dh_last, interpret=None, platform="gpu", **kwargs):
    # The interpreter unless JAX's device runs `platform`'s kernel (on a GPU
    # or TPU, tools/gpu_check.py runs these tests on the device).
    if interpret is None:
        interpret = platform != jax.default_backend()
    kwargs["platform"] = platform

    def scan(a, x, *h0):
        return rg_lru_scan_pallas(a, x, *h0, interpret=interpret, **kwargs)

    h0 = () if h0 is None else (h0,)
    outputs, vjp = jax.vjp(scan, a, x, *h0)
    grads = vjp((jnp.asarray(dy, outputs[0].dtype), jnp.asarray(dh_last)))
    return outputs, grads + (None,) * (3 - len(grads))


def reference_vjp(a, x, h0, dy, dh_last):
    outputs, vjp = jax.vjp(jax.jit(rg_lru_scan_reference), a, x, h0)
    return outputs, vjp((jnp.asarray(dy), jnp.asarray(dh_last)))


def assert_close(actual, expected, tol):
    for act, exp in zip(actual, expected, strict=True):
        assert (act is None) == (exp is None)
        if act is not None:
            act = np.asarray(jnp.asarray(act, "float32"))
            np.testing.assert_allclose(act, np.asarray(exp, np.float64), **tol)


# (platform, b, t, l, with_h0, kwargs). Every T and width misses the blocks;
# on TPU, `time_block` cuts the sequence into chunks, the last one padded.
CASES = [
    ("gpu", 1, 1, 5, True, {}),
    ("gpu", 3, 33, 130, False, {"block_width": 256}),
    ("gpu", 2, 7, 130, True, {}),  # two width blocks of 128
    ("tpu", 1, 1, 5, False, {}),
    ("tpu", 2, 7, 130, True, {}),  # one whole-width block of 2 × 128 lanes
    ("tpu", 1, 33, 5, False, {"time_block": 8}),  # five chunks, no h0
    (
        "tpu",
        2,
        17,
        1030,
        True,
        {"block_width": 1024, "time_block": 8, "interpret": TPU_MEMORY_MODEL},
    ),
]


@pytest.mark.parametrize("platform, b, t, l, with_h0, kwargs", CASES)
def test_values_and_gradients_float32(platform, b, t, l, with_h0, kwargs):
    a, x, h0, dy, dh_last = random_inputs(b, t, l, seed=t + l)
    h0 = h0 if with_h0 else None
    outputs, grads = pallas_vjp(a, x, h0, dy, dh_last, platform=platform, **kwargs)
    assert outputs[0].dtype == jnp.float32 and outputs[0].shape == (b, t, l)
    assert outputs[1].dtype == jnp.float32 and outputs[1].shape == (b, l)
    exact_outputs, exact_grads = float64_scan_and_grads(a, x, h0, dy, dh_last)
    assert_close(outputs, exact_outputs, TOL)
    assert_close(grads, exact_grads if with_h0 else exact_grads[:2] + (None,), TOL)


# The same arguments as two of CASES, so the kernels are already compiled.
@pytest.mark.parametrize("platform, b, t, l, with_h0, kwargs", [CASES[2], CASES[4]])
def test_matches_keras_reference(platform, b, t, l, with_h0, kwargs):
    a, x, h0, dy, dh_last = random_inputs(b, t, l, seed=t + l)
    outputs, grads = pallas_vjp(a, x, h0, dy, dh_last, platform=platform, **kwargs)
    ref_outputs, ref_grads = reference_vjp(a, x, h0, dy, dh_last)
    assert_close(outputs, ref_outputs, TOL)
    assert_close(grads, ref_grads, TOL)


@pytest.mark.parametrize("platform, y_dtype", [("gpu", "bfloat16"), ("tpu", "float32")])
def test_bfloat16_inputs_accumulate_in_float32(platform, y_dtype):
    a, x, h0, dy, dh_last = random_inputs(2, 17, 130, seed=5)
    a, x, dy = (jnp.asarray(v, "bfloat16") for v in (a, x, dy))
    (y, h_last), (da, dx, dh0) = pallas_vjp(
        a, x, h0, dy, dh_last, platform=platform, y_dtype=y_dtype
    )
    assert y.dtype == jnp.dtype(y_dtype)
    assert h_last.dtype == jnp.float32
    assert (da.dtype, dx.dtype, dh0.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)

    # The exact answer for the bfloat16-rounded inputs.
    rounded = [np.asarray(v.astype("float32")) for v in (a, x, dy)]
    (y_ref, h_ref), grads_ref = float64_scan_and_grads(
        rounded[0], rounded[1], h0, rounded[2], dh_last
    )
    # Float32 results are only float32 arithmetic away from the exact answer
    # (dh0 = a_0 g_0 never reads a stored state).
    assert_close([h_last, dh0], [h_ref, grads_ref[2]], TOL)
    assert_close([y], [y_ref], TOL if y_dtype == "float32" else BFLOAT16_TOL)
    assert_close([dx], grads_ref[1:2], BFLOAT16_TOL)
    da_tol = BFLOAT16_TOL if y_dtype == "float32" else STORED_STATE_TOL
    assert_close([da], grads_ref[:1], da_tol)


def test_reset_cuts_the_dependence_on_the_past():
    a, x, h0, dy, dh_last = random_inputs(1, 9, 5, seed=1)
    a[:, 4] = 0.0
    (y, _), (_, dx, dh0) = pallas_vjp(a, x, h0, np.ones_like(dy), 0 * dh_last)
    x_changed = x.copy()
    x_changed[:, :4] += 10.0
    (y_changed, _), _ = pallas_vjp(a, x_changed, h0, dy, dh_last)
    np.testing.assert_array_equal(np.asarray(y)[:, 4:], np.asarray(y_changed)[:, 4:])
    # With loss sum(y), only y_0..y_3 depend on x_0..x_3 and h0.
    exact = float64_scan_and_grads(a[:, :4], x[:, :4], h0, np.ones((1, 4, 5)), 0)
    np.testing.assert_allclose(np.asarray(dx)[:, :4], exact[1][1], **TOL)
    np.testing.assert_allclose(np.asarray(dh0), exact[1][2], **TOL)


def test_jit_and_interpret_platform_default():
    # On CPU, interpret=True with no platform runs the GPU variant.
    a, x, h0, _, _ = random_inputs(2, 5, 3)
    y, h_last = jax.jit(lambda a, x, h0: rg_lru_scan_pallas(a, x, h0, interpret=True))(
        a, x, h0
    )
    (y_ref, h_ref), _ = float64_scan_and_grads(a, x, h0, 0 * a, 0 * h0)
    assert_close([y, h_last], [y_ref, h_ref], TOL)


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
    # Lowering runs the Triton / Mosaic block-shape checks without a device.
    a = jnp.ones((2, 11, 1030), dtype)

    def loss(a, x, h0):
        y, h_last = rg_lru_scan_pallas(
            a, x, h0, platform=platform, y_dtype=dtype, **kwargs
        )
        return jnp.sum(y.astype("float32")) + jnp.sum(h_last)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    text = grad.trace(a, a, a[:, 0]).lower(lowering_platforms=(lowering,)).as_text()
    target = "__gpu$xla.gpu.triton" if platform == "gpu" else "tpu_custom_call"
    assert text.count(target) == 2  # the forward and the backward kernel


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"platform": "gpu", "block_width": 384}, "power of two"),
        ({"platform": "tpu", "block_width": 200}, "multiple of 128"),
        ({"platform": "tpu", "block_width": 512}, "multiple of 1024"),
        ({"platform": "gpu", "time_block": 8}, "TPU kernel only"),
        ({"platform": "cpu"}, "interpret=True"),
    ],
)
def test_rejects_bad_arguments(kwargs, message):
    a = np.ones((1, 3, 2000), "float32")
    with pytest.raises(ValueError, match=message):
        rg_lru_scan_pallas(a, a, **kwargs)


def test_rejects_bad_shapes():
    a = np.ones((1, 3, 4), "float32")
    with pytest.raises(ValueError, match=r"shape \[b, t, l\]"):
        rg_lru_scan_pallas(a, a[:, :2], interpret=True)
    with pytest.raises(ValueError, match="`h0` must have shape"):
        rg_lru_scan_pallas(a, a, np.ones((1, 3)), interpret=True)


def test_available_reports_why_not():
    assert pallas_layout.available("cpu") == (
        False,
        "Pallas has no compiled lowering for 'cpu'",
    )
    for platform in ("gpu", "tpu"):
        ok, reason = pallas_layout.available(platform)
        has_device = any(d.platform == platform for d in jax.devices())
        assert ok == has_device and (ok or reason)


def test_module_imports_without_jax():
    # Under the torch and TensorFlow backends JAX may be missing.
    code = (
        "import importlib.util, sys; sys.modules['jax'] = None; "
        "spec = importlib.util.spec_from_file_location("
        f"'m', {pallas_layout.__file__!r});"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m); "
        "ok, reason = m.available('gpu'); assert not ok and 'jax' in reason, reason"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
