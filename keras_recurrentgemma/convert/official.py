"""Conversion from the official (DeepMind) RecurrentGemma checkpoints.

The official parameters are a Flax tree with top-level keys `embedder`,
`blocks.0` … `blocks.N-1` and `final_norm`, sometimes wrapped under
`params`. `backbone_from_official` infers the architecture from the tensor
shapes, builds a `RecurrentGemmaBackbone` and loads every tensor, all or
nothing: a missing, unexpected or mis-shaped tensor is a `ValueError` that
names it.

Official Dense kernels are stored `(in, out)` like Keras, so only the stacked
MLP input projection needs reshaping; every other tensor keeps its shape and,
below `blocks.i/`, its name.

The tree is released in two file formats, both read here:

- Orbax (Kaggle `google/recurrentgemma/flax/...`): a checkpoint folder such
  as `2b/` next to `tokenizer.model`. `find_orbax_checkpoint`,
  `read_orbax_params`, `backbone_from_orbax`.
- PyTorch (Kaggle `google/recurrentgemma/pyTorch/...`): `2b.pt`, the
  `state_dict()` of `recurrentgemma.torch.Griffin`, i.e. the same tree joined
  with `.`, with every `kernel` renamed `weight` and stored `(out, in)` as
  `nn.Linear` does. `find_torch_checkpoint`, `read_torch_state_dict`,
  `params_from_torch_state_dict`, `backbone_from_official_torch`.
"""

import inspect
import os
import re
import zipfile
from collections.abc import Mapping

import numpy as np

from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.convert.common import TensorSource
from keras_recurrentgemma.convert.common import assign_backbone_weights
from keras_recurrentgemma.convert.common import to_numpy

_SOURCE = "official Flax checkpoint"

# Defaults of what the tensors cannot tell: the released checkpoints' values.
_OFFICIAL_DEFAULTS = dict(
    attention_window_size=2048,
    logits_soft_cap=30.0,
    embeddings_scale_by_sqrt_dim=True,
)

# Variable suffixes under `residual_block_i/` whose official name below
# `blocks.i/` is identical and whose layout already matches.
_SHARED = (
    "temporal_pre_norm/scale",
    "channel_pre_norm/scale",
    "mlp_block/ffw_down/kernel",
    "mlp_block/ffw_down/bias",
)
_RECURRENT = tuple(
    f"recurrent_block/{name}"
    for name in (
        "linear_x/kernel",
        "linear_x/bias",
        "linear_y/kernel",
        "linear_y/bias",
        "linear_out/kernel",
        "linear_out/bias",
        "conv_1d/w",
        "conv_1d/b",
        "rg_lru/a_param",
        "rg_lru/input_gate/w",
        "rg_lru/input_gate/b",
        "rg_lru/a_gate/w",
        "rg_lru/a_gate/b",
    )
)
_ATTENTION = tuple(
    f"attention_block/{name}"
    for name in (
        "proj_q/kernel",
        "proj_k/kernel",
        "proj_v/kernel",
        "proj_final/kernel",
        "proj_final/bias",
    )
)
_BLOCK_KEYS = {"recurrent": "recurrent_block", "attention": "attention_block"}


def _config_names():
    signature = inspect.signature(RecurrentGemmaBackbone.__init__)
    return sorted(
        name
        for name, p in signature.parameters.items()
        if name not in ("self", "dtype")
        and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
    )


def _not_griffin_error(what):
    return ValueError(
        "Expected an official RecurrentGemma (Griffin) Flax parameter tree: a "
        "nested dict with top-level keys 'embedder', 'blocks.0' … "
        "'blocks.N-1' and 'final_norm' (optionally under 'params'); "
        f"got {what}."
    )


def _flatten(tree, prefix=""):
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, path + "/"))
        else:
            flat[path] = value
    return flat


def _unwrap(params):
    if not isinstance(params, Mapping):
        raise _not_griffin_error(f"a {type(params).__name__}")
    # Orbax restores `{"params": tree}` when the training state was saved.
    if "embedder" not in params and isinstance(params.get("params"), Mapping):
        params = params["params"]
    if "embedder" not in params or "final_norm" not in params:
        raise _not_griffin_error(f"top-level keys {sorted(params)[:10]}")
    return params


def _block_indices(params, where):
    indices = []
    for key in params:
        if key.startswith("blocks."):
            suffix = key[len("blocks.") :]
            if not suffix.isdigit():
                raise _not_griffin_error(f"an unrecognised block key {key!r}")
            indices.append(int(suffix))
    indices.sort()
    if not indices:
        raise _not_griffin_error("no 'blocks.i' entries")
    if indices != list(range(len(indices))):
        missing = sorted(set(range(indices[-1] + 1)) - set(indices))
        raise ValueError(
            f"{where}: blocks must be numbered 0..N-1 without gaps; "
            f"missing {[f'blocks.{i}' for i in missing]}."
        )
    return indices


def _shape(source, key):
    if key not in source:
        raise ValueError(
            f"{source.source}: missing tensor `{key}`, needed to infer the "
            "model configuration."
        )
    return tuple(np.shape(source.tensors[key]))


def _infer_config(params, source):
    vocabulary_size, hidden_dim = _shape(source, "embedder/input_embedding")
    block_types = []
    for i in _block_indices(params, source.source):
        block = params[f"blocks.{i}"]
        if not isinstance(block, Mapping):
            raise _not_griffin_error(f"`blocks.{i}` as a {type(block).__name__}")
        present = [t for t, k in _BLOCK_KEYS.items() if k in block]
        if len(present) != 1:
            raise ValueError(
                f"{source.source}: `blocks.{i}` must hold exactly one of "
                f"'recurrent_block' or 'attention_block'; it has "
                f"{sorted(block)}."
            )
        block_types.append(present[0])

    config = dict(
        vocabulary_size=vocabulary_size,
        hidden_dim=hidden_dim,
        intermediate_dim=_shape(source, "blocks.0/mlp_block/ffw_up/w")[-1],
        block_types=block_types,
        **_OFFICIAL_DEFAULTS,
    )

    gate_heads = head_dim = None
    if "recurrent" in block_types:
        r = f"blocks.{block_types.index('recurrent')}/recurrent_block"
        config["lru_width"] = _shape(source, f"{r}/linear_x/kernel")[-1]
        config["conv1d_temporal_width"] = _shape(source, f"{r}/conv_1d/w")[0]
        gate_heads = _shape(source, f"{r}/rg_lru/input_gate/w")[0]
    if "attention" in block_types:
        a = f"blocks.{block_types.index('attention')}/attention_block"
        head_dim = _shape(source, f"{a}/proj_k/kernel")[-1]

    # The RG-LRU gate blocks and the attention heads share `num_heads`, so a
    # checkpoint where they disagree cannot be represented.
    if head_dim is not None:
        if hidden_dim % head_dim:
            raise ValueError(
                f"{source.source}: hidden_dim={hidden_dim} from `embedder/"
                f"input_embedding` is not a multiple of head_dim={head_dim} "
                "from `proj_k/kernel`."
            )
        attention_heads = hidden_dim // head_dim
        if gate_heads is not None and gate_heads != attention_heads:
            raise ValueError(
                f"{source.source}: the RG-LRU gates have {gate_heads} heads "
                "(`rg_lru/input_gate/w`) but the attention head_dim "
                f"{head_dim} (`proj_k/kernel`) implies {attention_heads} "
                f"heads for hidden_dim={hidden_dim}; they must agree."
            )
        config["num_heads"] = attention_heads
    else:
        config["num_heads"] = gate_heads
    return config


def _block_tensors(source, i, block_type):
    if block_type not in _BLOCK_KEYS:
        raise ValueError(
            f"Unknown block type {block_type!r} for block {i}; expected one "
            f"of {sorted(_BLOCK_KEYS)}."
        )
    ours, theirs = f"residual_block_{i}", f"blocks.{i}"
    tensors = {}
    for name in _SHARED + (_RECURRENT if block_type == "recurrent" else _ATTENTION):
        key = f"{theirs}/{name}"
        tensors[f"{ours}/{name}"] = (key, source.take(key))

    # `ffw_up` is one Einsum holding the gate (index 0, the GELU branch) and
    # the linear branch (index 1); we keep them as two Dense layers.
    w_key, b_key = f"{theirs}/mlp_block/ffw_up/w", f"{theirs}/mlp_block/ffw_up/b"
    w, b = source.take(w_key), source.take(b_key)
    if w.ndim != 3 or w.shape[0] != 2:
        raise ValueError(
            f"{source.source}: tensor `{w_key}` has shape {w.shape}; expected "
            "(2, hidden_dim, intermediate_dim)."
        )
    if b.ndim != 4 or b.shape[:3] != (2, 1, 1):
        raise ValueError(
            f"{source.source}: tensor `{b_key}` has shape {b.shape}; expected "
            "(2, 1, 1, intermediate_dim)."
        )
    for index, name in ((0, "ffw_gate"), (1, "ffw_up")):
        tensors[f"{ours}/mlp_block/{name}/kernel"] = (f"{w_key}[{index}]", w[index])
        tensors[f"{ours}/mlp_block/{name}/bias"] = (
            f"{b_key}[{index}, 0, 0]",
            b[index, 0, 0],
        )
    return tensors


def _check_override_names(config_overrides):
    valid = _config_names()
    unknown = sorted(set(config_overrides) - set(valid))
    if unknown:
        raise ValueError(
            f"Unknown config override(s) {unknown}; valid names are {valid}."
        )


def config_from_official(params, **config_overrides):
    """Reads `RecurrentGemmaBackbone` arguments off an official Flax tree.

    Nothing is built or converted: this only looks at key names and shapes,
    as `backbone_from_official` does before it builds the model.

    Args:
        params: the official parameter tree (see `backbone_from_official`).
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values.

    Returns:
        dict of `RecurrentGemmaBackbone` keyword arguments (without `dtype`).

    Raises:
        ValueError: if `params` is not a Griffin tree, an override name is
            unknown, or the shapes contradict each other.
    """
    _check_override_names(config_overrides)
    params = _unwrap(params)
    source = TensorSource(_flatten(params), _SOURCE)
    return {**_infer_config(params, source), **config_overrides}


def _build_backbone(params, dtype, config_overrides, where):
    _check_override_names(config_overrides)
    params = _unwrap(params)
    source = TensorSource(_flatten(params), where)
    config = {**_infer_config(params, source), **config_overrides}

    tensors = {
        "token_embedding/embeddings": (
            "embedder/input_embedding",
            source.take("embedder/input_embedding"),
        ),
        "final_norm/scale": ("final_norm/scale", source.take("final_norm/scale")),
    }
    for i, block_type in enumerate(config["block_types"]):
        tensors.update(_block_tensors(source, i, block_type))
    # Missing and extra tensors are caught before the model is built: building
    # allocates (and randomly initialises) every weight, which is slow for the
    # released sizes.
    source.check_all_used()
    backbone = RecurrentGemmaBackbone(**config, dtype=dtype)
    assign_backbone_weights(backbone, tensors, where)
    return backbone


def backbone_from_official(params, dtype=None, **config_overrides):
    """Builds a `RecurrentGemmaBackbone` from official Flax parameters.

    The configuration is read off the tensors: vocabulary and width from the
    embedding, the block pattern from which of `recurrent_block` or
    `attention_block` each `blocks.i` holds, the MLP, RG-LRU and Conv1D
    widths from their kernels, and `num_heads` from the RG-LRU gate blocks
    (or, for attention-only trees, `hidden_dim / head_dim`). What the tensors
    cannot tell takes the released models' values:
    `attention_window_size=2048`, `logits_soft_cap=30.0` and
    `embeddings_scale_by_sqrt_dim=True`.

    Args:
        params: nested mapping as restored from the official Orbax
            checkpoint (`embedder`, `blocks.i`, `final_norm`, possibly under
            `params`). Leaves may be numpy (including bfloat16) or JAX
            arrays.
        dtype: string or `keras.DTypePolicy` for the backbone, e.g.
            `"bfloat16"`. `None` uses Keras' default (float32). The tensors
            are cast to it.
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values, e.g. `attention_window_size=512`
            for a model fine-tuned with a shorter window.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ValueError: if `params` is not a Griffin tree; if an override name is
            unknown; if the RG-LRU gate heads and the attention head_dim
            disagree; or if a tensor is missing, unexpected or mis-shaped
            (the message names it). Nothing is loaded in that case.

    Example:
    ```python
    params = read_orbax_params("recurrentgemma-2b/2b")
    backbone = backbone_from_official(params, dtype="bfloat16")
    hidden = backbone({
        "token_ids": np.array([[2, 651, 6037]]),
        "padding_mask": np.ones((1, 3), "int32"),
    })
    logits = backbone.token_embedding(hidden, reverse=True)
    ```
    """
    return _build_backbone(params, dtype, config_overrides, _SOURCE)


# --- Orbax ---------------------------------------------------------------------

# Files that only an Orbax (or Flax) checkpoint folder holds: the PyTree
# metadata (orbax >= 0.5), the OCDBT root manifest, and the msgpack
# `checkpoint` of older Flax/Orbax saves.
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")
_LEGACY_CHECKPOINT_FILE = "checkpoint"
# Orbax writes into `<name>.orbax-checkpoint-tmp-<timestamp>` (or, in 0.12,
# `<name>.orbax-checkpoint-tmp`) and renames it once the save is complete.
_ORBAX_TMP = ".orbax-checkpoint-tmp"


def _is_msgpack_map(filename):
    # TensorFlow checkpoints also have a file named `checkpoint`, but theirs
    # is a text proto; Flax's starts with a msgpack map header.
    try:
        with open(filename, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def is_orbax_checkpoint(path):
    """True if `path` is a folder written by Orbax (or the older Flax saver).

    Args:
        path: str or path-like.

    Returns:
        bool. A folder holding `_METADATA` or `manifest.ocdbt` (what
        `orbax.checkpoint.PyTreeCheckpointer().save` writes, with and without
        OCDBT), or a msgpack `checkpoint` file (older Flax and Orbax saves).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, name)) for name in _ORBAX_MARKERS):
        return True
    return _is_msgpack_map(os.path.join(path, _LEGACY_CHECKPOINT_FILE))


def find_orbax_checkpoint(directory):
    """Finds the Orbax checkpoint folder of a downloaded model.

    The Kaggle Flax downloads hold the checkpoint in a subfolder named after
    the model (`2b/`, `2b-it/`, ...) next to `tokenizer.model`.

    Args:
        directory: str or path-like. The checkpoint folder itself, or a folder
            with exactly one checkpoint folder directly inside it. Unfinished
            saves (`*.orbax-checkpoint-tmp*`) are not counted.

    Returns:
        The checkpoint folder as a str, or `None` if there is none.

    Raises:
        ValueError: if `directory` holds several checkpoint folders (they are
            listed).
    """
    directory = os.fspath(directory)
    if is_orbax_checkpoint(directory):
        return directory
    if not os.path.isdir(directory):
        return None
    found = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if _ORBAX_TMP not in name and is_orbax_checkpoint(os.path.join(directory, name))
    )
    if len(found) > 1:
        raise ValueError(
            f"{directory}: several Orbax checkpoints {found}; pass the one to load."
        )
    return found[0] if found else None


def _orbax_error_detail(error):
    # tensorstore appends its whole JSON spec to the message; the part before
    # it says what failed and where.
    message = str(error).split(" [tensorstore_spec=")[0].strip()
    message = " ".join(message.split())
    return message[:600] or type(error).__name__


def _orbax_file_in(message, path):
    """The file a tensorstore message names, if it is inside `path`."""
    for name in re.findall(r'local file "([^"]+)"', message):
        if not name.endswith("/") and os.path.abspath(name).startswith(
            os.path.abspath(path)
        ):
            return name
    return None


def _import_orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "Reading an Orbax (Flax) checkpoint needs the `orbax-checkpoint` "
            "package: `pip install orbax-checkpoint`."
        ) from e
    return ocp


def _numpy_restore_args(ocp, checkpointer, path):
    """Restore arguments that ask for numpy leaves, or None if unknown.

    Restored as numpy, the arrays never go to an accelerator (a 2B
    checkpoint would otherwise take device memory just to be converted).
    """
    import jax

    try:
        metadata = checkpointer.metadata(path)
    except Exception:  # Old layouts: the plain restore still works.
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        return None
    return jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
    )


def read_orbax_params(path):
    """Reads an official Orbax checkpoint into a nested dict of numpy arrays.

    Args:
        path: str or path-like. The checkpoint folder, or a folder holding
            exactly one (see `find_orbax_checkpoint`).

    Returns:
        The restored tree as nested dicts of numpy arrays; bfloat16 tensors
        stay `ml_dtypes.bfloat16`. It is whatever was saved, e.g. the Griffin
        tree, or `{"params": tree}`.

    Raises:
        ImportError: if `orbax-checkpoint` is not installed.
        ValueError: if `path` is not an Orbax checkpoint, is an unfinished
            save, or is truncated, incomplete or corrupt (the message names
            the folder, and the file when Orbax reports it).
    """
    path = os.fspath(path)
    checkpoint = find_orbax_checkpoint(path)
    if checkpoint is None:
        raise ValueError(
            f"{path}: not an Orbax checkpoint (no {' or '.join(_ORBAX_MARKERS)} "
            "in it or in a folder directly inside it)."
        )
    checkpoint = os.path.abspath(checkpoint)
    if _ORBAX_TMP in os.path.basename(checkpoint):
        raise ValueError(
            f"{checkpoint}: an unfinished Orbax save (Orbax renames the folder "
            "once every file is written); save or download it again."
        )
    ocp = _import_orbax()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restore_args = _numpy_restore_args(ocp, checkpointer, checkpoint)
        if restore_args is None:
            tree = checkpointer.restore(checkpoint)
        else:
            tree = checkpointer.restore(
                checkpoint, args=ocp.args.PyTreeRestore(restore_args=restore_args)
            )
    except MemoryError:
        raise
    except Exception as e:
        # tensorstore reports missing and truncated files as ValueError,
        # FileNotFoundError or OSError with a spec dump; say what it means.
        detail = _orbax_error_detail(e)
        culprit = _orbax_file_in(detail, checkpoint)
        raise ValueError(
            f"{checkpoint}: cannot read this Orbax checkpoint; it is truncated, "
            "incomplete or corrupt"
            + (f" (file {culprit})" if culprit else "")
            + f". Orbax said: {detail}"
        ) from e
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"{checkpoint}: the Orbax checkpoint holds a {type(tree).__name__}, "
            "not a tree of named parameters."
        )
    return _to_numpy_tree(tree)


def _to_numpy_tree(tree):
    return {
        key: _to_numpy_tree(value) if isinstance(value, Mapping) else to_numpy(value)
        for key, value in tree.items()
    }


def backbone_from_orbax(path, dtype=None, **config_overrides):
    """Builds a `RecurrentGemmaBackbone` from an official Orbax checkpoint.

    Args:
        path: str or path-like. The checkpoint folder (e.g. `2b/` of the
            Kaggle Flax download), or the download folder holding it.
        dtype: string or `keras.DTypePolicy` for the backbone. `None` uses
            Keras' default (float32).
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values (see `backbone_from_official`);
            `attention_window_size` is 2048 unless given.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ImportError: if `orbax-checkpoint` is not installed.
        ValueError: if the checkpoint cannot be read (naming the folder) or
            does not hold a Griffin tree (naming the tensor).
    """
    params = read_orbax_params(path)
    where = f"Orbax checkpoint {find_orbax_checkpoint(path)}"
    return _build_backbone(params, dtype, config_overrides, where)


# --- PyTorch -------------------------------------------------------------------

_TORCH_SUFFIXES = (".pt", ".pth")
# Wrappers a `.pt` might add around `Griffin.state_dict()`: a training script's
# dict, `nn.DataParallel`'s `module.` prefix, or the `params.` prefix of a
# flattened `{"params": tree}` (what `flax_params_to_pytorch_state_dict` makes
# of a restored training state).
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_KEY_PREFIXES = ("module.", "params.")


def _import_torch(what):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{what} needs PyTorch: `pip install torch` (the CPU build is enough)."
        ) from e
    return torch


def find_torch_checkpoint(directory):
    """Finds the official PyTorch checkpoint (`*.pt` or `*.pth`) in a folder.

    Args:
        directory: str or path-like. A folder such as the Kaggle PyTorch
            download (`2b.pt` next to `tokenizer.model`), or the file itself.

    Returns:
        The file as a str, or `None` if there is no such file.

    Raises:
        ValueError: if the folder holds several candidates (they are listed).
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        return directory if directory.endswith(_TORCH_SUFFIXES) else None
    if not os.path.isdir(directory):
        return None
    found = sorted(
        os.path.join(directory, name)
        for name in os.listdir(directory)
        if name.endswith(_TORCH_SUFFIXES)
        and os.path.isfile(os.path.join(directory, name))
    )
    if len(found) > 1:
        raise ValueError(
            f"{directory}: several PyTorch checkpoints {found}; pass the one to load."
        )
    return found[0] if found else None


def _is_tensor_dict(value, torch):
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _strip_key_prefix(state_dict):
    for prefix in _KEY_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_torch_state_dict(path):
    """Reads an official PyTorch checkpoint, safely and onto the CPU.

    The file is loaded with `torch.load(..., map_location="cpu",
    weights_only=True)`, which unpickles tensors and plain containers only,
    and memory-mapped when it is a zip-format file, so a large checkpoint is
    not read into memory twice.

    Args:
        path: str or path-like. The `.pt` file, or a folder holding exactly
            one (see `find_torch_checkpoint`).

    Returns:
        dict `{name: torch.Tensor}`, the `Griffin.state_dict()`. A dict
        wrapping it under `state_dict`, `model_state_dict` or `model`, and a
        `module.` or `params.` prefix on every key, are removed.

    Raises:
        ImportError: if torch is not installed.
        ValueError: naming the file if there is none, it is truncated or not
            a PyTorch checkpoint, or it holds something else than a state
            dict.
    """
    path = os.fspath(path)
    filename = find_torch_checkpoint(path)
    if filename is None:
        raise ValueError(
            f"{path}: no PyTorch checkpoint (a {' or '.join(_TORCH_SUFFIXES)} file)."
        )
    torch = _import_torch("Reading an official PyTorch checkpoint")
    try:
        loaded = torch.load(
            filename,
            map_location="cpu",
            weights_only=True,
            # `mmap` needs the zip format; older `.pt` files are plain pickles.
            mmap=zipfile.is_zipfile(filename),
        )
    except MemoryError:
        raise
    except Exception as e:
        # torch reports a truncated zip as `OSError: [Errno 22]`, a text file
        # as `KeyError`, an empty one as `EOFError`.
        raise ValueError(
            f"{filename}: not a readable PyTorch checkpoint; the file is "
            f"truncated, corrupt or of another kind ({type(e).__name__}: {e})."
        ) from e
    if not _is_tensor_dict(loaded, torch) and isinstance(loaded, Mapping):
        inner = [k for k in _STATE_DICT_KEYS if _is_tensor_dict(loaded.get(k), torch)]
        if len(inner) == 1:
            loaded = loaded[inner[0]]
    if not _is_tensor_dict(loaded, torch):
        what = (
            f"a dict with keys {sorted(map(str, loaded))[:10]}"
            if isinstance(loaded, Mapping)
            else f"a {type(loaded).__name__}"
        )
        raise ValueError(
            f"{filename}: expected a state dict (names to tensors), as "
            f"`torch.save(model.state_dict())` writes; found {what}."
        )
    return _strip_key_prefix(dict(loaded))


def _torch_to_flax(state_dict, where):
    """The Flax tree of a Griffin state dict, and each Flax path's torch key."""
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{where}: expected a state dict (names to tensors), got a "
            f"{type(state_dict).__name__}."
        )
    state_dict = _strip_key_prefix(dict(state_dict))
    params, names = {}, {}
    for key, value in state_dict.items():
        parts = str(key).split(".")
        # `blocks` is an `nn.ModuleList`, so its index is part of the key
        # (`blocks.3.…`), while the Flax tree names the block `blocks.3`.
        if parts[0] == "blocks" and len(parts) > 2:
            parts = [f"blocks.{parts[1]}"] + parts[2:]
        if len(parts) < 2 or not all(parts):
            raise ValueError(
                f"{where}: tensor name `{key}` is not a Griffin parameter name."
            )
        array = to_numpy(value)
        # Only `nn.Linear` leaves are called `weight` in the official torch
        # model; they hold the Flax `kernel` transposed.
        if parts[-1] == "weight":
            if array.ndim != 2:
                raise ValueError(
                    f"{where}: tensor `{key}` has shape {tuple(array.shape)}; "
                    "an nn.Linear weight must be 2-D (out, in)."
                )
            parts[-1] = "kernel"
            array = array.T
        node = params
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(
                    f"{where}: tensor `{key}` nests under "
                    f"`{'.'.join(parts[: depth + 1])}`, which is itself a tensor."
                )
        if parts[-1] in node:
            raise ValueError(
                f"{where}: tensor `{key}` clashes with another one at "
                f"`{'/'.join(parts)}`."
            )
        node[parts[-1]] = array
        names["/".join(parts)] = key
    return params, names


def params_from_torch_state_dict(state_dict):
    """Turns an official PyTorch state dict back into the official Flax tree.

    The inverse of `recurrentgemma.conversion.flax_params_to_pytorch_state_dict`:
    `blocks.i.…` keys become `blocks.i` subtrees, every `nn.Linear` `weight`
    `(out, in)` becomes a `kernel` `(in, out)`, and every other tensor keeps
    its name and layout. Shapes are not checked here; `backbone_from_official`
    checks them.

    Args:
        state_dict: mapping from names to torch tensors (or arrays), e.g. the
            result of `read_torch_state_dict`. bfloat16 tensors become
            `ml_dtypes.bfloat16` arrays with the same bits.

    Returns:
        Nested dict of numpy arrays: `embedder`, `blocks.i`, `final_norm`.

    Raises:
        ValueError: if a name cannot be placed in the tree, or a `weight` is
            not 2-D (naming the tensor).
    """
    return _torch_to_flax(state_dict, "official PyTorch state dict")[0]


# A tensor path of the official Flax tree, as conversion errors name them.
_FLAX_PATH = re.compile(r"\b(?:embedder|final_norm|blocks\.\d+)(?:/\w+)+")


def _with_torch_names(message, names):
    """Rewrites Flax paths in a conversion error as the file's tensor names.

    Paths of tensors the file holds map back to their key; others (e.g. a
    missing tensor) get the name the official conversion would give them.
    """
    transposed = False

    def rename(match):
        nonlocal transposed
        path = match.group(0)
        if path in names:
            name = names[path]
        else:
            top, *rest = path.split("/")
            if rest[-1] == "kernel":
                rest[-1] = "weight"
            name = ".".join([top] + rest)
        transposed = transposed or path.endswith("/kernel")
        return name

    message = _FLAX_PATH.sub(rename, message)
    if transposed and "shape" in message:
        message += (
            " (Shapes are in the Flax layout: an nn.Linear weight is shown "
            "transposed, as (in, out).)"
        )
    return message


def backbone_from_official_torch(path, dtype=None, **config_overrides):
    """Builds a `RecurrentGemmaBackbone` from an official PyTorch checkpoint.

    Args:
        path: str or path-like. The `.pt` file (e.g. `2b.pt` of the Kaggle
            PyTorch download), or the folder holding it.
        dtype: string or `keras.DTypePolicy` for the backbone. `None` uses
            Keras' default (float32). A bfloat16 checkpoint loaded with
            `dtype="bfloat16"` keeps every weight bit for bit.
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values (see `backbone_from_official`);
            `attention_window_size` is 2048 unless given.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ImportError: if torch is not installed.
        ValueError: if the file is missing, truncated or not a state dict
            (naming the file), or a tensor is missing, unexpected or
            mis-shaped (naming it as the file does).
    """
    state_dict = read_torch_state_dict(path)
    where = f"official PyTorch checkpoint {find_torch_checkpoint(path)}"
    params, names = _torch_to_flax(state_dict, where)
    del state_dict
    try:
        return _build_backbone(params, dtype, config_overrides, where)
    except ValueError as e:
        raise ValueError(_with_torch_names(str(e), names)) from e
