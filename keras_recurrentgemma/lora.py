"""LoRA on the backbone: default targets, argument checks, the weights file.

KerasHub's `Backbone` does the LoRA work (freeze everything, call
`enable_lora(rank)` on the named layers). What this module adds:

- default targets for Griffin (`DEFAULT_LORA_TARGETS`);
- only the low-rank factors train: the targets' biases are frozen too;
- a rank that is not a positive int, or a name no layer has, is an error
  that lists the valid names, instead of a silent no-op;
- `save_lora_weights` writes KerasHub's layout (`lora/vars/rank`,
  `lora/{index}/vars/lora_kernel_{a,b}`, so either library reads the other's
  files), into a temporary file moved into place, plus a JSON description
  of the model it came from;
- `load_lora_weights` checks the file against the model (rank, target names,
  layer paths, factor shapes) before assigning anything, and names the file
  and the first mismatch.
"""

import json
import os

import h5py
import numpy as np
from keras.src.saving.saving_lib import H5IOStore

# Attention query and value projections, and the recurrent block's two input
# projections (the Conv1D/RG-LRU branch and the gate branch).
DEFAULT_LORA_TARGETS = ("proj_q", "proj_v", "linear_x", "linear_y")

# Root attribute holding the JSON description of the model that saved a file.
METADATA_KEY = "keras_recurrentgemma_lora"
SUFFIX = ".lora.h5"


def layers_with_weights(backbone):
    """KerasHub's numbering of layers in a LoRA file: the index in this list."""
    return [
        layer for layer in backbone._flatten_layers(include_self=False) if layer.weights
    ]


def lora_layer_names(backbone):
    """Names that `enable_lora` accepts: layers that support LoRA."""
    return sorted(
        {
            layer.name
            for layer in layers_with_weights(backbone)
            if hasattr(layer, "enable_lora")
        }
    )


def enabled_layers(backbone):
    """`(index, layer)` of each LoRA layer, in file order."""
    layers = layers_with_weights(backbone)
    return [(i, layers[i]) for i in getattr(backbone, "_lora_enabled_layers", [])]


def check_rank(rank):
    if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) or rank <= 0:
        raise ValueError(f"LoRA `rank` must be a positive int; got {rank!r}.")
    return int(rank)


def check_target_names(backbone, target_layer_names):
    if isinstance(target_layer_names, str):
        target_layer_names = [target_layer_names]
    names = list(target_layer_names)
    if not names:
        raise ValueError("`target_layer_names` is empty: name at least one layer.")
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
        "rank": backbone._lora_rank,
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
    directory, base = os.path.split(os.path.abspath(filepath))
    # Written beside the target and renamed over it, so an interrupted save
    # leaves any earlier file intact.
    partial = os.path.join(directory, f".{base}.{os.getpid()}.partial")
    try:
        store = H5IOStore(partial, mode="w")
        store.make("lora")["rank"] = backbone._lora_rank
        for i, layer in enabled_layers(backbone):
            entry = store.make(f"lora/{i}")
            entry["lora_kernel_a"] = layer.lora_kernel_a
            entry["lora_kernel_b"] = layer.lora_kernel_b
        store.close()
        with h5py.File(partial, "a") as f:
            f.attrs[METADATA_KEY] = json.dumps(_metadata(backbone))
        os.replace(partial, filepath)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


def read_lora_file(filepath):
    """`(rank, metadata or None, {index: (a, b)})` from a LoRA weights file."""
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
        indices = sorted(int(k) for k in f["lora"] if k.isdigit())
        metadata = f.attrs.get(METADATA_KEY)
        metadata = json.loads(metadata) if metadata is not None else None
    store = H5IOStore(filepath, mode="r")
    try:
        rank = int(np.asarray(store.get("lora")["rank"]))
        factors = {}
        for i in indices:
            entry = store.get(f"lora/{i}")
            factors[i] = (entry["lora_kernel_a"], entry["lora_kernel_b"])
    except (KeyError, ValueError, OSError) as e:
        raise ValueError(f"{filepath}: incomplete LoRA weights file ({e}).") from e
    finally:
        store.close()
    return rank, metadata, factors


def planned_layers(backbone, target_layer_names):
    """`(index, layer)` that `enable_lora(rank, target_layer_names)` would pick."""
    return [
        (i, layer)
        for i, layer in enumerate(layers_with_weights(backbone))
        if layer.name in target_layer_names and hasattr(layer, "enable_lora")
    ]


def factor_shapes(layer, rank):
    """Shapes of a layer's `lora_kernel_a` and `lora_kernel_b` at `rank`."""
    kernel = getattr(layer, "_kernel", None)
    if kernel is None:
        kernel = getattr(layer, "_embeddings", None)
    return (kernel.shape[0], rank), (rank, kernel.shape[-1])


def check_lora_file_matches(backbone, filepath, rank, metadata, factors):
    """Raises `ValueError` naming the first way the file and model differ.

    Runs before LoRA is enabled on a model without it, so a failed load
    leaves the model as it was.
    """
    where = f"LoRA weights file {filepath}"
    saved_targets = metadata["target_layer_names"] if metadata else None
    if enabled_layers(backbone):
        if rank != backbone._lora_rank:
            raise ValueError(
                f"{where} has rank {rank}, but this model's LoRA has rank "
                f"{backbone._lora_rank}. Load it into a model without LoRA, "
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
    if sorted(factors) != sorted(layers):
        raise ValueError(
            f"{where} holds LoRA factors for {len(factors)} layers, but this model "
            f"has {len(layers)} layers named {sorted(set(targets))} (or they sit "
            "elsewhere): the file comes from a different architecture."
        )
    for i, (a, b) in factors.items():
        layer = layers[i]
        saved_path = metadata["layers"][str(i)]["path"] if metadata else None
        if saved_path is not None and saved_path != layer.path:
            raise ValueError(
                f"{where}: layer {i} is `{saved_path}` in the file but "
                f"`{layer.path}` in this model: the file comes from a different "
                "architecture."
            )
        expected = factor_shapes(layer, rank)
        if (tuple(a.shape), tuple(b.shape)) != expected:
            raise ValueError(
                f"{where}: the LoRA factors of `{layer.path}` have shapes "
                f"{tuple(a.shape)} and {tuple(b.shape)}, this model needs "
                f"{expected[0]} and {expected[1]}: the file comes from a model of "
                "another size."
            )
    return targets


def load_lora_weights(backbone, filepath):
    """Reads and checks the file, then enables LoRA if needed and assigns."""
    rank, metadata, factors = read_lora_file(filepath)
    targets = check_lora_file_matches(
        backbone, os.fspath(filepath), rank, metadata, factors
    )
    if not enabled_layers(backbone):
        backbone.enable_lora(rank, target_layer_names=targets)
    layers = dict(enabled_layers(backbone))
    for i, (a, b) in factors.items():
        layers[i].lora_kernel_a.assign(a)
        layers[i].lora_kernel_b.assign(b)
