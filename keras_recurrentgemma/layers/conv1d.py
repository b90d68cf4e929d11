"""Depthwise temporal convolution that never mixes documents."""

import math

import keras
from keras import ops


def document_ids(segment_pos):
    """Numbers the documents in each row: `cumsum(segment_pos == 0)`.

    Padding before the first document gets 0, so it never shares an id with
    a real token. `segment_pos` `[b, t]` → int32 `[b, t]`.
    """
    return ops.cumsum(ops.cast(ops.equal(segment_pos, 0), "int32"), axis=1)


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class Conv1D(keras.layers.Layer):
    """Causal depthwise convolution over time, with bias.

        y_t = b + Σ_{s=0}^{k-1} w[k-1-s] ⊙ x_{t-s} · [x_{t-s} is in x_t's document]

    `w` is `[k, l]` (`k = temporal_width`), `b` is `[l]`; `w[k-1]` multiplies
    the current token. A term is dropped when `t - s < 0` or when a document
    starts in `(t - s, t]`, so nothing crosses a document boundary or reaches
    into left padding.

    Args:
        temporal_width: int. Kernel length `k`. Defaults to `4`.

    Call arguments:
        x: float tensor `[b, t, l]`.
        segment_pos: int tensor `[b, t]`; 0 starts a document.

    Returns:
        Tensor `[b, t, l]`.
    """

    def __init__(self, temporal_width=4, **kwargs):
        super().__init__(**kwargs)
        self.temporal_width = temporal_width

    def build(self, input_shape):
        width = input_shape[-1]
        self.w = self.add_weight(
            name="w",
            shape=(self.temporal_width, width),
            initializer=keras.initializers.RandomNormal(
                stddev=math.sqrt(0.01 / self.temporal_width)
            ),
        )
        self.b = self.add_weight(name="b", shape=(width,), initializer="zeros")
        self.built = True

    def call(self, x, segment_pos):
        k = self.temporal_width
        b, l = ops.shape(x)[0], ops.shape(x)[2]
        doc = document_ids(segment_pos)
        # Left padding: zeros for x, and a document id (-1) no token has.
        x_pad = ops.concatenate([ops.zeros((b, k - 1, l), x.dtype), x], axis=1)
        doc_pad = ops.concatenate([ops.full((b, k - 1), -1, doc.dtype), doc], axis=1)
        y = ops.zeros_like(x) + self.b
        for s in range(k):
            stop = -s if s else None
            x_s = x_pad[:, k - 1 - s : stop]
            same_doc = ops.equal(doc_pad[:, k - 1 - s : stop], doc)
            term = x_s * self.w[k - 1 - s]
            y = y + ops.where(ops.expand_dims(same_doc, -1), term, 0.0)
        return y

    def compute_output_shape(self, x_shape, segment_pos_shape):
        return x_shape

    def get_config(self):
        return {**super().get_config(), "temporal_width": self.temporal_width}
