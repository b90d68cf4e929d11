"""Host (numpy) arrays into backend tensors, with the fewest copies.

What the loaders share once a tensor is read: `host_copy` makes it dense
and of its variable's dtype, `backend_tensor` turns it into what the
backend's `assign` takes without a further copy, and `release_placeholder`
frees a JAX variable's placeholder before its weight arrives.
"""

import concurrent.futures
import os

import keras
import numpy as np

from keras_recurrentgemma.utils import host_arrays


def transposes_while_copying(array, dtype):
    """Whether `backend_tensor` takes `array`, a transposed view, as it is.

    JAX's `device_put` copies a strided array into XLA's own buffer in one
    pass, transposing as it goes (19 ms for a `[2560, 7680]` bfloat16
    kernel, against 46 for `host_copy`'s tiled transpose and then
    `jnp.array`'s copy). torch and TensorFlow need a dense array.
    """
    array = np.asarray(array)
    return (
        keras.config.backend() == "jax"
        and array.dtype == dtype
        and array.ndim == 2
        and array.flags.f_contiguous
        and not array.flags.c_contiguous
    )


def release_placeholder(variable):
    """Frees a JAX variable's placeholder value before its real one arrives.

    JAX arrays are immutable: `assign` makes a new buffer and frees the old
    one only after, so without this the zero placeholder and the tensor
    coexist (2.6 GB for the released 2B's embedding). torch and TensorFlow
    assign in place. KerasHub's preset loader does the same
    (`preset_utils.jax_memory_cleanup`), with the same exception for
    sharded arrays, which a distributed computation may still reference.
    """
    if keras.config.backend() != "jax":
        return
    value = variable.value
    if getattr(value, "sharding", None) is not None and len(value.devices()) > 1:
        return
    value.delete()


def backend_tensor(array):
    """What `variable.assign` takes with the fewest copies of `array`.

    Measured for the released embedding (1.3 GB of bfloat16) on CPU:
    - torch knows no `ml_dtypes.bfloat16`: Keras converts such arrays through
      float32 (2.6 GB more, and slow) and copies even other dtypes, while
      `torch.from_numpy` shares the array (bfloat16 as int16 bits, viewed
      back), and `assign` copies it into the variable on any device;
    - JAX: `jnp.array` copies an aligned bfloat16 array once (10 ms for a
      `[2560, 7680]` kernel; `ops.convert_to_tensor` takes 42, and 55
      through an int16 view), an unaligned one twice (the embedding as
      Keras's `.h5` reader returns it: 2.4 GB more at once, where
      `jax.device_put` copies it once, in 0.7 s instead of 1.2), and a
      transposed view once, transposing as it copies;
      `jax.device_put` would alias an aligned array, but XLA cannot donate
      a buffer it does not own: a LoRA `fit` step of the 2B then copied
      every frozen weight and ran out of 24 GB (the safetensors loader
      aliases what it reads all the same, and copies it into XLA's memory
      before such a step: `_adopt`);
    - TensorFlow converts a numpy array with two copies, then copies it
      into the variable (a 2.5 GB transient); through DLPack it takes an
      aligned array as it is, and `assign` adopts that buffer (the
      variable's placeholder, see `initialization.LoadPlaceholder`, was
      never resident).
    """
    backend = keras.config.backend()
    if backend == "tensorflow":
        return host_arrays.tensorflow_tensor(array)
    if backend == "torch":
        return host_arrays.torch_tensor(array)
    if backend == "jax":
        import jax

        if array.ctypes.data % host_arrays.ALIGNMENT or not array.flags.c_contiguous:
            return jax.device_put(array)  # copied into XLA's own buffer
        return jax.numpy.array(array)
    return array


def _transpose_2d(array, tile=256):
    """`np.ascontiguousarray(array)` for a transposed (Fortran-order) matrix.

    Copied in square tiles that stay in cache, and as unsigned integers of
    the same width (numpy has no fast copy loop for `ml_dtypes.bfloat16`):
    about 3x faster than numpy's one-pass copy for the released kernels.
    Bands of rows go to one thread per core (numpy copies without the GIL):
    2x faster again on two cores (15 against 29 ms for `[2560, 7680]`).
    """
    bits = array.view(np.dtype(f"u{array.dtype.itemsize}"))
    out = host_arrays.aligned_empty(bits.shape, bits.dtype)
    rows, cols = bits.shape

    def band(i):
        for j in range(0, cols, tile):
            out[i : i + tile, j : j + tile] = bits[i : i + tile, j : j + tile]

    bands = range(0, rows, tile)
    if len(bands) > 1 and (os.cpu_count() or 1) > 1:
        with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
            list(pool.map(band, bands))
    else:
        for i in bands:
            band(i)
    return out.view(array.dtype)


def host_copy(array, dtype):
    """`array` as a C-contiguous, writable numpy array in `dtype`.

    At most one copy, none for a freshly read tensor already in `dtype`:
    a transposed view, another dtype, or a read-only (memory-mapped) array
    is copied once (twice for a transposed view in another dtype), into
    aligned memory (`host_arrays`). Backends may alias the array they are
    given, so a read-only map is never handed over as is.
    """
    array = np.asarray(array)
    dtype = np.dtype(dtype)
    if array.ndim == 2 and array.flags.f_contiguous and not array.flags.c_contiguous:
        array = _transpose_2d(array)
    if array.flags.c_contiguous and array.flags.writeable and array.dtype == dtype:
        return array
    return host_arrays.copy_into(host_arrays.aligned_empty(array.shape, dtype), array)
