"""The RG-LRU from its gate pre-activations: reference and dispatch.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    i_t = σ(z^x_t),   r_t = σ(z^a_t),   log a_t = -8 · r_t · softplus(Λ)
    h_t = a_t ⊙ h_{t-1} + sqrt(1 − a_t²) ⊙ (i_t ⊙ x_t)

`rg_lru` is what the layer calls. Where the scan implementation is a kernel
(`"pallas"`, `"triton"`), the gate arithmetic runs inside it too
(`ops.pallas_rg_lru`, `ops.triton_rg_lru`): no `[b, t, l]` intermediate goes
through memory. Everywhere else the gates are computed below in `keras.ops`
and the recurrence goes through `rg_lru_scan` with the same implementation;
XLA (JAX, TensorFlow) fuses that arithmetic on its own.
"""

import functools

from keras import ops

from keras_recurrentgemma.ops import kernel_check
from keras_recurrentgemma.ops import rg_lru_math
from keras_recurrentgemma.ops.remat import remat_function
from keras_recurrentgemma.ops.scan import KERNELS
from keras_recurrentgemma.ops.scan import _interpret
from keras_recurrentgemma.ops.scan import resolve_implementation
from keras_recurrentgemma.ops.scan import rg_lru_scan
from keras_recurrentgemma.ops.scan import rg_lru_scan_reference


def sqrt_bound_derivative(x, max_gradient=rg_lru_math.MAX_SQRT_GRADIENT):
    """`sqrt(x)` whose gradient is `1 / (2 sqrt(max(x, 1 / (4 m²))))`.

    The forward value is exactly `sqrt(x)`. Written with `stop_gradient`
    rather than a custom-gradient op so it behaves the same on every backend:
    `x - stop_gradient(x)` is zero forward and carries a unit gradient.
    """
    floor = 1.0 / (4.0 * max_gradient**2)
    value = ops.stop_gradient(ops.sqrt(x))
    slope = ops.stop_gradient(0.5 * ops.rsqrt(ops.maximum(x, floor)))
    return value + (x - ops.stop_gradient(x)) * slope


def rg_lru_gates(x, gate_x, gate_a, a_param, segment_pos):
    """The recurrence's decay and input, `(a, normalized_x)`, float32 `[b, t, l]`.

    Where a document starts (`segment_pos == 0`) `a` is 0 and the
    `sqrt(1 − a²)` factor 1; on padding (`segment_pos < 0`) `a` is 1 and the
    input 0, so the state passes through unchanged.
    """
    gate_x = ops.sigmoid(ops.cast(gate_x, "float32"))
    gate_a = ops.sigmoid(ops.cast(gate_a, "float32"))
    log_a = -rg_lru_math.C * gate_a * ops.softplus(ops.cast(a_param, "float32"))
    a = ops.exp(log_a)
    # 1 − a² as −expm1(2 log a): the official `1 - exp(2 log a)` keeps no
    # correct digit once a is within float32's epsilon of 1, and the kernels
    # (whose exp differs from the backend's by an ulp) would then disagree
    # with it at any tolerance.
    one_minus_a_square = -ops.expm1(2.0 * log_a)

    reset = ops.expand_dims(ops.equal(segment_pos, 0), -1)
    pad = ops.expand_dims(segment_pos < 0, -1)
    multiplier = ops.where(reset, 1.0, sqrt_bound_derivative(one_minus_a_square))
    normalized_x = ops.cast(x, "float32") * gate_x * multiplier
    normalized_x = ops.where(pad, 0.0, normalized_x)
    a = ops.where(reset, 0.0, ops.where(pad, 1.0, a))
    return a, normalized_x


def rg_lru(
    x,
    gate_x,
    gate_a,
    a_param,
    segment_pos,
    h0=None,
    implementation="auto",
    rematerialise=False,
):
    """Runs the RG-LRU with the best implementation available.

    Args:
        x: float tensor `[b, t, l]`.
        gate_x: float tensor `[b, t, l]`, the input gate before its sigmoid.
        gate_a: float tensor `[b, t, l]`, the `a` gate before its sigmoid.
        a_param: float tensor `[l]`, `Λ`.
        segment_pos: int tensor `[b, t]`; 0 starts a document, -1 is padding.
        h0: optional float tensor `[b, l]`, the state carried in.
        implementation: as in `resolve_implementation`. `"pallas"` and
            `"triton"` run the gates in their kernel too; every other
            implementation runs `rg_lru_gates` and then `rg_lru_scan`. When
            `"auto"` picks a kernel, the kernel is first checked on this
            device (`ops.kernel_check`); one that fails warns once and the
            reference runs instead.
        rematerialise: bool. Outside the kernels, keep only the inputs for
            the backward pass and recompute the float32 gates and scan
            there (`ops.remat.remat_function`), when `h0` is `None`. Those
            are about ten float32 `[b, t, l]` arrays a recurrent block, the
            largest part of what a training step kept (the 2B's LoRA step,
            512 tokens: torch 9.6 -> 8.6 GiB at its peak, JAX 10.4 -> 9.5);
            their recomputation is elementwise and the scan.

    Returns:
        `(y, h_last)`: float32 `[b, t, l]` and `[b, l]`.
    """
    name = resolve_implementation(implementation, x)
    if name in KERNELS:
        # "auto" trusts a kernel on a device only once it passed its check
        # there; a forced one runs unchecked and fails loudly.
        if implementation == "auto" and not kernel_check.kernel_works(
            name, x, _kernel(name), _reference
        ):
            name = "reference"
        else:
            # A `keras.Variable` is the backend's tensor only once converted.
            a_param = ops.convert_to_tensor(a_param)
            return _kernel(name)(x, gate_x, gate_a, a_param, segment_pos, h0)
    if rematerialise and h0 is None:
        # A `keras.Variable` is the backend's tensor only once converted.
        tensors = (x, gate_x, gate_a, ops.convert_to_tensor(a_param))
        unit = functools.partial(_gates_and_scan, implementation=name)
        return remat_function(unit, tensors, segment_pos)
    return _gates_and_scan(
        x, gate_x, gate_a, a_param, segment_pos, h0, implementation=name
    )


def _gates_and_scan(
    x, gate_x, gate_a, a_param, segment_pos, h0=None, *, implementation
):
    a, normalized_x = rg_lru_gates(x, gate_x, gate_a, a_param, segment_pos)
    return rg_lru_scan(a, normalized_x, h0, implementation=implementation)


def _kernel(name):
    """The kernel of the whole unit, `(x, gate_x, gate_a, Λ, segment_pos, h0)`."""
    if name == "pallas":
        from keras_recurrentgemma.ops import pallas_rg_lru

        def pallas(*args):
            return pallas_rg_lru.rg_lru_pallas(*args, interpret=_interpret())

        return pallas
    from keras_recurrentgemma.ops import triton_rg_lru

    def triton(*args):
        return triton_rg_lru.rg_lru_triton(*args)

    return triton


def _reference(x, gate_x, gate_a, a_param, segment_pos, h0):
    a, normalized_x = rg_lru_gates(x, gate_x, gate_a, a_param, segment_pos)
    return rg_lru_scan_reference(a, normalized_x, h0)
