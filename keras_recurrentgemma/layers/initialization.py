"""Initial values that a checkpoint load can skip.

Building a released model draws billions of random numbers (for the 2B,
about a minute on two CPU cores and, on JAX, several GB of float32
temporaries per large tensor) that the checkpoint then overwrites. Inside
`skip_random_initialization()` every layer of this package asks for zeros
instead (`LoadPlaceholder`): no random draws, and on TensorFlow no memory
until the checkpoint's values arrive.
"""

import contextlib
import contextvars

import keras

from keras_recurrentgemma.utils import host_arrays

_SKIP = contextvars.ContextVar("skip_random_initialization", default=False)


@contextlib.contextmanager
def skip_random_initialization():
    """Layers built inside this context start from zeros, not random values.

    Only for models whose every weight is assigned right after building
    (the checkpoint loaders): the initializers of the layers built here are
    not their training initializers.
    """
    token = _SKIP.set(True)
    try:
        yield
    finally:
        _SKIP.reset(token)


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class LoadPlaceholder(keras.initializers.Zeros):
    """Zeros for a weight that a checkpoint is about to overwrite.

    On TensorFlow they are numpy's `calloc`ed memory handed over through
    DLPack: its pages are mapped in only when written, so placeholders
    cost nothing, and the loader's aligned arrays, handed over the same
    way, replace them without a copy. Zeros that TensorFlow filled would
    be freed into its threads' `malloc` arenas as each weight arrived,
    where numpy never reuses them (a 2B load ended at 11 GiB instead of
    7). On JAX on a CPU the same `calloc`ed zeros, which `jax.device_put`
    takes without a copy when aligned: XLA would otherwise fill 5 GB of
    zeros for the 2B, which the loader frees before each weight arrives
    (`convert.backend_arrays.release_placeholder`). On torch on a CPU too, shared
    without a copy: the loader then hands each variable the array it read
    (`convert.backend_arrays.adopt`), where zeros that torch wrote (17 GB for the
    9B) would only be dropped. Elsewhere Keras's own zeros.
    """

    def __call__(self, shape, dtype=None):
        backend = keras.config.backend()
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        if backend == "tensorflow":
            zeros = host_arrays.aligned_zeros(shape, dtype)
            return host_arrays.tensorflow_tensor(zeros)
        if backend == "jax":
            import jax

            if jax.default_backend() == "cpu":
                return jax.device_put(host_arrays.aligned_zeros(shape, dtype))
        if backend == "torch" and keras.ops.zeros(()).device.type == "cpu":
            return host_arrays.torch_tensor(host_arrays.aligned_zeros(shape, dtype))
        return super().__call__(shape, dtype)


def initializer(init):
    """`init`, or a `LoadPlaceholder` while building a model that is about
    to be loaded."""
    return LoadPlaceholder() if _SKIP.get() else init
