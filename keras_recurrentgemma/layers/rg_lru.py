"""Real-Gated Linear Recurrent Unit (RG-LRU), the recurrence of Griffin."""

import keras
from keras import ops

from keras_recurrentgemma.layers.block_diagonal_linear import BlockDiagonalLinear
from keras_recurrentgemma.layers.initialization import initializer
from keras_recurrentgemma.ops import rg_lru


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RingInitializer(keras.initializers.Initializer):
    """Draws `a_param` so that `a = exp(-softplus(a_param))` lies on a ring.

    `a²` is uniform in `[min_rad², max_rad²]`, then the softplus is inverted.
    """

    def __init__(self, min_rad=0.9, max_rad=0.999, seed=None):
        self.min_rad = min_rad
        self.max_rad = max_rad
        self.seed = seed

    def __call__(self, shape, dtype=None):
        u = keras.random.uniform(shape, seed=self.seed, dtype="float32")
        log_a = 0.5 * ops.log(
            u * (self.max_rad**2 - self.min_rad**2) + self.min_rad**2 + 1e-8
        )
        return ops.cast(ops.log(ops.expm1(-log_a)), dtype or "float32")

    def get_config(self):
        return {"min_rad": self.min_rad, "max_rad": self.max_rad, "seed": self.seed}


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RGLRU(keras.layers.Layer):
    """Real-Gated Linear Recurrent Unit.

        i_t = σ(W_x x_t + b_x)                  input gate   (`input_gate`)
        r_t = σ(W_a x_t + b_a)                  a gate       (`a_gate`)
        log a_t = -8 · r_t · softplus(Λ)        Λ = `a_param`
        h_t = a_t ⊙ h_{t-1} + sqrt(1 − a_t²) ⊙ (i_t ⊙ x_t)

    Both gates are block-diagonal with `num_heads` blocks. Where a document
    starts (`segment_pos == 0`) the state is reset: `a_t` is set to 0 and the
    `sqrt(1 − a_t²)` factor to 1. Padding (`segment_pos == -1`) leaves the
    state as it is (`a_t = 1`, input 0), so a right-padded row ends with the
    state of its last real token. The gates, `a_t`, the normalisation and the
    recurrence are computed in float32 whatever the compute dtype; `sqrt`
    has its gradient capped at 1000 as in the official model.

    A call without `h0` (a training pass) recomputes the float32 gates and
    recurrence in the backward pass instead of keeping them (`rg_lru`'s
    `rematerialise`): they were the largest part of what a training step
    keeps. `rematerialise` (an attribute, not saved) turns that off; the
    residual block does so when it rematerialises itself whole.

    Args:
        num_heads: int. Number of diagonal blocks in each gate.
        scan_implementation: str. Passed to `ops.rg_lru` (see `rg_lru_scan`
            for the names); `"auto"` picks the fastest path for the backend
            and device, and `"pallas"` computes the gates inside its kernel.

    Call arguments:
        x: float tensor `[b, t, l]`.
        segment_pos: int tensor `[b, t]`, position of each token in its
            document; 0 starts a document, -1 marks padding.
        h0: optional float tensor `[b, l]`, the state carried in.

    Returns:
        `(y, h_last)`: `y` `[b, t, l]` in the compute dtype, and `h_last`
        float32 `[b, l]`.
    """

    def __init__(self, num_heads, scan_implementation="auto", **kwargs):
        # Not autocast, so that `h0` arrives in float32 (see RecurrentBlock).
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.num_heads = num_heads
        self.scan_implementation = scan_implementation
        self.rematerialise = True
        self.input_gate = BlockDiagonalLinear(
            num_heads, dtype=self.dtype_policy, name="input_gate"
        )
        self.a_gate = BlockDiagonalLinear(
            num_heads, dtype=self.dtype_policy, name="a_gate"
        )

    def build(self, input_shape):
        self.a_param = self.add_weight(
            name="a_param",
            shape=(input_shape[-1],),
            initializer=initializer(RingInitializer()),
        )
        self.input_gate.build(input_shape)
        self.a_gate.build(input_shape)
        self.built = True

    def call(self, x, segment_pos, h0=None):
        # The gate arithmetic runs inside `rg_lru`, in the scan kernel where
        # one fuses it. A call without `h0` (training) keeps only its inputs
        # for the backward pass, unless the residual block around it is
        # rematerialised whole.
        y, h_last = rg_lru(
            x,
            self.input_gate(x),
            self.a_gate(x),
            self.a_param,
            segment_pos,
            h0,
            implementation=self.scan_implementation,
            rematerialise=self.rematerialise,
        )
        return ops.cast(y, self.compute_dtype), h_last

    def compute_output_spec(self, x, segment_pos, h0=None):
        y = keras.KerasTensor(x.shape, dtype=self.compute_dtype)
        h_last = keras.KerasTensor((x.shape[0], x.shape[-1]), dtype="float32")
        return y, h_last

    def get_config(self):
        return {
            **super().get_config(),
            "num_heads": self.num_heads,
            "scan_implementation": self.scan_implementation,
        }
