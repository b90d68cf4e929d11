"""RecurrentGemma causal language model: fit, generate and score."""

import contextlib
import math
import numbers
import warnings
from typing import NamedTuple

import keras
import numpy as np
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import ContrastiveSampler
from keras_hub.src.samplers.serialization import get as get_sampler
from keras_hub.src.utils.tensor_utils import any_equal

from keras_recurrentgemma import chunked_loss
from keras_recurrentgemma import compiled_decode
from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.backbone import _with_segment_pos
from keras_recurrentgemma.causal_lm_preprocessor import (
    RecurrentGemmaCausalLMPreprocessor,
)
from keras_recurrentgemma.chat import format_chat
from keras_recurrentgemma.layers.dense import check_quantization_mode
from keras_recurrentgemma.layers.dense import quantizable_layers
from keras_recurrentgemma.saving import atomic_preset_dir
from keras_recurrentgemma.tokenizer import END_OF_TURN
from keras_recurrentgemma.utils.checks import check_in_range
from keras_recurrentgemma.utils.checks import check_no_padding_gaps
from keras_recurrentgemma.utils.checks import check_same_shape
from keras_recurrentgemma.utils.checks import check_token_ids

SAMPLERS = ("beam", "contrastive", "greedy", "random", "top_k", "top_p")
# A logit that no softmax turns into a non-zero probability, finite in fp32.
_NEVER = -1e9


class RecurrentGemmaCache(NamedTuple):
    """Everything generation remembers; its size never depends on length.

    Attributes:
        blocks: tuple with one cache per residual block, in order:
            `RecurrentBlockCache(rg_lru_state [b, l] float32,
            conv1d_state [b, k-1, l])` or `AttentionBlockCache(keys [b, w, k],
            values [b, w, k], positions [b, w])`.
        num_tokens: int32 `[b]`, tokens absorbed per row; the next token's
            position.
        hidden: `[b, d]`, the final hidden state at each row's last absorbed
            token, from which the next token's logits come. Kept so that a
            prompt is absorbed once and its logits are computed at one
            position only.
    """

    blocks: tuple
    num_tokens: object
    hidden: object


def _no_grad():
    """torch's `no_grad` (a chunked prefill records no autograd graph, which
    would hold each chunk's activations); nothing on other backends."""
    if keras.config.backend() != "torch":
        return contextlib.nullcontext()
    import torch

    return torch.no_grad()


def _right_padded_lengths(padding_mask, name="padding_mask"):
    """Row lengths of a right-padded mask; raises if real tokens have gaps."""
    mask = ops.cast(padding_mask, "int32")
    t = ops.shape(mask)[1]
    lengths = ops.sum(mask, axis=1)
    prefix = ops.cast(ops.arange(t)[None, :] < lengths[:, None], "int32")
    gaps = ops.sum(ops.abs(mask - prefix), axis=1)
    check_in_range(
        gaps,
        0,
        1,
        f"`{name}` must be right padded (each row's real tokens first, then "
        "padding); a row has {bad} positions out of order.",
    )
    return lengths


def _check_prompts(inputs, vocabulary_size):
    """Eager checks of a generation batch, before any compiled code runs.

    XLA drops TensorFlow's assertion ops, so checks inside the compiled
    `generate_step` could vanish; here they run on concrete arrays on every
    backend.
    """
    if not isinstance(inputs, dict) or not {"token_ids", "padding_mask"} <= set(inputs):
        raise ValueError(
            "Without a preprocessor, `generate` takes a dict with `token_ids` "
            f"and `padding_mask`; got {type(inputs).__name__}."
        )
    token_ids = np.asarray(ops.convert_to_numpy(inputs["token_ids"]))
    mask = np.asarray(ops.convert_to_numpy(inputs["padding_mask"])).astype(bool)
    if token_ids.ndim != 2 or token_ids.shape != mask.shape:
        raise ValueError(
            f"`token_ids` {token_ids.shape} and `padding_mask` {mask.shape} must "
            "both be [batch, max_length]."
        )
    if token_ids.shape[0] == 0:
        raise ValueError("`generate` got an empty batch of prompts.")
    if token_ids.dtype.kind not in "iu":
        raise TypeError(f"`token_ids` must be integers; got dtype {token_ids.dtype}.")
    real = token_ids[mask]
    if real.size and (real.min() < 0 or real.max() >= vocabulary_size):
        bad = real.min() if real.min() < 0 else real.max()
        raise ValueError(
            f"`token_ids` contains id {bad}, outside [0, vocabulary_size="
            f"{vocabulary_size})."
        )
    lengths = mask.sum(axis=1)
    if np.any(lengths == 0):
        raise ValueError(
            f"Prompt {int(np.argmin(lengths))} has no tokens; every prompt needs "
            "at least one (the preprocessor adds <bos>)."
        )
    prefix = np.arange(mask.shape[1])[None, :] < lengths[:, None]
    if np.any(mask != prefix):
        raise ValueError(
            "`padding_mask` must be right padded (each row's real tokens first, "
            f"then padding); row {int(np.argmax(np.any(mask != prefix, 1)))} is not."
        )


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaCausalLM(CausalLM):
    """RecurrentGemma for causal language modelling and generation.

    `fit` trains on `(x, y, sample_weight)` batches (raw strings when a
    preprocessor is attached); `generate` continues prompts with any KerasHub
    sampler (`compile(sampler=...)`).

    Generation keeps a fixed-size cache (`RecurrentGemmaCache`): per
    recurrent block the float32 RG-LRU state and the last
    `conv1d_temporal_width - 1` Conv1D inputs, per attention block a ring
    buffer of `attention_window_size` keys and values. Memory does not grow
    with `max_length`. Prompts are absorbed in chunks of `prefill_chunk_size`
    tokens, each row only up to its own length, so padding never enters the
    recurrent or convolution state; logits are computed only where a token is
    sampled.

    For long inputs beyond one call, feed them chunk by chunk:
    ```python
    cache = causal_lm.initial_cache(batch_size=1)
    for chunk in chunks:  # int arrays [1, n]
        cache = causal_lm.prefill(chunk, cache=cache)
    logits = causal_lm.next_token_logits(cache)
    ```

    Args:
        backbone: `RecurrentGemmaBackbone`.
        preprocessor: `RecurrentGemmaCausalLMPreprocessor` or `None`.
        instruction_tuned: bool. The weights are an instruction-tuned (-it)
            model: `stop_token_ids="auto"` also stops at `<end_of_turn>`.
            Defaults to `False`.
        prefill_chunk_size: int. Prompt tokens absorbed per step of
            `generate`'s prefill; attention there costs
            `chunk × (chunk + attention_window_size)` per head. Defaults to
            `1024`.

    Example:
    ```python
    causal_lm = keras_recurrentgemma.RecurrentGemmaCausalLM.from_preset(name)
    causal_lm.compile(sampler="top_k")
    causal_lm.generate("The quick brown fox", max_length=64)

    turns = [{"role": "user", "content": "Write a haiku about rain."}]
    causal_lm.chat(turns, max_length=128)  # for the -it presets
    ```
    """

    backbone_cls = RecurrentGemmaBackbone
    preprocessor_cls = RecurrentGemmaCausalLMPreprocessor
    # Until `compile` says otherwise, TensorFlow's `generate` uses XLA.
    _generate_jit_compile = True
    # `compile(jit_compile=...)` as given; on torch it picks the decode mode.
    _generate_compile = "auto"
    _torch_decode_mode = None
    # Set by `compile(loss="auto")`; `None` means the full logits.
    _loss_chunk_size = None
    # True while `train_step` runs with the chunked loss: `call` returns
    # hidden states and `compute_loss` makes the logits chunk by chunk.
    _chunked_loss_step = False
    presets = preset_loader.PresetsProperty()

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds the causal LM (backbone and preprocessor) from a preset.

        Args:
            preset: str. A name from `RecurrentGemmaCausalLM.presets`; a local
                Keras preset, Hugging Face or official (Orbax or `.pt`)
                checkpoint directory; or an `hf://` / `kaggle://` handle.
                Checkpoints that are not Keras presets are converted on load,
                the tokenizer coming from their `tokenizer.model`.
            load_weights: bool. If `False`, the weights are randomly
                initialised.
            **kwargs: task arguments (`instruction_tuned`,
                `prefill_chunk_size`, `preprocessor`, ...) and `dtype`.
                Named instruction-tuned presets set `instruction_tuned=True`.

        Raises:
            ValueError: for an unknown name (listing the known ones), a
                directory in no known format, a truncated or mismatched
                weights file, or a failed download (saying what to do).

        Example:
        ```python
        causal_lm = RecurrentGemmaCausalLM.from_preset("griffin_tiny_pydocs_en")
        causal_lm.generate("The function", max_length=40)
        ```
        """
        return preset_loader.load_task(cls, preset, load_weights, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """Saves backbone, preprocessor and tokenizer as a Keras preset.

        As `RecurrentGemmaBackbone.save_to_preset`: all files go to a
        temporary directory that then replaces `preset_dir`, so an
        interrupted save leaves the previous preset intact.
        """
        with atomic_preset_dir(preset_dir) as staging:
            super().save_to_preset(staging, max_shard_size=max_shard_size)

    def __init__(
        self,
        backbone,
        preprocessor=None,
        instruction_tuned=False,
        prefill_chunk_size=1024,
        **kwargs,
    ):
        if int(prefill_chunk_size) < 1:
            raise ValueError(
                f"`prefill_chunk_size` must be >= 1; got {prefill_chunk_size}."
            )
        # === Layers ===
        self.backbone = backbone
        self.preprocessor = preprocessor

        # === Functional model ===
        inputs = backbone.input
        hidden = backbone(inputs)
        outputs = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.instruction_tuned = instruction_tuned
        self.prefill_chunk_size = int(prefill_chunk_size)

    # The backbone's `segment_pos` input is optional here too.
    def __call__(self, inputs, *args, **kwargs):
        return super().__call__(_with_segment_pos(inputs), *args, **kwargs)

    def call(self, inputs, *args, **kwargs):
        if self._chunked_loss_step:
            return self.backbone(_with_segment_pos(inputs))
        return super().call(_with_segment_pos(inputs), *args, **kwargs)

    def compile(
        self,
        optimizer="auto",
        loss="auto",
        *,
        weighted_metrics="auto",
        sampler="greedy",
        loss_chunk_size=chunked_loss.DEFAULT_LOSS_CHUNK_SIZE,
        **kwargs,
    ):
        """Configures training and generation.

        As KerasHub's `CausalLM.compile`, except that:

        - `loss="auto"` averages the cross-entropy over real tokens only
          (`sample_weight` masks padding), so the reported loss does not
          depend on how much padding `sequence_length` adds. In `fit` it is
          computed `loss_chunk_size` tokens at a time (an int, default 256;
          `None` for the full logits at once), each chunk's logits
          recomputed in the backward pass, so the `[batch, seq, vocab]`
          logits are never held whole (`keras_recurrentgemma.chunked_loss`;
          same loss and gradients). Any other `loss` uses the full logits;
        - under a pure `"float16"` policy the optimizer is wrapped in a
          `keras.optimizers.LossScaleOptimizer`, as Keras does for
          `"mixed_float16"` only (pass `auto_scale_loss=False` to opt out).
          `fit` then warns if float16 weights are trainable: their optimizer
          state is float16 too and underflows; use `"mixed_float16"` or
          `enable_lora`;
        - on torch, `jit_compile` also picks how `generate` runs each decode
          step (`torch_decode_mode`): `False` (or `run_eagerly=True`)
          eagerly, `True` through `torch.compile`, `"auto"` through
          `torch.compile` with CUDA graphs on CUDA and eagerly on a CPU.
        """
        if isinstance(sampler, str) and sampler not in SAMPLERS:
            raise ValueError(
                f"Unknown sampler {sampler!r}; use one of {list(SAMPLERS)} or "
                "a `keras_hub.samplers.Sampler` instance."
            )
        get_sampler(sampler)  # fails here, not at the first `generate`
        loss_chunk_size = chunked_loss.check_loss_chunk_size(loss_chunk_size)
        self._loss_chunk_size = loss_chunk_size if loss == "auto" else None
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        self._generate_compile = kwargs.get("jit_compile", "auto")
        self._generate_jit_compile = self._generate_compile is not False
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        self._scale_float16_loss(kwargs.get("auto_scale_loss", True))

    def train_step(self, *args, **kwargs):
        # Only inside the step does `call` return hidden states (for
        # `compute_loss`); `model(x)`, `predict` and `evaluate` get logits.
        self._chunked_loss_step = self._loss_chunk_size is not None
        try:
            return super().train_step(*args, **kwargs)
        finally:
            self._chunked_loss_step = False

    def compute_loss(
        self, x=None, y=None, y_pred=None, sample_weight=None, training=True
    ):
        if not self._chunked_loss_step:
            return super().compute_loss(x, y, y_pred, sample_weight, training)
        # `y_pred` is the hidden states. The metrics are updated here, a
        # chunk of logits at a time: on JAX only this call sees the weights.
        metrics = self._compile_metrics
        if metrics is not None and metrics.built and not metrics.metrics:
            metrics = None
        loss = chunked_loss.chunked_cross_entropy(
            lambda h: self.backbone.token_embedding(h, reverse=True),
            y_pred,
            y,
            sample_weight,
            self._loss_chunk_size,
            on_chunk=None if metrics is None else metrics.update_state,
        )
        for extra in self.losses:
            loss = loss + self._aggregate_additional_loss(extra)
        return loss

    def compute_metrics(self, x, y, y_pred, sample_weight=None):
        if self._chunked_loss_step:
            return self.get_metrics_result()  # updated by `compute_loss`
        return super().compute_metrics(x, y, y_pred, sample_weight)

    def _scale_float16_loss(self, auto_scale_loss):
        if self.backbone.compute_dtype != "float16" or self.optimizer is None:
            return
        # Small float16 gradients flush to zero without loss scaling, whatever
        # the variables' dtype; Keras checks for the name "mixed_float16".
        if auto_scale_loss and not isinstance(
            self.optimizer, keras.optimizers.LossScaleOptimizer
        ):
            self.optimizer = keras.optimizers.LossScaleOptimizer(self.optimizer)

    def fit(self, *args, **kwargs):
        trained = [v.path for v in self.trainable_weights if v.dtype == "float16"]
        if trained:
            warnings.warn(
                f"{len(trained)} trainable weights are float16 (e.g. "
                f"{trained[0]}): the optimizer keeps its moments in float16 "
                "too, where they underflow and training diverges. Fine-tune "
                'with `dtype="mixed_float16"` (float32 weights), or call '
                "`backbone.enable_lora(rank)`, whose factors are float32.",
                stacklevel=2,
            )
        return super().fit(*args, **kwargs)

    def quantize(self, mode=None, config=None, filters=None, **kwargs):
        """Quantizes the projections and the tied embedding in place.

        Touches the `Dense` projections (attention, recurrent block, MLP)
        and the token embedding, whose int8 copy also produces the
        soft-capped logits. The RG-LRU gates, `a_param`, the Conv1D and the
        norms stay in float: they are small, and the recurrence is
        sensitive to them. `generate` recompiles on its next call. A
        quantized model saves and loads like any other (`save_to_preset`,
        `.keras`).

        Args:
            mode: str. `"int8"`; also `"int4"`, or `"float8"` (which Keras
                has for `Dense` only, so the embedding stays in float).
            config: optional `keras.quantizers.QuantizationConfig`.
            filters: optional regex, list of regexes or callable, as in
                `keras.Model.quantize`; it narrows the layers above, never
                widens them.

        Raises:
            ValueError: for an unknown mode, `"gptq"` or `"awq"`, or a model
                already quantized.
        """
        check_quantization_mode(mode, config)
        # The filter keeps Keras away from the preprocessor's tokenizer
        # (never built: Keras would stop there) and from every layer it has
        # no integer kernel for. It checks exact types itself, so Keras's
        # check, which refuses KerasHub's embedding subclass, is turned off.
        kwargs["type_check"] = False
        filters = quantizable_layers(filters, mode)
        super().quantize(mode, config=config, filters=filters, **kwargs)

    # --- The cache ----------------------------------------------------------

    def initial_cache(self, batch_size):
        """An empty `RecurrentGemmaCache` for `batch_size` rows."""
        backbone = self.backbone
        return RecurrentGemmaCache(
            blocks=backbone.initial_caches(batch_size),
            num_tokens=ops.zeros((batch_size,), "int32"),
            hidden=ops.zeros((batch_size, backbone.hidden_dim), self.compute_dtype),
        )

    def _advance(self, token_ids, cache, padding_mask):
        """Feeds `[b, t]` tokens, right padded, into `cache`.

        Returns `(hidden [b, t, d], lengths [b], cache)`; `hidden` at padded
        positions is garbage (see `_hold_last`).
        """
        b, t = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        if padding_mask is None:
            mask = ops.ones((b, t), "bool")
        else:
            mask = ops.cast(padding_mask, "bool")
        counts = ops.cumsum(ops.cast(mask, "int32"), axis=1)
        segment_pos = ops.where(mask, cache.num_tokens[:, None] + counts - 1, -1)
        hidden, blocks = self.backbone.forward_with_caches(
            token_ids, segment_pos, cache.blocks
        )
        lengths = counts[:, -1]
        last = ops.take_along_axis(
            ops.concatenate([cache.hidden[:, None], hidden], axis=1),
            ops.broadcast_to(lengths[:, None, None], (b, 1, ops.shape(hidden)[2])),
            axis=1,
        )[:, 0]
        return (
            hidden,
            lengths,
            RecurrentGemmaCache(blocks, cache.num_tokens + lengths, last),
        )

    @staticmethod
    def _hold_last(hidden, lengths, previous):
        """Padded positions repeat the hidden state of the last real token."""
        b, t, d = ops.shape(hidden)[0], ops.shape(hidden)[1], ops.shape(hidden)[2]
        both = ops.concatenate([previous[:, None], hidden], axis=1)
        idx = ops.minimum(
            ops.arange(1, t + 1, dtype="int32")[None, :], lengths[:, None]
        )
        return ops.take_along_axis(
            both, ops.broadcast_to(idx[:, :, None], (b, t, d)), axis=1
        )

    def call_with_cache(
        self, token_ids, cache, cache_update_index=None, padding_mask=None
    ):
        """Runs `token_ids` on top of `cache`; the generation forward pass.

        Positions come from `cache.num_tokens`, so `cache_update_index` is
        accepted for KerasHub compatibility and not needed. Tokens where
        `padding_mask` is 0 leave the cache as it is; each row's real tokens
        must come first (right padding).

        Args:
            token_ids: int tensor `[b, t]`.
            cache: `RecurrentGemmaCache`, e.g. from `initial_cache`.
            cache_update_index: ignored.
            padding_mask: optional int/bool tensor `[b, t]`.

        Returns:
            `(logits [b, t, vocab], hidden_states [b, t, d], cache)`. At a
            padded position both repeat the last real token's.
        """
        token_ids = check_token_ids(token_ids, self.backbone.vocabulary_size)
        if padding_mask is not None:
            _right_padded_lengths(padding_mask)
        return self._call_with_cache(token_ids, cache, padding_mask)

    def _call_with_cache(self, token_ids, cache, padding_mask=None):
        hidden, lengths, new_cache = self._advance(token_ids, cache, padding_mask)
        hidden = self._hold_last(hidden, lengths, cache.hidden)
        logits = self.backbone.token_embedding(hidden, reverse=True)
        return logits, hidden, new_cache

    def prefill(self, token_ids, padding_mask=None, cache=None, chunk_size=None):
        """Absorbs tokens into the cache without computing any logits.

        Call it repeatedly, passing the returned cache back, to feed a prompt
        in chunks of any size; the result equals one call on the whole
        prompt. Or pass `chunk_size` and the whole input: it is fed in
        slices of that many tokens, so memory stays flat however long the
        input is (keep a very long input in host memory, e.g. numpy; only
        one slice at a time reaches the device). Then
        `next_token_logits(cache)` gives the distribution of the next token,
        and `call_with_cache` continues one token at a time.

        Args:
            token_ids: int tensor or array `[b, t]`.
            padding_mask: optional `[b, t]`, right padded; a row whose real
                tokens ended in an earlier chunk passes all zeros.
            cache: `RecurrentGemmaCache` to continue, or `None` to start.
            chunk_size: optional positive int; feed `token_ids` in slices of
                this many tokens.

        Returns:
            The new `RecurrentGemmaCache`.
        """
        if chunk_size is not None:
            return self._prefill_in_chunks(token_ids, padding_mask, cache, chunk_size)
        token_ids = check_token_ids(
            ops.convert_to_tensor(token_ids), self.backbone.vocabulary_size
        )
        if cache is None:
            cache = self.initial_cache(ops.shape(token_ids)[0])
        if padding_mask is not None:
            _right_padded_lengths(padding_mask)
        return self._advance(token_ids, cache, padding_mask)[2]

    def _prefill_in_chunks(self, token_ids, padding_mask, cache, chunk_size):
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int):
            raise ValueError(
                f"`chunk_size` must be a positive int; got {chunk_size!r}."
            )
        if chunk_size <= 0:
            raise ValueError(f"`chunk_size` must be a positive int; got {chunk_size}.")
        shape = tuple(token_ids.shape)
        if len(shape) != 2:
            raise ValueError(f"`token_ids` must be [batch, length]; got shape {shape}.")
        if padding_mask is not None:
            if tuple(padding_mask.shape) != shape:
                raise ValueError(
                    f"`padding_mask` {tuple(padding_mask.shape)} must have the "
                    f"shape of `token_ids` {shape}."
                )
            # Checked whole: a row may not restart in a later chunk.
            _right_padded_lengths(padding_mask)
        with _no_grad():
            for start in range(0, shape[1], chunk_size):
                end = start + chunk_size
                mask = None if padding_mask is None else padding_mask[:, start:end]
                cache = self.prefill(token_ids[:, start:end], mask, cache)
                # Cuts autograd history (torch) so earlier chunks can be freed.
                cache = keras.tree.map_structure(ops.stop_gradient, cache)
        if cache is None:
            cache = self.initial_cache(shape[0])
        return cache

    def next_token_logits(self, cache):
        """Logits `[b, vocab]` for the token after everything in `cache`."""
        hidden = cache.hidden[:, None, :]
        return self.backbone.token_embedding(hidden, reverse=True)[:, 0]

    def _build_cache(self, token_ids, padding_mask=None, return_hidden=False):
        """Prefills the right-padded prompts in `token_ids`.

        Chunks of `prefill_chunk_size` (or of the whole buffer, if shorter)
        run in a loop that stops after the longest prompt. On torch, which
        runs this eagerly, the buffer is first cut after the longest prompt,
        so a `max_length` buffer costs nothing beyond it.

        Returns:
            `(hidden_states, cache)`; `hidden_states` is `[b, t, d]` when
            `return_hidden` (the contrastive sampler needs it) and else
            `None`.
        """
        b, t = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
        if padding_mask is None:
            padding_mask = ops.ones((b, t), "int32")
        mask = ops.cast(padding_mask, "int32")
        if keras.config.backend() == "torch" and not return_hidden:
            # Eager: the lengths are known, and the columns after the longest
            # prompt would only be masked out (a fifth of a 128-token greedy
            # `generate` from a 32-token prompt went there).
            t = max(int(ops.max(ops.sum(mask, axis=1))), 1)
            token_ids, mask = token_ids[:, :t], mask[:, :t]
        chunk = min(self.prefill_chunk_size, t)
        padded = math.ceil(t / chunk) * chunk
        if padded != t:
            token_ids = ops.pad(token_ids, [[0, 0], [0, padded - t]])
            mask = ops.pad(mask, [[0, 0], [0, padded - t]])
        longest = ops.max(ops.sum(mask, axis=1))
        cache = self.initial_cache(b)
        hidden_states = ()
        if return_hidden:
            hidden_states = ops.zeros(
                (b, padded, self.backbone.hidden_dim), self.compute_dtype
            )

        def cond(start, cache, hidden_states):
            return start < longest

        def body(start, cache, hidden_states):
            ids = ops.slice(token_ids, [0, start], [b, chunk])
            chunk_mask = ops.slice(mask, [0, start], [b, chunk])
            hidden, lengths, new_cache = self._advance(ids, cache, chunk_mask)
            if return_hidden:
                hidden = self._hold_last(hidden, lengths, cache.hidden)
                hidden_states = ops.slice_update(hidden_states, [0, start, 0], hidden)
            return start + chunk, new_cache, hidden_states

        _, cache, hidden_states = ops.while_loop(
            cond,
            body,
            (ops.convert_to_tensor(0, "int32"), cache, hidden_states),
            maximum_iterations=padded // chunk,
        )
        if return_hidden:
            return hidden_states[:, :t], cache
        return None, cache

    # --- Generation ---------------------------------------------------------

    def generate_step(self, inputs, stop_token_ids=None):
        """Generates into one right-padded batch; compiled by `generate`.

        Each row's prompt is prefilled up to its own length. The sampler then
        walks the columns from the shortest prompt's end: a row still inside
        its prompt keeps its cache and gets a point-mass distribution on its
        known next token (so beam scores are unaffected), and its first
        sampled token comes from the hidden state its prefill left.

        Args:
            inputs: dict with `token_ids` and `padding_mask` `[b, max_length]`.
            stop_token_ids: tuple of ids, or `None`.

        Returns:
            dict with the filled `token_ids` and a `padding_mask` that ends
            after each row's first new stop token.
        """
        # `generate_function` checked the prompts before compiling this.
        token_ids = inputs["token_ids"]
        padding_mask = ops.cast(inputs["padding_mask"], "bool")
        lengths = ops.sum(ops.cast(padding_mask, "int32"), axis=1)
        return_hidden = isinstance(self.sampler, ContrastiveSampler)
        hidden_states, cache = self._build_cache(
            token_ids, padding_mask, return_hidden=return_hidden
        )
        max_length = ops.shape(token_ids)[1]
        decode = self._decode_function()

        def next(prompt, cache, index):
            b = ops.shape(prompt)[0]
            token = ops.slice(prompt, [0, index - 1], [b, 1])
            upcoming = ops.slice(
                prompt, [0, ops.minimum(index, max_length - 1)], [b, 1]
            )
            return decode(token, upcoming, index, cache)

        token_ids = self.sampler(
            next=next,
            prompt=token_ids,
            cache=cache,
            index=ops.min(lengths),
            mask=padding_mask,
            stop_token_ids=stop_token_ids,
            hidden_states=hidden_states,
            model=self,
        )
        if stop_token_ids is not None:
            # Keep everything up to and including each row's first new stop.
            stops = ops.cast(
                any_equal(token_ids, stop_token_ids, ops.logical_not(padding_mask)),
                "int32",
            )
            after = ops.cumsum(stops, axis=-1) - stops
            padding_mask = ops.logical_not(ops.cast(after, "bool"))
        else:
            padding_mask = ops.ones_like(token_ids, dtype="bool")
        return {"token_ids": token_ids, "padding_mask": padding_mask}

    def _decode_step(self, token, upcoming, index, cache):
        """One column of `generate_step`'s loop; a pure function of tensors.

        Feeds `token` `[b, 1]` (the column before `index`) to the rows whose
        prompt is absorbed; a row still inside its prompt gets a point mass
        on its known `upcoming` token `[b, 1]` instead of logits.

        Returns:
            `(logits float32 [b, vocab], hidden [b, d], cache)`.
        """
        # A row feeds the column only once its prompt is absorbed.
        feed = ops.greater_equal(index - 1, cache.num_tokens)[:, None]
        logits, hidden, new_cache = self._call_with_cache(token, cache, feed)
        logits = ops.cast(logits[:, 0], "float32")
        known = ops.less(index, cache.num_tokens)
        vocab = self.backbone.vocabulary_size
        point_mass = ops.where(
            ops.equal(ops.arange(vocab)[None, :], upcoming), 0.0, _NEVER
        )
        logits = ops.where(known[:, None], point_mass, logits)
        return logits, hidden[:, 0], new_cache

    def _decode_function(self):
        """`_decode_step`, or on torch its traced/compiled version.

        JAX and TensorFlow compile the whole `generate_step` already; torch
        runs it eagerly, so there the step goes through the
        `TorchDecodeStep` that `make_generate_function` set up.
        """
        compiled = getattr(self, "_torch_decode", None)
        if compiled is None or compiled.mode == "eager":
            return self._decode_step
        # Steps traced for another set of variables (before LoRA or
        # quantization) are not reused.
        variables_key = tuple(id(v) for v in self.variables)

        def decode(*args):
            return compiled(*args, variables_key=variables_key)

        return decode

    @property
    def torch_decode_mode(self):
        """How `generate` runs each decode step on torch, or `None` elsewhere.

        `"inductor"` (the step traced once per batch shape and compiled
        with `torch.compile`, with CUDA graphs on CUDA) by default on CUDA
        and after `compile(jit_compile=True)`; `"eager"` by default on a CPU,
        after `compile(jit_compile=False)` and with `run_eagerly`. Assign
        `"graph"` (the traced step replayed as it is: eager's kernels and
        results without the Python overhead) or any of these to override
        the choice, `None` to go back to it. See
        `keras_recurrentgemma.compiled_decode`.
        """
        if keras.config.backend() != "torch":
            return None
        if self._torch_decode_mode is not None:
            return self._torch_decode_mode
        device = self.backbone.token_embedding.embeddings.value.device.type
        return compiled_decode.resolve_mode(
            self._generate_compile, self.run_eagerly, device
        )

    @torch_decode_mode.setter
    def torch_decode_mode(self, mode):
        if mode is not None and mode not in compiled_decode.MODES:
            raise ValueError(
                f"`torch_decode_mode` must be one of {compiled_decode.MODES} or "
                f"None; got {mode!r}."
            )
        self._torch_decode_mode = mode
        self.generate_function = None

    def _tensorflow_generate_xla(self):
        """Whether TensorFlow compiles `generate_step` with XLA.

        Yes unless `compile(jit_compile=False)`, except that under the
        default `"auto"` 16-bit weights on a machine without a GPU run
        without XLA: XLA's CPU compiler computes every bfloat16/float16
        matrix product in float32 and hoists those conversions out of the
        decode loop, so the compiled loop holds a float32 copy of every
        weight (the released 2B ran out of 24 GB; without XLA its
        `generate` peaked at 8.1 GiB, `tools/benchmark_real_size.py`).
        """
        if self._generate_compile != "auto":
            return self._generate_jit_compile
        import tensorflow as tf

        sixteen_bit = self.backbone.variable_dtype in ("bfloat16", "float16")
        return not (sixteen_bit and not tf.config.list_logical_devices("GPU"))

    def make_generate_function(self):
        """The compiled `generate_step`, behind eager checks of its inputs.

        JAX jits it and torch runs it under `no_grad` (both as KerasHub
        does); TensorFlow compiles it with XLA even on CPU, where Keras's
        `jit_compile="auto"` would not, unless `compile(jit_compile=False)`
        or, under `"auto"`, the weights are 16-bit on a machine without a
        GPU (see `_tensorflow_generate_xla`).
        On torch the per-token decode step runs as `torch_decode_mode`
        says: compiled by default on CUDA.
        """
        if self.generate_function is not None:
            return self.generate_function
        self._torch_decode = None
        if keras.config.backend() == "torch":
            self._torch_decode = compiled_decode.TorchDecodeStep(
                self._decode_step, self.torch_decode_mode
            )
        if keras.config.backend() == "tensorflow" and not self.run_eagerly:
            import tensorflow as tf

            compiled = tf.function(
                self.generate_step, jit_compile=self._tensorflow_generate_xla()
            )
        else:
            compiled = super().make_generate_function()
        vocabulary_size = self.backbone.vocabulary_size

        def generate_function(inputs, stop_token_ids=None):
            _check_prompts(inputs, vocabulary_size)
            return compiled(inputs, stop_token_ids=stop_token_ids)

        self.generate_function = generate_function
        return generate_function

    def _auto_stop_token_ids(self):
        if self.preprocessor is None:
            raise ValueError(
                'stop_token_ids="auto" needs a preprocessor (for its tokenizer). '
                "Pass `stop_token_ids=None` to generate up to `max_length`, or a "
                "tuple of ids."
            )
        tokenizer = self.preprocessor.tokenizer
        ids = [tokenizer.end_token_id]
        if self.instruction_tuned:
            if tokenizer.end_of_turn_id is None:
                raise ValueError(
                    f"instruction_tuned=True but the vocabulary has no {END_OF_TURN}."
                )
            ids.append(tokenizer.end_of_turn_id)
        return tuple(ids)

    def generate(
        self, inputs, max_length=None, stop_token_ids="auto", strip_prompt=False
    ):
        """Continues prompts; see `keras_hub.models.CausalLM.generate`.

        `stop_token_ids="auto"` stops at `<eos>` and, for instruction-tuned
        models, at `<end_of_turn>`. A stop token that never comes just runs
        to `max_length` (prompt plus new tokens).

        Text that is not valid Unicode (lone surrogates, bytes that are not
        UTF-8) is generated from with U+FFFD in place of the bad parts (see
        `RecurrentGemmaTokenizer`); an empty or whitespace-only prompt is
        continued from `<bos>` (and the whitespace).

        Raises:
            ValueError: for an empty prompt list, `max_length <= 0`, a
                prompt longer than `max_length` (prompts are never silently
                truncated), token ids or stop token ids outside
                `[0, vocabulary_size)`, or a `padding_mask` that is not right
                padded.
            TypeError: for a `max_length` or stop token id that is not an
                int, or float `token_ids`.
        """
        if isinstance(inputs, (list, tuple)) and len(inputs) == 0:
            raise ValueError("`generate` got an empty list of prompts.")
        if max_length is not None:
            if isinstance(max_length, bool) or not isinstance(
                max_length, numbers.Integral
            ):
                raise TypeError(
                    f"`max_length` must be a positive int; got {max_length!r} "
                    f"({type(max_length).__name__})."
                )
            if max_length <= 0:
                raise ValueError(
                    f"`max_length` must be a positive int; got {max_length}."
                )
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(
                    f'`stop_token_ids` must be "auto", None or a tuple of ids; '
                    f"got {stop_token_ids!r}."
                )
            stop_token_ids = self._auto_stop_token_ids()
        elif stop_token_ids is not None:
            stop_token_ids = self._check_stop_token_ids(stop_token_ids)
        return super().generate(
            inputs,
            max_length=max_length,
            stop_token_ids=stop_token_ids,
            strip_prompt=strip_prompt,
        )

    def _check_stop_token_ids(self, stop_token_ids):
        """A tuple of in-range int ids; one int is accepted as a 1-tuple."""
        if isinstance(stop_token_ids, numbers.Integral):
            stop_token_ids = (stop_token_ids,)
        try:
            ids = tuple(stop_token_ids)
        except TypeError:
            ids = None
        if ids is None or not all(
            isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in ids
        ):
            raise TypeError(
                '`stop_token_ids` must be "auto", None or a tuple of int ids; '
                f"got {stop_token_ids!r}."
            )
        vocab = self.backbone.vocabulary_size
        bad = [int(i) for i in ids if not 0 <= i < vocab]
        if bad:
            # Such an id can never be sampled, so generation would silently
            # run to `max_length`.
            raise ValueError(
                f"`stop_token_ids` contains id {bad[0]}, outside "
                f"[0, vocabulary_size={vocab})."
            )
        return tuple(int(i) for i in ids)

    def chat(self, turns, max_length=None):
        """Generates the model's next turn of a conversation.

        Formats `turns` with `keras_recurrentgemma.chat.format_chat`,
        generates until `<end_of_turn>` or `<eos>`, and returns the reply
        text alone. Meant for instruction-tuned models.

        Args:
            turns: list of `{"role": "user" | "model", "content": str}`.
            max_length: int. Prompt plus reply tokens. Defaults to the
                preprocessor's `sequence_length`.

        Returns:
            str, the reply.
        """
        if self.preprocessor is None:
            raise ValueError("`chat` needs a preprocessor to tokenize the turns.")
        tokenizer = self.preprocessor.tokenizer
        stops = [tokenizer.end_token_id]
        if tokenizer.end_of_turn_id is not None:
            stops.append(tokenizer.end_of_turn_id)
        reply = self.generate(
            format_chat(turns),
            max_length=max_length,
            stop_token_ids=tuple(stops),
            strip_prompt=True,
        )
        end = reply.find(END_OF_TURN)
        return reply if end < 0 else reply[:end]

    # --- Scoring ------------------------------------------------------------

    def score(
        self,
        token_ids,
        padding_mask=None,
        scoring_mode="logits",
        layer_intercept_fn=None,
        target_ids=None,
    ):
        """Scores token sequences with one forward pass.

        Args:
            token_ids: int tensor `[b, t]`.
            padding_mask: optional `[b, t]`; ones if omitted. Left or right
                padding; padding between real tokens is refused.
            scoring_mode: `"logits"` (`[b, t, vocab]`) or `"loss"` (per-token
                cross-entropy of `target_ids`, `[b, t]`, i.e. minus the
                log-softmax of the logits at the target).
            layer_intercept_fn: optional `fn(x, i)` applied to the scaled
                embeddings (`i = -1`) and to each residual block's output
                (`i = 0, 1, ...`); it must return a tensor of the same shape.
            target_ids: int tensor `[b, t]`, required for `"loss"`.

        Returns:
            The per-token scores.
        """
        if scoring_mode not in ("logits", "loss"):
            raise ValueError(
                f"scoring_mode must be 'logits' or 'loss'; got {scoring_mode!r}."
            )
        if scoring_mode == "loss" and target_ids is None:
            raise ValueError("scoring_mode='loss' needs `target_ids`.")
        token_ids = ops.convert_to_tensor(token_ids)
        if padding_mask is None:
            padding_mask = ops.ones(ops.shape(token_ids), "int32")
        if scoring_mode == "loss":
            # Out-of-range targets are a silent 0 loss on JAX and a backend
            # error elsewhere.
            target_ids = ops.convert_to_tensor(target_ids)
            check_same_shape(token_ids, target_ids, "token_ids", "target_ids")
            target_ids = check_in_range(
                target_ids,
                0,
                self.backbone.vocabulary_size,
                "`target_ids` contains id {bad}, outside [0, vocabulary_size="
                f"{self.backbone.vocabulary_size}).",
            )
        token_ids, segment_pos = self.backbone.segment_positions(
            token_ids, padding_mask
        )
        check_no_padding_gaps(segment_pos)
        hidden, _ = self.backbone.forward_with_caches(
            token_ids, segment_pos, layer_intercept_fn=layer_intercept_fn
        )
        logits = self.backbone.token_embedding(hidden, reverse=True)
        if scoring_mode == "logits":
            return logits
        loss = keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction="none"
        )
        return loss(target_ids, ops.cast(logits, "float32"))

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "instruction_tuned": self.instruction_tuned,
                "prefill_chunk_size": self.prefill_chunk_size,
            }
        )
        return config
