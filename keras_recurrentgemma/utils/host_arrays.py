"""Host (numpy) arrays that a backend takes without copying them.

Loading a released model moves gigabytes from files into variables; every
copy on the way is a transient the size of a tensor (1.3 GB for the 2B's
embedding). Two facts decide whether a backend copies:

- alignment: TensorFlow (Eigen) needs tensor data on a 64-byte boundary.
  A large numpy array is `malloc`'s mapping plus a 16-byte header, so it
  is never aligned; `aligned_empty` and `aligned_zeros` are. (JAX's CPU
  client would alias such arrays too, but the loader copies them for JAX:
  see `convert.common.backend_tensor`.)
- TensorFlow converts a numpy array with two copies; DLPack hands it the
  buffer itself (`tensorflow_tensor`).

`aligned_zeros` is `calloc`ed: for a large array the kernel maps its pages
in only when they are written, so a placeholder made from it costs no
memory until then. (Giving every large array its own memory map, so that
it is returned to the system when dropped, made loads 20-30% slower: the
fresh pages fault in as they are written.)
"""

import ml_dtypes
import numpy as np

# TensorFlow's (Eigen's) alignment of tensor buffers.
ALIGNMENT = 64


def numpy_dtype(dtype):
    """A numpy dtype for a Keras dtype name (`"bfloat16"` is `ml_dtypes`')."""
    return np.dtype(ml_dtypes.bfloat16 if str(dtype) == "bfloat16" else dtype)


def _new(shape, dtype, zeros):
    dtype = numpy_dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buffer = (np.zeros if zeros else np.empty)(nbytes + ALIGNMENT, np.uint8)
    start = -buffer.ctypes.data % ALIGNMENT
    return buffer[start : start + nbytes].view(dtype).reshape(shape)


def aligned_empty(shape, dtype):
    """`np.empty(shape, dtype)` with its data on an `ALIGNMENT` boundary."""
    return _new(shape, dtype, zeros=False)


def aligned_zeros(shape, dtype):
    """`np.zeros(shape, dtype)` with its data on an `ALIGNMENT` boundary;
    not resident until written, when large."""
    return _new(shape, dtype, zeros=True)


def copy_into(out, array):
    """`out[...] = array`, bit for bit; `ml_dtypes` types copied as integer
    bits (numpy has no fast copy loop for them)."""
    if out.dtype == array.dtype and out.dtype.kind not in "biuf":
        bits = np.dtype(f"u{out.dtype.itemsize}")
        np.copyto(out.view(bits), array.view(bits))
    else:
        np.copyto(out, array, casting="unsafe")
    return out


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
