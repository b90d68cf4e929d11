"""Writes a RecurrentGemma model as a Hugging Face `transformers` checkpoint.

`export_to_transformers(obj, path)` takes a `RecurrentGemmaCausalLM`, a
backbone, a tokenizer or a causal LM preprocessor and writes what
`AutoModelForCausalLM.from_pretrained(path)` and
`AutoTokenizer.from_pretrained(path)` load as `RecurrentGemmaForCausalLM`:

- `config.json`: the fields of the released checkpoints (`block_types`,
  `intermediate_size` = 2 × our MLP width, one key/value head, ...), in both
  the transformers 4 (`rope_theta`, `torch_dtype`) and 5 (`rope_parameters`,
  `dtype`) spellings;
- `model.safetensors`, or shards `model-0000i-of-0000n.safetensors` with
  `model.safetensors.index.json` past `max_shard_size`, written one tensor at
  a time (LoRA factors merged into their kernels, each tensor in its
  variable's dtype: bfloat16 stays bfloat16);
- `tokenizer.model`, `tokenizer_config.json` and, for a unigram vocabulary,
  a `tokenizer.json` that tokenizes exactly as SentencePiece does;
- `generation_config.json` with the stop ids (`<eos>`, and `<end_of_turn>`
  for an instruction-tuned model).

Everything is checked before anything is written, then written into a
staging directory that is renamed into place, so a failure leaves nothing.
The weight names are `convert.huggingface`'s mapping, run backwards; the
files are written by `to_transformers_safetensors` and
`to_transformers_tokenizer`.
"""

import contextlib
import os
import shutil
import tempfile

import numpy as np

from keras_recurrentgemma.convert import common
from keras_recurrentgemma.convert.huggingface import CONFIG_FILE
from keras_recurrentgemma.convert.huggingface import MODEL_TYPE
from keras_recurrentgemma.convert.huggingface import weight_map
from keras_recurrentgemma.convert.to_transformers_safetensors import SAFETENSORS_DTYPES
from keras_recurrentgemma.convert.to_transformers_safetensors import write_json
from keras_recurrentgemma.convert.to_transformers_safetensors import write_safetensors
from keras_recurrentgemma.convert.to_transformers_tokenizer import tokenizer_files

GENERATION_CONFIG_FILE = "generation_config.json"
# What transformers fixes and our backbone also fixes; written for readers of
# the file (and older transformers), not chosen here.
_FIXED_FIELDS = {
    "hidden_activation": "gelu_pytorch_tanh",
    "num_key_value_heads": 1,
    "attention_bias": False,
    "attention_dropout": 0.0,
    "tie_word_embeddings": True,
    "embeddings_scale_by_sqrt_dim": True,
    "partial_rotary_factor": 0.5,
    "w_init_variance_scale": 0.01,
    "use_cache": True,
}


def export_to_transformers(obj, path, overwrite=False, max_shard_size=5):
    """Writes `obj` as a Hugging Face `transformers` directory at `path`.

    Args:
        obj: a `RecurrentGemmaCausalLM` (model, and its tokenizer if it has a
            preprocessor), `RecurrentGemmaBackbone` (model only),
            `RecurrentGemmaTokenizer` or `RecurrentGemmaCausalLMPreprocessor`
            (tokenizer only).
        path: str or path-like. The directory to create.
        overwrite: bool. Replace `path` if it exists and is not empty.
            Defaults to `False`.
        max_shard_size: float. Largest weights file, in GB (10^9 bytes);
            bigger models are split into shards with an index, as
            `save_pretrained` does. Defaults to `5`.

    Raises:
        ValueError: before anything is written, if `obj` is none of the
            above, the model is one transformers cannot represent (no soft
            cap, unscaled embeddings, an untied head, quantized weights), the
            vocabulary cannot be tokenized the same way by transformers, the
            tokenizer has more ids than the model, or `path` is a file or a
            non-empty directory and `overwrite` is `False`.
    """
    path = os.path.abspath(os.path.expanduser(os.fspath(path)))
    backbone, tokenizer, add_bos, stop_ids = _parts(obj)
    if isinstance(max_shard_size, bool) or not (
        isinstance(max_shard_size, (int, float)) and max_shard_size > 0
    ):
        raise ValueError(
            f"`max_shard_size` must be a positive number of GB; got {max_shard_size!r}."
        )
    _check_target(path, overwrite)
    files = {}
    tensors = None
    if backbone is not None:
        check_representable(backbone)
        tensors = weight_tensors(backbone)
        files[CONFIG_FILE] = huggingface_config(backbone, tokenizer)
    if tokenizer is not None:
        if (
            backbone is not None
            and tokenizer.vocabulary_size() > backbone.vocabulary_size
        ):
            raise ValueError(
                f"The tokenizer has {tokenizer.vocabulary_size()} ids but the model "
                f"only {backbone.vocabulary_size} embeddings."
            )
        files.update(tokenizer_files(tokenizer, add_bos))
        if stop_ids is not None:
            files[GENERATION_CONFIG_FILE] = generation_config(tokenizer, stop_ids)
    with _staged_directory(path, overwrite) as staging:
        for name, content in files.items():
            _write_file(os.path.join(staging, name), content)
        if tensors is not None:
            write_safetensors(tensors, staging, int(max_shard_size * 1e9))


def _parts(obj):
    """`(backbone, tokenizer, add_bos, stop_ids)` of what is exported."""
    from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
    from keras_recurrentgemma.causal_lm import RecurrentGemmaCausalLM
    from keras_recurrentgemma.causal_lm_preprocessor import (
        RecurrentGemmaCausalLMPreprocessor,
    )
    from keras_recurrentgemma.tokenizer import RecurrentGemmaTokenizer

    if isinstance(obj, RecurrentGemmaCausalLM):
        preprocessor = obj.preprocessor
        if preprocessor is None:
            return obj.backbone, None, True, None
        tokenizer = preprocessor.tokenizer
        stop_ids = [tokenizer.end_token_id]
        if getattr(obj, "instruction_tuned", False):
            if tokenizer.end_of_turn_id is None:
                raise ValueError(
                    "instruction_tuned=True but the vocabulary has no <end_of_turn>."
                )
            stop_ids.append(tokenizer.end_of_turn_id)
        return obj.backbone, tokenizer, preprocessor.add_start_token, stop_ids
    if isinstance(obj, RecurrentGemmaBackbone):
        return obj, None, True, None
    if isinstance(obj, RecurrentGemmaCausalLMPreprocessor):
        return None, obj.tokenizer, obj.add_start_token, None
    if isinstance(obj, RecurrentGemmaTokenizer):
        return None, obj, True, None
    raise ValueError(
        "export_to_transformers takes a RecurrentGemmaCausalLM, "
        "RecurrentGemmaBackbone, RecurrentGemmaTokenizer or "
        f"RecurrentGemmaCausalLMPreprocessor; got {type(obj).__name__}."
    )


# --- Model --------------------------------------------------------------------


def check_representable(backbone):
    """Raises `ValueError` for what `RecurrentGemmaForCausalLM` cannot compute.

    transformers always scales the embedding by `bfloat16(sqrt(hidden))`,
    always soft-caps the logits and always ties the output head; its block
    pattern, widths and window can express any backbone we build.
    """
    problems = []
    if not backbone.embeddings_scale_by_sqrt_dim:
        problems.append(
            "embeddings_scale_by_sqrt_dim=False (transformers always scales "
            "the embeddings)"
        )
    if not backbone.logits_soft_cap:
        problems.append(
            f"logits_soft_cap={backbone.logits_soft_cap!r} (transformers always "
            "soft-caps the logits)"
        )
    if not backbone.token_embedding.tie_weights:
        problems.append("an untied output head (transformers ties lm_head)")
    quantized = sorted(
        {
            layer.quantization_mode
            for layer in backbone._flatten_layers(include_self=False)
            if getattr(layer, "quantization_mode", None)
        }
    )
    if quantized:
        problems.append(
            f"{quantized} quantized weights (export the float model, before `quantize`)"
        )
    if problems:
        raise ValueError(
            "This model cannot be exported to transformers' "
            f"RecurrentGemmaForCausalLM: {'; '.join(problems)}."
        )


def huggingface_config(backbone, tokenizer=None):
    """The `config.json` dict of `RecurrentGemmaForCausalLM` for `backbone`."""
    dtype = _weights_dtype(backbone)
    num_layers = len(backbone.block_types)
    theta = float(backbone.rope_max_wavelength)
    config = {
        "architectures": ["RecurrentGemmaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        # transformers holds gate and up side by side: twice our width.
        "intermediate_size": 2 * backbone.intermediate_dim,
        "num_attention_heads": backbone.num_heads,
        "head_dim": backbone.head_dim,
        "num_hidden_layers": num_layers,
        # The whole list: transformers cycles it to num_hidden_layers, which
        # leaves a full-length list as it is.
        "block_types": list(backbone.block_types),
        "lru_width": backbone.lru_width,
        "attention_window_size": backbone.attention_window_size,
        "conv1d_width": backbone.conv1d_temporal_width,
        "logits_soft_cap": float(backbone.logits_soft_cap),
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "rope_theta": theta,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": theta,
            "partial_rotary_factor": 0.5,
        },
        "final_w_init_variance_scale": 2.0 / num_layers,
        "dtype": dtype,
        "torch_dtype": dtype,
        **_FIXED_FIELDS,
    }
    config.update(_token_ids(tokenizer))
    return config


def _token_ids(tokenizer):
    if tokenizer is None:  # transformers' defaults, the official vocabulary's
        return {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}
    return {
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": tokenizer.end_token_id,
        "bos_token_id": tokenizer.start_token_id,
    }


def generation_config(tokenizer, stop_ids):
    """`generation_config.json`: every id `generate` should stop at."""
    ids = _token_ids(tokenizer)
    ids["eos_token_id"] = stop_ids[0] if len(stop_ids) == 1 else list(stop_ids)
    return {**ids, "use_cache": True}


def _weights_dtype(backbone):
    dtypes = {_dtype_name(v) for v in backbone.weights}
    # Mixed precision keeps float32 variables; a model cast to one 16-bit
    # dtype has it everywhere. The RG-LRU state is float32 either way.
    return "float32" if "float32" in dtypes else sorted(dtypes)[0]


def _dtype_name(variable):
    return str(variable.dtype)  # Keras's standard names: "float32", "bfloat16"


def weight_tensors(backbone):
    """`[(HF key, shape, dtype name, read)]` for every tensor to write.

    `read()` returns the tensor as a numpy array in transformers' layout.
    Only shapes and dtypes are looked at here; LoRA kernels are merged
    (`kernel + alpha / rank · A B`, in float32, then cast back) when read.

    Raises:
        ValueError: naming a variable that has no place in the checkpoint,
            or a dtype safetensors cannot hold.
    """
    variables = {v.path: v for v in backbone.weights}
    merged = {}  # kernel path -> its LoRA-enabled Dense layer
    for layer in backbone._flatten_layers(include_self=False):
        if getattr(layer, "lora_enabled", False):
            merged[layer._kernel.path] = layer
            for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
                variables.pop(factor.path)
    tensors = []
    for var_path, key, transform in weight_map(backbone):
        variable = variables.pop(var_path)
        dtype = _dtype_name(variable)
        if dtype not in SAFETENSORS_DTYPES:
            raise ValueError(
                f"Variable `{var_path}` is {dtype}; only {sorted(SAFETENSORS_DTYPES)} "
                "can be exported."
            )
        shape = _hf_shape(tuple(variable.shape), transform)
        layer = merged.get(var_path)

        def read(variable=variable, layer=layer, transform=transform):
            array = _host_array(variable)
            if layer is not None:
                array = _merge_lora(array, layer)
            return _to_huggingface_layout(array, transform)

        tensors.append((key, shape, dtype, read))
    if variables:
        raise ValueError(
            f"Variables {sorted(variables)[:5]} have no tensor in transformers' "
            "RecurrentGemma; this model cannot be exported."
        )
    return tensors


def _host_array(tensor):
    """A variable or backend tensor as a numpy array, bfloat16 kept."""
    from keras import ops

    value = getattr(tensor, "value", tensor)
    if hasattr(value, "detach"):  # torch: numpy() knows no bfloat16
        return common.to_numpy(value)
    return np.asarray(ops.convert_to_numpy(value))


def _merge_lora(kernel, layer):
    a = _host_array(layer.lora_kernel_a).astype(np.float32)
    b = _host_array(layer.lora_kernel_b).astype(np.float32)
    scale = layer.lora_alpha / layer.lora_rank
    return (kernel.astype(np.float32) + scale * (a @ b)).astype(kernel.dtype)


def _hf_shape(shape, transform):
    # "linear": our kernels are `nn.Linear`'s (out, in) already.
    if transform == "conv":  # our (k, l) -> depthwise Conv1d (l, 1, k)
        return (shape[1], 1, shape[0])
    return shape


def _to_huggingface_layout(array, transform):
    if transform == "conv":
        return np.ascontiguousarray(array.T[:, None, :])
    return np.ascontiguousarray(array)


# --- Files ----------------------------------------------------------------------


def _write_file(filename, content):
    if isinstance(content, bytes):
        with open(filename, "wb") as f:
            f.write(content)
    else:
        write_json(filename, content)


def _check_target(path, overwrite):
    if os.path.lexists(path) and not os.path.isdir(path):
        raise ValueError(f"Cannot export to {path!r}: it is a file, not a directory.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(
            f"Cannot export to {path!r}: the directory is not empty. Pass "
            "`overwrite=True` to replace it, or choose a new directory."
        )


@contextlib.contextmanager
def _staged_directory(path, overwrite):
    """Yields a sibling temporary directory that becomes `path` on success.

    On failure (or interruption) it is deleted and `path` is untouched. With
    `overwrite`, the old `path` is moved aside, replaced, then deleted.
    """
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{name}.export-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp's 0700 is not an export's mode
    old = None
    try:
        yield staging
        _check_target(path, overwrite)  # again: it may have appeared meanwhile
        if os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rename(path, os.path.join(old, name))
        os.rename(staging, path)
    except BaseException:
        if old is not None and not os.path.exists(path):
            os.rename(os.path.join(old, name), path)
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
