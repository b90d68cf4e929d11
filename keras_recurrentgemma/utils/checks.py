"""Input checks that raise a clear error eagerly and inside compiled graphs.

A bad token id must never become a silent wrong answer: `take` on JAX fills
out-of-range rows with NaN, and on GPU TensorFlow returns zeros. The value
checks here run wherever the model runs: on concrete tensors they raise
`ValueError` at once; inside `jax.jit` a host callback raises the same
message; inside `tf.function` a `tf.debugging` assertion does. This is the
one module that looks at the backend for checks, so layers never do.
"""

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


def check_token_ids(token_ids, vocabulary_size):
    """`check_in_range` for token ids, with the one message every caller uses."""
    return check_in_range(
        token_ids,
        0,
        vocabulary_size,
        "`token_ids` contains id {bad}, outside [0, vocabulary_size="
        f"{vocabulary_size}).",
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
