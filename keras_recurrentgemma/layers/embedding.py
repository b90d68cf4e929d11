"""The tied token embedding, whose reverse call soft-caps without overflow."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding as KerasHubReversibleEmbedding


# Named like its parent on purpose: Keras files weights under the snake-cased
# class name (`layers/reversible_embedding/vars`), so another name would make
# every saved preset and KerasHub LoRA file unreadable.
@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class ReversibleEmbedding(KerasHubReversibleEmbedding):
    """KerasHub's `ReversibleEmbedding`, with the soft cap taken first.

        logits = tanh((h / cap) Eᵀ) · cap        h: [b, t, d], E: [vocab, d]

    This equals `tanh(h Eᵀ / cap) · cap`, but the division comes before the
    matrix product, so under float16 the product only overflows once a logit
    passes `cap · 65504`, not `65504`; `tanh` and the final product are
    computed in float32. Without a cap, or when quantized, it is the parent
    layer unchanged.
    """

    def call(self, inputs, reverse=False):
        if not reverse or self.logit_soft_cap is None:
            return super().call(inputs, reverse=reverse)
        cap = float(self.logit_soft_cap)
        if self.tie_weights:
            kernel = ops.transpose(self.embeddings)
        else:
            kernel = self.reverse_embeddings
        if self.reverse_dtype is not None:
            inputs = ops.cast(inputs, self.reverse_dtype)
            kernel = ops.cast(kernel, self.reverse_dtype)
        scaled = ops.matmul(inputs / ops.cast(cap, inputs.dtype), kernel)
        logits = ops.tanh(ops.cast(scaled, "float32")) * cap
        return ops.cast(logits, scaled.dtype)
