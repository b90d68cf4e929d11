"""The RG-LRU linear recurrence as Triton kernels for torch, forward and backward.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

Document starts are encoded in `a` (`a_t = 0` drops the carried state), so the
kernels need no reset input. Each program owns one batch row and `BLOCK_L`
channels and walks the sequence in order, carrying `h` in float32 registers:
the recurrence is elementwise across channels, so channels need no
communication and the sequence is read exactly once.

The backward pass is the same recurrence run in reverse on the cotangents:

    g_t = dy_t + a_{t+1} ⊙ g_{t+1}   (g_{T-1} also gets dh_last)
    dx_t = g_t,   da_t = g_t ⊙ h_{t-1},   dh0 = a_0 ⊙ g_0

The layers do not call this scan: they run `ops.triton_rg_lru`, which also
computes the gates and is a torch custom op, so that traced graphs (`make_fx`,
`torch.compile`) launch it at each replay. This one is an `autograd.Function`
for callers of `rg_lru_scan(..., implementation="triton")` on eager tensors.

Triton is imported, and the kernels decorated, at first use: importing this
module under the jax or tensorflow backend, or without triton, costs nothing,
and `TRITON_INTERPRET=1` (which Triton reads when a kernel is decorated) can
still be set after import to run the kernels on CPU tensors.
"""

import functools
import sys

# Widest block a program takes. 128 float32 channels fill four warps with one
# channel per thread; more channels per program would only cut the number of
# programs, and the sequential loop is latency bound, so programs are what
# hide it.
_MAX_BLOCK_L = 128
# The narrowest block on GPU: one warp, 128-byte rows.
_MIN_BLOCK_L = 32
# The interpreter pays per program per step in Python, so there one program
# takes as many channels as it can.
_MAX_BLOCK_L_INTERPRETED = 1024


def available(device):
    """Whether `rg_lru_scan_triton` can run on `device`.

    Args:
        device: a `torch.device` or a string such as `"cuda:0"` or `"cpu"`.

    Returns:
        `(ok, reason)`: `reason` says why not when `ok` is False, else "".
    """
    try:
        import torch
    except ImportError as error:
        return False, f"torch is not importable: {error}"
    try:
        _import_triton()
    except (ImportError, RuntimeError) as error:
        return False, str(error)
    device = torch.device(device)
    if _interpreting():
        return True, ""
    if device.type != "cuda":
        return False, (
            f"Triton kernels need a CUDA device, got {device.type!r}; set "
            "TRITON_INTERPRET=1 before the first call to run them on CPU."
        )
    if not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device."
    return True, ""


def _import_triton():
    # TensorFlow and Triton each carry their own LLVM. Loading Triton's after
    # TensorFlow's registers LLVM's command-line options twice, and LLVM
    # aborts the process, with no exception to catch; the other order works.
    if "tensorflow" in sys.modules and "triton" not in sys.modules:
        raise RuntimeError(
            "triton cannot be imported after tensorflow in one process (their "
            "LLVM copies clash and abort it); import triton first."
        )
    try:
        import triton
    except ImportError as error:
        raise ImportError(f"triton is not importable: {error}") from error
    return triton


def _interpreting():
    # What `triton.jit` reads when it decorates; it parses the variable itself.
    return _import_triton().knobs.runtime.interpret


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
    ok, reason = available(a.device)
    if not ok:
        raise RuntimeError(f"rg_lru_scan_triton cannot run: {reason}")
    if block_l is None:
        block_l = _default_block_l(a.shape[0], a.shape[2], a.device)
    elif block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"block_l must be a power of two, got {block_l}.")
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


def _default_block_l(b, l, device):
    import torch
    import triton

    widest = triton.next_power_of_2(l)
    if _interpreting():
        return min(widest, _MAX_BLOCK_L_INTERPRETED)
    block = min(widest, _MAX_BLOCK_L)
    # Narrow blocks until every multiprocessor has two programs, so a small
    # batch still fills the GPU.
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    while block > _MIN_BLOCK_L and b * triton.cdiv(l, block) < programs_wanted:
        block //= 2
    return block


def _launch_options(block_l):
    return dict(
        # One channel per thread.
        num_warps=max(1, min(4, block_l // 32)),
        # `a * h + x` as one fused multiply-add rounds once. Asked for
        # explicitly because Triton 3.10 turns the default off (3.9 warns).
        enable_fp_fusion=True,
    )


def _launch_forward(a, x, h0, y_dtype, block_l):
    import torch
    import triton

    b, t, l = a.shape
    y = torch.empty((b, t, l), dtype=y_dtype, device=a.device)
    h_last = torch.empty((b, l), dtype=torch.float32, device=a.device)
    if t == 0:
        h_last.copy_(h0 if h0 is not None else torch.zeros_like(h_last))
        return y, h_last
    forward, _ = _kernels(_interpreting())
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
        **_launch_options(block_l),
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
            _, backward = _kernels(_interpreting())
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
                **_launch_options(ctx.block_l),
            )
            return da, dx, dh0, None, None

    return RGLRUScan


@functools.cache
def _kernels(interpreted):
    """The forward and backward kernels, decorated in the current Triton mode.

    Keyed on the mode because `triton.jit` reads `TRITON_INTERPRET` when it
    decorates: a kernel decorated for the GPU cannot run in the interpreter.
    """
    del interpreted
    triton = _import_triton()
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
