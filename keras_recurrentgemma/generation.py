"""The generation engine: one cache, one prefill plan, one decode step.

Every way of generating runs the code here, and none re-derives it:
`RecurrentGemmaCausalLM.generate` (its `generate_step`: prefill, then a
KerasHub sampler's loop over `decode_step`), `streaming.stream_token_ids`
(the same prefill chunks, then `decode_step` one token at a time), the
command line (through `generate` and `stream_generate`) and the traced
torch step (`compiled_decode`); `generation_compile.compile_for_backend`
compiles any of them for the backend.

Data flow: right-padded prompts `[b, t]` → `chunk_plan` → `advance` per
chunk (each row only up to its own length) → `RecurrentGemmaCache` →
`decode_step` per new token → `keep_through_first_stop`.

Shape letters as in CONTRIBUTING.md's legend: `b` batch rows, `t` tokens
in one call, `c` tokens in one prefill chunk, `d` hidden_dim, `l`
lru_width, `m` conv1d_temporal_width, `w` attention_window_size, `k` head
dim, `v` vocabulary_size.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
from keras import ops
from keras_hub.samplers import BeamSampler
from keras_hub.samplers import ContrastiveSampler
from keras_hub.samplers import Sampler
from keras_hub.samplers import get as get_keras_hub_sampler

# Every KerasHub sampler `compile(sampler=...)` takes by name.
SAMPLERS = ("beam", "contrastive", "greedy", "random", "top_k", "top_p")
# Samplers that pick one token from one distribution per step. Beam search
# and contrastive search revise or rescore candidates across steps, so no
# token is final when it is produced.
STREAMING_SAMPLERS = ("greedy", "random", "top_k", "top_p")
# A logit that no softmax turns into a non-zero probability, finite in fp32.
NEVER = -1e9


class RecurrentGemmaCache(NamedTuple):
    """Everything generation remembers; its size never depends on length.

    Attributes:
        blocks: tuple with one cache per residual block, in order:
            `RecurrentBlockCache(rg_lru_state [b, l] float32,
            conv1d_state [b, m-1, l])` or `AttentionBlockCache(keys [b, w, k],
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


# --- The cache ----------------------------------------------------------------


def initial_cache(backbone, batch_size, dtype):
    """An empty `RecurrentGemmaCache` for `batch_size` rows; `hidden` in `dtype`."""
    return RecurrentGemmaCache(
        blocks=backbone.initial_caches(batch_size),
        num_tokens=ops.zeros((batch_size,), "int32"),
        hidden=ops.zeros((batch_size, backbone.hidden_dim), dtype),
    )


def advance(backbone, token_ids, cache, padding_mask=None):
    """Feeds `[b, t]` tokens, right padded, into `cache`.

    Row `i`'s real tokens get positions `num_tokens[i], num_tokens[i] + 1,
    ...`; padded ones get -1, which leaves every block's state as it was.

    Returns:
        `(hidden [b, t, d], lengths [b], cache)`; `hidden` at padded
        positions is garbage (see `hold_last`).
    """
    b, t = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
    if padding_mask is None:
        mask = ops.ones((b, t), "bool")
    else:
        mask = ops.cast(padding_mask, "bool")
    counts = ops.cumsum(ops.cast(mask, "int32"), axis=1)
    segment_pos = ops.where(mask, cache.num_tokens[:, None] + counts - 1, -1)
    hidden, blocks = backbone.forward_with_caches(token_ids, segment_pos, cache.blocks)
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


def hold_last(hidden, lengths, previous):
    """`hidden [b, t, d]` with each padded position holding the hidden state
    of its row's last real token (`previous [b, d]` if the row had none)."""
    b, t, d = ops.shape(hidden)[0], ops.shape(hidden)[1], ops.shape(hidden)[2]
    both = ops.concatenate([previous[:, None], hidden], axis=1)
    idx = ops.minimum(ops.arange(1, t + 1, dtype="int32")[None, :], lengths[:, None])
    return ops.take_along_axis(
        both, ops.broadcast_to(idx[:, :, None], (b, t, d)), axis=1
    )


def forward(backbone, token_ids, cache, padding_mask=None):
    """`advance`, then logits: `(logits [b, t, v], hidden [b, t, d], cache)`,
    padded positions repeating their row's last real token's."""
    hidden, lengths, new_cache = advance(backbone, token_ids, cache, padding_mask)
    hidden = hold_last(hidden, lengths, cache.hidden)
    return backbone.token_embedding(hidden, reverse=True), hidden, new_cache


def next_token_logits(backbone, cache):
    """Logits `[b, v]` for the token after everything in `cache`."""
    return backbone.token_embedding(cache.hidden[:, None, :], reverse=True)[:, 0]


# --- Prefill ------------------------------------------------------------------


class ChunkPlan(NamedTuple):
    """How a prompt buffer is cut into prefill chunks.

    Attributes:
        length: int, the buffer's columns that are fed (a prefix of it).
        chunk: int, tokens per chunk.
        padded: int, `length` rounded up to whole chunks.
    """

    length: int
    chunk: int
    padded: int

    def starts(self, longest):
        """The first column of each chunk that holds a real token."""
        return range(0, min(int(longest), self.padded), self.chunk)


def trims_buffer(return_hidden=False):
    """Whether a prefill cuts its buffer after the longest prompt.

    On torch, which prefills eagerly, the lengths are concrete, and the
    columns after the longest prompt would only be masked out (a fifth of a
    128-token greedy `generate` from a 32-token prompt went there). Compiled
    code (JAX, TensorFlow) needs the static buffer length; the contrastive
    sampler needs hidden states for every column.
    """
    return keras.config.backend() == "torch" and not return_hidden


def chunk_plan(buffer_length, chunk_size, longest=None):
    """The one chunking of every prefill, so equal prompts give equal numbers.

    Args:
        buffer_length: int, the columns of the right-padded buffer
            (`max_length` for `generate`).
        chunk_size: int, the most tokens per chunk (`prefill_chunk_size`).
        longest: int, the longest prompt, given only when the buffer is
            trimmed after it (see `trims_buffer`).

    Returns:
        `ChunkPlan`: chunks of `min(chunk_size, length)` tokens, where
        `length` is `buffer_length`, or `max(longest, 1)` when trimmed.
    """
    length = int(buffer_length) if longest is None else max(int(longest), 1)
    # An empty buffer (`prefill` of no tokens) is a plan of no chunks.
    chunk = max(min(int(chunk_size), length), 1)
    return ChunkPlan(length, chunk, math.ceil(length / chunk) * chunk)


def prefill_buffer(
    backbone, token_ids, padding_mask, chunk_size, dtype, return_hidden=False
):
    """Prefills right-padded prompts in `chunk_plan`'s chunks; compilable.

    The chunks run in a `while_loop` that stops after the longest prompt.

    Args:
        token_ids: int `[b, t]`; padding_mask: `[b, t]`, right padded.
        chunk_size: int, `prefill_chunk_size`.
        dtype: the compute dtype, for the cache's `hidden`.
        return_hidden: bool; the contrastive sampler needs every column's
            hidden state.

    Returns:
        `(hidden_states [b, t, d] or None, cache)`.
    """
    b, t = ops.shape(token_ids)[0], ops.shape(token_ids)[1]
    mask = ops.cast(padding_mask, "int32")
    longest = None
    if trims_buffer(return_hidden):
        longest = int(ops.max(ops.sum(mask, axis=1)))
    plan = chunk_plan(t, chunk_size, longest)
    token_ids, mask = token_ids[:, : plan.length], mask[:, : plan.length]
    if plan.padded != plan.length:
        pad = [[0, 0], [0, plan.padded - plan.length]]
        token_ids, mask = ops.pad(token_ids, pad), ops.pad(mask, pad)
    longest = ops.max(ops.sum(mask, axis=1))
    chunk = plan.chunk
    hidden_states = ()
    if return_hidden:
        hidden_states = ops.zeros((b, plan.padded, backbone.hidden_dim), dtype)

    def cond(start, cache, hidden_states):
        return start < longest

    def body(start, cache, hidden_states):
        ids = ops.slice(token_ids, [0, start], [b, chunk])
        chunk_mask = ops.slice(mask, [0, start], [b, chunk])
        hidden, lengths, new_cache = advance(backbone, ids, cache, chunk_mask)
        if return_hidden:
            hidden = hold_last(hidden, lengths, cache.hidden)
            hidden_states = ops.slice_update(hidden_states, [0, start, 0], hidden)
        return start + chunk, new_cache, hidden_states

    _, cache, hidden_states = ops.while_loop(
        cond,
        body,
        (
            ops.convert_to_tensor(0, "int32"),
            initial_cache(backbone, b, dtype),
            hidden_states,
        ),
        maximum_iterations=plan.padded // chunk,
    )
    return (hidden_states[:, :t] if return_hidden else None), cache


def prefill_prompt(prefill, token_ids, buffer_length, chunk_size, cache):
    """Prefills one prompt (a list of ids) in the chunks `prefill_buffer`
    would use for it in a `[1, buffer_length]` buffer, so the numbers are
    the same, not just close.

    Args:
        prefill: `fn(token_ids [1, c], padding_mask [1, c], cache)`
            returning the cache (`advance`, maybe compiled).

    Returns:
        The cache.
    """
    n = len(token_ids)
    plan = chunk_plan(buffer_length, chunk_size, n if trims_buffer() else None)
    ids = np.zeros((1, plan.padded), "int32")
    ids[0, :n] = token_ids
    mask = np.zeros((1, plan.padded), "int32")
    mask[0, :n] = 1
    for start in plan.starts(n):
        end = start + plan.chunk
        cache = prefill(ids[:, start:end], mask[:, start:end], cache)
    return cache


# --- Decoding -----------------------------------------------------------------


def decode_step(backbone, token, upcoming, index, cache):
    """One column of the sampling loop; a pure function of tensors.

    Feeds `token [b, 1]` (the column before `index`) to the rows whose
    prompt is absorbed; a row still inside its prompt gets a point mass on
    its known `upcoming [b, 1]` token instead of logits.

    Returns:
        `(logits float32 [b, v], hidden [b, d], cache)`.
    """
    feed = ops.greater_equal(index - 1, cache.num_tokens)[:, None]
    logits, hidden, new_cache = forward(backbone, token, cache, feed)
    logits = ops.cast(logits[:, 0], "float32")
    known = ops.less(index, cache.num_tokens)
    vocab = ops.arange(backbone.vocabulary_size)[None, :]
    point_mass = ops.where(ops.equal(vocab, upcoming), 0.0, NEVER)
    logits = ops.where(known[:, None], point_mass, logits)
    return logits, hidden[:, 0], new_cache


def sample(sampler, model, inputs, cache, hidden_states, decode, stop_token_ids):
    """Runs `sampler` over the columns after the shortest prompt.

    Each step calls `decode(token, upcoming, index, cache)` (`decode_step`,
    maybe compiled). Returns `generate_step`'s dict: the filled
    `token_ids` and a `padding_mask` through each row's first new stop.
    """
    token_ids = inputs["token_ids"]
    padding_mask = ops.cast(inputs["padding_mask"], "bool")
    max_length = ops.shape(token_ids)[1]

    def next(prompt, cache, index):
        b = ops.shape(prompt)[0]
        token = ops.slice(prompt, [0, index - 1], [b, 1])
        upcoming = ops.slice(prompt, [0, ops.minimum(index, max_length - 1)], [b, 1])
        return decode(token, upcoming, index, cache)

    token_ids = sampler(
        next=next,
        prompt=token_ids,
        cache=cache,
        index=ops.min(ops.sum(ops.cast(padding_mask, "int32"), axis=1)),
        mask=padding_mask,
        stop_token_ids=stop_token_ids,
        hidden_states=hidden_states,
        model=model,
    )
    if stop_token_ids is None:
        padding_mask = ops.ones_like(token_ids, dtype="bool")
    else:
        padding_mask = keep_through_first_stop(token_ids, stop_token_ids, padding_mask)
    return {"token_ids": token_ids, "padding_mask": padding_mask}


# --- Stop tokens --------------------------------------------------------------


def is_stop_token(token_ids, stop_token_ids):
    """Bool tensor of `token_ids`' shape: which entries are stop tokens."""
    stops = ops.convert_to_tensor(list(stop_token_ids), ops.dtype(token_ids))
    return ops.any(ops.equal(token_ids[..., None], stops), axis=-1)


def keep_through_first_stop(token_ids, stop_token_ids, prompt_mask):
    """The mask `[b, t]` of everything up to and including each row's first
    stop token after its prompt (`prompt_mask`)."""
    stops = is_stop_token(token_ids, stop_token_ids)
    stops = ops.cast(ops.logical_and(stops, ops.logical_not(prompt_mask)), "int32")
    after = ops.cumsum(stops, axis=-1) - stops
    return ops.logical_not(ops.cast(after, "bool"))


def auto_stop_token_ids(tokenizer, instruction_tuned):
    """`<eos>`, and `<end_of_turn>` for instruction-tuned weights."""
    ids = [tokenizer.end_token_id]
    if instruction_tuned:
        if tokenizer.end_of_turn_id is None:
            raise ValueError(
                "instruction_tuned=True but the vocabulary has no <end_of_turn>."
            )
        ids.append(tokenizer.end_of_turn_id)
    return tuple(ids)


def chat_stop_token_ids(tokenizer):
    """Where a chat reply ends: `<eos>` and, if the vocabulary has it,
    `<end_of_turn>` (`chat` and the command line's `chat`)."""
    ids = [tokenizer.end_token_id]
    if tokenizer.end_of_turn_id is not None:
        ids.append(tokenizer.end_of_turn_id)
    return tuple(ids)


# --- Samplers -----------------------------------------------------------------


def get_sampler(sampler="greedy", seed=None, streaming=False, **config):
    """A KerasHub sampler, made by `keras_hub.samplers.get`.

    Args:
        sampler: str, one of `SAMPLERS` (`STREAMING_SAMPLERS` if
            `streaming`), or a `keras_hub.samplers.Sampler` instance
            (returned as is).
        seed: int or `None`, seed of the random samplers; not passed to
            the others.
        streaming: bool. Refuse beam and contrastive search, which settle
            on tokens only at the end.
        **config: constructor arguments of a named sampler, e.g.
            `temperature`, `k`, `p`, `num_beams`; `None` values are left out.

    Raises:
        ValueError: for an unknown name, a sampler that cannot stream when
            `streaming`, or `seed`/`config` given with an instance.
    """
    is_instance = isinstance(sampler, Sampler)
    if streaming and (
        isinstance(sampler, (BeamSampler, ContrastiveSampler))
        or sampler in ("beam", "contrastive")
    ):
        name = type(sampler).__name__ if is_instance else sampler
        raise ValueError(
            f"The {name} sampler cannot stream: it settles on tokens only at the "
            "end. Use `causal_lm.generate` with it, or stream with one of "
            f"{list(STREAMING_SAMPLERS)}."
        )
    config = {k: v for k, v in config.items() if v is not None}
    if is_instance:
        if seed is not None or config:
            raise ValueError(
                "`seed` and sampler options go to the sampler's constructor when "
                "passing a sampler instance."
            )
        return sampler
    names = STREAMING_SAMPLERS if streaming else SAMPLERS
    if not isinstance(sampler, str) or sampler not in names:
        raise ValueError(
            f"Unknown sampler {sampler!r}; use one of {list(names)} or a "
            "`keras_hub.samplers.Sampler` instance."
        )
    if seed is not None and sampler in ("random", "top_k", "top_p"):
        config["seed"] = int(seed)
    return get_keras_hub_sampler({"class_name": sampler, "config": config})
