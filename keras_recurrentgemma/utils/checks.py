"""Input checks that raise a clear error eagerly and inside compiled graphs.

A bad token id must never become a silent wrong answer: `take` on JAX fills
out-of-range rows with NaN, and on GPU TensorFlow returns zeros. The value
checks here run wherever the model runs: on concrete tensors they raise
`ValueError` at once; inside `jax.jit` a host callback raises the same
message; inside `tf.function` a `tf.debugging` assertion does. This is the
one module that looks at the backend for checks, so layers never do.

`check_backbone_config` checks a config read from a file before any layer
is built from it.
"""

import math
import numbers

import keras
import numpy as np
from keras import ops


def _backend():
    return keras.config.backend()


def _is_traced(x):
    if _backend() == "jax":
        import jax

        return isinstance(x, jax.core.Tracer)
    if _backend() == "tensorflow":
        import tensorflow as tf

        return not tf.executing_eagerly()
    if _backend() == "torch":
        import torch

        return torch.compiler.is_compiling()
    return False


def check_in_range(values, low, high, message):
    """Raises `ValueError(message.format(bad=...))` unless low <= values < high.

    `message` is formatted with `bad`, the offending extreme value. Returns
    `values`; use the returned tensor downstream, so that inside a graph
    the check runs before anything that consumes the values.
    """
    if _static_size(values) == 0:
        # Nothing can be out of range, and `min` of nothing fails on every
        # backend.
        return values
    lo = ops.min(values)
    hi = ops.max(values)

    def raise_if_bad(lo, hi):
        lo, hi = int(np.asarray(lo)), int(np.asarray(hi))
        if lo < low:
            raise ValueError(message.format(bad=lo))
        if hi >= high:
            raise ValueError(message.format(bad=hi))

    if not _is_traced(values):
        raise_if_bad(ops.convert_to_numpy(lo), ops.convert_to_numpy(hi))
        return values
    if _backend() == "jax":
        import jax

        jax.debug.callback(raise_if_bad, lo, hi)
        return values
    if _backend() == "tensorflow":
        import tensorflow as tf

        text = message.format(bad="(see values)")
        checks = [
            tf.debugging.assert_greater_equal(lo, tf.cast(low, lo.dtype), message=text),
            tf.debugging.assert_less(hi, tf.cast(high, hi.dtype), message=text),
        ]
        # Graph ops run in dependency order, not program order: without this
        # a gather on the bad ids could fail first with a less useful error.
        with tf.control_dependencies(checks):
            return tf.identity(values)
    return values


def _static_size(x):
    """The number of elements if every dimension is known, else `None`."""
    shape = tuple(x.shape)
    if any(d is None for d in shape):
        return None
    return math.prod(shape)


def check_token_ids(token_ids, vocabulary_size):
    """`check_in_range` for token ids, with the one message every caller uses.

    Also refuses, by their static shape, ids that are not `[batch, length]`
    or that hold no token: the blocks index the time axis and reduce over
    the batch, which fails deep inside each backend otherwise.
    """
    if not hasattr(token_ids, "shape"):
        token_ids = ops.convert_to_tensor(token_ids)
    shape = tuple(token_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"`token_ids` must be [batch, length]; got shape {shape}.")
    if _static_size(token_ids) == 0:
        raise ValueError(
            f"`token_ids` has shape {shape}: an empty batch or no tokens. "
            "Pass at least one row of at least one token."
        )
    return check_in_range(
        token_ids,
        0,
        vocabulary_size,
        "`token_ids` contains id {bad}, outside [0, vocabulary_size="
        f"{vocabulary_size}).",
    )


def check_no_padding_gaps(segment_pos):
    """Raises unless padding lies where the blocks can skip it.

    Padding (`segment_pos == -1`) may precede a row's tokens, follow them,
    or come just before a document start (`segment_pos == 0`). Between two
    tokens of one document it would be wrong silently: the Conv1D window
    would count the gap as zeros instead of reaching the earlier tokens.

    Args:
        segment_pos: int `[b, t]`, as `SegmentPositions` returns it.

    Returns:
        The per-row count of such gaps (zeros); inside a graph, use it
        downstream so the check runs first.
    """
    resumes = ops.logical_and(segment_pos[:, 1:] > 0, segment_pos[:, :-1] < 0)
    return check_in_range(
        ops.sum(ops.cast(resumes, "int32"), axis=1),
        0,
        1,
        "`padding_mask` has padding between tokens of one document (a row "
        "has {bad} such gaps); pad on the left or the right only, or start a "
        "document (`segment_pos` 0) right after the padding.",
    )


def check_same_shape(a, b, a_name, b_name):
    """Raises `ValueError` naming both tensors when their shapes differ."""
    a_shape, b_shape = tuple(a.shape), tuple(b.shape)
    known = all(d is not None for d in a_shape + b_shape)
    if known:
        if a_shape != b_shape:
            raise ValueError(
                f"`{b_name}` has shape {b_shape} but `{a_name}` has shape "
                f"{a_shape}; they must be equal."
            )
    elif _backend() == "tensorflow" and _is_traced(a):
        import tensorflow as tf

        tf.debugging.assert_equal(
            tf.shape(a),
            tf.shape(b),
            message=f"`{b_name}` and `{a_name}` must have the same shape.",
        )


_REQUIRED_BACKBONE_ARGS = (
    "vocabulary_size",
    "hidden_dim",
    "intermediate_dim",
    "num_heads",
    "block_types",
)
_POSITIVE_INT_ARGS = (
    "vocabulary_size",
    "hidden_dim",
    "intermediate_dim",
    "num_heads",
    "lru_width",
    "attention_window_size",
    "conv1d_temporal_width",
)
_BOOL_ARGS = ("embeddings_scale_by_sqrt_dim", "remat")


def _is_int(value):
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value):
    return (
        isinstance(value, numbers.Real)
        and not isinstance(value, bool)
        and math.isfinite(value)
    )


def check_backbone_config(config):
    """Raises `ValueError` naming the first bad field of a backbone config.

    A config read from a file (a preset's `config.json`, a converted
    checkpoint's) can hold anything; a wrong type or a non-positive size
    would otherwise fail far inside Keras (`math domain error`, division by
    zero) or build a model that cannot run. Checks types and ranges only:
    how the fields relate (divisibility, known block types) is the
    backbone's own check.

    Args:
        config: dict of `RecurrentGemmaBackbone` arguments.
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"A backbone config must be a JSON object; got {type(config).__name__}."
        )
    for name in _REQUIRED_BACKBONE_ARGS:
        if name not in config:
            raise ValueError(f"The backbone config lacks `{name}`.")
    for name in _POSITIVE_INT_ARGS:
        value = config.get(name)
        if name == "lru_width" and value is None:
            continue
        if name in config and not (_is_int(value) and value > 0):
            raise ValueError(f"`{name}` must be a positive int; got {value!r}.")
    block_types = config["block_types"]
    if not isinstance(block_types, (list, tuple)) or not all(
        isinstance(b, str) for b in block_types
    ):
        raise ValueError(
            "`block_types` must be a list of 'recurrent' and 'attention'; got "
            f"{block_types!r}."
        )
    cap = config.get("logits_soft_cap")
    if cap is not None and not (_is_real(cap) and cap >= 0):
        raise ValueError(
            f"`logits_soft_cap` must be a non-negative number or null; got {cap!r}."
        )
    epsilon = config.get("layer_norm_epsilon", 1e-6)
    if not (_is_real(epsilon) and epsilon >= 0):
        raise ValueError(
            f"`layer_norm_epsilon` must be a non-negative number; got {epsilon!r}."
        )
    wavelength = config.get("rope_max_wavelength", 10_000)
    if not (_is_real(wavelength) and wavelength > 0):
        raise ValueError(
            f"`rope_max_wavelength` must be a positive number; got {wavelength!r}."
        )
    for name in _BOOL_ARGS:
        if name in config and not isinstance(config[name], bool):
            raise ValueError(f"`{name}` must be true or false; got {config[name]!r}.")
    scan = config.get("scan_implementation", "auto")
    if not isinstance(scan, str):
        raise ValueError(f"`scan_implementation` must be a string; got {scan!r}.")
    dtype = config.get("dtype")
    if dtype is not None and not isinstance(dtype, (str, dict)):
        raise ValueError(
            "`dtype` must be a dtype policy name or a serialized policy; got "
            f"{dtype!r}."
        )
    if isinstance(dtype, dict):
        # Keras turns an unknown class into "float32" without a word.
        module, name = str(dtype.get("module")), dtype.get("class_name")
        if module.split(".")[0] != "keras" or "DTypePolicy" not in str(name):
            raise ValueError(
                f"`dtype` must be a serialized Keras dtype policy; got `{name}` "
                f"from module `{module}`."
            )
