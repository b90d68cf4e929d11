"""The unfused Triton scan (tools/) against the reference and a float64 loop.

The kernels of the bare recurrence, which `tools/benchmark_scan.py` measures
the fused kernel against; they share its launch rules (`ops.triton_launch`).

Runs on the torch backend only. On a machine without CUDA the kernels run in
Triton's interpreter (TRITON_INTERPRET=1, set for this module alone).
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.tolerances import KERNEL
from tests.tolerances import SELF_CONSISTENCY

if keras.config.backend() != "torch":
    pytest.skip("the Triton scan is a torch kernel", allow_module_level=True)
if "tensorflow" in sys.modules and "triton" not in sys.modules:
    # Importing triton now would abort the whole run
    # (see `triton_launch.import_triton`).
    pytest.skip(
        "tensorflow was imported before triton; conftest must import triton first",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton")

import torch  # noqa: E402

from keras_recurrentgemma.ops import rg_lru_scan_reference  # noqa: E402
from keras_recurrentgemma.ops.triton_launch import available  # noqa: E402
from tools.triton_scan_unfused import rg_lru_scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = SELF_CONSISTENCY["float32"]
BF16_TOL = KERNEL["bfloat16"]


@pytest.fixture(autouse=True, scope="module")
def _interpreter_on_cpu():
    # Set here rather than process-wide so the other torch tests never see
    # the interpreter; the kernels are decorated at first use, after this.
    if DEVICE == "cuda":
        yield
        return
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_INTERPRET", "1")
        yield


def random_case(b, t, l, seed=0):
    """Decays with resets, inputs, h0 and cotangents for y and h_last."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(0.5, 1.0, (b, t, l))
    a[rng.random((b, t)) < 0.2] = 0.0  # document starts, per row
    a[:, rng.integers(0, t)] = 0.0  # and one shared by every row
    x, dy = rng.normal(size=(2, b, t, l))
    h0, dh_last = rng.normal(size=(2, b, l))
    return [v.astype("float32") for v in (a, x, h0, dy, dh_last)]


def numpy_scan_with_grads(a, x, h0, dy, dh_last):
    """`(y, h_last, da, dx, dh0)` in float64 by explicit loops."""
    a, x, dy = (v.astype(np.float64) for v in (a, x, dy))
    start = np.zeros_like(a[:, 0]) if h0 is None else h0.astype(np.float64)
    h, ys = start, []
    for t in range(a.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    y = np.stack(ys, 1)
    # g_t = dL/dh_t = dy_t + a_{t+1} g_{t+1}, with dh_last entering at T-1.
    da, dx = np.zeros_like(a), np.zeros_like(a)
    g, a_next = dh_last.astype(np.float64), np.ones_like(start)
    for t in reversed(range(a.shape[1])):
        g = dy[:, t] + a_next * g
        dx[:, t] = g
        da[:, t] = g * (y[:, t - 1] if t else start)
        a_next = a[:, t]
    return y, h, da, dx, None if h0 is None else a_next * g


def to_torch(*arrays, dtype=torch.float32):
    return [
        None if v is None else torch.tensor(v, device=DEVICE).to(dtype) for v in arrays
    ]


def value_and_grads(scan, a, x, h0, dy, dh_last):
    """`(y, h_last, da, dx, dh0)` of `scan`, gradients of <y, dy> + <h, dh>."""
    leaves = [v.detach().clone().requires_grad_() for v in (a, x)]
    if h0 is not None:
        leaves.append(h0.detach().clone().requires_grad_())
    y, h_last = scan(*leaves[:2], leaves[2] if h0 is not None else None)
    loss = (y.float() * dy).sum() + (h_last * dh_last).sum()
    # The reference never reads `a` when t=1 and h0 is absent.
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    grads = [
        torch.zeros_like(v) if g is None else g
        for v, g in zip(leaves, grads, strict=True)
    ]
    dh0 = grads[2] if h0 is not None else None
    return y, h_last, grads[0], grads[1], dh0


def assert_close(actual, expected, tol):
    for got, want in zip(actual, expected, strict=True):
        if want is None:
            assert got is None
            continue
        if isinstance(want, torch.Tensor):
            want = want.detach().float().cpu().numpy()
        np.testing.assert_allclose(got.detach().float().cpu().numpy(), want, **tol)


@pytest.mark.parametrize("with_h0", [False, True])
@pytest.mark.parametrize("b,t,l", [(1, 1, 5), (3, 7, 130), (1, 33, 5), (3, 33, 130)])
def test_float32_matches_loop_and_reference(b, t, l, with_h0):
    a, x, h0, dy, dh_last = random_case(b, t, l, seed=t * l)
    h0 = h0 if with_h0 else None
    expected = numpy_scan_with_grads(a, x, h0, dy, dh_last)
    inputs = to_torch(a, x, h0, dy, dh_last)

    got = value_and_grads(rg_lru_scan_triton, *inputs)
    assert got[0].dtype == got[1].dtype == torch.float32
    assert_close(got, expected, TOL)
    reference = value_and_grads(rg_lru_scan_reference, *inputs)
    assert_close(got, reference, TOL)


def test_several_blocks_with_a_masked_tail():
    # 130 channels in blocks of 32: four full blocks and one of two channels.
    a, x, h0, dy, dh_last = random_case(3, 7, 130, seed=1)
    expected = numpy_scan_with_grads(a, x, h0, dy, dh_last)

    def scan(a, x, h0):
        return rg_lru_scan_triton(a, x, h0, block_l=32)

    got = value_and_grads(scan, *to_torch(a, x, h0, dy, dh_last))
    assert_close(got, expected, TOL)


@pytest.mark.parametrize("y_dtype", [torch.float32, torch.bfloat16])
def test_bfloat16_inputs(y_dtype):
    a, x, h0, dy, dh_last = random_case(3, 33, 130, seed=2)
    a_bf, x_bf, h0_bf = to_torch(a, x, h0, dtype=torch.bfloat16)
    dy, dh_last = to_torch(dy, dh_last)
    # Autograd hands a bfloat16 y a bfloat16 cotangent, so every comparison
    # starts from that rounded cotangent.
    dy = dy.to(y_dtype).float()
    # The exact answer for the bfloat16-rounded inputs.
    rounded = [v.float().cpu().numpy() for v in (a_bf, x_bf, h0_bf)]
    expected = numpy_scan_with_grads(
        *rounded, *(v.cpu().numpy() for v in (dy, dh_last))
    )

    def scan(a, x, h0):
        return rg_lru_scan_triton(a, x, h0, y_dtype=y_dtype)

    got = value_and_grads(scan, a_bf, x_bf, h0_bf, dy, dh_last)
    assert got[0].dtype == y_dtype
    assert got[1].dtype == torch.float32
    assert all(g.dtype == torch.bfloat16 for g in got[2:])
    y_tol = TOL if y_dtype == torch.float32 else BF16_TOL
    assert_close(got[:1], expected[:1], y_tol)
    assert_close(got[1:2], expected[1:2], TOL)
    assert_close(got[2:], expected[2:], BF16_TOL)
    reference = value_and_grads(rg_lru_scan_reference, a_bf, x_bf, h0_bf, dy, dh_last)
    assert_close(got[2:], reference[2:], BF16_TOL)


def test_non_contiguous_inputs_and_unused_y():
    a, x, h0, _, dh_last = random_case(2, 9, 6, seed=3)
    # [b, l, t] storage viewed as [b, t, l]; h0 as a column of a [l, b] array.
    a_t, x_t = to_torch(a.transpose(0, 2, 1).copy(), x.transpose(0, 2, 1).copy())
    a_view, x_view = a_t.transpose(1, 2), x_t.transpose(1, 2)
    (h0_t,) = to_torch(h0.T.copy())
    h0_view = h0_t.T
    assert not any(v.is_contiguous() for v in (a_view, x_view, h0_view))
    # Only h_last enters the loss: y's cotangent arrives as expanded zeros.
    leaves = [v.clone().requires_grad_() for v in (a_view, x_view, h0_view)]
    _, h_last = rg_lru_scan_triton(*leaves)
    (h_last * to_torch(dh_last)[0]).sum().backward()
    y, h, da, dx, dh0 = numpy_scan_with_grads(a, x, h0, np.zeros_like(a), dh_last)
    assert_close([h_last] + [v.grad for v in leaves], [h, da, dx, dh0], TOL)


def test_empty_sequence_passes_h0_through():
    _, _, h0, _, dh_last = random_case(2, 1, 4)
    a = x = torch.zeros(2, 0, 4, device=DEVICE)
    dy = torch.zeros(2, 0, 4, device=DEVICE)
    got = value_and_grads(
        rg_lru_scan_triton, a, x, *to_torch(h0), dy, *to_torch(dh_last)
    )
    assert got[0].shape == (2, 0, 4)
    assert_close([got[1], got[4]], [h0, dh_last], TOL)


def test_bad_shapes_raise():
    a = torch.zeros(2, 3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="a and x must both have shape"):
        rg_lru_scan_triton(a, torch.zeros(2, 3, 5, device=DEVICE))
    with pytest.raises(ValueError, match="h0 must have shape"):
        rg_lru_scan_triton(a, a, torch.zeros(2, 3, device=DEVICE))
    with pytest.raises(ValueError, match="power of two"):
        rg_lru_scan_triton(a, a, block_l=48)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors need the interpreter")
def test_cpu_needs_the_interpreter(monkeypatch):
    assert available("cpu") == (True, "")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, reason = available("cpu")
    assert not ok and "TRITON_INTERPRET=1" in reason
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        rg_lru_scan_triton(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3))


def test_triton_after_tensorflow_is_refused_not_fatal():
    pytest.importorskip("tensorflow")
    # A fresh process, loading the module by path: importing the package
    # imports keras, whose torch backend already loads triton (through
    # torch._dynamo), and that is the order that works. TensorFlow imports
    # keras too, so the subprocess must not be on the torch backend either.
    path = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
        "keras_recurrentgemma",
        "ops",
        "triton_launch.py",
    )
    code = (
        "import importlib.util\n"
        "import tensorflow\n"
        f"spec = importlib.util.spec_from_file_location('triton_launch', {path!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(module)\n"
        "print(module.available('cpu'))\n"
    )
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TRITON_INTERPRET="1")
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(False, 'triton cannot be imported after tensorflow" in result.stdout
