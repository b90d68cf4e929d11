"""Griffin's recurrent temporal-mixing block."""

from typing import NamedTuple

import keras
from keras import ops

from keras_recurrentgemma.layers.conv1d import Conv1D
from keras_recurrentgemma.layers.dense import fan_in_dense
from keras_recurrentgemma.layers.mlp import gelu_gate
from keras_recurrentgemma.layers.rg_lru import RGLRU
from keras_recurrentgemma.layers.stored_config import StoredConfig


class RecurrentBlockCache(NamedTuple):
    """What a recurrent block remembers between calls; size fixed per batch.

    Attributes:
        rg_lru_state: float32 `[b, l]`, the RG-LRU state `h`.
        conv1d_state: `[b, k-1, l]`, the Conv1D window (last `k - 1` inputs
            of the current document, oldest first), in the compute dtype.
    """

    rg_lru_state: object
    conv1d_state: object


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentBlock(StoredConfig, keras.layers.Layer):
    """Gated branch times a Conv1D → RG-LRU branch.

        y = gelu_tanh(x W_y + b_y)
        u = RG-LRU(Conv1D(x W_x + b_x))
        out = (u ⊙ y) W_out + b_out

    Shapes: `W_x`, `W_y` `[d, l]`, `W_out` `[l, d]` (`l = lru_width`).
    `u ⊙ y` is `mlp.gelu_gate`, rematerialised in training passes unless
    `rematerialise` (an attribute) is turned off.

    Args:
        hidden_dim: int. Model width `d`.
        lru_width: int. Recurrence width `l`.
        num_heads: int. Diagonal blocks of the RG-LRU gates.
        conv1d_temporal_width: int. Conv1D kernel length. Defaults to `4`.
        final_w_init_variance_scale: float. Init scale of `linear_out`.
        scan_implementation: str. See `rg_lru_scan`.

    Call arguments:
        x: float tensor `[b, t, d]`.
        segment_pos: int tensor `[b, t]`; -1 marks padding.
        cache: optional `RecurrentBlockCache` that `x` continues; an empty
            one (`initial_cache`) if omitted.

    Returns:
        `(out, cache)`: `out` `[b, t, d]` and the `RecurrentBlockCache` after
        each row's last real token.
    """

    CONFIG = (
        "hidden_dim",
        "lru_width",
        "num_heads",
        "conv1d_temporal_width",
        "final_w_init_variance_scale",
        "scan_implementation",
    )

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
        # Not autocast: Keras would round the float32 RG-LRU state in `cache`
        # to a bfloat16/float16 compute dtype at every generation step.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        self.store_config(locals())
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
        self.rematerialise = True

    def build(self, input_shape):
        lru_shape = input_shape[:-1] + (self.lru_width,)
        self.linear_y.build(input_shape)
        self.linear_x.build(input_shape)
        self.conv_1d.build(lru_shape)
        self.rg_lru.build(lru_shape)
        self.linear_out.build(lru_shape)
        self.built = True

    def initial_cache(self, batch_size):
        """The empty `RecurrentBlockCache`: zero state, empty window."""
        return RecurrentBlockCache(
            rg_lru_state=ops.zeros((batch_size, self.lru_width), "float32"),
            conv1d_state=self.conv_1d.initial_state(batch_size, self.lru_width),
        )

    def call(self, x, segment_pos, cache=None):
        h0 = conv_state = None
        if cache is not None:
            h0, conv_state = cache.rg_lru_state, cache.conv1d_state
        y = self.linear_y(x)
        x, conv_state = self.conv_1d(self.linear_x(x), segment_pos, conv_state)
        x, h_last = self.rg_lru(x, segment_pos, h0)
        x = gelu_gate(y, x, self.rematerialise)
        return self.linear_out(x), RecurrentBlockCache(h_last, conv_state)

    def compute_output_spec(self, x, segment_pos, cache=None):
        b, k = x.shape[0], self.conv1d_temporal_width
        return keras.KerasTensor(
            x.shape, dtype=self.compute_dtype
        ), RecurrentBlockCache(
            keras.KerasTensor((b, self.lru_width), dtype="float32"),
            keras.KerasTensor((b, k - 1, self.lru_width), dtype=self.compute_dtype),
        )
