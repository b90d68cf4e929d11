"""RecurrentGemmaCausalLM: the fixed-size cache, generation and scoring.

What is proved, on every backend:
- feeding tokens one at a time through `call_with_cache` gives the logits of
  the full forward pass, for sequences several windows long, for every block
  pattern;
- chunked prefill, with chunks smaller and larger than the window, leaves
  the same cache and next-token logits as one-shot prefill;
- a batch of prompts of different lengths generates, row by row, what each
  prompt generates alone (greedy and beam);
- the cache's bytes do not depend on `max_length`;
- `score` is the log-softmax of the forward logits;
- every KerasHub sampler runs, stop tokens behave, and bad input is refused.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import RecurrentGemmaCache
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.causal_lm import SAMPLERS
from tests.conftest import TINY_CONFIGS
from tests.models import tiny_causal_lm
from tests.tolerances import PARITY
from tests.tolerances import relative_error

TOL = PARITY["float32"]["relative"]


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def random_ids(lm, shape, seed=0):
    # Ids 6.. avoid the special and turn pieces, so nothing stops early.
    vocab = lm.backbone.vocabulary_size
    return np.random.default_rng(seed).integers(6, vocab, size=shape).astype("int32")


def forward_logits(lm, token_ids, padding_mask=None):
    """Logits of the full forward pass (the backbone's, compiled by predict)."""
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    inputs = {"token_ids": token_ids, "padding_mask": padding_mask}
    hidden = lm.backbone.predict_on_batch(inputs)
    return to_numpy(
        lm.backbone.token_embedding(ops.convert_to_tensor(hidden), reverse=True)
    )


def right_padded(rows, length):
    """Packs lists of ids into right-padded `token_ids` and `padding_mask`."""
    token_ids = np.zeros((len(rows), length), "int32")
    padding_mask = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = row
        padding_mask[i, : len(row)] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def generate_ids(lm, rows, max_length, stop_token_ids=None):
    """Generation on token ids (no strings), returning numpy arrays."""
    outputs = lm.make_generate_function()(
        right_padded(rows, max_length), stop_token_ids=stop_token_ids
    )
    return (
        ops.convert_to_numpy(outputs["token_ids"]),
        ops.convert_to_numpy(outputs["padding_mask"]),
    )


def assert_same_cache(actual, expected):
    """Integer leaves (positions, counts) exactly; float leaves within TOL."""
    leaves = zip(keras.tree.flatten(actual), keras.tree.flatten(expected), strict=True)
    for a, e in leaves:
        if "int" in keras.backend.standardize_dtype(e.dtype):
            np.testing.assert_array_equal(
                ops.convert_to_numpy(a), ops.convert_to_numpy(e)
            )
        elif np.any(to_numpy(e)):
            assert relative_error(to_numpy(a), to_numpy(e)) <= TOL
        else:
            np.testing.assert_array_equal(to_numpy(a), 0.0)


@pytest.fixture(scope="module")
def griffin_lm():
    return tiny_causal_lm("griffin", sequence_length=24, prefill_chunk_size=4)


# --- The cache --------------------------------------------------------------


@pytest.mark.parametrize("config", sorted(TINY_CONFIGS))
def test_token_by_token_equals_full_forward(config):
    lm = tiny_causal_lm(config)
    window = TINY_CONFIGS[config]["attention_window_size"]
    length = 4 * window + 3
    token_ids = random_ids(lm, (2, length))
    expected = forward_logits(lm, token_ids)

    cache = lm.initial_cache(2)
    steps = []
    for t in range(length):
        logits, hidden, cache = lm.call_with_cache(token_ids[:, t : t + 1], cache)
        steps.append(to_numpy(logits)[:, 0])
    assert relative_error(np.stack(steps, axis=1), expected) <= TOL
    np.testing.assert_array_equal(ops.convert_to_numpy(cache.num_tokens), [length] * 2)


def test_cache_is_typed_per_block(griffin_lm):
    cache = griffin_lm.initial_cache(3)
    assert isinstance(cache, RecurrentGemmaCache)
    names = [type(c).__name__ for c in cache.blocks]
    assert names == [
        "RecurrentBlockCache",
        "RecurrentBlockCache",
        "AttentionBlockCache",
    ]
    recurrent, attention = cache.blocks[0], cache.blocks[2]
    config = TINY_CONFIGS["griffin"]
    assert tuple(recurrent.rg_lru_state.shape) == (3, config["lru_width"])
    assert keras.backend.standardize_dtype(recurrent.rg_lru_state.dtype) == "float32"
    assert tuple(recurrent.conv1d_state.shape) == (3, 3, config["lru_width"])
    head_dim = config["hidden_dim"] // config["num_heads"]
    window = config["attention_window_size"]
    assert tuple(attention.keys.shape) == (3, window, head_dim)
    assert tuple(attention.values.shape) == (3, window, head_dim)
    np.testing.assert_array_equal(ops.convert_to_numpy(attention.positions), -1)


def test_padding_leaves_the_cache_untouched(griffin_lm):
    # Row 0 is all padding in the second call: its cache must not move.
    token_ids = random_ids(griffin_lm, (2, 7))
    cache = griffin_lm.prefill(token_ids)
    more = random_ids(griffin_lm, (2, 3), seed=1)
    mask = np.array([[0, 0, 0], [1, 1, 0]], "int32")
    new = griffin_lm.prefill(more, padding_mask=mask, cache=cache)
    for old_leaf, new_leaf in zip(
        keras.tree.flatten(cache), keras.tree.flatten(new), strict=True
    ):
        np.testing.assert_array_equal(to_numpy(old_leaf)[0], to_numpy(new_leaf)[0])
    np.testing.assert_array_equal(ops.convert_to_numpy(new.num_tokens), [7, 9])


@pytest.mark.parametrize("chunk", [1, 2, 4, 5, 6, 13, 29])
def test_chunked_prefill_equals_one_shot(griffin_lm, chunk):
    # Window 5: chunks below, at and above it, and one chunk for everything.
    # Row 1 is 11 tokens shorter, so its later chunks are all padding.
    lm = griffin_lm
    length = 29
    token_ids = random_ids(lm, (2, length), seed=2)
    mask = np.ones((2, length), "int32")
    mask[1, length - 11 :] = 0
    one_shot = lm.prefill(token_ids, padding_mask=mask)

    cache = None
    for start in range(0, length, chunk):
        sl = slice(start, start + chunk)
        cache = lm.prefill(token_ids[:, sl], padding_mask=mask[:, sl], cache=cache)
    assert_same_cache(cache, one_shot)
    assert (
        relative_error(
            to_numpy(lm.next_token_logits(cache)),
            to_numpy(lm.next_token_logits(one_shot)),
        )
        <= TOL
    )
    # And both equal the full forward pass at each row's last real token.
    full = forward_logits(lm, token_ids, mask)
    last = [length - 1, length - 12]
    expected = full[[0, 1], last]
    assert relative_error(to_numpy(lm.next_token_logits(cache)), expected) <= TOL


def test_cache_bytes_do_not_depend_on_max_length(griffin_lm):
    prompt = random_ids(griffin_lm, (2, 6))

    def cache_bytes(max_length):
        inputs = right_padded(list(prompt), max_length)
        _, cache = griffin_lm._build_cache(inputs["token_ids"], inputs["padding_mask"])
        return sum(
            int(np.prod(leaf.shape))
            * np.dtype(keras.backend.standardize_dtype(leaf.dtype)).itemsize
            for leaf in keras.tree.flatten(cache)
        )

    assert cache_bytes(64) == cache_bytes(65536)


# --- Generation -------------------------------------------------------------


@pytest.mark.parametrize("sampler", ["greedy", "beam"])
def test_batch_rows_generate_what_they_generate_alone(griffin_lm, sampler):
    # Lengths 1 (just <bos>), 3 (inside the conv window), and 13 (beyond the
    # attention window): right padding must never reach a row's state.
    lm = griffin_lm
    lm.compile(sampler=sampler)
    rows = [
        [2],
        [2] + list(random_ids(lm, (2,), seed=3)),
        [2] + list(random_ids(lm, (12,), seed=4)),
    ]
    max_length = 24
    batch, _ = generate_ids(lm, rows, max_length)
    for i, row in enumerate(rows):
        alone, _ = generate_ids(lm, [row], max_length)
        np.testing.assert_array_equal(batch[i], alone[0], err_msg=f"row {i}")
        np.testing.assert_array_equal(batch[i, : len(row)], row)


def test_prefill_chunk_size_does_not_change_generation(griffin_lm):
    rows = [[2] + list(random_ids(griffin_lm, (15,), seed=5)), [2, 9, 10]]
    griffin_lm.compile(sampler="greedy")
    expected, _ = generate_ids(griffin_lm, rows, 24)
    other = RecurrentGemmaCausalLM(
        griffin_lm.backbone, griffin_lm.preprocessor, prefill_chunk_size=24
    )
    other.compile(sampler="greedy")
    actual, _ = generate_ids(other, rows, 24)
    np.testing.assert_array_equal(actual, expected)


def test_greedy_generation_equals_argmax_of_full_forward(griffin_lm):
    # Each greedy token is the argmax of the full pass over everything before
    # it, well past the attention window.
    griffin_lm.compile(sampler="greedy")
    prompt = [2] + list(random_ids(griffin_lm, (3,), seed=6))
    tokens, _ = generate_ids(griffin_lm, [prompt], 24)
    logits = forward_logits(griffin_lm, tokens)
    np.testing.assert_array_equal(
        tokens[0, len(prompt) :], logits[0, len(prompt) - 1 : -1].argmax(-1)
    )


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_generates(griffin_lm, sampler):
    griffin_lm.compile(sampler=sampler)
    rows = [[2, 40, 41, 42], [2, 50]]
    # The same shapes and stop ids as the string call below: one compilation.
    eos = griffin_lm.preprocessor.tokenizer.end_token_id
    tokens, mask = generate_ids(griffin_lm, rows, 24, stop_token_ids=(eos,))
    assert tokens.shape == (2, 24)
    for i, row in enumerate(rows):
        np.testing.assert_array_equal(tokens[i, : len(row)], row)
        np.testing.assert_array_equal(mask[i, : len(row) + 1], True)
    assert np.all((tokens >= 0) & (tokens < griffin_lm.backbone.vocabulary_size))
    text = griffin_lm.generate(["The fox", "Hello"], max_length=24)
    assert text[0].startswith("The fox")
    assert text[1].startswith("Hello")


def test_strip_prompt(griffin_lm):
    griffin_lm.compile(sampler="greedy")
    full = griffin_lm.generate(
        "The quick brown fox", max_length=16, stop_token_ids=None
    )
    reply = griffin_lm.generate(
        "The quick brown fox", max_length=16, stop_token_ids=None, strip_prompt=True
    )
    assert full.startswith("The quick brown fox")
    assert not reply.startswith("The quick")
    assert full.endswith(reply)


def test_stop_tokens(griffin_lm):
    griffin_lm.compile(sampler="greedy")
    prompt = [2, 40, 41]
    tokens, _ = generate_ids(griffin_lm, [prompt], 20)
    generated = tokens[0, len(prompt) :]
    # A stop id that never comes: generation simply runs to max_length.
    unused = next(i for i in range(6, 400) if i not in generated)
    same, mask = generate_ids(griffin_lm, [prompt], 20, stop_token_ids=(unused,))
    np.testing.assert_array_equal(same, tokens)
    np.testing.assert_array_equal(mask, True)
    # Stopping at the third new token keeps it and masks everything after.
    stop = int(generated[2])
    first = len(prompt) + int(np.argmax(generated == stop))
    _, mask = generate_ids(griffin_lm, [prompt], 20, stop_token_ids=(stop,))
    np.testing.assert_array_equal(mask[0, : first + 1], True)
    np.testing.assert_array_equal(mask[0, first + 1 :], False)


# --- Scoring and training ---------------------------------------------------


def test_score_is_log_softmax_of_forward_logits(griffin_lm):
    token_ids = random_ids(griffin_lm, (2, 13), seed=7)
    mask = np.ones_like(token_ids)
    logits = forward_logits(griffin_lm, token_ids)
    scored = to_numpy(griffin_lm.score(token_ids, mask))
    assert relative_error(scored, logits) <= TOL
    targets = np.roll(token_ids, -1, axis=1)
    loss = to_numpy(
        griffin_lm.score(token_ids, mask, scoring_mode="loss", target_ids=targets)
    )
    log_softmax = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    expected = -np.take_along_axis(log_softmax, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-5)


def test_score_layer_intercept_fn_sees_every_layer(griffin_lm):
    seen = []

    def intercept(x, i):
        seen.append(i)
        return x

    griffin_lm.score(random_ids(griffin_lm, (1, 5)), layer_intercept_fn=intercept)
    assert seen == [-1, 0, 1, 2]


def test_fit_on_raw_strings():
    lm = tiny_causal_lm("hawk", sequence_length=16)
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    text = ["The quick brown fox jumps over the lazy dog."] * 4
    history = lm.fit(text, batch_size=2, epochs=3, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_config_round_trip(griffin_lm):
    config = griffin_lm.get_config()
    copy = RecurrentGemmaCausalLM.from_config(config)
    assert copy.prefill_chunk_size == griffin_lm.prefill_chunk_size
    assert copy.instruction_tuned == griffin_lm.instruction_tuned
    assert copy.backbone.get_config() == griffin_lm.backbone.get_config()


# --- Bad input --------------------------------------------------------------


def test_empty_prompt_list(griffin_lm):
    with pytest.raises(ValueError, match="empty"):
        griffin_lm.generate([], max_length=8)


def test_prompt_longer_than_max_length(griffin_lm):
    long_prompt = " ".join(["fox"] * 20)
    with pytest.raises(ValueError, match="max_length"):
        griffin_lm.generate(long_prompt, max_length=8)
    with pytest.raises(ValueError, match="max_length"):
        griffin_lm.generate(["Hello", "The quick brown fox jumps"], max_length=3)


@pytest.mark.parametrize("max_length", [0, -4])
def test_non_positive_max_length(griffin_lm, max_length):
    with pytest.raises(ValueError, match="max_length"):
        griffin_lm.generate("Hello", max_length=max_length)


def test_unknown_sampler_name(griffin_lm):
    with pytest.raises(ValueError, match="greedy"):
        griffin_lm.compile(sampler="gredy")


def test_call_with_cache_refuses_left_padding(griffin_lm):
    cache = griffin_lm.initial_cache(1)
    with pytest.raises(ValueError, match="right padded"):
        griffin_lm.call_with_cache(
            np.array([[5, 6, 7]], "int32"), cache, padding_mask=np.array([[0, 1, 1]])
        )


def test_out_of_range_token_ids(griffin_lm):
    vocab = griffin_lm.backbone.vocabulary_size
    with pytest.raises(ValueError, match="token_ids"):
        griffin_lm.prefill(np.array([[2, vocab]], "int32"))
    with pytest.raises(ValueError, match="token_ids"):
        griffin_lm.prefill(np.array([[2, -1]], "int32"))


def test_generate_checks_token_inputs_before_compiling(griffin_lm):
    griffin_lm.compile(sampler="greedy")
    generate = griffin_lm.make_generate_function()
    vocab = griffin_lm.backbone.vocabulary_size
    good = right_padded([[2, 7, 8]], 8)
    with pytest.raises(ValueError, match="token_ids"):
        generate({**good, "token_ids": np.where(good["token_ids"] == 7, vocab, 0)})
    left = {k: np.roll(v, 5, axis=1) for k, v in good.items()}
    with pytest.raises(ValueError, match="right padded"):
        generate(left)
    with pytest.raises(ValueError, match="no tokens"):
        generate(right_padded([[2, 7], []], 8))


def test_bfloat16_generation_keeps_the_recurrence_in_float32():
    lm = tiny_causal_lm("griffin", dtype="bfloat16")
    cache = lm.prefill(random_ids(lm, (2, 9)))
    recurrent, attention = cache.blocks[0], cache.blocks[2]
    dtype = keras.backend.standardize_dtype
    assert dtype(recurrent.rg_lru_state.dtype) == "float32"
    assert dtype(recurrent.conv1d_state.dtype) == "bfloat16"
    assert dtype(attention.keys.dtype) == "bfloat16"
    assert dtype(attention.positions.dtype) == "int32"
    assert np.all(np.isfinite(to_numpy(lm.next_token_logits(cache))))
    lm.compile(sampler="greedy")
    tokens, _ = generate_ids(lm, [[2, 40, 41]], 16)
    assert np.all((tokens >= 0) & (tokens < lm.backbone.vocabulary_size))


@pytest.mark.skipif(
    keras.config.backend() != "tensorflow", reason="TensorFlow's XLA choice"
)
def test_tensorflow_generate_skips_xla_for_16_bit_weights_on_cpu():
    # XLA's CPU compiler would hold a float32 copy of every 16-bit weight in
    # the decode loop; without XLA the tokens are those of the eager model.
    import tensorflow as tf

    on_cpu = not tf.config.list_logical_devices("GPU")
    lm16 = tiny_causal_lm(dtype="bfloat16")
    assert lm16._tensorflow_generate_xla() is not on_cpu
    assert tiny_causal_lm()._tensorflow_generate_xla() is True
    lm16.compile(jit_compile=True)
    assert lm16._tensorflow_generate_xla() is True
    lm16.compile(jit_compile=False)
    assert lm16._tensorflow_generate_xla() is False
    without_xla = lm16.generate(["The"], max_length=12)
    lm16.compile()  # "auto": no XLA here
    assert lm16.generate(["The"], max_length=12) == without_xla
