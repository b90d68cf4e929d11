"""The whole RG-LRU (gates, normalisation, recurrence) in Triton kernels for torch.

Shape legend: `b` batch, `t` sequence, `l` lru_width. The same unit as
`ops.pallas_rg_lru` (whose docstring has the equations of both passes):

    i_t = σ(z^x_t),  r_t = σ(z^a_t),  log a_t = r_t ⊙ w,  w = -8 · softplus(Λ)
    h_t = ā_t ⊙ h_{t-1} + x̄_t

Why it matters more on torch than anywhere: eager torch runs each of the
dozen elementwise ops of the gate arithmetic as its own kernel, each a pass
over `[b, t, l]` float32 memory. Here the forward kernel reads `x`, `z^x`,
`z^a` once and writes `y`; the backward kernel recomputes the gates and writes
`dx`, `dz^x`, `dz^a`, and per-row sums for `dw`. `Λ`'s gradient flows through
`w`, a `[l]` vector, in torch.

Each program owns one batch row and `BLOCK_L` channels and walks the sequence
in order; `ops.triton_launch` has the import and block-size rules.
Both passes are torch custom ops (`keras_recurrentgemma::rg_lru_forward`,
`::rg_lru_backward`), so a traced decode step replays the kernel.
"""

import functools

from keras_recurrentgemma.ops import rg_lru_math
from keras_recurrentgemma.ops import triton_launch as launch


def rg_lru_triton(x, gate_x, gate_a, a_param, segment_pos, h0=None, *, block_l=None):
    """The RG-LRU from its gate pre-activations, differentiable through autograd.

    Args:
        x: float torch tensor `[b, t, l]` (float32, bfloat16 or float16).
        gate_x: tensor like `x`, the input gate before its sigmoid.
        gate_a: tensor like `x`, the `a` gate before its sigmoid.
        a_param: float tensor `[l]`, `Λ`.
        segment_pos: int tensor `[b, t]`: 0 starts a document, -1 is padding.
        h0: optional float tensor `[b, l]`, the state before the first step.
        block_l: channels per program, a power of two (default: from the
            device and shape).

    Returns:
        `(y, h_last)`, float32 `[b, t, l]` and `[b, l]`. Gradients reach `x`,
        both gates, `a_param` and `h0` in their own dtypes.
    """
    import torch

    _check_inputs(x, gate_x, gate_a, a_param, segment_pos, h0)
    ok, reason = launch.available(x.device)
    if not ok:
        raise RuntimeError(f"rg_lru_triton cannot run: {reason}")
    b, _, l = x.shape
    block_l = launch.block_l_for(block_l, b, l, x.device)
    w = -rg_lru_math.C * torch.nn.functional.softplus(a_param.float())
    pos = segment_pos.to(torch.int32)
    return _forward_op()(x, gate_x, gate_a, w, pos, h0, block_l)


def _check_inputs(x, gate_x, gate_a, a_param, segment_pos, h0):
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    if x.ndim != 3 or 0 in x.shape:
        raise ValueError(
            "x must have a nonzero shape [batch, seq, lru_width]; got "
            f"{tuple(x.shape)}."
        )
    b, t, l = x.shape
    for name, tensor in (("gate_x", gate_x), ("gate_a", gate_a)):
        if tensor.shape != x.shape:
            raise ValueError(
                f"{name} must have the shape of x, {tuple(x.shape)}; got "
                f"{tuple(tensor.shape)}."
            )
    if tuple(a_param.shape) != (l,):
        raise ValueError(f"a_param must have shape {(l,)}; got {tuple(a_param.shape)}.")
    if tuple(segment_pos.shape) != (b, t):
        raise ValueError(
            f"segment_pos must have shape {(b, t)}; got {tuple(segment_pos.shape)}."
        )
    if segment_pos.dtype.is_floating_point or segment_pos.dtype == torch.bool:
        raise TypeError(f"segment_pos must be integer; got {segment_pos.dtype}.")
    if h0 is not None and tuple(h0.shape) != (b, l):
        raise ValueError(f"h0 must have shape {(b, l)}; got {tuple(h0.shape)}.")
    named = (("x", x), ("gate_x", gate_x), ("gate_a", gate_a), ("a_param", a_param))
    for name, tensor in named + (("h0", h0),):
        if tensor is not None and tensor.dtype not in floats:
            raise TypeError(f"{name} must be one of {floats}, got {tensor.dtype}.")
    tensors = [v for _, v in named] + [segment_pos] + ([h0] if h0 is not None else [])
    if any(v.device != x.device for v in tensors):
        raise ValueError(
            "x, the gates, a_param, segment_pos and h0 must be on one device."
        )


# The constants of `rg_lru_math` the kernels read, passed in as `tl.constexpr`
# (a kernel reads no Python global that is not one).
_LAUNCH_CONSTANTS = {
    "SERIES_RANGE": rg_lru_math.SERIES_RANGE,
    "SQRT_FLOOR": rg_lru_math.SQRT_FLOOR,
}


@functools.cache
def _forward_op():
    """The forward kernel as a torch custom op, with the backward as its autograd.

    A custom op rather than an `autograd.Function`: tracing (`make_fx`, which
    the compiled decode step uses, and `torch.compile`) records it as one
    node and launches the kernel again at each replay, where a bare kernel
    launch would be missing from the graph, its output left unwritten.
    """
    from typing import Optional

    import torch
    import triton
    from torch import Tensor

    @torch.library.custom_op("keras_recurrentgemma::rg_lru_forward", mutates_args=())
    def forward_op(
        x: Tensor,
        gate_x: Tensor,
        gate_a: Tensor,
        w: Tensor,
        pos: Tensor,
        h0: Optional[Tensor],  # noqa: UP045 (custom_op parses the annotation)
        block_l: int,
    ) -> tuple[Tensor, Tensor]:
        b, t, l = x.shape
        y = torch.empty((b, t, l), dtype=torch.float32, device=x.device)
        h_last = torch.empty((b, l), dtype=torch.float32, device=x.device)
        forward, _ = _kernels(launch.interpreting())
        # A missing h0 is never read (HAS_H0 is False); any pointer will do.
        forward[(b, triton.cdiv(l, block_l))](
            x.contiguous(),
            gate_x.contiguous(),
            gate_a.contiguous(),
            w.contiguous(),
            pos.contiguous(),
            h0.contiguous() if h0 is not None else h_last,
            y,
            h_last,
            t,
            l,
            HAS_H0=h0 is not None,
            BLOCK_L=block_l,
            **_LAUNCH_CONSTANTS,
            **launch.launch_options(block_l),
        )
        return y, h_last

    @forward_op.register_fake
    def _(x, gate_x, gate_a, w, pos, h0, block_l):
        b, _, l = x.shape
        return x.new_empty(x.shape, dtype=torch.float32), x.new_empty(
            (b, l), dtype=torch.float32
        )

    @torch.library.custom_op("keras_recurrentgemma::rg_lru_backward", mutates_args=())
    def backward_op(
        x: Tensor,
        gate_x: Tensor,
        gate_a: Tensor,
        w: Tensor,
        pos: Tensor,
        h0: Optional[Tensor],  # noqa: UP045
        y: Tensor,
        dy: Tensor,
        dh_last: Tensor,
        block_l: int,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        b, t, l = x.shape
        x, gate_x, gate_a = (v.contiguous() for v in (x, gate_x, gate_a))
        dx = torch.empty_like(x)
        dgate_x = torch.empty_like(gate_x)
        dgate_a = torch.empty_like(gate_a)
        dw_rows = torch.empty((b, l), dtype=torch.float32, device=x.device)
        dh0 = torch.empty((b, l), dtype=torch.float32, device=x.device)
        # Autograd hands unused cotangents over as stride-0 expansions.
        dh_last = dh_last.float().contiguous()
        _, backward = _kernels(launch.interpreting())
        backward[(b, triton.cdiv(l, block_l))](
            x,
            gate_x,
            gate_a,
            w.contiguous(),
            pos.contiguous(),
            h0.contiguous() if h0 is not None else dh_last,
            y.contiguous(),
            dy.float().contiguous(),
            dh_last,
            dx,
            dgate_x,
            dgate_a,
            dw_rows,
            dh0,
            t,
            l,
            HAS_H0=h0 is not None,
            BLOCK_L=block_l,
            **_LAUNCH_CONSTANTS,
            **launch.launch_options(block_l),
        )
        return dx, dgate_x, dgate_a, dw_rows.sum(0), dh0

    @backward_op.register_fake
    def _(x, gate_x, gate_a, w, pos, h0, y, dy, dh_last, block_l):
        b, _, l = x.shape
        state = x.new_empty((b, l), dtype=torch.float32)
        return (
            torch.empty_like(x),
            torch.empty_like(gate_x),
            torch.empty_like(gate_a),
            w.new_empty(w.shape, dtype=torch.float32),
            state,
        )

    def setup_context(ctx, inputs, output):
        x, gate_x, gate_a, w, pos, h0, block_l = inputs
        # The gates are recomputed from the inputs: nothing else is kept.
        ctx.save_for_backward(x, gate_x, gate_a, w, pos, h0, output[0])
        ctx.block_l = block_l

    def backward(ctx, dy, dh_last):
        x, gate_x, gate_a, w, pos, h0, y = ctx.saved_tensors
        dx, dgate_x, dgate_a, dw, dh0 = backward_op(
            x, gate_x, gate_a, w, pos, h0, y, dy, dh_last, ctx.block_l
        )
        dh0 = dh0.to(h0.dtype) if h0 is not None else None
        return dx, dgate_x, dgate_a, dw, None, dh0, None

    forward_op.register_autograd(backward, setup_context=setup_context)
    return forward_op


def _helpers(tl, minus_expm1_series):
    """The kernels' shared pieces, over `triton.language` and the series.

    Plain functions: `_kernels` decorates them for the compiler, or hands
    them to the interpreter as they are.
    """

    def program(w_ptr, h0_ptr, L, HAS_H0: tl.constexpr, BLOCK_L: tl.constexpr):
        """This program's batch row, channels, their mask, and `w`, `h0` there."""
        pid_b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = cols < L
        w = tl.load(w_ptr + cols, mask=mask, other=0.0)
        if HAS_H0:
            h0 = tl.load(h0_ptr + pid_b * L + cols, mask=mask).to(tl.float32)
        else:
            h0 = tl.full((BLOCK_L,), 0.0, dtype=tl.float32)
        return pid_b, cols, mask, w, h0

    def step(
        x_ptr, gx_ptr, ga_ptr, pos_ptr, offsets, mask, w, SERIES_RANGE: tl.constexpr
    ):
        """One time step's `x`, position, and gates (float32): i_t, r_t, a_t,
        a_t², 1 − a_t² (by the series where `1 − exp` cancels), m_t, ā_t."""
        pos = tl.load(pos_ptr)
        x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
        zx = tl.load(gx_ptr + offsets, mask=mask).to(tl.float32)
        za = tl.load(ga_ptr + offsets, mask=mask).to(tl.float32)
        gx = 1.0 / (1.0 + tl.exp(-zx))
        ga = 1.0 / (1.0 + tl.exp(-za))
        log_a = ga * w
        a = tl.exp(log_a)
        z = 2.0 * log_a
        a_square = tl.exp(z)
        one_minus_a_square = tl.where(
            z > SERIES_RANGE, minus_expm1_series(z), 1.0 - a_square
        )
        multiplier = tl.where(pos == 0, 1.0, tl.sqrt(one_minus_a_square))
        decay = tl.where(pos == 0, 0.0, tl.where(pos < 0, 1.0, a))
        return x, pos, gx, ga, a, a_square, one_minus_a_square, multiplier, decay

    return program, step


@functools.cache
def _kernels(interpreted):
    """The forward and backward kernels, decorated in the current Triton mode.

    Keyed on the mode because `triton.jit` reads `TRITON_INTERPRET` when it
    decorates: a kernel decorated for the GPU cannot run in the interpreter.
    """
    triton = launch.import_triton()
    import triton.language as tl

    # Only builtins of `tl` inside the kernels (`tl.full`, `tl.exp`, not
    # `tl.sigmoid` or `tl.zeros`): Triton's library functions are themselves
    # `triton.jit` functions decorated when `triton.language` is imported, so
    # with TRITON_INTERPRET set after that import the interpreter refuses
    # them. Our own helpers are decorated here, in the current mode. The
    # compiler finds them in this function's closure; the interpreter runs a
    # kernel's source in the module's globals, so there they are put.
    series = rg_lru_math.minus_expm1_series
    if interpreted:
        program, step = _helpers(tl, series)
        globals().update(program=program, step=step)
    else:
        program, step = (triton.jit(f) for f in _helpers(tl, triton.jit(series)))

    # Sequence lengths change every call (prefill chunks, decode); not
    # specialising on them avoids a recompilation per length.
    @triton.jit(do_not_specialize=["T"])
    def forward(
        x_ptr,
        gx_ptr,
        ga_ptr,
        w_ptr,
        pos_ptr,
        h0_ptr,
        y_ptr,
        h_last_ptr,
        T,
        L,
        HAS_H0: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SERIES_RANGE: tl.constexpr,
        SQRT_FLOOR: tl.constexpr,
    ):
        pid_b, cols, mask, w, h = program(w_ptr, h0_ptr, L, HAS_H0, BLOCK_L)
        # int64 offsets: b * t * l passes 2**31 at long contexts.
        offsets = pid_b * T * L + cols
        for t in range(T):
            x, pos, gx, _, _, _, _, multiplier, decay = step(
                x_ptr, gx_ptr, ga_ptr, pos_ptr + pid_b * T + t, offsets, mask, w,
                SERIES_RANGE,
            )  # fmt: skip
            h = decay * h + tl.where(pos < 0, 0.0, x * gx * multiplier)
            tl.store(y_ptr + offsets, h, mask=mask)
            offsets += L
        tl.store(h_last_ptr + pid_b * L + cols, h, mask=mask)

    @triton.jit(do_not_specialize=["T"])
    def backward(
        x_ptr,
        gx_ptr,
        ga_ptr,
        w_ptr,
        pos_ptr,
        h0_ptr,
        y_ptr,
        dy_ptr,
        dh_last_ptr,
        dx_ptr,
        dgx_ptr,
        dga_ptr,
        dw_ptr,
        dh0_ptr,
        T,
        L,
        HAS_H0: tl.constexpr,
        BLOCK_L: tl.constexpr,
        SERIES_RANGE: tl.constexpr,
        SQRT_FLOOR: tl.constexpr,
    ):
        pid_b, cols, mask, w, h0 = program(w_ptr, h0_ptr, L, HAS_H0, BLOCK_L)
        offsets = (pid_b * T + T - 1) * L + cols
        carry = tl.load(dh_last_ptr + pid_b * L + cols, mask=mask)
        dw = tl.full((BLOCK_L,), 0.0, dtype=tl.float32)
        for k in range(T):
            t = T - 1 - k
            x, pos, gx, ga, a, a_square, one_minus_a_square, multiplier, decay = step(
                x_ptr, gx_ptr, ga_ptr, pos_ptr + pid_b * T + t, offsets, mask, w,
                SERIES_RANGE,
            )  # fmt: skip
            # h_{t-1}: the state stored one step back, or h0 before step 0
            # (which reads its own, valid, address and drops it).
            h_before = tl.load(y_ptr + offsets - tl.where(t > 0, L, 0), mask=mask)
            h_before = tl.where(t > 0, h_before, h0)

            g = tl.load(dy_ptr + offsets, mask=mask) + carry
            # Padding passes `g` on to h_{t-1} (ā = 1) and reaches no input.
            g_in = tl.where(pos < 0, 0.0, g)
            gated = g_in * gx
            dx = gated * multiplier
            tl.store(dx_ptr + offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
            dgx = g_in * x * multiplier * gx * (1.0 - gx)
            tl.store(dgx_ptr + offsets, dgx.to(dgx_ptr.dtype.element_ty), mask=mask)
            # sqrt's derivative is capped (rg_lru_math.MAX_SQRT_GRADIENT).
            slope = 1.0 / tl.sqrt(tl.maximum(one_minus_a_square, SQRT_FLOOR))
            dlog_a = g_in * h_before * a - gated * x * a_square * slope
            dlog_a = tl.where(pos == 0, 0.0, dlog_a)
            dga = dlog_a * w * ga * (1.0 - ga)
            tl.store(dga_ptr + offsets, dga.to(dga_ptr.dtype.element_ty), mask=mask)
            dw += dlog_a * ga
            carry = decay * g
            offsets -= L
        tl.store(dw_ptr + pid_b * L + cols, dw, mask=mask)
        tl.store(dh0_ptr + pid_b * L + cols, carry, mask=mask)

    return forward, backward
