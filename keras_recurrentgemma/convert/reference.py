"""Logits from the implementation a checkpoint was released for.

`reference_logits` runs a checkpoint through its own code, not ours: the
`transformers` model for a Hugging Face directory, the official PyTorch
`Griffin` for a `.pt`, the official Flax `Griffin` for an Orbax checkpoint.
Comparing those logits with a converted `RecurrentGemmaBackbone`'s checks
the conversion end to end (`tools/convert_checkpoint.py --check`).

Every reference runs in float32 whatever the checkpoint's dtype, so that it
is the most accurate answer each implementation gives.
"""

import numpy as np

from keras_recurrentgemma.convert.official import config_from_official
from keras_recurrentgemma.convert.official_torch import find_torch_checkpoint
from keras_recurrentgemma.convert.official_torch import read_torch_state_dict
from keras_recurrentgemma.convert.orbax import find_orbax_checkpoint
from keras_recurrentgemma.convert.orbax import read_orbax_params

SOURCE_FORMATS = ("huggingface", "official_torch", "orbax")

# What the official `GriffinConfig` cannot express: the official code fixes
# these values, so a backbone configured otherwise has no official twin.
_OFFICIAL_FIXED = {
    "conv1d_temporal_width": 4,
    "layer_norm_epsilon": 1e-6,
    "rope_max_wavelength": 10_000,
}


def _import_recurrentgemma(framework):
    try:
        if framework == "jax":
            import recurrentgemma.jax as implementation
        else:
            import recurrentgemma.torch as implementation
    except ImportError as e:
        raise ImportError(
            f"The official {framework} reference needs the `recurrentgemma` "
            f"package: `pip install 'recurrentgemma[{framework}]'`."
        ) from e
    return implementation


def _token_ids(token_ids):
    ids = np.asarray(token_ids)
    if ids.ndim != 2 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(
            "token_ids must be a non-empty integer array [batch, time]; got "
            f"shape {ids.shape} and dtype {ids.dtype}."
        )
    return ids


def griffin_config(config):
    """The official `recurrentgemma.common.GriffinConfig` for a backbone config.

    Args:
        config: dict of `RecurrentGemmaBackbone` arguments, e.g.
            `backbone.get_config()`.

    Returns:
        A `GriffinConfig`.

    Raises:
        ImportError: if `recurrentgemma` is not installed.
        ValueError: if `config` sets something the official implementation
            fixes (Conv1D width 4, RMSNorm epsilon 1e-6, RoPE wavelength
            10000) to another value.
    """
    try:
        import recurrentgemma.common as common
    except ImportError as e:
        raise ImportError(
            "The official reference needs the `recurrentgemma` package: "
            "`pip install 'recurrentgemma[jax,torch]'`."
        ) from e
    for key, value in _OFFICIAL_FIXED.items():
        if config.get(key, value) != value:
            raise ValueError(
                f"config `{key}`={config[key]!r}, but the official "
                f"implementation fixes it to {value!r}; it cannot serve as "
                "the reference for this model."
            )
    block_type = {
        "recurrent": common.TemporalBlockType.RECURRENT,
        "attention": common.TemporalBlockType.ATTENTION,
    }
    return common.GriffinConfig(
        vocab_size=int(config["vocabulary_size"]),
        width=int(config["hidden_dim"]),
        mlp_expanded_width=int(config["intermediate_dim"]),
        num_heads=int(config["num_heads"]),
        block_types=tuple(block_type[b] for b in config["block_types"]),
        embeddings_scale_by_sqrt_dim=bool(
            config.get("embeddings_scale_by_sqrt_dim", True)
        ),
        attention_window_size=int(config.get("attention_window_size", 2048)),
        # Ours says "no cap" with None, the official code with 0.
        logits_soft_cap=float(config.get("logits_soft_cap") or 0.0),
        lru_width=config.get("lru_width"),
    )


def _official_config(params, backbone, config, overrides):
    if backbone is not None:
        base = backbone.get_config()
    elif config is not None:
        base = dict(config)
    else:
        # Read off the checkpoint, exactly as the converter would.
        base = config_from_official(params)
    return griffin_config({**base, **overrides})


def _huggingface_logits(path, ids):
    try:
        import torch
        from transformers import RecurrentGemmaForCausalLM
    except ImportError as e:
        raise ImportError(
            "The Hugging Face reference needs `transformers` and PyTorch: "
            "`pip install transformers torch`."
        ) from e
    try:
        model = RecurrentGemmaForCausalLM.from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError, RuntimeError) as e:
        raise ValueError(
            f"{path}: transformers cannot load this checkpoint "
            f"({type(e).__name__}: {e})."
        ) from e
    model.eval()
    with torch.no_grad():
        logits = model(torch.from_numpy(ids).long(), use_cache=False).logits
    return logits.float().numpy()


def _official_torch_logits(path, ids, backbone, config, overrides):
    official = _import_recurrentgemma("torch")
    import torch

    from keras_recurrentgemma.convert.official_torch import params_from_torch_state_dict

    filename = find_torch_checkpoint(path)
    state_dict = read_torch_state_dict(path)
    params = None
    if backbone is None and config is None:
        params = params_from_torch_state_dict(state_dict)
    griffin = _official_config(params, backbone, config, overrides)
    del params
    model = official.Griffin(griffin, gradient_checkpointing=False, dtype=torch.float32)
    try:
        # Copies (and upcasts) into the model's own float32 parameters.
        model.load_state_dict(state_dict)
    except RuntimeError as e:
        raise ValueError(
            f"{filename}: the official PyTorch Griffin for {griffin} does not "
            f"accept this state dict: {e}"
        ) from e
    del state_dict
    model.eval()
    segment_pos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
    with torch.no_grad():
        logits, _ = model(
            torch.from_numpy(ids).long(),
            torch.from_numpy(np.ascontiguousarray(segment_pos)).long(),
            return_cache=False,
        )
    return logits.float().numpy()


def _orbax_logits(path, ids, backbone, config, overrides):
    official = _import_recurrentgemma("jax")
    import jax
    import jax.numpy as jnp

    params = read_orbax_params(path)
    if "embedder" not in params and "params" in params:
        params = params["params"]
    griffin = _official_config(params, backbone, config, overrides)
    model = official.Griffin(
        griffin,
        gradient_checkpointing=False,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
    )

    # The parameters are arguments, not constants baked into the program, and
    # are upcast inside it, so a bfloat16 checkpoint crosses to the device as
    # is.
    @jax.jit
    def forward(params, tokens, segment_pos):
        params = jax.tree_util.tree_map(lambda x: x.astype(jnp.float32), params)
        logits, _ = model.apply(
            {"params": params}, tokens, segment_pos, return_cache=False
        )
        return logits

    segment_pos = np.broadcast_to(np.arange(ids.shape[1], dtype=np.int32), ids.shape)
    try:
        logits = forward(params, jnp.asarray(ids, jnp.int32), jnp.asarray(segment_pos))
    except MemoryError:
        raise
    except Exception as e:  # Flax, jaxtyping and XLA errors share no base.
        raise ValueError(
            f"{find_orbax_checkpoint(path)}: the official Flax Griffin for "
            f"{griffin} does not accept these parameters: {e}"
        ) from e
    return np.asarray(logits, dtype=np.float32)


def reference_logits(
    source_format, path, token_ids, backbone=None, config=None, **config_overrides
):
    """Logits of a checkpoint computed by the implementation it came from.

    Positions are `arange(time)` for every row: no padding, no packing.

    - `"huggingface"`: `transformers.RecurrentGemmaForCausalLM
      .from_pretrained(path, dtype=float32)`, without a cache. It reads its
      own `config.json`; note that transformers 5.23 ignores the attention
      window past `attention_window_size` tokens (SPEC §6), so compare at
      most `attention_window_size` tokens.
    - `"official_torch"`: `recurrentgemma.torch.Griffin` in float32 with the
      `.pt` state dict loaded.
    - `"orbax"`: `recurrentgemma.jax.Griffin.apply` in float32 on the
      restored parameters.

    The official models need a `GriffinConfig`, built from `backbone`'s
    config, else from `config`, else read off the checkpoint's shapes the way
    the converter does (so `attention_window_size` is then 2048 unless given
    in `config_overrides`).

    Args:
        source_format: one of `"huggingface"`, `"official_torch"`, `"orbax"`.
        path: str or path-like. The Hugging Face directory; the `.pt` file or
            its folder; the Orbax checkpoint folder or its parent.
        token_ids: integer array `[batch, time]`.
        backbone: optional `RecurrentGemmaBackbone` whose configuration the
            official model copies, e.g. the converted one.
        config: optional dict of `RecurrentGemmaBackbone` arguments, used
            when `backbone` is not given.
        **config_overrides: backbone arguments replacing those from
            `backbone`/`config`/the checkpoint, e.g.
            `attention_window_size=2048`. Official formats only.

    Returns:
        float32 numpy array `[batch, time, vocabulary_size]`.

    Raises:
        ImportError: naming what to `pip install` when the reference
            implementation is missing.
        ValueError: for an unknown format, bad `token_ids`, a config the
            official code cannot express, overrides for `"huggingface"`, or
            a checkpoint the reference cannot read (naming the file).
    """
    ids = _token_ids(token_ids)
    if source_format == "huggingface":
        if config_overrides:
            raise ValueError(
                "The Hugging Face reference reads its configuration from "
                f"config.json; overrides {sorted(config_overrides)} would be "
                "ignored. Edit config.json instead."
            )
        return _huggingface_logits(path, ids)
    if source_format == "official_torch":
        return _official_torch_logits(path, ids, backbone, config, config_overrides)
    if source_format == "orbax":
        return _orbax_logits(path, ids, backbone, config, config_overrides)
    raise ValueError(
        f"Unknown source_format {source_format!r}; expected one of {SOURCE_FORMATS}."
    )
