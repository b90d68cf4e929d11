"""Token-by-token generation, for printing text while it is produced.

`RecurrentGemmaCausalLM.generate` runs its whole sampling loop in one
compiled call and returns at the end. `stream_generate` drives the same
model one token at a time through its public cache API (`prefill`,
`next_token_logits`, `call_with_cache`) and the same KerasHub sampler
methods (`compute_probabilities`, `get_next_token`), so it yields the text
as it comes and, with the greedy sampler, exactly the tokens `generate`
returns.

Example:
```python
stream = stream_generate(causal_lm, "The quick brown fox", max_length=64)
for piece in stream:
    print(piece, end="", flush=True)
stream.finish_reason  # "stop" or "length"
```
"""

import weakref

import keras
import numpy as np
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import ContrastiveSampler
from keras_hub.samplers import Sampler
from keras_hub.samplers import get as get_keras_hub_sampler

# Samplers that pick one token from one distribution per step. Beam search
# and contrastive search revise or rescore candidates across steps, so no
# token is final when it is produced.
STREAMING_SAMPLERS = ("greedy", "random", "top_k", "top_p")
# Detokenized text ending in these may still change when more bytes come:
# SentencePiece byte fallback spells a character outside the vocabulary as
# one token per UTF-8 byte, and an incomplete sequence decodes to U+FFFD.
_INCOMPLETE = "\ufffd"


class PromptTooLongError(ValueError):
    """The prompt, with `<bos>`, has more tokens than `max_length`.

    Attributes:
        num_tokens: int, the prompt's length in tokens.
        max_length: int, the limit it exceeded.
    """

    def __init__(self, num_tokens, max_length):
        self.num_tokens = num_tokens
        self.max_length = max_length
        super().__init__(
            f"The prompt is {num_tokens} tokens long (with <bos>), more than "
            f"max_length={max_length} (prompt plus new tokens). Pass a larger "
            "max_length or shorten the prompt."
        )


def get_sampler(sampler="greedy", seed=None, **config):
    """A KerasHub sampler that `stream_generate` can drive.

    Args:
        sampler: str, one of `STREAMING_SAMPLERS`, or a
            `keras_hub.samplers.Sampler` instance (returned as is).
        seed: int or `None`. Seed of the random samplers; ignored by
            `"greedy"`.
        **config: further constructor arguments for a named sampler, e.g.
            `temperature`, `k` (top_k, top_p) or `p` (top_p).

    Returns:
        A `keras_hub.samplers.Sampler`.

    Raises:
        ValueError: for beam or contrastive search, an unknown name, or
            `seed`/`config` given with a sampler instance.
    """
    if isinstance(sampler, (BeamSampler, ContrastiveSampler)) or sampler in (
        "beam",
        "contrastive",
    ):
        name = sampler if isinstance(sampler, str) else type(sampler).__name__
        raise ValueError(
            f"The {name} sampler cannot stream: it settles on tokens only at the "
            "end. Use `causal_lm.generate` with it, or stream with one of "
            f"{list(STREAMING_SAMPLERS)}."
        )
    if isinstance(sampler, Sampler):
        if seed is not None or config:
            raise ValueError(
                "`seed` and sampler options go to the sampler's constructor when "
                "passing a sampler instance."
            )
        return sampler
    if sampler not in STREAMING_SAMPLERS:
        raise ValueError(
            f"Unknown sampler {sampler!r}; use one of {list(STREAMING_SAMPLERS)} "
            "or a `keras_hub.samplers.Sampler` instance."
        )
    config = {k: v for k, v in config.items() if v is not None}
    if sampler != "greedy" and seed is not None:
        config["seed"] = int(seed)
    return get_keras_hub_sampler({"class_name": sampler, "config": config})


def prompt_token_ids(causal_lm, prompt):
    """The token ids generation starts from: `<bos>` (if added) and `prompt`.

    Args:
        causal_lm: `RecurrentGemmaCausalLM` with a preprocessor.
        prompt: str.

    Returns:
        list of int.
    """
    preprocessor = _preprocessor(causal_lm)
    ids = [int(i) for i in np.asarray(preprocessor.tokenizer(prompt)).reshape(-1)]
    if preprocessor.add_start_token:
        ids = [preprocessor.tokenizer.start_token_id] + ids
    return ids


def stream_token_ids(
    causal_lm,
    token_ids,
    max_length,
    sampler="greedy",
    stop_token_ids="auto",
    seed=None,
):
    """Yields new token ids one at a time, as `generate` would produce them.

    The prompt is prefilled in the chunks `generate` uses
    (`prefill_chunk_size`, at most `max_length`), then each token comes
    from one `call_with_cache` step. Generation ends after the first stop
    token (which is yielded, as `generate` keeps it) or at `max_length`
    tokens in all.

    Args:
        causal_lm: `RecurrentGemmaCausalLM`.
        token_ids: list of int, the prompt including `<bos>`.
        max_length: int, prompt plus new tokens.
        sampler: see `get_sampler`.
        stop_token_ids: `"auto"` (`<eos>`, and `<end_of_turn>` when
            `causal_lm.instruction_tuned`), `None`, or a sequence of ids.
        seed: see `get_sampler`.

    Yields:
        int, each new token id.

    Raises:
        PromptTooLongError: if `token_ids` is longer than `max_length`.
        ValueError: for an empty prompt or a sampler that cannot stream.
    """
    token_ids = [int(i) for i in token_ids]
    max_length = int(max_length)
    if not token_ids:
        raise ValueError("The prompt has no tokens; it needs at least <bos>.")
    if len(token_ids) > max_length:
        raise PromptTooLongError(len(token_ids), max_length)
    sampler = get_sampler(sampler, seed=seed)
    stops = _stop_token_ids(causal_lm, stop_token_ids)
    return _stream_token_ids(causal_lm, token_ids, max_length, sampler, stops)


def _stream_token_ids(causal_lm, token_ids, max_length, sampler, stops):
    if len(token_ids) == max_length:
        return
    functions = _compiled(causal_lm)
    # `generate` prefills its `[1, max_length]` buffer in chunks of this
    # size; using the same chunks gives the same numbers, not just close ones.
    chunk = min(causal_lm.prefill_chunk_size, max_length)
    padded = -(-len(token_ids) // chunk) * chunk
    ids = np.zeros((1, padded), "int32")
    ids[0, : len(token_ids)] = token_ids
    mask = np.zeros((1, padded), "int32")
    mask[0, : len(token_ids)] = 1
    cache = causal_lm.initial_cache(1)
    for start in range(0, padded, chunk):
        cache = functions.prefill(
            ids[:, start : start + chunk], mask[:, start : start + chunk], cache
        )
    logits = functions.first_logits(cache)
    for _ in range(max_length - len(token_ids)):
        probabilities = sampler.compute_probabilities(logits)
        next_token = sampler.get_next_token(probabilities)
        token = int(keras.ops.convert_to_numpy(next_token).reshape(-1)[0])
        yield token
        if token in stops:
            return
        logits, cache = functions.step(np.array([[token]], "int32"), cache)


class TextStream:
    """The text of a generation, yielded piece by piece as tokens arrive.

    Iterate it to drive generation. Each piece is the new suffix of the
    detokenized prompt-plus-generation: SentencePiece spaces, newlines and
    multi-byte characters come out as `generate` writes them, and a
    character split over byte-fallback tokens is held back until whole. Stop
    tokens end the stream without being printed.

    Attributes:
        token_ids: list of int, the new tokens so far (a final stop token
            included).
        text: str, the text yielded so far.
        finish_reason: `None` while generating, then `"stop"` (a stop token
            came) or `"length"` (`max_length` reached).
        prompt_length: int, the prompt's tokens, `<bos>` included.
    """

    def __init__(self, causal_lm, prompt_ids, token_stream, stop_token_ids):
        tokenizer = _preprocessor(causal_lm).tokenizer
        self._tokenizer = tokenizer
        # `generate_postprocess` drops these before detokenizing.
        self._special = set(int(i) for i in tokenizer.special_token_ids)
        self._stops = set(stop_token_ids)
        self._context = [i for i in prompt_ids if i not in self._special]
        self._prefix = self._decode(self._context)
        self._tokens = token_stream
        self._kept = []
        self.prompt_length = len(prompt_ids)
        self.token_ids = []
        self.text = ""
        self.finish_reason = None

    def _decode(self, ids):
        text = self._tokenizer.detokenize(ids)
        if hasattr(text, "numpy"):
            text = text.numpy()
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return str(text)

    def _new_text(self, final):
        # Decoding after the prompt keeps the first new token's leading
        # space, which SentencePiece drops at the start of a decoded text.
        full = self._decode(self._context + self._kept)
        if full.startswith(self._prefix):
            full = full[len(self._prefix) :]
        else:
            full = self._decode(self._kept)
        if not final:
            full = full.rstrip(_INCOMPLETE)
        if not full.startswith(self.text):
            # Decoding revised text already printed; print nothing until the
            # two agree again (at worst, at the end).
            return ""
        piece = full[len(self.text) :]
        self.text = full
        return piece

    def __iter__(self):
        return self

    def __next__(self):
        while self.finish_reason is None:
            token = next(self._tokens, None)
            if token is None:
                self.finish_reason = "length"
                piece = self._new_text(final=True)
            else:
                self.token_ids.append(token)
                if token in self._stops:
                    self.finish_reason = "stop"
                    piece = self._new_text(final=True)
                else:
                    if token not in self._special:
                        self._kept.append(token)
                    piece = self._new_text(final=False)
            if piece:
                return piece
        raise StopIteration

    def read(self):
        """Runs generation to the end and returns all of its text."""
        for _ in self:
            pass
        return self.text


def stream_generate(
    causal_lm,
    prompt,
    max_length=None,
    sampler="greedy",
    stop_token_ids="auto",
    seed=None,
):
    """Generates a continuation of `prompt`, yielding its text as it comes.

    Args:
        causal_lm: `RecurrentGemmaCausalLM` with a preprocessor.
        prompt: str.
        max_length: int. Prompt (with `<bos>`) plus new tokens, as in
            `generate`. Defaults to the preprocessor's `sequence_length`.
        sampler: str, one of `STREAMING_SAMPLERS`, or a KerasHub sampler
            instance other than beam or contrastive.
        stop_token_ids: `"auto"` (`<eos>`, and `<end_of_turn>` when
            `causal_lm.instruction_tuned`), `None` (run to `max_length`), or a
            sequence of ids.
        seed: int or `None`, for the random samplers named by string.

    Returns:
        A `TextStream`: iterate it for the new text's pieces (the prompt is
        not repeated); afterwards its `token_ids` and `finish_reason` say what
        was generated and why it ended.

    Raises:
        PromptTooLongError: if the prompt has more than `max_length` tokens.
        ValueError: for a model without a preprocessor, a bad `max_length`,
            or a sampler that cannot stream.
    """
    preprocessor = _preprocessor(causal_lm)
    if max_length is None:
        max_length = preprocessor.sequence_length
    if int(max_length) <= 0:
        raise ValueError(f"`max_length` must be a positive int; got {max_length}.")
    ids = prompt_token_ids(causal_lm, prompt)
    stops = _stop_token_ids(causal_lm, stop_token_ids)
    tokens = stream_token_ids(causal_lm, ids, max_length, sampler, stops, seed)
    return TextStream(causal_lm, ids, tokens, stops)


# --- Helpers ------------------------------------------------------------------


def _preprocessor(causal_lm):
    if causal_lm.preprocessor is None:
        raise ValueError(
            "Streaming text needs a causal LM with a preprocessor (for its "
            "tokenizer); use `stream_token_ids` with token ids otherwise."
        )
    return causal_lm.preprocessor


def _stop_token_ids(causal_lm, stop_token_ids):
    if isinstance(stop_token_ids, str):
        if stop_token_ids != "auto":
            raise ValueError(
                '`stop_token_ids` must be "auto", None or a sequence of ids; '
                f"got {stop_token_ids!r}."
            )
        return causal_lm._auto_stop_token_ids()
    if stop_token_ids is None:
        return ()
    return tuple(int(i) for i in stop_token_ids)


class _Functions:
    """The three per-token computations, compiled once per model."""

    def __init__(self, prefill, first_logits, step):
        self.prefill = prefill
        self.first_logits = first_logits
        self.step = step


# Compiled functions per model, so a chat's later turns reuse the first
# turn's compilation; dropped with the model.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(causal_lm):
    # `compile(jit_compile=...)` or `run_eagerly` may change between calls.
    key = (causal_lm.run_eagerly, getattr(causal_lm, "_generate_jit_compile", True))
    entry = _COMPILED.get(causal_lm)
    if entry is None or entry[0] != key:
        entry = (key, _compile(causal_lm))
        _COMPILED[causal_lm] = entry
    return entry[1]


def _compile(causal_lm):
    # `_COMPILED` keeps these only while the model lives, so they must not
    # keep it alive themselves.
    model = weakref.ref(causal_lm)

    def prefill(token_ids, padding_mask, cache):
        return model().prefill(token_ids, padding_mask=padding_mask, cache=cache)

    def first_logits(cache):
        return model().next_token_logits(cache)

    def step(token_ids, cache):
        logits, _, cache = model().call_with_cache(token_ids, cache)
        return logits[:, 0], cache

    functions = (prefill, first_logits, step)
    backend = keras.config.backend()
    if backend == "jax":
        return _Functions(*(_jax_jit(causal_lm, fn) for fn in functions))
    if backend == "tensorflow" and not causal_lm.run_eagerly:
        import tensorflow as tf

        # As `generate` does: XLA unless `compile(jit_compile=False)`.
        jit = getattr(causal_lm, "_generate_jit_compile", True)
        return _Functions(*(tf.function(fn, jit_compile=jit) for fn in functions))
    if backend == "torch":
        import torch

        # As `generate` does; per call, since a `with` around the generator
        # would also cover the caller's code between tokens.
        return _Functions(*(torch.no_grad()(fn) for fn in functions))
    return _Functions(*functions)


def _jax_jit(causal_lm, fn):
    """`fn` jitted with the model's weights as arguments, not constants.

    As KerasHub's `generate` does on JAX: inside a `StatelessScope` the
    variables read the traced values, so one compilation serves any
    weights and none are baked into the program.
    """
    import jax

    variables = list(causal_lm.trainable_variables) + list(
        causal_lm.non_trainable_variables
    )

    @jax.jit
    def stateless(values, *args):
        mapping = list(zip(variables, values, strict=True))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*args)

    def call(*args):
        return stateless([v.value for v in variables], *args)

    return call
