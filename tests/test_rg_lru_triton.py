"""The fused RG-LRU Triton kernels (gates and scan) against the `keras.ops` one.

Torch backend only. Without CUDA the kernels run in Triton's interpreter
(TRITON_INTERPRET=1, set for this module alone), and every Triton kernel of
the package is also compiled to a cubin for real GPU targets: Triton's
compiler and `ptxas` need no GPU, so CI catches code that only the
interpreter accepts.
"""

import sys

import keras
import numpy as np
import pytest

from tests.tolerances import KERNEL
from tests.tolerances import SELF_CONSISTENCY
from tests.tolerances import relative_error

if keras.config.backend() != "torch":
    pytest.skip("the Triton kernels are torch kernels", allow_module_level=True)
if "tensorflow" in sys.modules and "triton" not in sys.modules:
    pytest.skip(
        "tensorflow was imported before triton; tests/__init__ imports triton first",
        allow_module_level=True,
    )
triton = pytest.importorskip("triton")

import torch  # noqa: E402

from keras_recurrentgemma.ops import rg_lru  # noqa: E402
from keras_recurrentgemma.ops import rg_lru_gates  # noqa: E402
from keras_recurrentgemma.ops import rg_lru_scan_reference  # noqa: E402
from keras_recurrentgemma.ops import triton_launch  # noqa: E402
from keras_recurrentgemma.ops import triton_rg_lru  # noqa: E402
from tests.models import document_positions  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = SELF_CONSISTENCY["float32"]
BFLOAT16_RELATIVE = KERNEL["bfloat16_relative"]


@pytest.fixture(autouse=True)
def _interpreter_on_cpu(request, monkeypatch):
    # Not for the compile tests: they decorate the kernels for the GPU.
    if DEVICE == "cpu" and "compiles" not in request.node.name:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def random_inputs(b, t, l, seed, dtype=torch.float32):
    rng = np.random.default_rng(seed)

    def tensor(*shape, dtype=dtype):
        values = torch.tensor(rng.normal(size=shape), dtype=dtype, device=DEVICE)
        return values.requires_grad_()

    x, gate_x, gate_a = (tensor(b, t, l) for _ in range(3))
    a_param = tensor(l)
    h0 = tensor(b, l, dtype=torch.float32)
    pos = torch.tensor(document_positions(b, t, seed), device=DEVICE)
    return x, gate_x, gate_a, a_param, pos, h0


def reference(x, gate_x, gate_a, a_param, pos, h0):
    a, normalized_x = rg_lru_gates(x, gate_x, gate_a, a_param, pos)
    return rg_lru_scan_reference(a, normalized_x, h0)


def run(fn, inputs, with_h0, seed=0):
    """`(outputs, gradients)` of `fn` for random cotangents."""
    x, gate_x, gate_a, a_param, pos, h0 = inputs
    h0 = h0 if with_h0 else None
    y, h_last = fn(x, gate_x, gate_a, a_param, pos, h0)
    rng = np.random.default_rng(seed + 1)
    dy = torch.tensor(rng.normal(size=y.shape), dtype=torch.float32, device=DEVICE)
    dh = torch.tensor(rng.normal(size=h_last.shape), dtype=torch.float32, device=DEVICE)
    wrt = [x, gate_x, gate_a, a_param] + ([h0] if with_h0 else [])
    grads = torch.autograd.grad([y, h_last], wrt, [dy, dh])
    return [y.detach(), h_last.detach()], list(grads)


def assert_close(actual, expected):
    for act, exp in zip(actual, expected, strict=True):
        assert act.shape == exp.shape and act.dtype == exp.dtype
        np.testing.assert_allclose(
            act.float().cpu().numpy(), exp.float().cpu().numpy(), **TOL
        )


# T = 1, batch 1, widths below and above a block, several blocks with a
# masked tail (block_l 32 over 70 channels).
@pytest.mark.parametrize(
    "b, t, l, with_h0, block_l",
    [(1, 1, 5, True, None), (2, 13, 130, False, None), (3, 9, 70, True, 32)],
)
def test_values_and_gradients_match_the_reference(b, t, l, with_h0, block_l):
    inputs = random_inputs(b, t, l, seed=t + l)

    def fused(*args):
        return triton_rg_lru.rg_lru_triton(*args, block_l=block_l)

    outputs, grads = run(fused, inputs, with_h0)
    expected_outputs, expected_grads = run(reference, inputs, with_h0)
    assert outputs[0].dtype == torch.float32
    assert_close(outputs, expected_outputs)
    assert_close(grads, expected_grads)


def test_bfloat16_inputs():
    inputs = random_inputs(2, 11, 40, seed=3, dtype=torch.bfloat16)
    outputs, grads = run(triton_rg_lru.rg_lru_triton, inputs, with_h0=True)
    expected_outputs, expected_grads = run(reference, inputs, with_h0=True)
    # The gates and the recurrence run in float32 on the rounded inputs.
    assert_close(outputs, expected_outputs)
    for grad, expected in zip(grads, expected_grads, strict=True):
        assert grad.dtype == expected.dtype
        assert relative_error(grad.float().cpu(), expected.float().cpu()) <= (
            BFLOAT16_RELATIVE
        )


def test_dispatch_runs_the_fused_kernel(monkeypatch):
    calls = []
    original = triton_rg_lru.rg_lru_triton

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return original(*args, **kwargs)

    monkeypatch.setattr(triton_rg_lru, "rg_lru_triton", spy)
    inputs = random_inputs(2, 6, 9, seed=4)
    with torch.no_grad():
        fused = rg_lru(*inputs, implementation="triton")
        expected = reference(*inputs)
    assert calls == [(2, 6, 9)]
    assert_close(list(fused), list(expected))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"gate_x": torch.ones(1, 3, 5)}, "gate_x must have the shape of x"),
        ({"a_param": torch.ones(5)}, r"a_param must have shape \(4,\)"),
        ({"segment_pos": torch.zeros(1, 4, dtype=torch.int32)}, "segment_pos must"),
        ({"segment_pos": torch.zeros(1, 3)}, "segment_pos must be integer"),
        ({"h0": torch.ones(2, 4)}, "h0 must have shape"),
        ({"x": torch.ones(1, 0, 4)}, "nonzero shape"),
        ({"x": torch.ones(1, 3, 4, dtype=torch.float64)}, "x must be one of"),
    ],
)
def test_rejects_bad_inputs(change, message):
    args = {
        "x": torch.ones(1, 3, 4),
        "gate_x": torch.ones(1, 3, 4),
        "gate_a": torch.ones(1, 3, 4),
        "a_param": torch.ones(4),
        "segment_pos": torch.zeros(1, 3, dtype=torch.int32),
        "h0": None,
    }
    args.update(change)
    with pytest.raises((ValueError, TypeError), match=message):
        triton_rg_lru.rg_lru_triton(**args)


def _signature(kernel, pointer_dtypes):
    """Every argument of `kernel`: pointers typed from `pointer_dtypes`."""
    signature = {}
    for name in kernel.arg_names:
        if name in ("HAS_H0", "BLOCK_L", *triton_rg_lru._LAUNCH_CONSTANTS):
            signature[name] = "constexpr"
        elif name in ("T", "L"):
            signature[name] = "i32"
        else:
            signature[name] = "*" + pointer_dtypes.get(name, "fp32")
    return signature


# T4 (Kaggle), A100, H100.
@pytest.mark.parametrize("capability", [75, 80, 90])
def test_every_kernel_compiles_for_gpu(capability, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if triton.knobs.runtime.interpret:
        pytest.skip("TRITON_INTERPRET was set before triton was imported")
    sixteen_bit = {
        name: "bf16"
        for name in ("a_ptr", "x_ptr", "gx_ptr", "ga_ptr", "dx_ptr", "dgx_ptr")
        + ("dga_ptr", "da_ptr")
    }
    sixteen_bit["pos_ptr"] = "i32"
    for kernel in triton_rg_lru._kernels(False):
        source = ASTSource(
            fn=kernel,
            signature=_signature(kernel, sixteen_bit),
            constexprs={
                "HAS_H0": True,
                "BLOCK_L": 128,
                **triton_rg_lru._LAUNCH_CONSTANTS,
            },
        )
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", capability, 32),
            options=triton_launch.launch_options(128),
        )
        assert compiled.asm["cubin"], kernel.fn.__name__


def test_traced_graph_launches_the_kernel_again():
    # The compiled torch decode step is a `make_fx` trace: the kernel must be
    # a node of it, run again at each replay, not a launch seen once.
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [v.detach() for v in random_inputs(2, 3, 8, seed=6)]
    with torch.no_grad():
        graph = make_fx(lambda *args: triton_rg_lru.rg_lru_triton(*args))(*inputs)
        assert "keras_recurrentgemma.rg_lru_forward" in str(graph.graph)
        new = random_inputs(2, 3, 8, seed=7)
        new = [v.detach() for v in new[:4]] + [inputs[4], new[5].detach()]
        assert_close(list(graph(*new)), list(reference(*new)))


def test_compiled_decode_step_runs_the_fused_kernel(monkeypatch):
    import warnings

    from keras_recurrentgemma import RecurrentGemmaCausalLM
    from keras_recurrentgemma import compiled_decode
    from tests.models import tiny_causal_lm
    from tests.test_compiled_decode import generate_ids

    monkeypatch.setattr(compiled_decode, "_warned", set())
    lm = tiny_causal_lm("griffin", sequence_length=12, scan_implementation="triton")
    outputs = {}
    for mode in ("graph", "eager"):
        task = RecurrentGemmaCausalLM(lm.backbone, preprocessor=None)
        task.compile(sampler="greedy")
        task.torch_decode_mode = mode
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            outputs[mode] = generate_ids(task, rows=([2, 5, 9],), max_length=12)
        assert not [w for w in caught if "decoding eagerly" in str(w.message)]
        if mode == "graph":
            assert task._torch_decode.num_traces == 1
    np.testing.assert_array_equal(outputs["graph"], outputs["eager"])
