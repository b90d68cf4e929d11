"""Checks of generation inputs, raising a clear error before any compiled
code runs (XLA drops TensorFlow's assertion ops, so checks inside a
compiled `generate_step` could vanish)."""

import numbers

import numpy as np
from keras import ops

from keras_recurrentgemma.utils.checks import check_in_range


def right_padded_lengths(padding_mask, name="padding_mask"):
    """Row lengths `[b]` of a right-padded mask; raises if real tokens have
    gaps (also inside compiled code, through `check_in_range`)."""
    mask = ops.cast(padding_mask, "int32")
    t = ops.shape(mask)[1]
    lengths = ops.sum(mask, axis=1)
    prefix = ops.cast(ops.arange(t)[None, :] < lengths[:, None], "int32")
    gaps = ops.sum(ops.abs(mask - prefix), axis=1)
    check_in_range(
        gaps,
        0,
        1,
        f"`{name}` must be right padded (each row's real tokens first, then "
        "padding); a row has {bad} positions out of order.",
    )
    return lengths


def check_prompts(inputs, vocabulary_size):
    """Eager checks of a `generate` batch (`token_ids`, `padding_mask`), on
    concrete arrays on every backend."""
    if not isinstance(inputs, dict) or not {"token_ids", "padding_mask"} <= set(inputs):
        raise ValueError(
            "Without a preprocessor, `generate` takes a dict with `token_ids` "
            f"and `padding_mask`; got {type(inputs).__name__}."
        )
    token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
    mask = np.asarray(ops.convert_to_numpy(inputs["padding_mask"])).astype(bool)
    if token_ids.ndim != 2 or token_ids.shape != mask.shape:
        raise ValueError(
            f"`token_ids` {token_ids.shape} and `padding_mask` {mask.shape} must "
            "both be [batch, max_length]."
        )
    if token_ids.shape[0] == 0:
        raise ValueError("`generate` got an empty batch of prompts.")
    if token_ids.dtype.kind not in "iu":
        raise TypeError(f"`token_ids` must be integers; got dtype {token_ids.dtype}.")
    real = token_ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocabulary_size):
        bad = real.min() if real.min() < 0 else real.max()
        raise ValueError(
            f"`token_ids` contains id {bad}, outside [0, vocabulary_size="
            f"{vocabulary_size})."
        )
    lengths = mask.sum(axis=1)
    if np.any(lengths == 0):
        raise ValueError(
            f"Prompt {int(np.argmin(lengths))} has no tokens; every prompt needs "
            "at least one (the preprocessor adds <bos>)."
        )
    prefix = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if np.any(mask != prefix):
        raise ValueError(
            "`padding_mask` must be right padded (each row's real tokens first, "
            f"then padding); row {int(np.argmax(np.any(mask != prefix, 1)))} is not."
        )


def check_max_length(max_length):
    """`None` or a positive int (`TypeError` for a non-int)."""
    if max_length is None:
        return
    if isinstance(max_length, bool) or not isinstance(max_length, numbers.Integral):
        raise TypeError(
            f"`max_length` must be a positive int; got {max_length!r} "
            f"({type(max_length).__name__})."
        )
    if max_length <= 0:
        raise ValueError(f"`max_length` must be a positive int; got {max_length}.")


def check_stop_token_ids(stop_token_ids, vocabulary_size):
    """A tuple of in-range int ids; one int is accepted as a 1-tuple."""
    if isinstance(stop_token_ids, numbers.Integral):
        stop_token_ids = (stop_token_ids,)
    try:
        ids = tuple(stop_token_ids)
    except TypeError:
        ids = None
    if ids is None or not all(
        isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids
    ):
        raise TypeError(
            '`stop_token_ids` must be "auto", None or a tuple of int ids; '
            f"got {stop_token_ids!r}."
        )
    bad = [int(i) for i in ids if not 0 <= i < vocabulary_size]
    if bad:
        # Such an id can never be sampled, so generation would silently run
        # to `max_length`.
        raise ValueError(
            f"`stop_token_ids` contains id {bad[0]}, outside "
            f"[0, vocabulary_size={vocabulary_size})."
        )
    return tuple(int(i) for i in ids)


def check_chunk_size(chunk_size):
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
        raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size!r}.")
    if chunk_size <= 0:
        raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size}.")


def check_prefill_buffer(token_ids, padding_mask):
    """Shapes of a whole input to `prefill(chunk_size=...)`; its mask is
    checked whole, since a row may not restart in a later chunk."""
    shape = tuple(token_ids.shape)
    if len(shape) != 2:
        raise ValueError(f"`token_ids` must be [batch, length]; got shape {shape}.")
    if padding_mask is not None:
        if tuple(padding_mask.shape) != shape:
            raise ValueError(
                f"`padding_mask` {tuple(padding_mask.shape)} must have the "
                f"shape of `token_ids` {shape}."
            )
        right_padded_lengths(padding_mask)
    return shape
