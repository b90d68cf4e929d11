"""Block-diagonal linear map used by the RG-LRU gates."""

import math

import keras
from keras import ops

from keras_recurrentgemma.layers.initialization import initializer


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class BlockDiagonalLinear(keras.layers.Layer):
    """Affine map whose weight is block-diagonal with `num_blocks` blocks.

        y[..., h, j] = Σ_i x[..., h, i] · w[h, i, j] + b[h, j]

    Shapes: `w` is `[h, i, j]` and `b` is `[h, j]` with `i = j = l / h`.

    Args:
        num_blocks: int. Number of diagonal blocks `h`; must divide the input
            width `l`.

    Call arguments:
        x: float tensor `[b, t, l]`.

    Returns:
        Tensor `[b, t, l]`.
    """

    def __init__(self, num_blocks, **kwargs):
        super().__init__(**kwargs)
        self.num_blocks = num_blocks

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_blocks:
            raise ValueError(
                f"`{self.name}`: input width {width} is not divisible by "
                f"num_blocks={self.num_blocks}."
            )
        self.block_width = width // self.num_blocks
        self.w = self.add_weight(
            name="w",
            shape=(self.num_blocks, self.block_width, self.block_width),
            initializer=initializer(
                keras.initializers.RandomNormal(
                    stddev=1.0 / math.sqrt(self.block_width)
                )
            ),
        )
        self.b = self.add_weight(
            name="b",
            shape=(self.num_blocks, self.block_width),
            initializer="zeros",
        )
        self.built = True

    def call(self, x):
        b, t = ops.shape(x)[0], ops.shape(x)[1]
        x = ops.reshape(x, (b, t, self.num_blocks, self.block_width))
        y = ops.einsum("bthi,hij->bthj", x, self.w) + self.b
        return ops.reshape(y, (b, t, self.num_blocks * self.block_width))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "num_blocks": self.num_blocks}
