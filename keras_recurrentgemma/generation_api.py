"""The generation side of `RecurrentGemmaCausalLM`, over `generation`.

A mixin: `generate_step` and its compilation (`make_generate_function`,
`torch_decode_mode`); the cache API (`initial_cache`, `prefill`,
`call_with_cache`, `next_token_logits`), to feed long inputs chunk by chunk
and continue them a token at a time; `generation_functions`, streaming's
steps compiled as `generate` compiles them; `resolve_stop_token_ids`; and
`chat`.
"""

import keras
from keras import ops
from keras_hub.samplers import ContrastiveSampler

from keras_recurrentgemma import compiled_decode
from keras_recurrentgemma import generation
from keras_recurrentgemma import generation_checks as checks
from keras_recurrentgemma import generation_compile
from keras_recurrentgemma.chat import format_chat
from keras_recurrentgemma.tokenizer import END_OF_TURN
from keras_recurrentgemma.utils.checks import check_token_ids


class GenerationMixin:
    """Generation and the cache API, for a `RecurrentGemmaCausalLM`."""

    def initial_cache(self, batch_size):
        """An empty `RecurrentGemmaCache` for `batch_size` rows."""
        return generation.initial_cache(self.backbone, batch_size, self.compute_dtype)

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
            `(logits [b, t, v], hidden_states [b, t, d], cache)`. At a
            padded position both repeat the last real token's.
        """
        token_ids = check_token_ids(token_ids, self.backbone.vocabulary_size)
        if padding_mask is not None:
            checks.right_padded_lengths(padding_mask)
        return generation.forward(self.backbone, token_ids, cache, padding_mask)

    def prefill(self, token_ids, padding_mask=None, cache=None, chunk_size=None):
        """Absorbs tokens into the cache without computing any logits.

        Call it repeatedly, passing the returned cache back, to feed a prompt
        in chunks of any size; the result equals one call on the whole
        prompt. Or pass `chunk_size` and the whole input: it is fed in
        slices of that many tokens (`generation.chunk_plan`), so memory
        stays flat however long the input is (keep a very long input in
        host memory, e.g. numpy; only one slice at a time reaches the
        device). Then `next_token_logits(cache)` gives the distribution of
        the next token, and `call_with_cache` continues one token at a time.

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
            checks.check_chunk_size(chunk_size)
            b, t = checks.check_prefill_buffer(token_ids, padding_mask)
            plan = generation.chunk_plan(t, chunk_size)
            with generation_compile.no_grad():
                for start in plan.starts(t):
                    end = start + plan.chunk
                    mask = None if padding_mask is None else padding_mask[:, start:end]
                    cache = self.prefill(token_ids[:, start:end], mask, cache)
                    # Cuts autograd history (torch): earlier chunks can be freed.
                    cache = keras.tree.map_structure(ops.stop_gradient, cache)
            return self.initial_cache(b) if cache is None else cache
        token_ids = check_token_ids(
            ops.convert_to_tensor(token_ids), self.backbone.vocabulary_size
        )
        if cache is None:
            cache = self.initial_cache(ops.shape(token_ids)[0])
        if padding_mask is not None:
            checks.right_padded_lengths(padding_mask)
        return generation.advance(self.backbone, token_ids, cache, padding_mask)[2]

    def next_token_logits(self, cache):
        """Logits `[b, v]` for the token after everything in `cache`."""
        return generation.next_token_logits(self.backbone, cache)

    def _build_cache(self, token_ids, padding_mask, return_hidden=False):
        """`generate`'s prefill: `generation.prefill_buffer` in chunks of
        `prefill_chunk_size`; returns `(hidden_states or None, cache)`."""
        return generation.prefill_buffer(
            self.backbone,
            token_ids,
            padding_mask,
            self.prefill_chunk_size,
            self.compute_dtype,
            return_hidden=return_hidden,
        )

    def generation_functions(self):
        """The per-token computations of streaming, compiled as `generate`'s.

        Returns:
            `generation_compile.GenerationFunctions`: `prefill(token_ids,
            padding_mask, cache)` (one chunk), `first_logits(cache)` and
            `decode(token, upcoming, index, cache)` (`generation.decode_step`,
            on torch in `torch_decode_mode`), each compiled by
            `generation_compile.compile_for_backend`, kept while the model's
            compile settings and variables stay the same.
        """
        key = (
            self.run_eagerly,
            self._generate_compile,
            self.torch_decode_mode,
            generation_compile.variables_key(self),
        )
        cached = getattr(self, "_generation_functions", None)
        if cached is None or cached[0] != key:
            cached = (
                key,
                generation_compile.compile_functions(self, self._compile_step),
            )
            self._generation_functions = cached
        return cached[1]

    def resolve_stop_token_ids(self, stop_token_ids="auto"):
        """The stop tokens `generate` uses for `stop_token_ids`.

        Args:
            stop_token_ids: `"auto"` (`<eos>` and, when `instruction_tuned`,
                `<end_of_turn>`; needs a preprocessor), `None`, an int or a
                sequence of ints in `[0, vocabulary_size)`.

        Returns:
            A tuple of ints, or `None` for `None`.
        """
        if isinstance(stop_token_ids, str):
            if stop_token_ids != "auto":
                raise ValueError(
                    f'`stop_token_ids` must be "auto", None or a tuple of ids; '
                    f"got {stop_token_ids!r}."
                )
            if self.preprocessor is None:
                raise ValueError(
                    'stop_token_ids="auto" needs a preprocessor (for its '
                    "tokenizer). Pass `stop_token_ids=None` to generate up to "
                    "`max_length`, or a tuple of ids."
                )
            return generation.auto_stop_token_ids(
                self.preprocessor.tokenizer, self.instruction_tuned
            )
        if stop_token_ids is None:
            return None
        return checks.check_stop_token_ids(
            stop_token_ids, self.backbone.vocabulary_size
        )

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
        hidden_states, cache = self._build_cache(
            inputs["token_ids"],
            inputs["padding_mask"],
            return_hidden=isinstance(self.sampler, ContrastiveSampler),
        )
        decode = self._decode_step
        if self._torch_decode is not None:
            # Torch runs this eagerly, so the number of steps is known.
            mask = keras.ops.convert_to_numpy(inputs["padding_mask"])
            steps = mask.shape[1] - int(mask.astype(bool).sum(axis=1).min())
            decode = generation_compile.bound_step(self._torch_decode, self, steps)
        return generation.sample(
            self.sampler, self, inputs, cache, hidden_states, decode, stop_token_ids
        )

    def _decode_step(self, token, upcoming, index, cache):
        return generation.decode_step(self.backbone, token, upcoming, index, cache)

    @property
    def torch_decode_mode(self):
        """How `generate` runs each decode step on torch, or `None` elsewhere.

        `"inductor"` (the step traced once per batch shape and compiled
        with `torch.compile`, with CUDA graphs on CUDA) by default on CUDA
        and after `compile(jit_compile=True)`; `"auto"` by default on a CPU
        (`"graph"`, the traced step replayed as it is: eager's kernels and
        results without the Python overhead, for a call that decodes
        enough tokens to pay for the tracing, or once shorter calls of the
        same batch size have decoded that many; `"eager"` before);
        `"eager"` after `compile(jit_compile=False)` and with
        `run_eagerly`. Assign any of these to override the choice, `None`
        to go back to it. See `keras_recurrentgemma.compiled_decode`.
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
            return self._generate_compile is not False
        import tensorflow as tf

        sixteen_bit = self.backbone.variable_dtype in ("bfloat16", "float16")
        return not (sixteen_bit and not tf.config.list_logical_devices("GPU"))

    def _compile_step(self, fn, **kwargs):
        return generation_compile.compile_for_backend(
            fn, self, tensorflow_xla=self._tensorflow_generate_xla(), **kwargs
        )

    def make_generate_function(self):
        """The compiled `generate_step`, behind eager checks of its inputs.

        Compiled by `generation_compile.compile_for_backend`: jitted on JAX (the
        weights and the sampler's seeds passed in, as KerasHub does), under
        `no_grad` on torch, and on TensorFlow with XLA even on CPU, where
        Keras's `jit_compile="auto"` would not, unless
        `compile(jit_compile=False)` or, under `"auto"`, the weights are
        16-bit on a machine without a GPU (see `_tensorflow_generate_xla`).
        On torch the per-token decode step runs as `torch_decode_mode`
        says: compiled by default on CUDA.
        """
        if self.generate_function is not None:
            return self.generate_function
        self._torch_decode = None
        if keras.config.backend() == "torch":
            mode = self.torch_decode_mode
            self._torch_decode = self._compile_step(self._decode_step, torch_mode=mode)
        compiled = self._compile_step(
            self.generate_step,
            static_argnames=("stop_token_ids",),
            sampler=self.sampler,
        )
        vocabulary_size = self.backbone.vocabulary_size

        def generate_function(inputs, stop_token_ids=None):
            checks.check_prompts(inputs, vocabulary_size)
            return compiled(inputs, stop_token_ids=stop_token_ids)

        self.generate_function = generate_function
        return generate_function

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
        reply = self.generate(
            format_chat(turns),
            max_length=max_length,
            stop_token_ids=generation.chat_stop_token_ids(self.preprocessor.tokenizer),
            strip_prompt=True,
        )
        end = reply.find(END_OF_TURN)
        return reply if end < 0 else reply[:end]
