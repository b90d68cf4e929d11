"""RecurrentGemma (Griffin) backbone."""

import math

import keras
import ml_dtypes
from keras import ops
from keras_hub.models import Backbone

from keras_recurrentgemma import lora
from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.layers import BLOCK_TYPES
from keras_recurrentgemma.layers import ResidualBlock
from keras_recurrentgemma.layers import RMSNormalization
from keras_recurrentgemma.layers import SegmentPositions
from keras_recurrentgemma.layers.dense import check_quantization_mode
from keras_recurrentgemma.layers.dense import no_collect
from keras_recurrentgemma.layers.dense import quantizable_layers
from keras_recurrentgemma.layers.dense import resolve_policies
from keras_recurrentgemma.layers.embedding import ReversibleEmbedding
from keras_recurrentgemma.layers.initialization import initializer
from keras_recurrentgemma.layers.lora_state import merged_weights_only
from keras_recurrentgemma.preset_mixin import ModelPresetMixin


def embedding_normalizer(hidden_dim):
    """`sqrt(hidden_dim)` rounded to bfloat16, as the official model trains.

    50.5 (not 50.596) for the 2B's width 2560; 64.0 for the 9B's 4096.
    """
    return float(ml_dtypes.bfloat16(math.sqrt(hidden_dim)))


def _with_segment_pos(inputs):
    if isinstance(inputs, dict) and "segment_pos" not in inputs:
        return {**inputs, "segment_pos": None}
    return inputs


def _with_segment_pos_spec(inputs):
    """Inputs for shape inference: a left-out `segment_pos` has the shape of
    `token_ids` (Keras's graph walk reads every input's shape, even an
    optional one's)."""
    if not isinstance(inputs, dict) or inputs.get("segment_pos") is not None:
        return inputs
    token_ids = inputs["token_ids"]
    spec = keras.KerasTensor(tuple(token_ids.shape), dtype="int32")
    return {**inputs, "segment_pos": spec}


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaBackbone(ModelPresetMixin, Backbone):
    """RecurrentGemma (Griffin) decoder: RG-LRU recurrences and local attention.

    Embeds tokens, scales them by `bfloat16(sqrt(hidden_dim))`, runs
    `len(block_types)` residual blocks whose temporal mixing is either a
    recurrent block (Conv1D + RG-LRU) or local multi-query attention, and
    applies a final RMSNorm. The output is the final hidden state
    `[batch, seq, hidden_dim]`; logits are
    `token_embedding(hidden, reverse=True)`, tied to the embedding and
    soft-capped with `tanh(logits / cap) · cap`.

    The same class builds Griffin (recurrent and attention blocks), Hawk (all
    recurrent) and an attention-only baseline.

    Args:
        vocabulary_size: int. Number of tokens.
        hidden_dim: int. Model width (`width` in the official config).
        intermediate_dim: int. MLP expanded width (`mlp_expanded_width`;
            half of Hugging Face's `intermediate_size`).
        num_heads: int. Attention query heads, and diagonal blocks of the
            RG-LRU gates. `hidden_dim / num_heads` is the head dim.
        block_types: list of str. One entry per layer, `"recurrent"` or
            `"attention"`.
        lru_width: int. RG-LRU width. Defaults to `hidden_dim`.
        attention_window_size: int. Each query sees itself and this many
            keys before it. Defaults to `2048`.
        conv1d_temporal_width: int. Conv1D kernel length. Defaults to `4`.
        logits_soft_cap: float or None. Defaults to `30.0`.
        embeddings_scale_by_sqrt_dim: bool. Defaults to `True`.
        layer_norm_epsilon: float. RMSNorm epsilon. Defaults to `1e-6`.
        rope_max_wavelength: int. Defaults to `10000`.
        scan_implementation: str. RG-LRU scan implementation, see
            `keras_recurrentgemma.ops.rg_lru_scan`. Defaults to `"auto"`.
        remat: bool. Rematerialise each residual block in training: only
            block inputs are kept for the backward pass, so activation
            memory per layer is `[batch, seq, hidden_dim]` instead of every
            intermediate; costs about one extra forward pass. Use it for
            long-sequence fine-tuning (the 2B's LoRA step, 512 tokens,
            on a CPU: 10.4 -> 7.4 GiB on JAX, 11.1 -> 8.2 GiB on torch).
            Generation is unaffected. Defaults to `False`.
        dtype: string or `keras.DTypePolicy`. Weights and compute dtype.

    Inputs:
        token_ids: int `[batch, seq]`.
        padding_mask: int `[batch, seq]`, 1 for real tokens. Left or right
            padding both work: padded positions never reach real tokens.
        segment_pos: optional int `[batch, seq]`, each token's position in
            its document, for packed rows; 0 starts a document.

    Example:
    ```python
    backbone = keras_recurrentgemma.RecurrentGemmaBackbone(
        vocabulary_size=256,
        hidden_dim=64,
        intermediate_dim=192,
        num_heads=4,
        block_types=["recurrent", "recurrent", "attention"],
        attention_window_size=16,
    )
    hidden = backbone({
        "token_ids": np.array([[2, 17, 42, 7]]),
        "padding_mask": np.ones((1, 4), "int32"),
    })
    logits = backbone.token_embedding(hidden, reverse=True)
    ```
    """

    def __init__(
        self,
        vocabulary_size,
        hidden_dim,
        intermediate_dim,
        num_heads,
        block_types,
        lru_width=None,
        attention_window_size=2048,
        conv1d_temporal_width=4,
        logits_soft_cap=30.0,
        embeddings_scale_by_sqrt_dim=True,
        layer_norm_epsilon=1e-6,
        rope_max_wavelength=10_000,
        scan_implementation="auto",
        remat=False,
        dtype=None,
        **kwargs,
    ):
        block_types = list(block_types)
        bad = [b for b in block_types if b not in BLOCK_TYPES]
        if bad or not block_types:
            raise ValueError(
                f"`block_types` must be a non-empty list of {BLOCK_TYPES}; "
                f"got {block_types}."
            )
        lru_width = hidden_dim if lru_width is None else lru_width
        for name, value in (("hidden_dim", hidden_dim), ("lru_width", lru_width)):
            if value % num_heads:
                raise ValueError(
                    f"`{name}`={value} is not divisible by num_heads={num_heads}."
                )
        num_layers = len(block_types)
        # Set before the functional graph is built, which uses it.
        self.embeddings_scale_by_sqrt_dim = embeddings_scale_by_sqrt_dim
        self.hidden_dim = hidden_dim

        # === Layers ===
        self.segment_positions = SegmentPositions(
            vocabulary_size, dtype=dtype, name="segment_positions"
        )
        self.token_embedding = ReversibleEmbedding(
            input_dim=vocabulary_size,
            output_dim=hidden_dim,
            tie_weights=True,
            logit_soft_cap=logits_soft_cap or None,
            embeddings_initializer=initializer(
                keras.initializers.RandomNormal(stddev=1.0 / math.sqrt(hidden_dim))
            ),
            dtype=dtype,
            name="token_embedding",
        )
        self.residual_blocks = [
            ResidualBlock(
                block_type,
                hidden_dim=hidden_dim,
                intermediate_dim=intermediate_dim,
                num_heads=num_heads,
                lru_width=lru_width,
                attention_window_size=attention_window_size,
                conv1d_temporal_width=conv1d_temporal_width,
                layer_norm_epsilon=layer_norm_epsilon,
                rope_max_wavelength=rope_max_wavelength,
                final_w_init_variance_scale=2.0 / num_layers,
                scan_implementation=scan_implementation,
                remat=remat,
                dtype=dtype,
                name=f"residual_block_{i}",
            )
            for i, block_type in enumerate(block_types)
        ]
        self.final_norm = RMSNormalization(
            layer_norm_epsilon, dtype=dtype, name="final_norm"
        )

        # === Functional model ===
        token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
        padding_mask = keras.Input(shape=(None,), dtype="int32", name="padding_mask")
        segment_pos_input = keras.Input(
            shape=(None,), dtype="int32", name="segment_pos", optional=True
        )
        # The checked ids feed the embedding so the check runs before it.
        checked_ids, segment_pos = self.segment_positions(
            token_ids, padding_mask, segment_pos_input
        )
        x, _ = self.forward_with_caches(checked_ids, segment_pos)
        super().__init__(
            inputs={
                "token_ids": token_ids,
                "padding_mask": padding_mask,
                "segment_pos": segment_pos_input,
            },
            outputs=x,
            dtype=dtype,
            **kwargs,
        )

        # === Config ===
        self.vocabulary_size = vocabulary_size
        self.intermediate_dim = intermediate_dim
        self.num_heads = num_heads
        self.head_dim = hidden_dim // num_heads
        self.block_types = block_types
        self.num_layers = num_layers
        self.lru_width = lru_width
        self.attention_window_size = attention_window_size
        self.conv1d_temporal_width = conv1d_temporal_width
        self.logits_soft_cap = logits_soft_cap
        self.layer_norm_epsilon = layer_norm_epsilon
        self.rope_max_wavelength = rope_max_wavelength
        self.scan_implementation = scan_implementation
        self.remat = bool(remat)
        # Built under a per-layer `DTypePolicyMap` (a quantized preset or
        # `.keras` file): each layer takes its own entry, or it cannot save.
        resolve_policies(self)

    def forward_with_caches(
        self, token_ids, segment_pos, caches=None, layer_intercept_fn=None
    ):
        """The one forward pass, shared by training and generation.

        (Not named `forward`: on torch that is `nn.Module.__call__`'s hook.)

        Token ids are not checked here (the `segment_positions` layer does
        that for the functional model).

        Args:
            token_ids: int tensor `[b, t]`.
            segment_pos: int tensor `[b, t]`; 0 starts a document, -1 marks
                padding, which leaves every cache as it is.
            caches: optional sequence of per-block caches that the tokens
                continue (see `initial_caches`); empty caches if omitted.
            layer_intercept_fn: optional `fn(x, i)` applied to the scaled
                embeddings (`i = -1`) and each block's output (`i >= 0`).

        Returns:
            `(hidden, caches)`: the final-norm hidden states `[b, t, d]` and
            a tuple of each block's cache after the row's last real token.
        """
        x = self.token_embedding(token_ids)
        if self.embeddings_scale_by_sqrt_dim:
            x = x * ops.cast(embedding_normalizer(self.hidden_dim), x.dtype)
        if layer_intercept_fn is not None:
            x = layer_intercept_fn(x, -1)
        new_caches = []
        for i, block in enumerate(self.residual_blocks):
            x, cache = block(x, segment_pos, None if caches is None else caches[i])
            if layer_intercept_fn is not None:
                x = layer_intercept_fn(x, i)
            new_caches.append(cache)
        return self.final_norm(x), tuple(new_caches)

    def initial_caches(self, batch_size):
        """One empty cache per residual block, in block order.

        A `RecurrentBlockCache` holds the float32 RG-LRU state `[b, l]` and
        the Conv1D window `[b, k-1, l]`; an `AttentionBlockCache` holds a ring
        buffer of `attention_window_size` keys, values and positions. Neither
        depends on sequence length.
        """
        return tuple(block.initial_cache(batch_size) for block in self.residual_blocks)

    # `segment_pos` is optional: callers may leave the key out. `__call__`
    # checks the input spec eagerly; `call` is what stateless (jit) paths use.
    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(_with_segment_pos(inputs), *args, **kwargs)

    def call(self, inputs, *args, **kwargs):
        return super().call(_with_segment_pos(inputs), *args, **kwargs)

    def compute_output_spec(self, inputs, *args, **kwargs):
        return super().compute_output_spec(
            _with_segment_pos_spec(inputs), *args, **kwargs
        )

    # --- LoRA ---------------------------------------------------------------

    def default_lora_layer_names(self):
        """Attention `proj_q`, `proj_v`; recurrent `linear_x`, `linear_y`.

        Only those the model has: a Hawk (all recurrent) gets the last two.
        """
        present = lora.lora_layer_names(self)
        return [name for name in lora.DEFAULT_LORA_TARGETS if name in present]

    def enable_lora(self, rank, target_layer_names=None):
        """Freezes the backbone and adds trainable rank-`rank` LoRA factors.

        By default LoRA goes on the attention query and value projections
        (`proj_q`, `proj_v`; the single key/value head is shared, so `proj_v`
        is small) and on the recurrent block's two input projections
        (`linear_x` into Conv1D → RG-LRU, `linear_y` into the gate). Only the
        factors train: the targets' kernels and biases are frozen, and
        saving the model (`save_to_preset`, `.keras`) merges the factors into
        the kernels. Training checkpoints (`save_weights`, `ModelCheckpoint`,
        `BackupAndRestore`) keep kernel and factors apart, so a run resumed
        from one continues exactly: our `Dense` overrides Keras's, which
        merges and zeroes the factors on load (see `layers/lora_state.py`).

        Args:
            rank: int > 0. Rank of the factorisation.
            target_layer_names: optional list of layer names, e.g.
                `["proj_q", "proj_k", "proj_v", "ffw_up"]`. An unknown name is
                an error listing the valid ones.
        """
        rank = lora.check_rank(rank)
        if target_layer_names is None:
            target_layer_names = self.default_lora_layer_names()
        names = lora.check_target_names(self, target_layer_names)
        if lora.enabled_layers(self):
            raise ValueError(
                f"LoRA is already enabled (rank {lora.lora_rank(self)} on "
                f"{self._lora_target_layer_names}). Build or load a fresh model to "
                "change it."
            )
        super().enable_lora(rank, target_layer_names=names)
        self._lora_target_layer_names = names
        lora.freeze_biases(self)

    def save_lora_weights(self, filepath):
        """Saves only the LoRA factors to `filepath` (ending `.lora.h5`)."""
        lora.save_lora_weights(self, filepath)

    def load_lora_weights(self, filepath):
        """Loads LoRA factors saved by `save_lora_weights`.

        Enables LoRA (with the file's rank and targets) if it is not on yet.
        The file is checked against the model first, so a file from another
        rank, architecture or size is an error naming it, and the model is
        left unchanged.
        """
        lora.load_lora_weights(self, filepath)

    # --- Quantization -------------------------------------------------------

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the projections and the tied embedding in place.

        The RG-LRU gates, `a_param`, the Conv1D and the norms stay in float.
        Quantize the causal LM instead when you have one: it also drops its
        compiled `generate`. See `RecurrentGemmaCausalLM.quantize`.
        """
        check_quantization_mode(mode, config)
        kwargs["type_check"] = False
        filters = quantizable_layers(filters, mode)
        with no_collect():
            super().quantize(mode, config=config, filters=filters, **kwargs)

    # --- Distribution -------------------------------------------------------

    @staticmethod
    def get_layout_map(
        device_mesh,
        model_parallel_dim_name="model",
        data_parallel_dim_name="batch",
    ):
        """A `keras.distribution.LayoutMap` for `ModelParallel` (JAX).

        See `keras_recurrentgemma.distribution.get_layout_map`.
        """
        from keras_recurrentgemma.distribution import get_layout_map

        return get_layout_map(
            device_mesh,
            model_parallel_dim_name=model_parallel_dim_name,
            data_parallel_dim_name=data_parallel_dim_name,
        )

    _load_preset = staticmethod(preset_loader.load_backbone)

    def _preset_save_scope(self):
        # A preset is for inference: LoRA is merged into the kernels and the
        # factors are not written (see `layers/lora_state.py`).
        return merged_weights_only()

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "vocabulary_size": self.vocabulary_size,
                "hidden_dim": self.hidden_dim,
                "intermediate_dim": self.intermediate_dim,
                "num_heads": self.num_heads,
                "block_types": list(self.block_types),
                "lru_width": self.lru_width,
                "attention_window_size": self.attention_window_size,
                "conv1d_temporal_width": self.conv1d_temporal_width,
                "logits_soft_cap": self.logits_soft_cap,
                "embeddings_scale_by_sqrt_dim": self.embeddings_scale_by_sqrt_dim,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "rope_max_wavelength": self.rope_max_wavelength,
                "scan_implementation": self.scan_implementation,
                "remat": self.remat,
            }
        )
        return config
