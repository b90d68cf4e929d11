"""Conversion from the official (DeepMind) RecurrentGemma checkpoints.

The official parameters are a Flax tree with top-level keys `embedder`,
`blocks.0` … `blocks.N-1` and `final_norm`, sometimes wrapped under
`params`. `backbone_from_official` infers the architecture from the tensor
shapes, builds a `RecurrentGemmaBackbone` and loads every tensor, all or
nothing: a missing, unexpected or mis-shaped tensor is a `ValueError` that
names it.

Official Dense kernels are stored `(in, out)`; ours are `(out, in)`
(`layers.dense.Dense`), so every kernel is transposed, and the stacked MLP
input projection is split in two; every other tensor keeps its shape and,
below `blocks.i/`, its name.

The tree is released in two file formats, read by `convert/orbax.py` (Flax)
and `convert/official_torch.py` (PyTorch `.pt`); both end here.
"""

import inspect
from collections.abc import Mapping

import numpy as np

from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.convert.common import TensorSource
from keras_recurrentgemma.convert.common import assign_backbone_weights
from keras_recurrentgemma.convert.quantize_on_load import build_for_load
from keras_recurrentgemma.convert.quantize_on_load import check_quantize_mode

_SOURCE = "official Flax checkpoint"

# Defaults of what the tensors cannot tell: the released checkpoints' values.
_OFFICIAL_DEFAULTS = dict(
    attention_window_size=2048,
    logits_soft_cap=30.0,
    embeddings_scale_by_sqrt_dim=True,
)

# Variable suffixes under `residual_block_i/` whose official name below
# `blocks.i/` is identical; those ending in `/kernel` are transposed.
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
        tensor = source.take(key)
        if name.endswith("/kernel"):
            tensor = tensor.T  # (in, out) -> our (out, in); lazy stays lazy
        tensors[f"{ours}/{name}"] = (key, tensor)

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
    # Row slices (not `w[index]`) let a lazy tensor read just its half, and
    # both kernels come before both biases, so a reader that keeps the
    # latest tensor reads each of `w` and `b` once.
    halves = ((0, "ffw_gate"), (1, "ffw_up"))
    for index, name in halves:
        tensors[f"{ours}/mlp_block/{name}/kernel"] = (
            f"{w_key}[{index}]",
            w[index : index + 1][0].T,
        )
    for index, name in halves:
        tensors[f"{ours}/mlp_block/{name}/bias"] = (
            f"{b_key}[{index}, 0, 0]",
            b[index : index + 1][0, 0, 0],
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


def build_backbone(params, dtype, config_overrides, where):
    config_overrides = dict(config_overrides)
    quantize = config_overrides.pop("quantize", None)
    if quantize is not None:
        check_quantize_mode(quantize)
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
    # allocates every weight, which is slow for the released sizes.
    source.check_all_used()
    backbone = build_for_load(RecurrentGemmaBackbone, config, dtype, quantize)
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
    return build_backbone(params, dtype, config_overrides, _SOURCE)
