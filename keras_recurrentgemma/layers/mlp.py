"""Gated MLP (GeGLU with tanh-approximate GELU)."""

import keras
from keras import ops

from keras_recurrentgemma.layers.dense import fan_in_dense
from keras_recurrentgemma.layers.stored_config import StoredConfig
from keras_recurrentgemma.ops.remat import remat_function


def gelu_gate(gate, value, rematerialise=True):
    """`gelu_tanh(gate) ⊙ value`, elementwise (`[b, t, f]` in the MLP,
    `[b, t, l]` in the recurrent block).

    With `rematerialise`, a training pass keeps `gate` and `value` for the
    backward pass and recomputes `gelu_tanh(gate)` from them, instead of
    keeping all three (the 2B's LoRA step at 512 tokens: 195 MiB less).
    """
    if rematerialise:
        return remat_function(_gelu_gate, (gate, value))
    return _gelu_gate(gate, value)


def _gelu_gate(gate, value):
    return ops.gelu(gate, approximate=True) * value


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class MLPBlock(StoredConfig, keras.layers.Layer):
    """Gated feed-forward block.

        y = (gelu_tanh(x W_gate + b_gate) ⊙ (x W_up + b_up)) W_down + b_down

    Shapes: `W_gate`, `W_up` `[d, f]`; `W_down` `[f, d]`. The official
    checkpoint stores `W_gate` and `W_up` stacked as `ffw_up.w[0]` and
    `ffw_up.w[1]`.

    Args:
        hidden_dim: int. Model width `d`.
        intermediate_dim: int. Expanded width `f`.
        final_w_init_variance_scale: float. Init scale of `ffw_down`.

    Call arguments:
        x: float tensor `[b, t, d]`.

    Returns:
        Tensor `[b, t, d]`.
    """

    CONFIG = ("hidden_dim", "intermediate_dim", "final_w_init_variance_scale")

    def __init__(
        self, hidden_dim, intermediate_dim, final_w_init_variance_scale=1.0, **kwargs
    ):
        super().__init__(**kwargs)
        self.store_config(locals())
        # See `gelu_gate`.
        self.rematerialise = True
        policy = self.dtype_policy
        self.ffw_gate = fan_in_dense(intermediate_dim, "ffw_gate", policy)
        self.ffw_up = fan_in_dense(intermediate_dim, "ffw_up", policy)
        self.ffw_down = fan_in_dense(
            hidden_dim, "ffw_down", policy, scale=final_w_init_variance_scale
        )

    def build(self, input_shape):
        self.ffw_gate.build(input_shape)
        self.ffw_up.build(input_shape)
        self.ffw_down.build(input_shape[:-1] + (self.intermediate_dim,))
        self.built = True

    def call(self, x):
        h = gelu_gate(self.ffw_gate(x), self.ffw_up(x), self.rematerialise)
        return self.ffw_down(h)

    def compute_output_shape(self, input_shape):
        return input_shape
