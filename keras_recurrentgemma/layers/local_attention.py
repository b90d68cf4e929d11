"""Local (sliding-window) multi-query attention."""

from typing import NamedTuple

import keras
from keras import ops

from keras_recurrentgemma.layers.conv1d import document_ids
from keras_recurrentgemma.layers.conv1d import last_real_index
from keras_recurrentgemma.layers.dense import fan_in_dense
from keras_recurrentgemma.layers.stored_config import StoredConfig

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
    """Which keys of a chunk each of its queries may see.

    Query `q` sees key `s` when `s <= q <= s + window_size` (itself and the
    `window_size` tokens before it), both are in the same document, and `s`
    is not padding.

    Args:
        segment_pos: int tensor `[b, t]`; -1 marks padding.
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
    key_is_real = (segment_pos >= 0)[:, None, :]
    return ops.logical_and(ops.logical_and(same_doc, key_is_real), in_window[None])


def cached_keys_mask(segment_pos, cache_positions, window_size):
    """Which cached keys each query of a chunk may see.

    Cached keys belong to the document the cache was left in, which only the
    chunk's tokens before its first reset (document id 0) continue. Query
    position `q` sees a cached key at position `p >= 0` when
    `q - p <= window_size`.

    Args:
        segment_pos: int tensor `[b, t]`, positions of the chunk's tokens.
        cache_positions: int tensor `[b, w]`; -1 marks an empty slot.
        window_size: int.

    Returns:
        bool tensor `[b, t, w]`.
    """
    continues = ops.logical_and(
        ops.equal(document_ids(segment_pos), 0), segment_pos >= 0
    )
    p = cache_positions[:, None, :]
    in_window = ops.logical_and(p >= 0, segment_pos[:, :, None] - p <= window_size)
    return ops.logical_and(continues[:, :, None], in_window)


class AttentionBlockCache(NamedTuple):
    """A ring buffer of the last `attention_window_size` keys and values.

    The token at position `p` lives in slot `p % attention_window_size`, so
    the buffer's size never depends on how many tokens went through it.

    Attributes:
        keys: `[b, w, k]`, keys after RoPE, in the compute dtype.
        values: `[b, w, k]`.
        positions: int32 `[b, w]`, each slot's token position; -1 if empty.
    """

    keys: object
    values: object
    positions: object


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class LocalAttentionBlock(StoredConfig, keras.layers.Layer):
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
        segment_pos: int tensor `[b, t]`; -1 marks padding.
        cache: optional `AttentionBlockCache` that `x` continues; an empty
            one if omitted.

    Returns:
        `(y, cache)`: `y` `[b, t, d]` and the `AttentionBlockCache` after each
        row's last real token.
    """

    CONFIG = (
        "hidden_dim",
        "num_heads",
        "attention_window_size",
        "rope_max_wavelength",
        "final_w_init_variance_scale",
    )

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
        self.store_config(locals())
        self.head_dim = hidden_dim // num_heads

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

    def initial_cache(self, batch_size):
        """The empty `AttentionBlockCache`: every slot at position -1."""
        w, k = self.attention_window_size, self.head_dim
        return AttentionBlockCache(
            keys=ops.zeros((batch_size, w, k), self.compute_dtype),
            values=ops.zeros((batch_size, w, k), self.compute_dtype),
            positions=ops.full((batch_size, w), -1, "int32"),
        )

    def call(self, x, segment_pos, cache=None):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        q = ops.reshape(self.proj_q(x), (b, t, self.num_heads, self.head_dim))
        k = ops.expand_dims(self.proj_k(x), 2)
        v = self.proj_v(x)
        q = apply_rope(q, segment_pos, self.rope_max_wavelength)
        k = apply_rope(k, segment_pos, self.rope_max_wavelength)[:, :, 0]

        keys, values = k, v
        if cache is not None and x.shape[1] == 1:
            return self._step(q, k, v, segment_pos, cache)
        mask = local_attention_mask(segment_pos, self.attention_window_size)
        if cache is not None:
            keys = ops.concatenate([ops.cast(cache.keys, k.dtype), k], axis=1)
            values = ops.concatenate([ops.cast(cache.values, v.dtype), v], axis=1)
            cached = cached_keys_mask(
                segment_pos, cache.positions, self.attention_window_size
            )
            mask = ops.concatenate([cached, mask], axis=-1)

        y = self._attend(q, keys, values, mask)
        return y, self._next_cache(cache, k, v, segment_pos)

    def _attend(self, q, keys, values, mask):
        """`proj_final(softmax(q keysᵀ / sqrt(k) + mask) values)`; `mask`
        `[b, t, s]` over the `s` keys."""
        b, t = ops.shape(q)[0], ops.shape(q)[1]
        # Scaled before the product, which could overflow in float16.
        q = q * ops.cast(self.head_dim**-0.5, q.dtype)
        logits = ops.einsum("btnk,bsk->bnts", q, keys)
        logits = ops.where(mask[:, None], ops.cast(logits, "float32"), _MIN_LOGIT)
        probs = ops.cast(ops.softmax(logits, axis=-1), self.compute_dtype)
        o = ops.einsum("bnts,bsk->btnk", probs, values)
        return self.proj_final(ops.reshape(o, (b, t, self.hidden_dim)))

    def _step(self, q, k, v, segment_pos, cache):
        # One token with a cache (a decode step): what `call` and
        # `_next_cache` give for t = 1, without their `[b, t]` document ids
        # and gathers, which are most of a decode step's ops. The token
        # (position p, -1 if padding) continues the cached document unless
        # it starts one (p = 0), sees itself if real, and goes to slot
        # p mod w.
        w = self.attention_window_size
        keys = ops.cast(cache.keys, k.dtype)
        values = ops.cast(cache.values, v.dtype)
        positions = ops.cast(cache.positions, "int32")
        p = segment_pos  # [b, 1]
        real = p >= 0
        seen = ops.logical_and(positions >= 0, p - positions <= w)
        mask = ops.concatenate([ops.logical_and(p > 0, seen), real], axis=-1)
        y = self._attend(
            q,
            ops.concatenate([keys, k], axis=1),
            ops.concatenate([values, v], axis=1),
            mask[:, None, :],
        )
        slots = ops.arange(w, dtype="int32")[None, :]
        write = ops.logical_and(real, ops.equal(slots, ops.mod(p, w)))
        # A document starting at this token empties the older slots.
        kept = ops.where(ops.equal(p, 0), -1, positions)
        return y, AttentionBlockCache(
            keys=ops.where(write[:, :, None], k, keys),
            values=ops.where(write[:, :, None], v, values),
            positions=ops.where(write, p, kept),
        )

    def _next_cache(self, cache, k, v, segment_pos):
        # Slot s must hold the newest position p ≡ s (mod w) with p <= the
        # row's last position: from this chunk if the token is in it, else
        # kept from the old cache, else (a document started in this chunk)
        # emptied. Gathers, not scatters, so every backend agrees when a
        # chunk is longer than the window.
        w = self.attention_window_size
        b, t, hd = ops.shape(k)[0], ops.shape(k)[1], ops.shape(k)[2]
        last = last_real_index(segment_pos)
        has_real = last >= 0
        last = ops.maximum(last, 0)[:, None]
        last_pos = ops.take_along_axis(segment_pos, last, axis=1)
        slots = ops.arange(w, dtype="int32")[None, :]
        p = last_pos - ops.mod(last_pos - slots, w)
        col = last - (last_pos - p)
        col_c = ops.clip(col, 0, t - 1)
        from_chunk = ops.logical_and(
            ops.logical_and(col >= 0, p >= 0),
            ops.equal(ops.take_along_axis(segment_pos, col_c, axis=1), p),
        )
        from_chunk = ops.logical_and(from_chunk, has_real[:, None])
        # Row `col_c` of each batch row's chunk, taken from the flattened
        # `[b·t, hd]` chunk: an index per slot (`[b·w]`), not one per element
        # as `take_along_axis` would need (`[b, w, hd]`, rebuilt every step).
        rows = ops.reshape(col_c + ops.arange(b, dtype="int32")[:, None] * t, (-1,))

        def slot_rows(x):
            return ops.reshape(ops.take(ops.reshape(x, (-1, hd)), rows, 0), (b, w, hd))

        new_k, new_v = slot_rows(k), slot_rows(v)
        if cache is None:
            cache = self.initial_cache(b)
        # The last token's document started in this chunk: older slots are
        # another document's.
        doc_last = ops.take_along_axis(document_ids(segment_pos), last, axis=1)
        stale = ops.logical_and(doc_last > 0, has_real[:, None])
        keep = ops.logical_not(from_chunk)[:, :, None]
        return AttentionBlockCache(
            keys=ops.where(keep, ops.cast(cache.keys, k.dtype), new_k),
            values=ops.where(keep, ops.cast(cache.values, v.dtype), new_v),
            positions=ops.where(
                from_chunk,
                p,
                ops.where(stale, -1, ops.cast(cache.positions, "int32")),
            ),
        )

    def compute_output_spec(self, x, segment_pos, cache=None):
        b, w, k = x.shape[0], self.attention_window_size, self.head_dim
        return keras.KerasTensor(
            x.shape, dtype=self.compute_dtype
        ), AttentionBlockCache(
            keras.KerasTensor((b, w, k), dtype=self.compute_dtype),
            keras.KerasTensor((b, w, k), dtype=self.compute_dtype),
            keras.KerasTensor((b, w), dtype="int32"),
        )
