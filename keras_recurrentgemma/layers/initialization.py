"""Initial values that a checkpoint load can skip.

Building a released model draws billions of random numbers (for the 2B,
about a minute on two CPU cores and, on JAX, several GB of float32
temporaries per large tensor) that the checkpoint then overwrites. Inside
`skip_random_initialization()` every layer of this package asks for zeros
instead: one cheap allocation per weight, no random draws.
"""

import contextlib
import contextvars

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


def initializer(init):
    """`init`, or `"zeros"` while building a model that is about to be loaded."""
    return "zeros" if _SKIP.get() else init
