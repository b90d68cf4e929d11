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
    7). Elsewhere Keras's own zeros: JAX frees each placeholder before its
    weight arrives, torch copies the weight into it.
    """

    def __call__(self, shape, dtype=None):
        if keras.config.backend() != "tensorflow":
            return super().__call__(shape, dtype)
        dtype = keras.backend.standardize_dtype(dtype or keras.config.floatx())
        return host_arrays.tensorflow_tensor(host_arrays.aligned_zeros(shape, dtype))


def initializer(init):
    """`init`, or a `LoadPlaceholder` while building a model that is about
    to be loaded."""
    return LoadPlaceholder() if _SKIP.get() else init
