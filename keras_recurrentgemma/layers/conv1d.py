"""Depthwise temporal convolution that never mixes documents."""

import math

import keras
from keras import ops

from keras_recurrentgemma.layers.initialization import initializer


def document_ids(segment_pos):
    """Numbers the documents in each row: `cumsum(segment_pos == 0)`.

    Tokens before the row's first `segment_pos == 0` get 0: in a full pass
    they are left padding; with a cache they continue the cached document.
    `segment_pos` `[b, t]` → int32 `[b, t]`.
    """
    return ops.cumsum(ops.cast(ops.equal(segment_pos, 0), "int32"), axis=1)


def last_real_index(segment_pos):
    """Index of each row's last real token (`segment_pos >= 0`), or -1.

    `segment_pos` `[b, t]` → int32 `[b]`.
    """
    t = ops.shape(segment_pos)[1]
    idx = ops.arange(t, dtype="int32")[None, :]
    return ops.max(ops.where(segment_pos >= 0, idx, -1), axis=1)


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class Conv1D(keras.layers.Layer):
    """Causal depthwise convolution over time, with bias.

        y_t = b + Σ_{s=0}^{k-1} w[k-1-s] ⊙ x_{t-s} · [x_{t-s} is in x_t's document]

    `w` is `[k, l]` (`k = temporal_width`), `b` is `[l]`; `w[k-1]` multiplies
    the current token. A term is dropped when `t - s < 0` or when a document
    starts in `(t - s, t]`, so nothing crosses a document boundary or reaches
    into left padding.

    The state is the window's memory: the last `k - 1` real inputs, oldest
    first, zeroed where they lie before the current document. Given a state,
    `x` continues it (the state plays the role of `x_{-k+1} … x_{-1}`).
    Padding (`segment_pos == -1`) must come after a row's real tokens, or
    before a document start; it never enters the state.

    Args:
        temporal_width: int. Kernel length `k`. Defaults to `4`.

    Call arguments:
        x: float tensor `[b, t, l]`.
        segment_pos: int tensor `[b, t]`; 0 starts a document, -1 is padding.
        state: optional tensor `[b, k-1, l]`; zeros (an empty window) if
            omitted.

    Returns:
        `(y, state)`: `y` `[b, t, l]` and the new state `[b, k-1, l]`.
    """

    def __init__(self, temporal_width=4, **kwargs):
        super().__init__(**kwargs)
        if temporal_width < 1:
            raise ValueError(f"temporal_width must be >= 1; got {temporal_width}.")
        self.temporal_width = temporal_width

    def build(self, input_shape):
        width = input_shape[-1]
        self.w = self.add_weight(
            name="w",
            shape=(self.temporal_width, width),
            initializer=initializer(
                keras.initializers.RandomNormal(
                    stddev=math.sqrt(0.01 / self.temporal_width)
                )
            ),
        )
        self.b = self.add_weight(name="b", shape=(width,), initializer="zeros")
        self.built = True

    def initial_state(self, batch_size, width):
        return ops.zeros(
            (batch_size, self.temporal_width - 1, width), self.compute_dtype
        )

    def call(self, x, segment_pos, state=None):
        k = self.temporal_width
        b, l = ops.shape(x)[0], ops.shape(x)[2]
        if state is None:
            state = self.initial_state(b, l)
        state = ops.cast(state, x.dtype)
        if x.shape[1] == 1:
            return self._step(x, segment_pos, state)
        # The state continues document 0, the id `document_ids` gives the
        # tokens before the chunk's first reset. An empty state is zeros, so
        # its document id is irrelevant.
        doc = document_ids(segment_pos)
        x_ext = ops.concatenate([state, x], axis=1)
        doc_ext = ops.concatenate([ops.zeros((b, k - 1), doc.dtype), doc], axis=1)
        y = ops.zeros_like(x) + self.b
        for s in range(k):
            stop = -s if s else None
            x_s = x_ext[:, k - 1 - s : stop]
            same_doc = ops.equal(doc_ext[:, k - 1 - s : stop], doc)
            term = x_s * self.w[k - 1 - s]
            y = y + ops.where(ops.expand_dims(same_doc, -1), term, 0.0)
        return y, self._next_state(x_ext, doc_ext, segment_pos)

    def _step(self, x, segment_pos, state):
        # One token (a decode step): the same sums in the same order as the
        # chunk path, without its `[b, t]` document ids and gathers, which
        # are most of a decode step's ops. The state continues the token's
        # document unless the token starts one (position 0).
        k = self.temporal_width
        continues = ops.not_equal(segment_pos, 0)[:, :, None]
        y = x * self.w[k - 1] + self.b
        for s in range(1, k):
            term = state[:, k - 1 - s : k - s] * self.w[k - 1 - s]
            y = y + ops.where(continues, term, 0.0)
        if k == 1:
            return y, state
        kept = ops.where(continues, state[:, 1:], ops.zeros_like(state[:, 1:]))
        shifted = ops.concatenate([kept, x], axis=1)
        # Padding (position -1) leaves the window as it was.
        return y, ops.where((segment_pos >= 0)[:, :, None], shifted, state)

    def _next_state(self, x_ext, doc_ext, segment_pos):
        # The window after the last real token: x_ext[last - k + 2 .. last].
        # A row with no real token keeps its state (last = k - 2).
        k = self.temporal_width
        if k == 1:
            return x_ext[:, :0]
        b, l = ops.shape(x_ext)[0], ops.shape(x_ext)[2]
        last = last_real_index(segment_pos) + (k - 1)
        idx = last[:, None] + ops.arange(-(k - 2), 1, dtype="int32")[None, :]
        real_ext = ops.concatenate(
            [ops.ones((b, k - 1), "bool"), segment_pos >= 0], axis=1
        )
        doc_last = ops.take_along_axis(doc_ext, last[:, None], axis=1)
        keep = ops.logical_and(
            ops.take_along_axis(real_ext, idx, axis=1),
            ops.equal(ops.take_along_axis(doc_ext, idx, axis=1), doc_last),
        )
        window = ops.take_along_axis(
            x_ext, ops.broadcast_to(idx[:, :, None], (b, k - 1, l)), axis=1
        )
        return ops.where(keep[:, :, None], window, ops.zeros_like(window))

    def compute_output_spec(self, x, segment_pos, state=None):
        state_shape = (x.shape[0], self.temporal_width - 1, x.shape[-1])
        return (
            keras.KerasTensor(x.shape, dtype=self.compute_dtype),
            keras.KerasTensor(state_shape, dtype=self.compute_dtype),
        )

    def get_config(self):
        return {**super().get_config(), "temporal_width": self.temporal_width}
