"""The tied token embedding, whose reverse call soft-caps without overflow."""

import keras
from keras import ops
from keras_hub.layers import ReversibleEmbedding as KerasHubReversibleEmbedding

from keras_recurrentgemma.ops.xla_cpu import matmul_transposed
from keras_recurrentgemma.ops.xla_cpu import take_rows


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
    layer's. The lookup and the logits go through `ops.xla_cpu`, which on
    JAX on a CPU keeps XLA from a float32 copy of a bfloat16 table.
    """

    def call(self, inputs, reverse=False):
        if not reverse and not self.mask_zero:
            # Keras's lookup, through `take_rows`: on XLA's CPU no float32
            # copy of a bfloat16 table.
            if keras.backend.standardize_dtype(inputs.dtype) not in ("int32", "int64"):
                inputs = ops.cast(inputs, "int32")
            rows = take_rows(self.embeddings, inputs)
            return ops.cast(rows, self.compute_dtype)
        if not reverse or self.logit_soft_cap is None:
            return super().call(inputs, reverse=reverse)
        cap = float(self.logit_soft_cap)
        if self.tie_weights:
            table = self.embeddings  # [vocab, d]
        else:
            table = ops.transpose(self.reverse_embeddings)
        if self.reverse_dtype is not None:
            inputs = ops.cast(inputs, self.reverse_dtype)
            table = ops.cast(table, self.reverse_dtype)
        # `matmul_transposed`: no float32 copy of the table on XLA's CPU.
        scaled = matmul_transposed(inputs / ops.cast(cap, inputs.dtype), table)
        logits = ops.tanh(ops.cast(scaled, "float32")) * cap
        return ops.cast(logits, scaled.dtype)
