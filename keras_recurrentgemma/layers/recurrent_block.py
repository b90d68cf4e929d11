"""Griffin's recurrent temporal-mixing block."""

import keras
from keras import ops

from keras_recurrentgemma.layers.conv1d import Conv1D
from keras_recurrentgemma.layers.dense import fan_in_dense
from keras_recurrentgemma.layers.rg_lru import RGLRU


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentBlock(keras.layers.Layer):
    """Gated branch times a Conv1D → RG-LRU branch.

        y = gelu_tanh(x W_y + b_y)
        u = RG-LRU(Conv1D(x W_x + b_x))
        out = (u ⊙ y) W_out + b_out

    Shapes: `W_x`, `W_y` `[d, l]`, `W_out` `[l, d]` (`l = lru_width`).

    Args:
        hidden_dim: int. Model width `d`.
        lru_width: int. Recurrence width `l`.
        num_heads: int. Diagonal blocks of the RG-LRU gates.
        conv1d_temporal_width: int. Conv1D kernel length. Defaults to `4`.
        final_w_init_variance_scale: float. Init scale of `linear_out`.
        scan_implementation: str. See `rg_lru_scan`.

    Call arguments:
        x: float tensor `[b, t, d]`.
        segment_pos: int tensor `[b, t]`.

    Returns:
        Tensor `[b, t, d]`.
    """

    def __init__(
        self,
        hidden_dim,
        lru_width,
        num_heads,
        conv1d_temporal_width=4,
        final_w_init_variance_scale=1.0,
        scan_implementation="auto",
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.hidden_dim = hidden_dim
        self.lru_width = lru_width
        self.num_heads = num_heads
        self.conv1d_temporal_width = conv1d_temporal_width
        self.final_w_init_variance_scale = final_w_init_variance_scale
        self.scan_implementation = scan_implementation
        policy = self.dtype_policy
        self.linear_y = fan_in_dense(lru_width, "linear_y", policy)
        self.linear_x = fan_in_dense(lru_width, "linear_x", policy)
        self.linear_out = fan_in_dense(
            hidden_dim, "linear_out", policy, scale=final_w_init_variance_scale
        )
        self.conv_1d = Conv1D(conv1d_temporal_width, dtype=policy, name="conv_1d")
        self.rg_lru = RGLRU(
            num_heads,
            scan_implementation=scan_implementation,
            dtype=policy,
            name="rg_lru",
        )

    def build(self, input_shape):
        lru_shape = input_shape[:-1] + (self.lru_width,)
        self.linear_y.build(input_shape)
        self.linear_x.build(input_shape)
        self.conv_1d.build(lru_shape)
        self.rg_lru.build(lru_shape)
        self.linear_out.build(lru_shape)
        self.built = True

    def call(self, x, segment_pos):
        y = ops.gelu(self.linear_y(x), approximate=True)
        x = self.conv_1d(self.linear_x(x), segment_pos)
        x, _ = self.rg_lru(x, segment_pos)
        return self.linear_out(x * y)

    def compute_output_shape(self, x_shape, segment_pos_shape):
        return x_shape

    def get_config(self):
        return {
            **super().get_config(),
            "hidden_dim": self.hidden_dim,
            "lru_width": self.lru_width,
            "num_heads": self.num_heads,
            "conv1d_temporal_width": self.conv1d_temporal_width,
            "final_w_init_variance_scale": self.final_w_init_variance_scale,
            "scan_implementation": self.scan_implementation,
        }
