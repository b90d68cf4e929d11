"""Where a dense kernel's bytes go, for the fastest product on the backend.

A Keras `Dense` kernel is `[i, o]` (input width, output width), stored row
by row. For a decode step (one row of `x`), torch's CPU product
`x [1, i] @ W [i, o]` of bfloat16 is 1.5 to 1.9x slower when `W` is stored
row by row than when the same `[i, o]` tensor is stored column by column
(the layout of `nn.Linear`'s `[o, i]` weight, read transposed): measured on
this project's CPUs for the 2B's `[2560, 7680]`, `[7680, 2560]` and
`[2560, 2560]` kernels, 2.9 / 3.3 / 1.0 ms against 2.0 / 2.0 / 0.7 ms.

In float32 it is the other way round (one row of `x` times a `[256, 768]`
kernel: 8.5 us row by row, 16 us column by column; the 2B's `[2560, 7680]`:
4.3 ms against 6.6 ms). So on torch on a CPU a bfloat16 kernel is created
column-major, and every other kernel as Keras makes it. Its shape, values,
checkpoints and every Keras API are unchanged: torch keeps a parameter's
layout through `assign` (an in-place `copy_`), so only the memory order
differs. JAX and TensorFlow choose their own layouts and are left alone, as
are integer (quantized) kernels.
"""

import keras
from keras.initializers import Zeros


def column_major(initializer):
    """`initializer` (a callable `(shape, dtype)`), its 2-D bfloat16 values
    stored column-major on torch on a CPU."""
    if keras.config.backend() != "torch":
        return initializer
    import torch

    initializer = keras.initializers.get(initializer)

    def initialize(shape, dtype=None):
        bf16 = keras.backend.standardize_dtype(dtype) == "bfloat16"
        if len(shape) == 2 and bf16 and isinstance(initializer, Zeros):
            # Zeros in either order are the same zeros: made `[o, i]` and
            # viewed transposed, without the copy (transposing the 2B's
            # load placeholders took 2.5 s, half of its load).
            value = initializer(tuple(reversed(shape)), dtype=dtype).T
            return value if value.device.type == "cpu" else value.contiguous()
        value = initializer(shape, dtype=dtype)
        if len(shape) != 2 or value.dtype != torch.bfloat16:
            return value
        if value.device.type != "cpu":
            return value
        return value.T.contiguous().T

    return initialize


def stored_column_major(variable):
    """Whether `variable` (2-D) was created column-major by `column_major`,
    so that a loader can hand it values in that order."""
    if keras.config.backend() != "torch" or len(variable.shape) != 2:
        return False
    value = variable.value
    return value.stride() == (1, value.shape[0]) and not value.is_contiguous()
