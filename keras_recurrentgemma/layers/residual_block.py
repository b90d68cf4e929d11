"""Pre-norm residual block: temporal mixing, then the MLP."""

import keras
from keras import ops

from keras_recurrentgemma.layers.local_attention import LocalAttentionBlock
from keras_recurrentgemma.layers.mlp import MLPBlock
from keras_recurrentgemma.layers.recurrent_block import RecurrentBlock
from keras_recurrentgemma.layers.rms_normalization import RMSNormalization
from keras_recurrentgemma.layers.stored_config import StoredConfig
from keras_recurrentgemma.ops.remat import remat_call

BLOCK_TYPES = ("recurrent", "attention")


def residual_stream_dtype(compute_dtype):
    """The dtype the residual stream is summed in.

    float32 under a float16 policy: Gemma-family residual streams grow past
    float16's 65504 (keras-hub #2424, blank output under `mixed_float16`),
    and summing in float32 costs one cast per block. bfloat16 has float32's
    range, so it is kept as it is.
    """
    return "float32" if compute_dtype == "float16" else compute_dtype


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class ResidualBlock(StoredConfig, keras.layers.Layer):
    """One Griffin layer.

        r = temporal_block(RMSNorm(x)) + x
        y = mlp_block(RMSNorm(r)) + r

    The sums `r` and `y` are in `residual_stream_dtype(compute_dtype)`:
    float32 under a float16 policy, else the compute dtype.

    `temporal_block` is a `RecurrentBlock` (`block_type="recurrent"`) or a
    `LocalAttentionBlock` (`block_type="attention"`).

    Args:
        block_type: str. `"recurrent"` or `"attention"`.
        hidden_dim: int. Model width `d`.
        intermediate_dim: int. MLP expanded width.
        num_heads: int. Attention heads, and RG-LRU gate blocks.
        lru_width: int. RG-LRU width.
        attention_window_size: int. Keys seen before each query.
        conv1d_temporal_width: int. Conv1D kernel length.
        layer_norm_epsilon: float. RMSNorm epsilon.
        rope_max_wavelength: int. RoPE longest wavelength.
        final_w_init_variance_scale: float. Init scale of output projections.
        scan_implementation: str. See `rg_lru_scan`.
        remat: bool. Rematerialise the block in training: keep only its
            input for the backward pass and recompute the rest, trading one
            extra forward pass for activation memory that no longer grows
            with the block's internals. Defaults to `False`.

    Call arguments:
        x: float tensor `[b, t, d]`.
        segment_pos: int tensor `[b, t]`; -1 marks padding.
        cache: optional cache of the temporal block (`RecurrentBlockCache` or
            `AttentionBlockCache`) that `x` continues.

    Returns:
        `(y, cache)`: `y` `[b, t, d]` and the temporal block's new cache. The
        same code runs a training pass (no cache in, cache ignored) and a
        generation step.
    """

    CONFIG = (
        "block_type",
        "hidden_dim",
        "intermediate_dim",
        "num_heads",
        "lru_width",
        "attention_window_size",
        "conv1d_temporal_width",
        "layer_norm_epsilon",
        "rope_max_wavelength",
        "final_w_init_variance_scale",
        "scan_implementation",
        "remat",
    )

    def __init__(
        self,
        block_type,
        hidden_dim,
        intermediate_dim,
        num_heads,
        lru_width,
        attention_window_size,
        conv1d_temporal_width=4,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10_000,
        final_w_init_variance_scale=1.0,
        scan_implementation="auto",
        remat=False,
        **kwargs,
    ):
        # Not autocast: the residual stream may be float32 under a float16
        # policy, and the RG-LRU state in `cache` is float32 always.
        kwargs.pop("autocast", None)
        super().__init__(autocast=False, **kwargs)
        if block_type not in BLOCK_TYPES:
            raise ValueError(
                f"Unknown block_type {block_type!r}; expected one of {BLOCK_TYPES}."
            )
        self.store_config(locals())
        self.remat = bool(remat)

        policy = self.dtype_policy
        self.temporal_pre_norm = RMSNormalization(
            layer_norm_epsilon, dtype=policy, name="temporal_pre_norm"
        )
        if block_type == "recurrent":
            self.temporal_block = RecurrentBlock(
                hidden_dim,
                lru_width,
                num_heads,
                conv1d_temporal_width=conv1d_temporal_width,
                final_w_init_variance_scale=final_w_init_variance_scale,
                scan_implementation=scan_implementation,
                dtype=policy,
                name="recurrent_block",
            )
            # A block rematerialised whole recomputes its RG-LRU anyway. (Its
            # norms, GELU gates and LoRA products, cheap to recompute, still
            # rematerialise themselves inside it.)
            self.temporal_block.rg_lru.rematerialise = not self.remat
        else:
            self.temporal_block = LocalAttentionBlock(
                hidden_dim,
                num_heads,
                attention_window_size,
                rope_max_wavelength=rope_max_wavelength,
                final_w_init_variance_scale=final_w_init_variance_scale,
                dtype=policy,
                name="attention_block",
            )
        self.channel_pre_norm = RMSNormalization(
            layer_norm_epsilon, dtype=policy, name="channel_pre_norm"
        )
        self.mlp_block = MLPBlock(
            hidden_dim,
            intermediate_dim,
            final_w_init_variance_scale=final_w_init_variance_scale,
            dtype=policy,
            name="mlp_block",
        )

    def build(self, input_shape):
        for layer in (
            self.temporal_pre_norm,
            self.temporal_block,
            self.channel_pre_norm,
            self.mlp_block,
        ):
            layer.build(input_shape)
        self.built = True

    def initial_cache(self, batch_size):
        """The temporal block's empty cache."""
        return self.temporal_block.initial_cache(batch_size)

    def call(self, x, segment_pos, cache=None):
        # Generation (a cache in) keeps no activations for a backward pass,
        # so only cache-free calls, i.e. training passes, are rematerialised.
        if self.remat and cache is None:
            return remat_call(self, self._forward, x, segment_pos)
        return self._forward(x, segment_pos, cache)

    @property
    def residual_dtype(self):
        return residual_stream_dtype(self.compute_dtype)

    def _forward(self, x, segment_pos, cache=None):
        dtype = self.residual_dtype
        x = ops.cast(x, dtype)
        h, cache = self.temporal_block(self.temporal_pre_norm(x), segment_pos, cache)
        r = ops.cast(h, dtype) + x
        y = ops.cast(self.mlp_block(self.channel_pre_norm(r)), dtype) + r
        return y, cache

    def compute_output_spec(self, x, segment_pos, cache=None):
        _, cache_spec = self.temporal_block.compute_output_spec(x, segment_pos, cache)
        return keras.KerasTensor(x.shape, dtype=self.residual_dtype), cache_spec
