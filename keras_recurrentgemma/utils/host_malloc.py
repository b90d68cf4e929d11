"""glibc's `malloc`, told to hand large freed blocks back (torch on a CPU).

glibc serves a request from its heap unless it is at least its "mmap
threshold", which starts at 128 KiB and, each time a separately mapped
block is freed, rises to that block's size (up to 32 MiB). After a first
training step, then, every activation of the 2B's step (2.5 to 16 MB at 512
tokens) comes from the heap, where the blocks the backward pass frees stay
with the process, fragmented, instead of going back to the system: a LoRA
step of the 2B (`remat=True`) peaked at 8.36 GiB with the weights and 0.5
GiB of tensors alive (counted with a `TorchDispatchMode`), over its bound of
the weights + 3 GiB (8.0).

`mallopt(M_MMAP_THRESHOLD, ...)` fixes the threshold (it no longer rises):
each larger block is mapped on its own and unmapped when freed. At 4 MiB
the same step peaked at 7.86 GiB and ran about 8% slower, 12.4 s against
11.5 (fresh pages fault in; `tools/benchmark_real_size.py --lora torch
--remat`); with the kernels stored `[out, in]`, 7.96 and 8.05 GiB, at the
bound. The 2B's hidden state at 512 tokens, `[512, 2560]` in bfloat16, is
2.5 MiB: under 4 MiB each block's saved input still came from the heap,
between its temporaries, and held the heap up (at the step's peak glibc's
heap had grown to 1.19 GiB, `mallinfo2`'s `arena`). At 2 MiB they are
mapped too: on an AMD EPYC machine, 7.47 and 7.49 GiB against 8.03 to 8.08
at 4 MiB, at 38.7 to 39.9 s a step against 31.7 to 34.9 (each fresh page
faults in: about 5 µs each on that virtual machine); in the benchmark's
run, 7.74 GiB and 39.0 s against 8.03 and 34.9. At 1 MiB the peak had
been 7.5 GiB, but the step 35% slower.

`limit_heap_retention` does this once per process, for torch training on a
CPU only, on glibc only, and not if the user set `MALLOC_MMAP_THRESHOLD_`
(glibc's own environment setting, which wins: `MALLOC_MMAP_THRESHOLD_=
4194304` trades memory back for time). It is process-wide: any later
allocation of 2 MiB or more is mapped on its own too.

JAX has the same problem in another place: compiling the 2B's LoRA step
(17 s of LLVM, many small blocks) leaves about 0.4 GiB freed but kept in
glibc's heaps, under the step's 1.35 GiB of XLA buffers that come next (the
step peaked at 8.25 GiB, over the 8.0 bound; 7.88 with the heaps trimmed
after the compile). `trim_after_compiles` has `malloc_trim(0)` run after
each XLA compile that took `TRIM_AFTER_SECONDS` or more (a trim costs
milliseconds; a compile that long freed far more than it keeps), through
`jax.monitoring`'s public listener, once per process.
"""

import ctypes
import ctypes.util
import os
import sys

THRESHOLD_BYTES = 2 * 2**20
# glibc's `mallopt` parameter number for the mmap threshold (malloc.h).
_M_MMAP_THRESHOLD = -3

TRIM_AFTER_SECONDS = 1.0
# The event JAX records when XLA finishes compiling (`jax.monitoring`).
_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"

_done = False
# The `jax.monitoring` listener `trim_after_compiles` registered, if any.
_listener = None
_trimming = False


def limit_heap_retention():
    """Fixes glibc's mmap threshold at `THRESHOLD_BYTES`, once.

    Returns:
        bool, whether this call set it.
    """
    global _done
    if _done:
        return False
    _done = True
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    libc = _glibc()
    return libc is not None and bool(libc.mallopt(_M_MMAP_THRESHOLD, THRESHOLD_BYTES))


def trim_after_compiles():
    """Has glibc hand back its free heap pages after each long XLA compile
    (JAX), from now on in this process.

    Returns:
        bool, whether this call registered the listener.
    """
    global _listener, _trimming
    if _trimming:
        return False
    _trimming = True
    libc = _glibc()
    if libc is None:
        return False
    import jax

    def listener(event, duration_secs, **kwargs):
        if event == _COMPILE_EVENT and duration_secs >= TRIM_AFTER_SECONDS:
            libc.malloc_trim(0)

    jax.monitoring.register_event_duration_secs_listener(listener)
    _listener = listener
    return True


def _glibc():
    """The C library if it is glibc on Linux (`mallopt` and `malloc_trim`
    are glibc's), else `None`."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        # musl has no `gnu_get_libc_version` (an AttributeError).
        return libc if libc.gnu_get_libc_version else None
    except (OSError, AttributeError):
        return None
