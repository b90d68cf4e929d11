"""Token-by-token generation, for printing text while it is produced.

`RecurrentGemmaCausalLM.generate` runs its whole sampling loop in one
compiled call and returns at the end. `stream_generate` drives the same
engine (`keras_recurrentgemma.generation`) one token at a time: the prompt
in `generate`'s prefill chunks, then the same decode step, compiled as
`generate` compiles it (`causal_lm.generation_functions()`), and the same
KerasHub sampler methods (`compute_probabilities`, `get_next_token`), so it
yields the text as it comes and, with the greedy sampler, exactly the
tokens `generate` returns.

Example:
```python
stream = stream_generate(causal_lm, "The quick brown fox", max_length=64)
for piece in stream:
    print(piece, end="", flush=True)
stream.finish_reason  # "stop" or "length"
```
"""

import keras
import numpy as np

from keras_recurrentgemma import generation
from keras_recurrentgemma import generation_compile
from keras_recurrentgemma.generation import STREAMING_SAMPLERS  # noqa: F401

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

    `generation.get_sampler` with `streaming=True`: one of
    `STREAMING_SAMPLERS` by name (with `seed` and constructor `config`,
    e.g. `temperature`, `k`, `p`), or a `keras_hub.samplers.Sampler`
    instance other than beam or contrastive search.
    """
    return generation.get_sampler(sampler, seed=seed, streaming=True, **config)


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
    functions = causal_lm.generation_functions()
    decode = generation_compile.bound_step(
        functions.decode, causal_lm, max_length - len(token_ids)
    )
    cache = generation.prefill_prompt(
        functions.prefill,
        token_ids,
        max_length,
        causal_lm.prefill_chunk_size,
        causal_lm.initial_cache(1),
    )
    logits = functions.first_logits(cache)
    for index in range(len(token_ids) + 1, max_length + 1):
        probabilities = sampler.compute_probabilities(logits)
        next_token = sampler.get_next_token(probabilities)
        token = int(keras.ops.convert_to_numpy(next_token).reshape(-1)[0])
        yield token
        if token in stops or index == max_length:
            return
        # `index` as `generate`'s loop has it when it feeds `token`.
        token = keras.ops.convert_to_tensor([[token]], "int32")
        index = keras.ops.convert_to_tensor(index, "int32")
        logits, _, cache = decode(token, token, index, cache)


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
    return tuple(causal_lm.resolve_stop_token_ids(stop_token_ids) or ())
