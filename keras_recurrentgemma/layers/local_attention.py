"""Local (sliding-window) multi-query attention."""

import keras
from keras import ops

from keras_recurrentgemma.layers.conv1d import document_ids
from keras_recurrentgemma.layers.dense import fan_in_dense

# Masked logits take this value, as in the official model; it is finite so a
# fully masked row gives a uniform softmax rather than NaN.
_MIN_LOGIT = -2.3819763e38


def apply_rope(x, positions, max_wavelength=10_000):
    """Rotary embedding on the first half of the last axis (rotate-half form).

    With `x = [x1 | x2 | x_pass]` (`x1`, `x2` each a quarter of `k`),
    `f_i = max_wavelength^(-2i / (k/2))` and `θ = positions · f`:

        [x1 cos θ − x2 sin θ | x2 cos θ + x1 sin θ | x_pass]

    Args:
        x: float tensor `[b, t, n, k]`.
        positions: int tensor `[b, t]`.
        max_wavelength: int. Longest wavelength.

    Returns:
        Tensor like `x`. sin/cos are computed in float32 and cast to x's dtype.
    """
    head_dim = x.shape[-1]
    rope_dim = head_dim // 2
    half = rope_dim // 2
    exponents = 2.0 * ops.arange(half, dtype="float32") / rope_dim
    inv_frequencies = 1.0 / ops.power(float(max_wavelength), exponents)
    theta = ops.cast(positions, "float32")[:, :, None, None] * inv_frequencies
    sin = ops.cast(ops.sin(theta), x.dtype)
    cos = ops.cast(ops.cos(theta), x.dtype)
    x1, x2, x_pass = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    return ops.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, x_pass], axis=-1)


def local_attention_mask(segment_pos, window_size):
    """Which keys each query may see during a full-sequence pass.

    Query `q` sees key `s` when `s <= q <= s + window_size` (itself and the
    `window_size` tokens before it) and both are in the same document.

    Args:
        segment_pos: int tensor `[b, t]`.
        window_size: int.

    Returns:
        bool tensor `[b, t, t]` indexed `[batch, query, key]`.
    """
    t = ops.shape(segment_pos)[1]
    idx = ops.arange(t)
    q_idx, k_idx = idx[:, None], idx[None, :]
    in_window = ops.logical_and(q_idx >= k_idx, q_idx <= k_idx + window_size)
    doc = document_ids(segment_pos)
    same_doc = ops.equal(doc[:, :, None], doc[:, None, :])
    return ops.logical_and(same_doc, in_window[None])


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class LocalAttentionBlock(keras.layers.Layer):
    """Local multi-query attention with one shared key/value head.

        q = x W_q,  k = x W_k,  v = x W_v          (no biases)
        q, k ← RoPE(q, k) at segment_pos           (first half of each head)
        o = softmax(q kᵀ / sqrt(k_dim) + mask) v   (softmax in float32)
        y = o W_final + b_final

    Shapes: `q` `[b, t, n, k]`, `k` and `v` `[b, t, k]` with `n = num_heads`
    and `k = hidden_dim / num_heads`. Each query sees itself and the
    `attention_window_size` keys before it, within its own document.

    Args:
        hidden_dim: int. Model width `d`.
        num_heads: int. Query heads `n`.
        attention_window_size: int. Keys seen before each query.
        rope_max_wavelength: int. Defaults to `10000`.
        final_w_init_variance_scale: float. Init scale of `proj_final`.

    Call arguments:
        x: float tensor `[b, t, d]`.
        segment_pos: int tensor `[b, t]`.

    Returns:
        Tensor `[b, t, d]`.
    """

    def __init__(
        self,
        hidden_dim,
        num_heads,
        attention_window_size,
        rope_max_wavelength=10_000,
        final_w_init_variance_scale=1.0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if hidden_dim % num_heads:
            raise ValueError(
                f"hidden_dim={hidden_dim} is not divisible by num_heads={num_heads}."
            )
        self.hidden_dim = hidden_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.attention_window_size = attention_window_size
        self.rope_max_wavelength = rope_max_wavelength
        self.final_w_init_variance_scale = final_w_init_variance_scale

        policy = self.dtype_policy
        self.proj_q = fan_in_dense(hidden_dim, "proj_q", policy, use_bias=False)
        self.proj_k = fan_in_dense(self.head_dim, "proj_k", policy, use_bias=False)
        self.proj_v = fan_in_dense(self.head_dim, "proj_v", policy, use_bias=False)
        self.proj_final = fan_in_dense(
            hidden_dim, "proj_final", policy, scale=final_w_init_variance_scale
        )

    def build(self, input_shape):
        for layer in (self.proj_q, self.proj_k, self.proj_v):
            layer.build(input_shape)
        self.proj_final.build(input_shape[:-1] + (self.hidden_dim,))
        self.built = True

    def call(self, x, segment_pos):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        q = ops.reshape(self.proj_q(x), (b, t, self.num_heads, self.head_dim))
        k = ops.expand_dims(self.proj_k(x), 2)
        v = self.proj_v(x)
        q = apply_rope(q, segment_pos, self.rope_max_wavelength)
        k = apply_rope(k, segment_pos, self.rope_max_wavelength)[:, :, 0]

        logits = ops.einsum("btnk,bsk->bnts", q, k) * (self.head_dim**-0.5)
        mask = local_attention_mask(segment_pos, self.attention_window_size)
        logits = ops.where(mask[:, None], ops.cast(logits, "float32"), _MIN_LOGIT)
        probs = ops.cast(ops.softmax(logits, axis=-1), self.compute_dtype)
        o = ops.einsum("bnts,bsk->btnk", probs, v)
        return self.proj_final(ops.reshape(o, (b, t, self.hidden_dim)))

    def compute_output_shape(self, x_shape, segment_pos_shape):
        return x_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "num_heads": self.num_heads,
            "attention_window_size": self.attention_window_size,
            "rope_max_wavelength": self.rope_max_wavelength,
            "final_w_init_variance_scale": self.final_w_init_variance_scale,
        }
