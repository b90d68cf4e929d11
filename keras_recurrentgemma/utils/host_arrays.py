"""Host (numpy) arrays that a backend takes without copying them.

Loading a released model moves gigabytes from files into variables; every
copy on the way is a transient the size of a tensor (1.3 GB for the 2B's
embedding). Two facts decide whether a backend copies:

- alignment: TensorFlow (Eigen) needs tensor data on a 64-byte boundary.
  A large numpy array is `malloc`'s mapping plus a 16-byte header, so it
  is never aligned; `aligned_empty` and `aligned_zeros` are. JAX's CPU
  client aliases such arrays too (`convert.backend_arrays.adopt`).
- TensorFlow converts a numpy array with two copies; DLPack hands it the
  buffer itself (`tensorflow_tensor`).

`aligned_zeros` is `calloc`ed: for a large array the kernel maps its pages
in only when they are written, so a placeholder made from it costs no
memory until then. (Giving every large array its own memory map, so that
it is returned to the system when dropped, made loads 20-30% slower: the
fresh pages fault in as they are written.)

A large array here asks for ordinary pages (`madvise(MADV_NOHUGEPAGE)`),
where numpy asks for transparent huge pages. With the system's default
(`madvise`), the kernel then finds each huge page as it is first written,
compacting memory when none is free, which it often is not while the page
cache holds the checkpoint: TensorFlow, which keeps the arrays read as its
weights, loaded the 2B in 12.5 and 13.8 s with huge pages on an AMD EPYC
machine, against 3.9 and 3.9 with ordinary ones (`compact_stall` in
`/proc/vmstat` counts those waits). torch and JAX hold their weights in
ordinary pages anyway, and decode as fast.
"""

import contextlib
import contextvars
import ctypes
import functools
import mmap
import sys

import ml_dtypes
import numpy as np

# TensorFlow's (Eigen's) alignment of tensor buffers.
ALIGNMENT = 64

# numpy asks for huge pages from 4 MiB up; so many bytes are advised back.
ORDINARY_PAGES_FROM = 1 << 22


def numpy_dtype(dtype):
    """A numpy dtype for a Keras dtype name (`"bfloat16"` is `ml_dtypes`')."""
    return np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)


def _new(shape, dtype, zeros):
    dtype = numpy_dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = (np.zeros if zeros else np.empty)(nbytes + ALIGNMENT, np.uint8)
    if nbytes >= ORDINARY_PAGES_FROM:
        _ordinary_pages(buffer)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def _ordinary_pages(buffer):
    """Advises the whole pages of a new, unwritten `buffer` to be ordinary
    ones (see the module's docstring). Linux only; elsewhere, and where the
    call fails, the pages stay as they were: only the speed differs."""
    advice = getattr(mmap, "MADV_NOHUGEPAGE", None)
    if advice is None or not sys.platform.startswith("linux"):
        return
    page = mmap.PAGESIZE
    first = -(-buffer.ctypes.data // page) * page
    last = (buffer.ctypes.data + buffer.nbytes) // page * page
    if last > first:
        _libc().madvise(first, last - first, advice)


@functools.cache
def _libc():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    libc.madvise.restype = ctypes.c_int
    return libc


def aligned_empty(shape, dtype):
    """`np.empty(shape, dtype)` with its data on an `ALIGNMENT` boundary."""
    return _new(shape, dtype, zeros=False)


def aligned_zeros(shape, dtype):
    """`np.zeros(shape, dtype)` with its data on an `ALIGNMENT` boundary;
    not resident until written, when large."""
    return _new(shape, dtype, zeros=True)


# `read_buffer` remakes a reused buffer more than `_SHRINK` times larger than
# needed (and than `_SHRINK_FROM` bytes).
_SHRINK = 4
_SHRINK_FROM = 64 << 20

# The buffer `read_buffer` lends inside `reused_buffer()`: a list holding
# it, or None outside.
_REUSED = contextvars.ContextVar("reused_buffer", default=None)


@contextlib.contextmanager
def reused_buffer():
    """Inside, `read_buffer` returns views of one buffer, not new arrays.

    For a caller that copies each array read before it reads the next (the
    loader on JAX off a CPU, where XLA copies each array to its device;
    measured on a CPU, when JAX copied there too): a new array's
    pages are faulted in and zeroed by the kernel as they are first
    written, which cost a quarter of the 9B's load time, while a reused
    buffer's pages are already there. The buffer is remade larger as
    needed, smaller after the largest array, and freed on exit.
    """
    token = _REUSED.set([None])
    try:
        yield
    finally:
        _REUSED.reset(token)


@contextlib.contextmanager
def no_reused_buffer():
    """Inside, `read_buffer` returns new arrays even within `reused_buffer()`
    (for a reader that keeps several arrays at once)."""
    token = _REUSED.set(None)
    try:
        yield
    finally:
        _REUSED.reset(token)


def read_buffer(shape, dtype):
    """An aligned array to read data into: new (`aligned_empty`), or a view
    of the reused buffer inside `reused_buffer()`, valid until the next
    call."""
    held = _REUSED.get()
    if held is None:
        return aligned_empty(shape, dtype)
    dtype = numpy_dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    # Remade when too small, and when far too large: the embedding, read
    # first, is 20x the next largest tensor, and would otherwise stay.
    if held[0] is None or not nbytes <= held[0].nbytes <= _SHRINK * max(
        nbytes, _SHRINK_FROM
    ):
        held[0] = None  # freed before the next one is made
        held[0] = aligned_empty((nbytes,), np.uint8)
    return held[0][:nbytes].view(dtype).reshape(shape)


def copy_into(out, array):
    """`out[...] = array`, bit for bit; `ml_dtypes` types copied as integer
    bits (numpy has no fast copy loop for them)."""
    if out.dtype == array.dtype and out.dtype.kind not in "biuf":
        bits = np.dtype(f"u{out.dtype.itemsize}")
        np.copyto(out.view(bits), array.view(bits))
    else:
        np.copyto(out, array, casting="unsafe")
    return out


def torch_tensor(array):
    """A torch tensor sharing `array`'s memory (bfloat16 as int16 bits,
    viewed back: torch knows no `ml_dtypes` type)."""
    import torch

    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def tensorflow_tensor(array):
    """A TensorFlow tensor on `array`'s memory: no copy if it is aligned and
    C-contiguous, one otherwise.

    bfloat16 goes through DLPack as int16 bits (DLPack has no `ml_dtypes`
    type) and is bit-cast back, which shares the buffer too. The tensor
    keeps the array alive. An array DLPack cannot export (a read-only one)
    is returned as it is, for TensorFlow to convert.
    """
    import tensorflow as tf

    if array.ctypes.data % ALIGNMENT or not array.flags.c_contiguous:
        array = copy_into(aligned_empty(array.shape, array.dtype), array)
    bf16 = array.dtype == ml_dtypes.bfloat16
    try:
        tensor = tf.experimental.dlpack.from_dlpack(
            (array.view(np.int16) if bf16 else array).__dlpack__()
        )
    except (BufferError, TypeError, ValueError):
        return array
    return tf.bitcast(tensor, tf.bfloat16) if bf16 else tensor
