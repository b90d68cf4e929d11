"""RMS normalisation in the `(1 + scale)` form."""

import keras
from keras import ops

from keras_recurrentgemma.ops.remat import remat_function


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RMSNormalization(keras.layers.Layer):
    """Root-mean-square normalisation with a zero-initialised scale.

        y = x / sqrt(mean(x², -1) + ε) ⊙ (1 + scale)

    The statistics are computed in float32 whatever the compute dtype, and
    the result is cast to the compute dtype, so bfloat16 and float16 stay
    accurate and a float32 input larger than float16's range is normalised
    before it is rounded.

    A 16-bit `x` is kept for the backward pass as it is, not as its float32
    copy: the arithmetic is recomputed from it (`ops.remat.remat_function`;
    the 2B's LoRA step kept 260 MiB of float32 inputs at 512 tokens).
    `rematerialise` (an attribute, not saved) turns that off.

    Args:
        epsilon: float. Added to the mean square. Defaults to `1e-6`.

    Call arguments:
        x: float tensor `[..., d]`.

    Returns:
        Tensor of the same shape and compute dtype as `x`.
    """

    def __init__(self, epsilon=1e-6, **kwargs):
        # Inputs are not autocast: a float32 residual stream (see
        # `residual_stream_dtype`) would overflow if rounded to float16 here.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.epsilon = epsilon
        self.rematerialise = True

    def build(self, input_shape):
        self.scale = self.add_weight(
            name="scale", shape=(input_shape[-1],), initializer="zeros"
        )
        self.built = True

    def call(self, x):
        scale = ops.convert_to_tensor(self.scale)
        if self.rematerialise and keras.backend.standardize_dtype(x.dtype) in (
            "bfloat16",
            "float16",
        ):
            return remat_function(self._normalize, (x, scale))
        return self._normalize(x, scale)

    def _normalize(self, x, scale):
        x32 = ops.cast(x, "float32")
        mean_square = ops.mean(ops.square(x32), axis=-1, keepdims=True)
        y = x32 * ops.rsqrt(mean_square + self.epsilon)
        y = y * (1.0 + ops.cast(scale, "float32"))
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
