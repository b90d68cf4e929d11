"""Loads Hugging Face `transformers` RecurrentGemma checkpoints.

A checkpoint is a directory as `RecurrentGemmaForCausalLM.save_pretrained`
writes it: `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`. Tensors are read lazily into numpy by
`safetensors_reader`, so loading needs neither torch nor transformers.
"""

import itertools
import os

import numpy as np

from keras_recurrentgemma.convert.common import TensorSource
from keras_recurrentgemma.convert.common import assign_backbone_weights
from keras_recurrentgemma.convert.common import read_json_object
from keras_recurrentgemma.convert.quantize_on_load import build_for_load
from keras_recurrentgemma.convert.quantize_on_load import check_quantize_mode
from keras_recurrentgemma.convert.safetensors_reader import WEIGHTS_FILE  # noqa: F401
from keras_recurrentgemma.convert.safetensors_reader import WEIGHTS_INDEX_FILE  # noqa: F401
from keras_recurrentgemma.convert.safetensors_reader import open_safetensors  # noqa: F401
from keras_recurrentgemma.convert.safetensors_reader import read_checkpoint_tensors

CONFIG_FILE = "config.json"
MODEL_TYPE = "recurrent_gemma"

# `RecurrentGemmaConfig` defaults (transformers 5.23), used where a
# `config.json` leaves a field out, exactly as transformers would.
_HF_DEFAULTS = {
    "num_hidden_layers": 26,
    "vocab_size": 256_000,
    "hidden_size": 2560,
    "intermediate_size": 3 * 2560,
    "num_attention_heads": 10,
    "lru_width": None,
    "attention_window_size": 2048,
    "conv1d_width": 4,
    "logits_soft_cap": 30.0,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "block_types": ("recurrent", "recurrent", "attention"),
    "num_key_value_heads": None,
    "attention_bias": False,
    "tie_word_embeddings": True,
    "rope_theta": 10_000.0,
    "partial_rotary_factor": 0.5,
}

# Fields that must be positive ints, and fields that must be numbers, when
# set; the rest of `config_from_huggingface` relies on it.
_POSITIVE_INT_KEYS = (
    "num_hidden_layers",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "lru_width",
    "attention_window_size",
    "conv1d_width",
    "num_key_value_heads",
)
_NUMBER_KEYS = (
    "logits_soft_cap",
    "rms_norm_eps",
    "rope_theta",
    "partial_rotary_factor",
)


def _get(hf_config, key):
    value = hf_config.get(key)
    return _HF_DEFAULTS[key] if value is None else value


def _check_field_types(hf_config):
    """Raises `ValueError` naming the first field of the wrong type or sign.

    Without it, a string or a negative size fails far from the file, in
    arithmetic here or in the layers.
    """
    for key in _POSITIVE_INT_KEYS:
        value = hf_config.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value <= 0
        ):
            raise ValueError(f"config `{key}` must be a positive int; got {value!r}.")
    rope = hf_config.get("rope_parameters")
    if rope is not None and not isinstance(rope, dict):
        raise ValueError(f"config `rope_parameters` must be an object; got {rope!r}.")
    for key in _NUMBER_KEYS:
        for where, value in (
            (key, hf_config.get(key)),
            (f"rope_parameters.{key}", (rope or {}).get(key)),
        ):
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, (int, float))
            ):
                raise ValueError(f"config `{where}` must be a number; got {value!r}.")


def _rope_settings(hf_config):
    """(rope_type, rope_theta, partial_rotary_factor) from old or new keys.

    transformers 5 nests RoPE under `rope_parameters`; 4.x wrote
    `rope_theta` and `partial_rotary_factor` at the top level and scaling
    under `rope_scaling`.
    """
    rope = dict(hf_config.get("rope_parameters") or {})
    legacy_scaling = hf_config.get("rope_scaling") or {}
    rope_type = rope.get(
        "rope_type",
        legacy_scaling.get("rope_type", legacy_scaling.get("type", "default")),
    )
    theta = rope.get("rope_theta", _get(hf_config, "rope_theta"))
    factor = rope.get("partial_rotary_factor", _get(hf_config, "partial_rotary_factor"))
    return rope_type, theta, factor


def _block_types(hf_config, num_layers):
    patterns = {}
    for key in ("block_types", "_block_types"):
        value = hf_config.get(key)
        if value is None:
            continue
        if not isinstance(value, (list, tuple)):
            raise ValueError(
                f"config `{key}` must be a list of 'recurrent' and 'attention'; "
                f"got {value!r}."
            )
        patterns[key] = list(value)
    # Early hub configs stored the pattern as `_block_types`; both keys
    # naming different patterns leaves the architecture ambiguous.
    if len(patterns) == 2 and patterns["block_types"] != patterns["_block_types"]:
        raise ValueError(
            "config has both `block_types` and `_block_types` with different "
            f"values: {patterns['block_types']} vs {patterns['_block_types']}."
        )
    pattern = next(iter(patterns.values()), list(_HF_DEFAULTS["block_types"]))
    bad = [b for b in pattern if b not in ("recurrent", "attention")]
    if bad or not pattern:
        raise ValueError(
            f"config `block_types` must be a non-empty list of 'recurrent' and "
            f"'attention'; got {pattern}."
        )
    # transformers repeats the pattern to cover every layer.
    return list(itertools.islice(itertools.cycle(pattern), num_layers))


def config_from_huggingface(hf_config):
    """Maps a Hugging Face `RecurrentGemmaConfig` dict to backbone kwargs.

    Fields missing from `hf_config` take `RecurrentGemmaConfig`'s defaults.
    Fields that only affect initialisation, dropout, caching or generation
    (`w_init_variance_scale`, `attention_dropout`, `use_cache`, token ids)
    are ignored.

    Args:
        hf_config: dict, the parsed `config.json`.

    Returns:
        dict of `RecurrentGemmaBackbone` keyword arguments (without `dtype`).

    Raises:
        ValueError: if `model_type` is not `"recurrent_gemma"`, or a field
            asks for something the backbone does not implement (the message
            names the key).
    """
    model_type = hf_config.get("model_type")
    if model_type != MODEL_TYPE:
        raise ValueError(
            f"config `model_type` is {model_type!r}, expected {MODEL_TYPE!r}."
        )

    _check_field_types(hf_config)

    def unsupported(key, value, expected):
        raise ValueError(
            f"config `{key}`={value!r} is not supported; expected {expected}."
        )

    hidden = _get(hf_config, "hidden_size")
    heads = _get(hf_config, "num_attention_heads")
    num_layers = _get(hf_config, "num_hidden_layers")

    # transformers falls back to one KV head per query head when this is
    # unset; the official models (and this backbone) use a single KV head.
    kv_heads = _get(hf_config, "num_key_value_heads") or heads
    if kv_heads != 1:
        unsupported("num_key_value_heads", kv_heads, "1 (multi-query attention)")
    activation = _get(hf_config, "hidden_activation")
    if activation != "gelu_pytorch_tanh":
        unsupported("hidden_activation", activation, "'gelu_pytorch_tanh'")
    if _get(hf_config, "attention_bias"):
        unsupported("attention_bias", True, "False")
    if not _get(hf_config, "tie_word_embeddings"):
        unsupported("tie_word_embeddings", False, "True (tied lm_head)")
    # transformers always scales the embedding, whatever this key says; a
    # config that asks otherwise was not written for that model, so refuse
    # rather than guess which behaviour its weights were trained with.
    if hf_config.get("embeddings_scale_by_sqrt_dim", True) is not True:
        unsupported(
            "embeddings_scale_by_sqrt_dim",
            hf_config["embeddings_scale_by_sqrt_dim"],
            "True",
        )
    rope_type, rope_theta, partial_rotary = _rope_settings(hf_config)
    if rope_type != "default":
        unsupported("rope_parameters.rope_type", rope_type, "'default'")
    if partial_rotary != 0.5:
        unsupported("partial_rotary_factor", partial_rotary, "0.5")
    intermediate_size = _get(hf_config, "intermediate_size")
    # transformers stores twice the MLP width (gate and up side by side).
    if intermediate_size % 2:
        unsupported("intermediate_size", intermediate_size, "an even number")
    cap = _get(hf_config, "logits_soft_cap")
    # transformers always applies `tanh(x / cap) * cap`, so 0 is not "off".
    if not cap > 0:
        unsupported("logits_soft_cap", cap, "a positive number")
    # `head_dim` in the file is ignored, as transformers recomputes it as
    # hidden_size // num_attention_heads.
    return {
        "vocabulary_size": _get(hf_config, "vocab_size"),
        "hidden_dim": hidden,
        "intermediate_dim": intermediate_size // 2,
        "num_heads": heads,
        "block_types": _block_types(hf_config, num_layers),
        "lru_width": _get(hf_config, "lru_width") or hidden,
        "attention_window_size": _get(hf_config, "attention_window_size"),
        "conv1d_temporal_width": _get(hf_config, "conv1d_width"),
        "logits_soft_cap": float(cap),
        "embeddings_scale_by_sqrt_dim": True,
        "layer_norm_epsilon": _get(hf_config, "rms_norm_eps"),
        "rope_max_wavelength": rope_theta,
    }


def read_config(path):
    """Reads `path/config.json`.

    Raises:
        ValueError: if the file is missing or is not valid JSON.
    """
    config_path = os.path.join(path, CONFIG_FILE)
    if not os.path.isfile(config_path):
        raise ValueError(f"{path}: no {CONFIG_FILE}; not a Hugging Face checkpoint.")
    return read_json_object(config_path)


def is_huggingface_checkpoint(path):
    """True if `path` is a directory whose `config.json` is RecurrentGemma's."""
    config_path = os.path.join(str(path), CONFIG_FILE)
    if not os.path.isfile(config_path):
        return False
    try:
        return read_config(str(path)).get("model_type") == MODEL_TYPE
    except ValueError:
        return False


def weight_map(backbone):
    """`[(variable path, HF key, transform)]` for every backbone variable.

    transform: "linear" takes an `nn.Linear` weight `(out, in)` as it is,
    our kernels' layout (`layers.dense.Dense`); "conv" turns HF's depthwise
    `(l, 1, k)` into `(k, l)`; None copies as is.
    """
    entries = [
        ("token_embedding/embeddings", "model.embed_tokens.weight", None),
        ("final_norm/scale", "model.final_norm.weight", None),
    ]
    for i, block_type in enumerate(backbone.block_types):
        ours, hf = f"residual_block_{i}/", f"model.layers.{i}."
        entries += [
            (ours + "temporal_pre_norm/scale", hf + "temporal_pre_norm.weight", None),
            (ours + "channel_pre_norm/scale", hf + "channel_pre_norm.weight", None),
        ]
        for name, hf_name in (
            ("ffw_gate", "gate_proj"),
            ("ffw_up", "up_proj"),
            ("ffw_down", "down_proj"),
        ):
            m_ours, m_hf = f"{ours}mlp_block/{name}/", f"{hf}mlp_block.{hf_name}."
            entries += [
                (m_ours + "kernel", m_hf + "weight", "linear"),
                (m_ours + "bias", m_hf + "bias", None),
            ]
        t_hf = hf + "temporal_block."
        if block_type == "recurrent":
            t_ours = ours + "recurrent_block/"
            for name in ("linear_x", "linear_y", "linear_out"):
                entries += [
                    (f"{t_ours}{name}/kernel", f"{t_hf}{name}.weight", "linear"),
                    (f"{t_ours}{name}/bias", f"{t_hf}{name}.bias", None),
                ]
            lru_ours, lru_hf = t_ours + "rg_lru/", t_hf + "rg_lru."
            entries += [
                (t_ours + "conv_1d/w", t_hf + "conv_1d.weight", "conv"),
                (t_ours + "conv_1d/b", t_hf + "conv_1d.bias", None),
                (lru_ours + "a_param", lru_hf + "recurrent_param", None),
                (lru_ours + "input_gate/w", lru_hf + "input_gate_weight", None),
                (lru_ours + "input_gate/b", lru_hf + "input_gate_bias", None),
                (lru_ours + "a_gate/w", lru_hf + "recurrent_gate_weight", None),
                (lru_ours + "a_gate/b", lru_hf + "recurrent_gate_bias", None),
            ]
        else:
            t_ours = ours + "attention_block/"
            entries += [
                (t_ours + "proj_q/kernel", t_hf + "q_proj.weight", "linear"),
                (t_ours + "proj_k/kernel", t_hf + "k_proj.weight", "linear"),
                (t_ours + "proj_v/kernel", t_hf + "v_proj.weight", "linear"),
                (t_ours + "proj_final/kernel", t_hf + "o_proj.weight", "linear"),
                (t_ours + "proj_final/bias", t_hf + "o_proj.bias", None),
            ]
    return entries


def _transform(array, transform, key, source):
    want_ndim = {"linear": 2, "conv": 3}.get(transform)
    if want_ndim is not None and array.ndim != want_ndim:
        raise ValueError(
            f"{source}: tensor `{key}` has shape {tuple(array.shape)}; expected "
            f"{want_ndim} dimensions."
        )
    if transform == "conv":
        if array.shape[1] != 1:
            raise ValueError(
                f"{source}: tensor `{key}` has shape {tuple(array.shape)}; a "
                "depthwise conv weight must be (width, 1, kernel)."
            )
        return array[:, 0, :].T
    return array


def _same_tensor(a, b, rows=16384):
    """`np.array_equal` of two (lazy) tensors, a block of rows at a time."""
    if tuple(a.shape) != tuple(b.shape):
        return False
    for start in range(0, max(a.shape[0], 1), rows):
        block = slice(start, start + rows)
        if not np.array_equal(a[block], b[block]):
            return False
    return True


def convert_weights(backbone, tensors, source):
    """Maps HF tensors to `{variable path: (HF key, array)}`.

    Raises:
        ValueError: naming a missing or unexpected tensor, or an `lm_head`
            that is not tied to the embedding.
    """
    source_tensors = TensorSource(tensors, source)
    converted = {}
    for path, key, transform in weight_map(backbone):
        array = _transform(source_tensors.take(key), transform, key, source)
        converted[path] = (key, array)
    # `save_pretrained` drops the tied `lm_head.weight`, but other writers
    # keep it; a copy that differs would mean an untied model.
    if "lm_head.weight" in source_tensors:
        lm_head = source_tensors.take("lm_head.weight")
        embedding = converted["token_embedding/embeddings"][1]
        if not _same_tensor(lm_head, embedding):
            raise ValueError(
                f"{source}: tensor `lm_head.weight` differs from "
                "`model.embed_tokens.weight`; only tied output embeddings "
                "are supported."
            )
    source_tensors.check_all_used()
    return converted


def backbone_from_huggingface(path, dtype=None, quantize=None, **kwargs):
    """Builds a `RecurrentGemmaBackbone` from a Hugging Face checkpoint dir.

    Args:
        path: str or path-like. A directory written by
            `RecurrentGemmaForCausalLM.save_pretrained`: `config.json` and
            `model.safetensors` or sharded safetensors with
            `model.safetensors.index.json`.
        dtype: str or `keras.DTypePolicy`, the backbone's dtype. `None`
            means `"float32"`, whatever the checkpoint's dtype; weights are
            cast to it.
        quantize: optional `"int8"` or `"int4"`: each tensor is quantized
            as it is read, so the float model is never held; the result
            equals loading in float and calling `quantize(mode)`.
        **kwargs: further backbone arguments that do not change the weights,
            e.g. `scan_implementation`.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ValueError: if `config.json` is missing, unreadable or not a
            supported RecurrentGemma config; if the weights are missing,
            truncated or corrupt; or if any tensor is missing, unexpected or
            mis-shaped. The message names the file or tensor. No weights are
            assigned unless all of them check out.
    """
    from keras_recurrentgemma.backbone import RecurrentGemmaBackbone

    path = os.fspath(path)
    config_path = os.path.join(path, CONFIG_FILE)
    hf_config = read_config(path)
    try:
        config = config_from_huggingface(hf_config)
    except ValueError as e:
        raise ValueError(f"{config_path}: {e}") from e
    if quantize is not None:
        check_quantize_mode(quantize)
    tensors = read_checkpoint_tensors(path)
    backbone = build_for_load(
        RecurrentGemmaBackbone,
        {**config, **kwargs},
        "float32" if dtype is None else dtype,
        quantize,
    )
    converted = convert_weights(backbone, tensors, source=path)
    assign_backbone_weights(backbone, converted, source=path)
    return backbone
