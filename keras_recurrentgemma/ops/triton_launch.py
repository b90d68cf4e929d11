"""What the Triton RG-LRU kernels share: availability, import order, launch sizes.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

A kernel program owns one batch row and `block_l` channels and walks the
sequence in order, carrying `h` in float32 registers: the recurrence is
elementwise across channels, so channels need no communication and the
sequence is read exactly once.

Triton is imported, and the kernels decorated, at first use: importing the
kernel modules under the jax or tensorflow backend, or without triton, costs
nothing, and `TRITON_INTERPRET=1` (which Triton reads when a kernel is
decorated) can still be set after import to run the kernels on CPU tensors.
Used by `ops.triton_rg_lru` (and by the unfused scan kernel that
`tools/benchmark_scan.py` compares it with).
"""

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
    """Whether the Triton kernels can run on `device`.

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
        import_triton()
    except (ImportError, RuntimeError) as error:
        return False, str(error)
    device = torch.device(device)
    if interpreting():
        return True, ""
    if device.type != "cuda":
        return False, (
            f"Triton kernels need a CUDA device, got {device.type!r}; set "
            "TRITON_INTERPRET=1 before the first call to run them on CPU."
        )
    if not torch.cuda.is_available():
        return False, "torch reports no usable CUDA device."
    return True, ""


def import_triton():
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


def interpreting():
    # What `triton.jit` reads when it decorates; it parses the variable itself.
    return import_triton().knobs.runtime.interpret


def block_l_for(block_l, b, l, device):
    """`block_l`, checked, or the default for a `[b, *, l]` call on `device`.

    Raises:
        ValueError: for a `block_l` that is not a power of two.
    """
    if block_l is None:
        return default_block_l(b, l, device)
    if block_l < 1 or block_l & (block_l - 1):
        raise ValueError(f"block_l must be a power of two, got {block_l}.")
    return block_l


def default_block_l(b, l, device):
    """Channels per program: as many as fill a program, narrowed until every
    multiprocessor has two programs."""
    import torch
    import triton

    widest = triton.next_power_of_2(l)
    if interpreting():
        return min(widest, _MAX_BLOCK_L_INTERPRETED)
    block = min(widest, _MAX_BLOCK_L)
    # Narrow blocks until every multiprocessor has two programs, so a small
    # batch still fills the GPU.
    programs_wanted = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    while block > _MIN_BLOCK_L and b * triton.cdiv(l, block) < programs_wanted:
        block //= 2
    return block


def launch_options(block_l):
    """Keyword arguments for a kernel launch of `block_l` channels per program."""
    return dict(
        # One channel per thread.
        num_warps=max(1, min(4, block_l // 32)),
        # `a * h + x` as one fused multiply-add rounds once. Asked for
        # explicitly because Triton 3.10 turns the default off (3.9 warns).
        enable_fp_fusion=True,
    )
