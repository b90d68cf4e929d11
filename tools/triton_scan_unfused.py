"""The bare RG-LRU recurrence as Triton kernels for torch, kept for comparison.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

Not part of the package: the layers run `keras_recurrentgemma.ops.rg_lru`,
whose Triton kernel (`ops.triton_rg_lru`) also computes the gates and is a
torch custom op. This one takes `a` and `x` already computed, which is what
`tools/benchmark_scan.py` measures the fused kernel against; it shares the
fused kernel's launch rules (`ops.triton_launch`) and
`tests/test_scan_triton.py` tests it. It is an `autograd.Function`, for eager
tensors.

Document starts are encoded in `a` (`a_t = 0` drops the carried state), so the
kernels need no reset input. The backward pass is the same recurrence run in
reverse on the cotangents:

    g_t = dy_t + a_{t+1} ⊙ g_{t+1}   (g_{T-1} also gets dh_last)
    dx_t = g_t,   da_t = g_t ⊙ h_{t-1},   dh0 = a_0 ⊙ g_0
"""

import functools

from keras_recurrentgemma.ops import triton_launch as launch


def rg_lru_scan_triton(a, x, h0=None, *, y_dtype=None, block_l=None):
    """Runs the recurrence with Triton kernels, differentiable through autograd.

    Args:
        a: float32 or bfloat16 torch tensor `[b, t, l]`, the per-step decay
            (already zeroed where a document starts).
        x: float32 or bfloat16 torch tensor `[b, t, l]`, the per-step input.
        h0: optional float torch tensor `[b, l]`, the state before the first
            step. Defaults to zeros.
        y_dtype: torch dtype of the returned states. Defaults to
            `torch.float32`.
        block_l: channels per program, a power of two. Defaults to a choice
            from the device and shape; set it to force several blocks.

    Returns:
        `(y, h_last)`: `y` `[b, t, l]` in `y_dtype` holding every state, and
        `h_last` float32 `[b, l]`, the state after the last step. Both are
        accumulated in float32; gradients come back in the input dtypes.
    """
    import torch

    if y_dtype is None:
        y_dtype = torch.float32
    _check_inputs(a, x, h0, y_dtype)
    ok, reason = launch.available(a.device)
    if not ok:
        raise RuntimeError(f"rg_lru_scan_triton cannot run: {reason}")
    block_l = launch.block_l_for(block_l, a.shape[0], a.shape[2], a.device)
    return _scan_function().apply(a, x, h0, y_dtype, block_l)


def _check_inputs(a, x, h0, y_dtype):
    import torch

    floats = (torch.float32, torch.bfloat16, torch.float16)
    if a.ndim != 3 or a.shape != x.shape:
        raise ValueError(
            "a and x must both have shape [batch, seq, lru_width]; got "
            f"{tuple(a.shape)} and {tuple(x.shape)}."
        )
    if h0 is not None and tuple(h0.shape) != (a.shape[0], a.shape[2]):
        raise ValueError(
            f"h0 must have shape [batch, lru_width] = {(a.shape[0], a.shape[2])}, "
            f"got {tuple(h0.shape)}."
        )
    for name, tensor in (("a", a), ("x", x), ("h0", h0)):
        if tensor is not None and tensor.dtype not in floats:
            raise TypeError(f"{name} must be one of {floats}, got {tensor.dtype}.")
    if y_dtype not in floats:
        raise TypeError(f"y_dtype must be one of {floats}, got {y_dtype}.")
    if x.device != a.device or (h0 is not None and h0.device != a.device):
        raise ValueError("a, x and h0 must be on the same device.")


def _launch_forward(a, x, h0, y_dtype, block_l):
    import torch
    import triton

    b, t, l = a.shape
    y = torch.empty((b, t, l), dtype=y_dtype, device=a.device)
    h_last = torch.empty((b, l), dtype=torch.float32, device=a.device)
    if t == 0:
        h_last.copy_(h0 if h0 is not None else torch.zeros_like(h_last))
        return y, h_last
    forward, _ = _kernels(launch.interpreting())
    grid = (b, triton.cdiv(l, block_l))
    # A missing h0 is never read (HAS_H0 is False); any pointer fills its slot.
    forward[grid](
        a,
        x,
        h0 if h0 is not None else h_last,
        y,
        h_last,
        t,
        l,
        HAS_H0=h0 is not None,
        BLOCK_L=block_l,
        **launch.launch_options(block_l),
    )
    return y, h_last


@functools.cache
def _scan_function():
    import torch
    import triton

    class RGLRUScan(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, x, h0, y_dtype, block_l):
            a = a.contiguous()
            x = x.contiguous()
            h0 = h0.contiguous() if h0 is not None else None
            y, h_last = _launch_forward(a, x, h0, y_dtype, block_l)
            # States narrower than float32 would round h_{t-1} in da; the
            # backward recomputes them in float32 then, instead of keeping a
            # float32 copy alive between the passes.
            ctx.states_are_float32 = y_dtype == torch.float32
            ctx.block_l = block_l
            ctx.x_dtype = x.dtype
            ctx.save_for_backward(
                a, y if ctx.states_are_float32 else x, h0 if h0 is not None else None
            )
            return y, h_last

        @staticmethod
        def backward(ctx, dy, dh_last):
            a, saved, h0 = ctx.saved_tensors
            if ctx.states_are_float32:
                y = saved
            else:
                y, _ = _launch_forward(a, saved, h0, torch.float32, ctx.block_l)
            b, t, l = a.shape
            # Autograd materialises unused cotangents as zeros, often as
            # stride-0 expansions.
            dy = dy.contiguous()
            dh_last = dh_last.contiguous()
            da = torch.empty_like(a)
            dx = torch.empty((b, t, l), dtype=ctx.x_dtype, device=a.device)
            dh0 = torch.empty_like(h0) if h0 is not None else None
            if t == 0:
                if dh0 is not None:
                    dh0.copy_(dh_last)
                return da, dx, dh0, None, None
            _, backward = _kernels(launch.interpreting())
            grid = (b, triton.cdiv(l, ctx.block_l))
            backward[grid](
                a,
                y,
                h0 if h0 is not None else dh_last,
                dy,
                dh_last,
                da,
                dx,
                dh0 if dh0 is not None else dh_last,
                t,
                l,
                HAS_H0=h0 is not None,
                BLOCK_L=ctx.block_l,
                **launch.launch_options(ctx.block_l),
            )
            return da, dx, dh0, None, None

    return RGLRUScan


@functools.cache
def _kernels(interpreted):
    """The forward and backward kernels, decorated in the current Triton mode
    (see `ops.triton_rg_lru._kernels`)."""
    del interpreted
    triton = launch.import_triton()
    import triton.language as tl

    # Only builtins (`tl.full`, not `tl.zeros`) inside the kernels: Triton's
    # library functions are themselves `triton.jit` functions decorated when
    # `triton.language` is imported, so with TRITON_INTERPRET set after that
    # import the interpreter refuses to call them.

    # Sequence lengths change every call (prefill chunks, decode); not
    # specialising on them avoids a recompilation per length.
    @triton.jit(do_not_specialize=["T"])
    def forward(
        a_ptr,
        x_ptr,
        h0_ptr,
        y_ptr,
        h_last_ptr,
        T,
        L,
        HAS_H0: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = cols < L
        # int64 offsets: b * t * l passes 2**31 at long contexts.
        offsets = pid_b * T * L + cols
        if HAS_H0:
            h = tl.load(h0_ptr + pid_b * L + cols, mask=mask).to(tl.float32)
        else:
            h = tl.full((BLOCK_L,), 0.0, dtype=tl.float32)
        for _ in range(T):
            a = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
            x = tl.load(x_ptr + offsets, mask=mask).to(tl.float32)
            h = a * h + x
            tl.store(y_ptr + offsets, h.to(y_ptr.dtype.element_ty), mask=mask)
            offsets += L
        tl.store(h_last_ptr + pid_b * L + cols, h, mask=mask)

    @triton.jit(do_not_specialize=["T"])
    def backward(
        a_ptr,
        y_ptr,
        h0_ptr,
        dy_ptr,
        dh_last_ptr,
        da_ptr,
        dx_ptr,
        dh0_ptr,
        T,
        L,
        HAS_H0: tl.constexpr,
        BLOCK_L: tl.constexpr,
    ):
        pid_b = tl.program_id(0).to(tl.int64)
        cols = tl.program_id(1) * BLOCK_L + tl.arange(0, BLOCK_L)
        mask = cols < L
        offsets = (pid_b * T + T - 1) * L + cols
        # The step after the last passes dh_last through unchanged.
        g = tl.load(dh_last_ptr + pid_b * L + cols, mask=mask).to(tl.float32)
        a_next = tl.full((BLOCK_L,), 1.0, dtype=tl.float32)
        # Steps T-1 .. 1 read h_{t-1} from y; step 0 reads h0, below.
        for _ in range(T - 1):
            dy = tl.load(dy_ptr + offsets, mask=mask).to(tl.float32)
            g = dy + a_next * g
            h_prev = tl.load(y_ptr + offsets - L, mask=mask).to(tl.float32)
            tl.store(dx_ptr + offsets, g.to(dx_ptr.dtype.element_ty), mask=mask)
            da = g * h_prev
            tl.store(da_ptr + offsets, da.to(da_ptr.dtype.element_ty), mask=mask)
            a_next = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
            offsets -= L
        dy = tl.load(dy_ptr + offsets, mask=mask).to(tl.float32)
        g = dy + a_next * g
        tl.store(dx_ptr + offsets, g.to(dx_ptr.dtype.element_ty), mask=mask)
        a0 = tl.load(a_ptr + offsets, mask=mask).to(tl.float32)
        if HAS_H0:
            h_prev = tl.load(h0_ptr + pid_b * L + cols, mask=mask).to(tl.float32)
            da = g * h_prev
            dh0 = (a0 * g).to(dh0_ptr.dtype.element_ty)
            tl.store(dh0_ptr + pid_b * L + cols, dh0, mask=mask)
        else:
            da = tl.full((BLOCK_L,), 0.0, dtype=tl.float32)
        tl.store(da_ptr + offsets, da.to(da_ptr.dtype.element_ty), mask=mask)

    return forward, backward
