"""The RG-LRU scan reference and its dispatcher."""

import keras
import numpy as np
import pytest
from keras import ops
from keras.backend import standardize_dtype

from keras_recurrentgemma.ops import resolve_implementation
from keras_recurrentgemma.ops import rg_lru_scan
from tests.backend_grad import value_and_grad
from tests.tolerances import KERNEL
from tests.tolerances import SELF_CONSISTENCY

TOL = SELF_CONSISTENCY["float32"]
GRAD_TOL = KERNEL["float32_gradient"]


def numpy_scan(a, x, h0):
    h = np.zeros(a[:, 0].shape, np.float64) if h0 is None else h0.astype(np.float64)
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return np.stack(ys, 1), h


def random_inputs(b, t, l, seed=0):
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.0, (b, t, l)).astype("float32")
    a[:, rng.integers(0, t, size=max(1, t // 4))] = 0.0  # resets
    x = rng.normal(size=(b, t, l)).astype("float32")
    h0 = rng.normal(size=(b, l)).astype("float32")
    return a, x, h0


# Every implementation that runs on CPU without an interpreter; the GPU and
# TPU kernels are tested in their own files (test_scan_pallas.py,
# test_scan_triton.py).
CPU_IMPLEMENTATIONS = ["reference", "doubling"] + (
    ["xla"] if keras.config.backend() == "tensorflow" else []
)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
@pytest.mark.parametrize("t", [1, 2, 7, 33])
@pytest.mark.parametrize("with_h0", [False, True])
def test_scan_matches_sequential_loop(implementation, t, with_h0):
    a, x, h0 = random_inputs(3, t, 5, seed=t)
    h0 = h0 if with_h0 else None
    y, h_last = rg_lru_scan(a, x, h0, implementation=implementation)
    y_ref, h_ref = numpy_scan(a, x, h0)
    assert ops.convert_to_numpy(y).dtype == np.float32
    np.testing.assert_allclose(ops.convert_to_numpy(y), y_ref, **TOL)
    np.testing.assert_allclose(ops.convert_to_numpy(h_last), h_ref, **TOL)


def test_bfloat16_inputs_accumulate_in_float32():
    a, x, h0 = random_inputs(2, 40, 8)
    a_bf = ops.cast(a, "bfloat16")
    x_bf = ops.cast(x, "bfloat16")
    y, h_last = rg_lru_scan(a_bf, x_bf, h0)
    assert standardize_dtype(y.dtype) == "float32"
    assert standardize_dtype(h_last.dtype) == "float32"
    # The exact answer for the bf16-rounded inputs, from float64.
    a_r = ops.convert_to_numpy(ops.cast(a_bf, "float32"))
    x_r = ops.convert_to_numpy(ops.cast(x_bf, "float32"))
    y_ref, _ = numpy_scan(a_r, x_r, h0)
    np.testing.assert_allclose(ops.convert_to_numpy(y), y_ref, **TOL)


@pytest.mark.parametrize("implementation", CPU_IMPLEMENTATIONS)
def test_gradients_match_reverse_scan(implementation):
    a, x, h0 = random_inputs(2, 9, 4, seed=3)
    w = np.random.default_rng(4).normal(size=x.shape).astype("float32")

    def loss(a, x, h0):
        y, h_last = rg_lru_scan(a, x, h0, implementation=implementation)
        return ops.sum(y * ops.convert_to_tensor(w)) + ops.sum(h_last)

    _, (da, dx, dh0) = value_and_grad(loss, a, x, h0)

    # dL/dh_t = g_t = w_t + [t = T-1] + a_{t+1} g_{t+1}
    y, _ = numpy_scan(a, x, h0)
    g = np.zeros_like(y)
    carry = np.zeros_like(y[:, 0])
    for t in reversed(range(a.shape[1])):
        nxt = a[:, t + 1] if t + 1 < a.shape[1] else 0.0
        carry = w[:, t] + (t == a.shape[1] - 1) + nxt * carry
        g[:, t] = carry
    h_prev = np.concatenate([h0[:, None], y[:, :-1]], axis=1)
    np.testing.assert_allclose(dx, g, **GRAD_TOL)
    np.testing.assert_allclose(da, g * h_prev, **GRAD_TOL)
    np.testing.assert_allclose(dh0, a[:, 0] * g[:, 0], **GRAD_TOL)


def test_dispatch_rejects_unknown_implementation():
    a, x, _ = random_inputs(1, 3, 2)
    with pytest.raises(ValueError, match="Unknown scan implementation 'cuda'"):
        rg_lru_scan(a, x, implementation="cuda")


def test_auto_picks_the_backend_path_on_cpu(monkeypatch):
    monkeypatch.delenv("KERAS_RECURRENTGEMMA_INTERPRET", raising=False)
    # No GPU or TPU here: the kernels stand aside, TensorFlow still gets XLA.
    expected = "xla" if keras.config.backend() == "tensorflow" else "reference"
    a, x, h0 = random_inputs(2, 12, 6)
    assert resolve_implementation("auto") == expected
    assert resolve_implementation("auto", ops.convert_to_tensor(x)) == expected
    y_auto, _ = rg_lru_scan(a, x, h0)
    y_forced, _ = rg_lru_scan(a, x, h0, implementation=expected)
    np.testing.assert_array_equal(
        ops.convert_to_numpy(y_auto), ops.convert_to_numpy(y_forced)
    )


FAST_PATHS = {"xla": "tensorflow", "pallas": "jax", "triton": "torch"}


@pytest.mark.parametrize("implementation", sorted(FAST_PATHS))
def test_forced_fast_path_that_cannot_run_says_why(implementation, monkeypatch):
    monkeypatch.delenv("KERAS_RECURRENTGEMMA_INTERPRET", raising=False)
    backend = keras.config.backend()
    if FAST_PATHS[implementation] == backend and implementation == "xla":
        pytest.skip("XLA runs on every TensorFlow device")
    if FAST_PATHS[implementation] != backend:
        why = f"needs the {FAST_PATHS[implementation]} backend"
    elif implementation == "pallas":
        why = "Pallas kernels need a GPU or TPU and JAX's default device is 'cpu'"
    else:
        # Triton's own interpreter, when switched on in this process, can run
        # on CPU tensors; the message then names what is missing instead.
        why = "triton|CUDA|cuda"
    a, x, _ = random_inputs(1, 3, 2)
    with pytest.raises(ValueError, match=f"{implementation!r} cannot run here: "):
        rg_lru_scan(a, x, implementation=implementation)
    with pytest.raises(ValueError, match=why.replace("(", r"\(")):
        resolve_implementation(implementation)


@pytest.mark.skipif(
    keras.config.backend() == "tensorflow", reason="TensorFlow has no kernel"
)
def test_the_kernels_are_the_whole_units_not_the_bare_scans(monkeypatch):
    # The kernels run gates and recurrence together (`ops.rg_lru`); forced on
    # the bare scan they point there, and "auto" runs the reference instead.
    from keras_recurrentgemma.ops import scan

    kernel = {"jax": "pallas", "torch": "triton"}[keras.config.backend()]
    monkeypatch.setenv("KERAS_RECURRENTGEMMA_INTERPRET", "1")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    a, x, h0 = random_inputs(2, 5, 3)
    with pytest.raises(ValueError, match=f"rg_lru_scan has no {kernel!r} kernel"):
        rg_lru_scan(a, x, h0, implementation=kernel)
    monkeypatch.setattr(scan, "_on_accelerator", lambda x: True)
    assert resolve_implementation("auto", ops.convert_to_tensor(x)) == kernel
    y_auto, _ = rg_lru_scan(a, x, h0)
    y_reference, _ = rg_lru_scan(a, x, h0, implementation="reference")
    np.testing.assert_array_equal(
        ops.convert_to_numpy(y_auto), ops.convert_to_numpy(y_reference)
    )


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="XLA through tf.function"
)
def test_auto_compiles_with_xla_on_tensorflow():
    import tensorflow as tf

    a, x, h0 = random_inputs(2, 13, 3)
    # Called eagerly, "auto" compiles the scan on its own; inside a compiled
    # function it is inlined.
    y, h_last = tf.function(rg_lru_scan, jit_compile=True)(a, x, h0)
    y_eager, _ = rg_lru_scan(a, x, h0)
    np.testing.assert_allclose(y_eager.numpy(), y.numpy(), **TOL)
    y_ref, h_ref = numpy_scan(a, x, h0)
    np.testing.assert_allclose(y.numpy(), y_ref, **TOL)
    np.testing.assert_allclose(h_last.numpy(), h_ref, **TOL)


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow",
    reason="only TensorFlow traces with an unknown sequence length",
)
def test_reference_with_unknown_sequence_length():
    import tensorflow as tf

    a, x, h0 = random_inputs(2, 11, 3)
    spec = tf.TensorSpec((2, None, 3), "float32")

    @tf.function(input_signature=[spec, spec, tf.TensorSpec((2, 3), "float32")])
    def traced(a, x, h0):
        return rg_lru_scan(a, x, h0)

    y, h_last = traced(a, x, h0)
    y_ref, h_ref = numpy_scan(a, x, h0)
    np.testing.assert_allclose(y.numpy(), y_ref, **TOL)
    np.testing.assert_allclose(h_last.numpy(), h_ref, **TOL)
