"""Weights files written before kernels were stored `[out, in]`.

Our `Dense` kernels are `[out, in]` (`layers.dense`). Before December 2026
they were Keras `Dense`'s `[in, out]`, with LoRA factors `A' [in, r]`,
`B' [r, out]`.
A weights file (a preset's `model.weights.h5`, `save_weights`,
`ModelCheckpoint`, `BackupAndRestore`, a `.keras` file) says which it holds:
every `Dense` entry written since carries `KEY`. Reading an entry without
it, `current` presents today's layout: the kernel (and a LoRA checkpoint's
unmerged kernel) transposed, and the factors as `A = B'ᵀ`, `B = A'ᵀ`, the
same update `(A' B')ᵀ`. Shapes alone cannot tell the two apart: the
2B's square kernels (`proj_q`, `linear_x`, `linear_y`) would load
transposed without a word. Quantized entries of the old layout (integer
kernels and scales laid out for `[in, out]`) are refused: quantize the float
model again.
"""

import keras
import numpy as np

# The entry that marks a layer's weights as `[out, in]`: a zero-dimensional
# int8, as every store (HDF5, `.keras`, npz) keeps arrays only.
KEY = "kernel_layout_oi"

# Entries of the old layout that hold a kernel or its factors.
_TRANSPOSED = {"0": "0", "unmerged_kernel": "unmerged_kernel"}
_SWAPPED = {"lora_kernel_a": "lora_kernel_b", "lora_kernel_b": "lora_kernel_a"}


def mark(store):
    """Writes `KEY` into a layer's entry of a weights file."""
    store[KEY] = np.ones((), "int8")


def current(store, where, quantized):
    """`store`, a layer's entry of a weights file, in today's layout.

    Args:
        store: the entry (a mapping of names to arrays, as Keras passes to
            `load_own_variables`).
        where: the layer's path, for errors.
        quantized: whether the entry holds a quantized layer.

    Raises:
        ValueError: for a quantized entry of the old layout.
    """
    keys = list(store.keys())
    if KEY in keys:
        return _Entries(store, [k for k in keys if k != KEY], transposed=False)
    if not keys:
        return store
    if quantized:
        raise ValueError(
            f"The weights of quantized layer `{where}` were written before "
            "keras_recurrentgemma stored kernels as [out, in] (December 2026); "
            "their integer layout cannot be converted. Load the float model "
            "and quantize it again."
        )
    return _Entries(store, keys, transposed=True)


class _Entries:
    """A read-only view of a store: `keys`, with the old layout's kernels
    transposed and factors swapped when `transposed`."""

    def __init__(self, store, keys, transposed):
        self._store = store
        self._keys = keys
        self._transposed = transposed

    def keys(self):
        return list(self._keys)

    def __len__(self):
        return len(self._keys)

    def __contains__(self, key):
        return key in self._keys

    def __getitem__(self, key):
        if not self._transposed:
            return self._store[key]
        if key in _TRANSPOSED:
            return _transpose(self._store[_TRANSPOSED[key]])
        if key in _SWAPPED:
            return _transpose(self._store[_SWAPPED[key]])
        return self._store[key]


def _transpose(value):
    # An HDF5 dataset or NumPy array stays NumPy (torch's Keras converts
    # NumPy bfloat16 through float32); a backend tensor stays one.
    if isinstance(value, np.ndarray) or type(value).__module__.startswith("h5py"):
        return np.asarray(value).T
    return keras.ops.transpose(value)
