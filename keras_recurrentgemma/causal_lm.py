"""RecurrentGemma causal language model: the KerasHub adapter.

KerasHub's `CausalLM` (presets, `compile`, `fit` with the chunked loss,
`quantize`, `score`, `generate`) on top of
`keras_recurrentgemma.generation` (the cache, prefill and decode step),
`generation_compile` (per-backend compilation) and `generation_api` (the
cache API, `generate_step` and `chat`, as a mixin).
"""

import keras
from keras import ops
from keras_hub.models import CausalLM
from keras_hub.samplers import get as get_keras_hub_sampler

from keras_recurrentgemma import chunked_loss
from keras_recurrentgemma import generation
from keras_recurrentgemma import generation_checks as checks
from keras_recurrentgemma import generation_compile
from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.backbone import _with_segment_pos
from keras_recurrentgemma.causal_lm_preprocessor import (
    RecurrentGemmaCausalLMPreprocessor,
)
from keras_recurrentgemma.generation import SAMPLERS  # noqa: F401
from keras_recurrentgemma.generation import RecurrentGemmaCache  # noqa: F401
from keras_recurrentgemma.generation_api import GenerationMixin
from keras_recurrentgemma.layers.dense import check_quantization_mode
from keras_recurrentgemma.layers.dense import no_collect
from keras_recurrentgemma.layers.dense import quantizable_layers
from keras_recurrentgemma.preset_mixin import ModelPresetMixin
from keras_recurrentgemma.training import TrainingMixin
from keras_recurrentgemma.utils.checks import check_in_range
from keras_recurrentgemma.utils.checks import check_no_padding_gaps
from keras_recurrentgemma.utils.checks import check_same_shape

# The functional model's inputs: what the preprocessor gives.
TASK_INPUTS = ("token_ids", "padding_mask")


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaCausalLM(
    ModelPresetMixin, TrainingMixin, GenerationMixin, CausalLM
):
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
    # `compile(jit_compile=...)` as given: XLA on TensorFlow (see
    # `_tensorflow_generate_xla`), the decode mode on torch.
    _generate_compile = "auto"
    _torch_decode_mode = None
    _torch_decode = None
    _load_preset = staticmethod(preset_loader.load_task)

    def export_for_generation(
        self, path, format="onnx", overwrite=False, prefill_length=32, quantize=None
    ):
        """Writes a generation artifact that runs without Keras.

        `prefill` and `decode_step` endpoints with the fixed-size state as
        explicit inputs and outputs, the tokenizer and `generation.json`;
        `keras_recurrentgemma.serving.load_exported(path)` runs it. `format`
        is `"onnx"` (torch, tensorflow), `"tf_saved_model"` (tensorflow,
        jax) or `"litert"` (tensorflow); `prefill_length` is the prompt chunk
        per `prefill` call; `quantize="int8"` (ONNX) stores the weight
        matrices as int8. See `keras_recurrentgemma.export`.

        Raises:
            ValueError: for an unknown format, one this backend cannot write
                (naming those that can), or an existing `path` without
                `overwrite=True`.
        """
        from keras_recurrentgemma.export import export_for_generation

        return export_for_generation(
            self,
            path,
            format=format,
            overwrite=overwrite,
            prefill_length=prefill_length,
            quantize=quantize,
        )

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
        # The preprocessor's two inputs, as KerasHub tasks take them; an
        # optional `segment_pos` (packed rows) is handled by `call`.
        inputs = {name: backbone.input[name] for name in TASK_INPUTS}
        hidden = backbone(inputs)
        outputs = backbone.token_embedding(hidden, reverse=True)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)

        # === Config ===
        self.instruction_tuned = instruction_tuned
        self.prefill_chunk_size = int(prefill_chunk_size)

    def call(self, inputs, *args, **kwargs):
        if self._chunked_loss_step:
            return self.backbone(_with_segment_pos(inputs))
        if isinstance(inputs, dict) and inputs.get("segment_pos") is not None:
            # Not an input of the functional graph (KerasHub's harness and
            # `predict` on preprocessed data need exactly the preprocessor's
            # structure), so rows with their own positions go the same way
            # by hand: backbone, then the tied embedding.
            hidden = self.backbone(inputs)
            return self.backbone.token_embedding(hidden, reverse=True)
        if isinstance(inputs, dict):
            inputs = {name: inputs[name] for name in TASK_INPUTS}
        return super().call(inputs, *args, **kwargs)

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
          computed `loss_chunk_size` tokens at a time (an int, default 64;
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
        # Fails here, not at the first `generate`.
        if isinstance(sampler, str):
            generation.get_sampler(sampler)
        else:
            get_keras_hub_sampler(sampler)
        loss_chunk_size = chunked_loss.check_loss_chunk_size(loss_chunk_size)
        self._loss_chunk_size = loss_chunk_size if loss == "auto" else None
        if loss == "auto":
            loss = keras.losses.SparseCategoricalCrossentropy(
                from_logits=True, reduction="mean_with_sample_weight"
            )
        self._generate_compile = kwargs.get("jit_compile", "auto")
        super().compile(
            optimizer=optimizer,
            loss=loss,
            weighted_metrics=weighted_metrics,
            sampler=sampler,
            **kwargs,
        )
        self._scale_float16_loss(kwargs.get("auto_scale_loss", True))

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
        with no_collect():
            super().quantize(mode, config=config, filters=filters, **kwargs)

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

    def generate(
        self,
        inputs,
        max_length=None,
        stop_token_ids="auto",
        strip_prompt=False,
        sampler=None,
    ):
        """Continues prompts; see `keras_hub.models.CausalLM.generate`.

        `stop_token_ids="auto"` stops at `<eos>` and, for instruction-tuned
        models, at `<end_of_turn>`. A stop token that never comes just runs
        to `max_length` (prompt plus new tokens). `sampler` (a name or a
        `keras_hub.samplers.Sampler`) serves this call only, leaving the
        one `compile(sampler=...)` set.

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
        checks.check_max_length(max_length)
        stop_token_ids = self.resolve_stop_token_ids(stop_token_ids)
        args = (inputs, max_length, stop_token_ids, strip_prompt)
        if sampler is None:
            return super().generate(*args)
        # The compiled loop reads `self.sampler`: swap in this call's sampler
        # and its compiled function, then put the model's own back.
        sampler = generation.get_sampler(sampler)
        key = (sampler, self._generate_compile, self.torch_decode_mode)
        key += (generation_compile.variables_key(self),)
        saved = (self.sampler, self.generate_function, self._torch_decode)
        own = getattr(self, "_per_call", None)
        function, decode = own[1:] if own and own[0] == key else (None, None)
        self.sampler, self.generate_function, self._torch_decode = (
            sampler,
            function,
            decode,
        )
        try:
            return super().generate(*args)
        finally:
            self._per_call = (key, self.generate_function, self._torch_decode)
            self.sampler, self.generate_function, self._torch_decode = saved

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "instruction_tuned": self.instruction_tuned,
                "prefill_chunk_size": self.prefill_chunk_size,
            }
        )
        return config
