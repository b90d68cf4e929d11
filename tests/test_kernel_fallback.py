"""`"auto"` checks a kernel once per device before trusting it (`ops.kernel_check`).

On CPU, "auto" is made to pick the backend's kernel by patching the device
detection (`scan._on_accelerator`); the kernels then run in their
interpreters. A failing kernel is simulated by patching the kernel function
to raise (as a compile error would) or to return wrong values. TensorFlow
has no kernel of its own ("auto" runs XLA there), so only the CPU test that
"auto" checks nothing applies to it.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.ops import KernelFallbackWarning
from keras_recurrentgemma.ops import kernel_check
from keras_recurrentgemma.ops import resolve_implementation
from keras_recurrentgemma.ops import rg_lru
from keras_recurrentgemma.ops import scan
from keras_recurrentgemma.ops.rg_lru import _reference as reference_unit
from tests.models import document_positions
from tests.models import tiny_causal_lm
from tests.tolerances import KERNEL as KERNEL_TOL

BACKEND = keras.config.backend()
KERNEL = {"jax": "pallas", "torch": "triton"}.get(BACKEND)
needs_kernel = pytest.mark.skipif(
    KERNEL is None, reason="TensorFlow has no kernel: 'auto' runs XLA there"
)


def kernel_module():
    if KERNEL == "pallas":
        from keras_recurrentgemma.ops import pallas_rg_lru

        return pallas_rg_lru, "rg_lru_pallas"
    from keras_recurrentgemma.ops import triton_rg_lru

    return triton_rg_lru, "rg_lru_triton"


def inputs(b=2, t=7, l=12, seed=0):
    """`(x, gate_x, gate_a, a_param, segment_pos, h0)` with documents and padding."""
    rng = np.random.default_rng(seed)

    def floats(*shape):
        return ops.convert_to_tensor(rng.normal(size=shape), "float32")

    segment_pos = ops.convert_to_tensor(document_positions(b, t, seed), "int32")
    return (*(floats(b, t, l) for _ in range(3)), floats(l), segment_pos, floats(b, l))


def numpy(values):
    return [ops.convert_to_numpy(v) for v in values]


@pytest.fixture
def auto_picks_the_kernel(monkeypatch):
    """ "auto" picks the kernel on CPU, run by its interpreter; no verdicts yet."""
    # On a GPU or TPU (tools/gpu_check.py) the kernels run on the device.
    if KERNEL == "triton":
        import torch

        if not torch.cuda.is_available():
            monkeypatch.setenv("TRITON_INTERPRET", "1")
    else:
        import jax

        if jax.default_backend() == "cpu":
            monkeypatch.setenv("KERAS_RECURRENTGEMMA_INTERPRET", "1")
    monkeypatch.setattr(scan, "_on_accelerator", lambda x: True)
    monkeypatch.setattr(kernel_check, "_verdicts", {})
    assert resolve_implementation("auto", inputs()[0]) == KERNEL


def break_kernel(monkeypatch, how):
    """Replace the kernel by one that raises, or that is off by a factor 2."""
    module, name = kernel_module()

    def broken(x, gate_x, gate_a, a_param, segment_pos, h0=None, **kwargs):
        if how == "raises":
            raise RuntimeError("simulated compile error: no lowering for this GPU")
        y, h_last = reference_unit(x, gate_x, gate_a, a_param, segment_pos, h0)
        return 2.0 * y, h_last

    monkeypatch.setattr(module, name, broken)


def fallback_warnings(caught):
    return [w for w in caught if issubclass(w.category, KernelFallbackWarning)]


@needs_kernel
def test_a_kernel_that_passes_its_check_runs_unwarned(
    auto_picks_the_kernel, monkeypatch
):
    module, name = kernel_module()
    original = getattr(module, name)
    calls = []

    def spy(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    args = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = numpy(rg_lru(*args))
        checked = len(calls)
        second = numpy(rg_lru(*args))
    assert not fallback_warnings(caught)
    assert list(kernel_check._verdicts.values()) == [True]
    # The check ran the kernel once, then each call ran it once more.
    assert checked == 2 and len(calls) == 3
    expected = numpy(rg_lru(*args, implementation="reference"))
    for actual in (first, second):
        for act, exp in zip(actual, expected, strict=True):
            np.testing.assert_allclose(act, exp, **KERNEL_TOL["float32"])


@needs_kernel
@pytest.mark.parametrize("how", ["raises", "wrong_values"])
def test_a_failing_kernel_warns_once_and_the_reference_runs(
    auto_picks_the_kernel, monkeypatch, how
):
    break_kernel(monkeypatch, how)
    args = inputs()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = [numpy(rg_lru(*args)) for _ in range(3)]
    [warning] = fallback_warnings(caught)
    message = str(warning.message)
    assert repr(KERNEL) in message
    assert kernel_check._device(args[0]) in message
    reason = "simulated compile error" if how == "raises" else "y is off the reference"
    assert reason in message
    expected = numpy(rg_lru(*args, implementation="reference"))
    for actual in results:
        for act, exp in zip(actual, expected, strict=True):
            np.testing.assert_array_equal(act, exp)


@needs_kernel
def test_a_forced_kernel_is_not_checked_and_fails_loudly(
    auto_picks_the_kernel, monkeypatch
):
    break_kernel(monkeypatch, "raises")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError, match="simulated compile error"):
            rg_lru(*inputs(), implementation=KERNEL)
    assert not fallback_warnings(caught)
    assert kernel_check._verdicts == {}


@needs_kernel
def test_generation_falls_back_inside_compiled_steps(
    auto_picks_the_kernel, monkeypatch
):
    # The first kernel call comes from inside `jax.jit` / a traced torch
    # step: the check must still run eagerly and decide.
    break_kernel(monkeypatch, "wrong_values")
    kwargs = {"sequence_length": 16, "prefill_chunk_size": 4}
    auto = tiny_causal_lm("griffin", scan_implementation="auto", **kwargs)
    reference = tiny_causal_lm("griffin", scan_implementation="reference", **kwargs)
    prompts = ["def", "import numpy as"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = []
        for lm in (auto, reference):
            lm.compile(sampler="greedy")
            outputs.append(lm.generate(prompts, max_length=16, stop_token_ids=None))
    assert len(fallback_warnings(caught)) == 1
    assert list(outputs[0]) == list(outputs[1])


def test_auto_without_an_accelerator_checks_nothing(monkeypatch):
    monkeypatch.delenv("KERAS_RECURRENTGEMMA_INTERPRET", raising=False)
    monkeypatch.setattr(kernel_check, "_verdicts", {})
    args = inputs()
    expected_name = "xla" if BACKEND == "tensorflow" else "reference"
    assert resolve_implementation("auto", args[0]) == expected_name
    actual = numpy(rg_lru(*args))
    expected = numpy(rg_lru(*args, implementation=expected_name))
    for act, exp in zip(actual, expected, strict=True):
        np.testing.assert_array_equal(act, exp)
    assert kernel_check._verdicts == {}
