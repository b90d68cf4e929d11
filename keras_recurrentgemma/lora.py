"""LoRA on the backbone: default targets, argument checks, the weights file.

KerasHub's `Backbone` does the LoRA work (freeze everything, call
`enable_lora(rank)` on the named layers). What this module adds:

- default targets for Griffin (`DEFAULT_LORA_TARGETS`);
- only the low-rank factors train: the targets' biases are frozen too;
- a rank that is not a positive int, or a name no layer has, is an error
  that lists the valid names, instead of a silent no-op;
- `save_lora_weights` has KerasHub's `Backbone.save_lora_weights` write its
  layout (`lora/vars/rank`, `lora/{index}/vars/lora_kernel_{a,b}`, so either
  library reads the other's files) into a temporary file, adds a JSON
  description of the model it came from, and renames it into place;
- `load_lora_weights` reads the whole file and checks it against the model
  (rank, target names, layer paths, factor shapes) before KerasHub's
  `load_lora_weights` assigns anything, and names the file and the first
  mismatch.

Only our `Dense` layers (Keras `EinsumDense`s with kernels `[out, in]`) take
LoRA here: KerasHub's file layout has no place for an embedding's factors
(`lora_embeddings_{a,b}`).

Training checkpoints (`save_weights`, `ModelCheckpoint`, `BackupAndRestore`)
keep the factors through our `Dense` (`layers/lora_state.py`).
"""

import contextlib
import json
import os

import h5py
import numpy as np
from keras_hub.models import Backbone

from keras_recurrentgemma.layers.dense import Dense
from keras_recurrentgemma.utils.lists import one_or_more

# Attention query and value projections, and the recurrent block's two input
# projections (the Conv1D/RG-LRU branch and the gate branch).
DEFAULT_LORA_TARGETS = ("proj_q", "proj_v", "linear_x", "linear_y")

# Root attribute holding the JSON description of the model that saved a file.
METADATA_KEY = "keras_recurrentgemma_lora"
# The metadata's `kernel_layout`: our kernels are `[out, in]`, so `A [out, r]`,
# `B [r, in]`. Files written before (no such entry) hold the factors of
# the kernel `[in, out]`: `A' [in, r]`, `B' [r, out]`, the same update as
# `A = B'ᵀ`, `B = A'ᵀ`; `load_lora_weights` reads them so.
KERNEL_LAYOUT = "oi"
SUFFIX = ".lora.h5"


# --- KerasHub's LoRA bookkeeping ------------------------------------------
# The one place that reads private state. KerasHub numbers the layers of a
# LoRA file by their index in Keras's private `_flatten_layers` order (its
# `Backbone.save_lora_weights`), and keeps the rank and those indices in
# `Backbone._lora_rank` / `_lora_enabled_layers`; no public API exposes
# either. If Keras or KerasHub renames them, `enabled_layers` finds nothing
# and the LoRA tests fail (they check the default targets and file indices),
# rather than files being silently misnumbered.


def layers_with_weights(backbone):
    """KerasHub's numbering of layers in a LoRA file: the index in this list."""
    return [
        layer for layer in backbone._flatten_layers(include_self=False) if layer.weights
    ]


def lora_rank(backbone):
    """The rank of the backbone's LoRA, or `None` without LoRA."""
    return getattr(backbone, "_lora_rank", None) if enabled_layers(backbone) else None


def enabled_layers(backbone):
    """`(index, layer)` of each LoRA layer, in file order."""
    layers = layers_with_weights(backbone)
    return [(i, layers[i]) for i in getattr(backbone, "_lora_enabled_layers", [])]


# --- Our checks ---------------------------------------------------------------


def supports_lora(layer):
    return isinstance(layer, Dense)


def lora_layer_names(backbone):
    """Names that `enable_lora` accepts: the model's `Dense` layers."""
    return sorted(
        {layer.name for layer in layers_with_weights(backbone) if supports_lora(layer)}
    )


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"LoRA `rank` must be a positive int; got {rank!r}.")
    return int(rank)


def check_target_names(backbone, target_layer_names):
    names = one_or_more(
        target_layer_names, "target_layer_names", "name at least one layer"
    )
    valid = lora_layer_names(backbone)
    unknown = [name for name in names if name not in valid]
    if unknown:
        raise ValueError(
            f"No layer supports LoRA under the name(s) {unknown}. Valid "
            f"`target_layer_names`: {valid}."
        )
    return names


def freeze_biases(backbone):
    """After KerasHub's `enable_lora`, the targets' biases are still trainable."""
    for _, layer in enabled_layers(backbone):
        bias = getattr(layer, "bias", None)
        if bias is not None:
            bias.trainable = False


def _metadata(backbone):
    return {
        "kernel_layout": KERNEL_LAYOUT,
        "rank": lora_rank(backbone),
        "target_layer_names": list(backbone._lora_target_layer_names),
        "layers": {
            str(i): {
                "path": layer.path,
                "lora_kernel_a": list(layer.lora_kernel_a.shape),
                "lora_kernel_b": list(layer.lora_kernel_b.shape),
            }
            for i, layer in enabled_layers(backbone)
        },
    }


@contextlib.contextmanager
def atomic_file(filepath, suffix):
    """Yields a temporary path beside `filepath` ending in `suffix`; on
    success it is flushed to disk and renamed over `filepath`, so a reader
    sees the old file or the complete new one, never a partial one. On any
    error (or interrupt) it is removed and `filepath` is left as it was."""
    directory, base = os.path.split(os.path.abspath(os.fspath(filepath)))
    partial = os.path.join(directory, f".{base}.{os.getpid()}.partial{suffix}")
    try:
        yield partial
        with open(partial, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(partial, filepath)
        # The rename itself reaches the disk with the directory's entry.
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def save_lora_weights(backbone, filepath):
    """Writes the LoRA factors; see the module docstring for the layout."""
    filepath = os.fspath(filepath)
    if not enabled_layers(backbone):
        raise ValueError(
            "There are no LoRA weights to save: call `backbone.enable_lora(rank)` "
            "(and train) first."
        )
    if not filepath.endswith(SUFFIX):
        raise ValueError(
            f"A LoRA weights file name must end in `{SUFFIX}`; got {filepath}."
        )
    with atomic_file(filepath, SUFFIX) as partial:
        Backbone.save_lora_weights(backbone, partial)
        with h5py.File(partial, "a") as f:
            f.attrs[METADATA_KEY] = json.dumps(_metadata(backbone))


def read_lora_file(filepath):
    """`(rank, metadata or None, {index: (a_shape, b_shape)})` of a LoRA file.

    Every dataset is read in full, so a damaged file fails here, before the
    model is touched.
    """
    filepath = os.fspath(filepath)
    if not os.path.isfile(filepath):
        raise ValueError(f"LoRA weights file {filepath} does not exist.")
    try:
        f = h5py.File(filepath, "r")
    except OSError as e:
        raise ValueError(
            f"{filepath} is not a readable HDF5 file (truncated or not written by "
            f"`save_lora_weights`): {e}"
        ) from e
    with f:
        if "lora" not in f or "vars" not in f["lora"] or "rank" not in f["lora/vars"]:
            raise ValueError(
                f"{filepath} holds no LoRA weights (no `lora/vars/rank`); is it a "
                "file written by `save_lora_weights`?"
            )
        try:
            rank = int(np.asarray(f["lora/vars/rank"][()]))
            metadata = f.attrs.get(METADATA_KEY)
            metadata = json.loads(metadata) if metadata is not None else None
            shapes = {}
            for key in f["lora"]:
                if not key.isdigit():
                    continue
                entry = f[f"lora/{key}/vars"]
                a, b = entry["lora_kernel_a"][()], entry["lora_kernel_b"][()]
                shapes[int(key)] = (tuple(a.shape), tuple(b.shape))
        except (KeyError, ValueError, OSError, TypeError) as e:
            raise ValueError(f"{filepath}: incomplete LoRA weights file ({e}).") from e
    return rank, metadata, shapes


def planned_layers(backbone, target_layer_names):
    """`(index, layer)` that `enable_lora(rank, target_layer_names)` would pick."""
    return [
        (i, layer)
        for i, layer in enumerate(layers_with_weights(backbone))
        if layer.name in target_layer_names and supports_lora(layer)
    ]


def factor_shapes(layer, rank):
    """Shapes of a `Dense` layer's `lora_kernel_a` `[out, r]` and
    `lora_kernel_b` `[r, in]` (Keras's `EinsumDense` LoRA of a kernel
    `[out, in]`)."""
    units, width = layer.float_kernel_shape()
    return (units, rank), (rank, width)


def check_lora_file_matches(backbone, filepath, rank, metadata, shapes):
    """Raises `ValueError` naming the first way the file and model differ.

    Runs before LoRA is enabled on a model without it, so a failed load
    leaves the model as it was.
    """
    where = f"LoRA weights file {filepath}"
    saved_targets = metadata["target_layer_names"] if metadata else None
    if enabled_layers(backbone):
        if rank != lora_rank(backbone):
            raise ValueError(
                f"{where} has rank {rank}, but this model's LoRA has rank "
                f"{lora_rank(backbone)}. Load it into a model without LoRA, "
                f"or one where `enable_lora({rank})` was called."
            )
        targets = list(backbone._lora_target_layer_names)
        if saved_targets is not None and sorted(saved_targets) != sorted(targets):
            raise ValueError(
                f"{where} was saved with LoRA on {sorted(saved_targets)}, but this "
                f"model has it on {sorted(targets)}."
            )
    else:
        targets = saved_targets or backbone.default_lora_layer_names()
        missing = [name for name in targets if name not in lora_layer_names(backbone)]
        if missing:
            raise ValueError(
                f"{where} has LoRA on layers named {missing}, which this model "
                "does not have: the file comes from a different architecture."
            )
    layers = dict(planned_layers(backbone, targets))
    if sorted(shapes) != sorted(layers):
        raise ValueError(
            f"{where} holds LoRA factors for {len(shapes)} layers, but this model "
            f"has {len(layers)} layers named {sorted(set(targets))} (or they sit "
            "elsewhere): the file comes from a different architecture."
        )
    for i, (a_shape, b_shape) in shapes.items():
        layer = layers[i]
        saved_path = metadata["layers"][str(i)]["path"] if metadata else None
        if saved_path is not None and saved_path != layer.path:
            raise ValueError(
                f"{where}: layer {i} is `{saved_path}` in the file but "
                f"`{layer.path}` in this model: the file comes from a different "
                "architecture."
            )
        expected = factor_shapes(layer, rank)
        if _earlier_layout(metadata):
            expected = (expected[1][::-1], expected[0][::-1])
        if (a_shape, b_shape) != expected:
            raise ValueError(
                f"{where}: the LoRA factors of `{layer.path}` have shapes "
                f"{a_shape} and {b_shape}, this model needs "
                f"{expected[0]} and {expected[1]}: the file comes from a model of "
                "another size."
            )
    return targets


def load_lora_weights(backbone, filepath):
    """Reads and checks the file, enables LoRA if needed, then has KerasHub's
    `Backbone.load_lora_weights` assign the factors."""
    filepath = os.fspath(filepath)
    rank, metadata, shapes = read_lora_file(filepath)
    targets = check_lora_file_matches(backbone, filepath, rank, metadata, shapes)
    if not enabled_layers(backbone):
        backbone.enable_lora(rank, target_layer_names=targets)
    if not _earlier_layout(metadata):
        Backbone.load_lora_weights(backbone, filepath)
        return
    with h5py.File(filepath, "r") as f:
        for i, layer in planned_layers(backbone, targets):
            entry = f[f"lora/{i}/vars"]
            a, b = entry["lora_kernel_a"][()], entry["lora_kernel_b"][()]
            layer.lora_kernel_a.assign(b.T)
            layer.lora_kernel_b.assign(a.T)


def _earlier_layout(metadata):
    """Whether a file's factors are those of kernels `[in, out]` (see
    `KERNEL_LAYOUT`); a file without our metadata (KerasHub's) is taken as
    it is."""
    return metadata is not None and metadata.get("kernel_layout") != KERNEL_LAYOUT
