"""Host (numpy) arrays into backend tensors, with the fewest copies.

What the loaders share once a tensor is read: `host_copy` makes it dense
and of its variable's dtype, `backend_tensor` turns it into what the
backend's `assign` takes without a further copy, and `release_placeholder`
frees a JAX variable's placeholder before its weight arrives. Where the
backend can, a variable takes the host memory itself instead (`adopt`, of
an array read or of the file's map, `mapped_view`), and JAX gets its own
copies back before a step donates them (`own_host_weights`).
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
      before such a step: `adopt`);
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


def mapped_view(tensor, variable):
    """The copy-on-write map of `tensor`'s file, where the variable can hold
    it as it is (`adopt`); else None.

    As Hugging Face's `from_pretrained` does: the 9B's 17 GB are then read
    from disk as the model first uses them, not all while it loads (31 s
    at this machine's 0.55 GB/s). The variable's memory is then the page
    cache's, which the system may reclaim and re-read while the weights
    stay unchanged; writes (training) go to private copies, never to the
    file. torch on a CPU takes any tensor so. JAX on a CPU (without a
    distribution) takes only 64-byte aligned host memory as it is, which
    safetensors does not promise (8 bytes): it maps the tensors that
    happen to be aligned (a quarter of the 9B's bytes) and reads the rest.
    TensorFlow reads them all.
    """
    if tensor.mapped is None or tensor.dtype != np.dtype(
        host_arrays.numpy_dtype(variable.dtype)
    ):
        return None
    backend = keras.config.backend()
    if backend == "torch" and variable.value.device.type == "cpu":
        return tensor.mapped()
    if backend == "jax" and jax_adopts():
        array = tensor.mapped()
        if array.ctypes.data % host_arrays.ALIGNMENT == 0:
            return array
    return None


def adopt(variable, array):
    """Makes `variable` hold `array`'s memory itself, where the backend can:
    `array` is one only the loader holds, and a copy would write the 9B's
    17 GB twice.

    - torch on a CPU: `parameter.data` becomes a tensor on the array; the
      `Parameter` stays the same object, so modules and optimizers still
      see it.
    - JAX on a CPU, without a distribution: `jax.device_put` aliases a
      64-byte aligned array (safetensors reads are). XLA cannot donate
      memory it does not own, so a `fit`, `evaluate` or `predict` step,
      which donates the weights, would copy them all at once (twice the
      model); `own_host_weights` copies them into XLA's memory one at a
      time first, and the variable is marked for it.

    Returns False where the caller must `assign` (a copy).
    """
    backend = keras.config.backend()
    dtype = host_arrays.numpy_dtype(variable.dtype)
    if array.dtype != dtype or not array.flags.c_contiguous:
        return False
    if backend == "torch":
        import torch

        parameter = variable.value
        value = backend_tensor(array)
        if not (
            isinstance(parameter, torch.nn.Parameter)
            and parameter.device == value.device
            and parameter.shape == value.shape
        ):
            return False
        parameter.data = value
        return True
    if backend == "jax" and jax_adopts():
        import jax

        if array.ctypes.data % host_arrays.ALIGNMENT:
            return False
        value = jax.device_put(array)
        variable.assign(value)
        # Marked only if XLA took the array as it is (it copies otherwise).
        variable._host_aliased = value.unsafe_buffer_pointer() == array.ctypes.data
        return True
    return False


def jax_on_cpu():
    import jax

    return jax.default_backend() == "cpu"


def jax_adopts():
    """Whether `jax.device_put` can alias host memory for a variable: on a
    CPU, with no distribution to shard it."""
    return jax_on_cpu() and keras.distribution.distribution() is None


def own_host_weights(model):
    """Gives XLA its own copy of each weight `adopt` left in a host array,
    one at a time, before a jitted step donates them (JAX; see `adopt`).

    Runs before `fit`, `evaluate` and `predict` build their steps
    (`training.TrainingMixin`): a load for generation alone never pays it.
    """
    if keras.config.backend() != "jax":
        return
    import jax

    for variable in model.variables:
        if getattr(variable, "_host_aliased", False):
            variable._host_aliased = False
            variable.assign(jax.numpy.array(variable.value, copy=True))
