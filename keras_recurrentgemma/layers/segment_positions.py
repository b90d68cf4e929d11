"""Validates the backbone's inputs and derives each token's document position."""

import keras
from keras import ops

from keras_recurrentgemma.utils.checks import check_no_padding_gaps
from keras_recurrentgemma.utils.checks import check_same_shape
from keras_recurrentgemma.utils.checks import check_token_ids


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class SegmentPositions(keras.layers.Layer):
    """Turns `(token_ids, padding_mask, segment_pos)` into checked positions.

        segment_pos = padding_mask ? (given segment_pos or cumsum(mask) − 1) : −1

    Position 0 starts a document: the RG-LRU state and the Conv1D window
    reset there, and attention does not cross it. Padding gets −1 and starts
    nothing, so left-padded rows match the unpadded prompt. Padding between
    two tokens of one document is refused (`ValueError`): the Conv1D window
    would read the gap as zeros.

    Args:
        vocabulary_size: int. Token ids must lie in `[0, vocabulary_size)`.

    Call arguments:
        token_ids: int tensor `[b, t]`.
        padding_mask: int or bool tensor `[b, t]`; 1 for real tokens.
        segment_pos: optional int tensor `[b, t]` for packed sequences
            (several documents per row); each document counts from 0.

    Returns:
        `(token_ids, segment_pos)`: the ids, passed through once checked, so
        that layers fed from them run after the check; int32 `[b, t]`.
    """

    def __init__(self, vocabulary_size, **kwargs):
        # Any dtype policy works: the layer holds no weights, Keras never
        # casts int inputs, and both outputs are int32. Taking the model's
        # policy keeps every sublayer on it, as KerasHub's harness checks.
        super().__init__(**kwargs)
        self.vocabulary_size = vocabulary_size

    def call(self, token_ids, padding_mask, segment_pos=None):
        check_same_shape(token_ids, padding_mask, "token_ids", "padding_mask")
        token_ids = check_token_ids(token_ids, self.vocabulary_size)
        mask = ops.cast(padding_mask, "bool")
        if segment_pos is None:
            segment_pos = ops.cumsum(ops.cast(mask, "int32"), axis=1) - 1
        else:
            check_same_shape(token_ids, segment_pos, "token_ids", "segment_pos")
        segment_pos = ops.where(mask, ops.cast(segment_pos, "int32"), -1)
        # Zeros when the check passes; added so graphs run the check first.
        gaps = check_no_padding_gaps(segment_pos)
        return token_ids, segment_pos + gaps[:, None]

    def compute_output_spec(self, token_ids, padding_mask, segment_pos=None):
        return (
            keras.KerasTensor(token_ids.shape, dtype=token_ids.dtype),
            keras.KerasTensor(token_ids.shape, dtype="int32"),
        )

    def get_config(self):
        return {**super().get_config(), "vocabulary_size": self.vocabulary_size}
