"""Property-based tests (hypothesis): random inputs always agree with a reference.

- Tokenizers (the tiny test vocabulary and the shipped preset's): exact round
  trip on the text where SentencePiece promises one, ids in range, a batch is
  its rows, and detokenize-then-tokenize settles after one round.
- `RecurrentGemmaCausalLMPreprocessor`: training rows, generation prompts and
  `pack` rebuilt from the tokenizer's ids for random text and lengths.
- The RG-LRU scan against a float64 loop for random shapes, resets, `h0` and
  chunkings; chunked `prefill` against one call and the full forward pass;
  packed documents against each document alone.

Examples are derandomized, so every run checks the same inputs.
"""

import functools
import os
import unicodedata

import keras
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import Phase
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor
from keras_recurrentgemma import RecurrentGemmaTokenizer
from keras_recurrentgemma import presets
from keras_recurrentgemma.ops.scan import rg_lru_scan
from tests.models import tiny_causal_lm
from tests.models import tiny_tokenizer
from tests.tolerances import SELF_CONSISTENCY
from tests.tolerances import relative_error

TOL = SELF_CONSISTENCY["float32"]
JAX = keras.config.backend() == "jax"


def examples(n, shrink=True):
    """Settings for `n` derandomized examples.

    No example database: derandomized runs replay nothing from it
    (Hypothesis still keeps caches in `.hypothesis/`, which it gitignores).
    `shrink=False` reports the first failing example as found, for tests
    where shrinking would rerun a model or recompile for hundreds of new
    shapes (minutes).
    """
    phases = [Phase.explicit, Phase.reuse, Phase.generate]
    return settings(
        max_examples=n,
        deadline=None,
        derandomize=True,
        database=None,
        phases=phases + [Phase.shrink] if shrink else phases,
        suppress_health_check=[
            HealthCheck.too_slow,
            HealthCheck.function_scoped_fixture,
        ],
    )


def to_lists(ids):
    """A tokenizer's output (lists, array, tensor or ragged) as Python ints."""
    if hasattr(ids, "to_list"):
        return ids.to_list()
    if isinstance(ids, (list, tuple)):
        return [to_lists(row) for row in ids]
    return np.asarray(ops.convert_to_numpy(ids)).tolist()


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


# --- Tokenizers ---------------------------------------------------------------

SHIPPED = presets.preset_directory(presets.DEFAULT_PRESET)


@functools.cache
def tokenizer(name):
    if name == "tiny":
        return tiny_tokenizer()
    if not os.path.isdir(SHIPPED or ""):
        pytest.skip(f"{presets.DEFAULT_PRESET} is not in this checkout")
    return RecurrentGemmaTokenizer.from_preset(presets.DEFAULT_PRESET)


# Text that the normalizers treat specially, mixed into random text: the turn
# markers (user-defined pieces, matched whole), the spellings of control
# pieces (plain text, never control ids), whitespace runs, and vocabulary.
SNIPPETS = (
    "<start_of_turn>",
    "<end_of_turn>",
    "<bos>",
    "<eos>",
    "<unk>",
    " ",
    "  ",
    "\n",
    "\t",
    "The",
    " quick",
    "42",
)

any_text = st.lists(
    st.one_of(st.text(st.characters(codec="utf-8")), st.sampled_from(SNIPPETS)),
    max_size=6,
).map("".join)

# The tiny vocabulary normalizes nothing (identity rules, no dummy prefix,
# whitespace kept) and has byte fallback, so every string comes back except
# one holding U+2581 "▁": that is the escaped space, and decodes as " ".
tiny_text = st.lists(
    st.one_of(
        st.text(st.characters(codec="utf-8", exclude_characters="▁")),
        st.sampled_from(SNIPPETS),
    ),
    max_size=6,
).map("".join)


def preset_round_trips(text):
    """Whether `text` is sure to come back exactly from the shipped vocabulary.

    Its normalizer is `nmt_nfkc` with `add_dummy_prefix` and
    `remove_extra_whitespaces`, and it has byte fallback, so the text must
    already be what normalization makes of it: NFKC; no separator but ASCII
    space (category Z: nmt maps them to " "); spaces single and inside the
    text (runs are merged, the ends stripped); no "▁" (U+2581, the escaped
    space) and no U+FFFD (nmt maps it to " "); and no character of category
    C, some of which nmt drops (most ASCII controls) or turns into a space
    (U+200B, U+FEFF). Checked with each code point between two letters, the
    rule admits nothing that changes; what it turns away but would still
    come back is most of category C (unassigned, private use, NUL, C1
    controls, U+00AD) and U+FF5E, which NFKC changes and nmt keeps.
    """
    return (
        unicodedata.normalize("NFKC", text) == text
        and text == text.strip(" ")
        and "  " not in text
        and all(
            c == " " or (unicodedata.category(c)[0] not in "CZ" and c not in "▁\ufffd")
            for c in text
        )
    )


_word = st.one_of(
    st.text(
        st.characters(
            codec="utf-8",
            exclude_categories=("C", "Z"),
            exclude_characters="▁\ufffd",
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from(["<start_of_turn>", "<end_of_turn>", "<bos>", "The", "def"]),
)
preset_text = (
    st.lists(_word, max_size=6)
    .map(lambda words: unicodedata.normalize("NFKC", " ".join(words)))
    .filter(preset_round_trips)
)

ROUND_TRIP_TEXT = {"tiny": tiny_text, "preset": preset_text}


@pytest.mark.parametrize("name", ["tiny", "preset"])
@examples(200)
@given(data=st.data())
def test_round_trip_where_sentencepiece_is_exact(name, data):
    tok = tokenizer(name)
    text = data.draw(ROUND_TRIP_TEXT[name], label="text")
    ids = to_lists(tok(text))
    assert tok.detokenize(ids) == text


@pytest.mark.parametrize("name", ["tiny", "preset"])
@examples(100)
@given(texts=st.lists(any_text, min_size=1, max_size=4))
def test_ids_in_range_and_a_batch_is_its_rows(name, texts):
    tok = tokenizer(name)
    batch = to_lists(tok(texts))
    rows = [to_lists(tok(text)) for text in texts]
    assert batch == rows
    assert all(0 <= i < tok.vocabulary_size() for row in rows for i in row)
    assert tok.detokenize(batch) == [tok.detokenize(row) for row in rows]


@pytest.fixture(params=["tiny", "preset"])
def graph_tokenizer(request):
    """`(tokenizer, tokenize traced by tf.function)`, built inside the test.

    conftest's `keras.utils.set_random_seed` clears TensorFlow's kernel
    cache, which owns TensorFlow Text's SentencePiece resource, so a
    tokenizer built before it fails in a graph (tensorflow/text#570).
    """
    tf = pytest.importorskip("tensorflow")
    if request.param == "tiny":
        tok = tiny_tokenizer()
    else:
        tokenizer("preset")  # skips when the preset is missing
        tok = RecurrentGemmaTokenizer.from_preset(presets.DEFAULT_PRESET)
    spec = tf.TensorSpec([None], tf.string)
    return tok, tf.function(tok.tokenize, input_signature=[spec])


@examples(40)
@given(texts=st.lists(any_text, min_size=1, max_size=4))
def test_graph_tokenize_equals_eager(graph_tokenizer, texts):
    # `tf.data` pipelines run the TensorFlow Text tokenizer, not the
    # `sentencepiece` package used eagerly.
    import tensorflow as tf

    tok, graph = graph_tokenizer
    assert graph(tf.constant(texts)).to_list() == to_lists(tok(texts))


def id_lists(tok):
    """Random ids, often the special, unknown and byte pieces."""
    vocab = tok.get_vocabulary()
    special = [i for i, p in enumerate(vocab) if p.startswith("<") and p.endswith(">")]
    return st.lists(
        st.one_of(st.integers(0, len(vocab) - 1), st.sampled_from(special)),
        max_size=24,
    )


@pytest.mark.parametrize("name", ["tiny", "preset"])
@examples(150)
@given(data=st.data())
def test_detokenize_then_tokenize_settles_after_one_round(name, data):
    # Not every id sequence is what the tokenizer would produce (control
    # ids vanish, bytes may not form UTF-8, the preset renormalizes), but
    # one round lands on text that round-trips exactly.
    tok = tokenizer(name)
    ids = data.draw(id_lists(tok), label="ids")
    once = to_lists(tok(tok.detokenize(ids)))
    text = tok.detokenize(once)
    assert to_lists(tok(text)) == once
    assert tok.detokenize(to_lists(tok(text))) == text


# --- Preprocessor ---------------------------------------------------------------


@examples(60)
@given(
    texts=st.lists(any_text, min_size=1, max_size=3),
    sequence_length=st.integers(1, 24),
)
def test_training_rows_are_bos_tokens_eos_shifted(texts, sequence_length):
    tok = tokenizer("tiny")
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        tok, sequence_length=sequence_length
    )
    x, y, sample_weight = preprocessor(texts)
    x = {key: to_numpy(value) for key, value in x.items()}
    # KerasHub keeps <eos> when it truncates: the ids are cut to make room.
    # `sequence_length + 1` tokens are packed, inputs the first
    # `sequence_length`, labels the last.
    width = sequence_length + 1
    for row, text in enumerate(texts):
        ids = to_lists(tok(text))[: sequence_length - 1]
        tokens = [tok.start_token_id, *ids, tok.end_token_id]
        full = tokens + [tok.pad_token_id] * (width - len(tokens))
        mask = [1] * len(tokens) + [0] * (width - len(tokens))
        np.testing.assert_array_equal(x["token_ids"][row], full[:-1])
        np.testing.assert_array_equal(x["padding_mask"][row], mask[:-1])
        np.testing.assert_array_equal(to_numpy(y)[row], full[1:])
        np.testing.assert_array_equal(to_numpy(sample_weight)[row], mask[1:])


@examples(60)
@given(texts=st.lists(tiny_text, min_size=1, max_size=3), slack=st.integers(-4, 8))
def test_generate_preprocess_then_postprocess_gives_the_prompts(texts, slack):
    tok = tokenizer("tiny")
    preprocessor = RecurrentGemmaCausalLMPreprocessor(tok)
    rows = [to_lists(tok(text)) for text in texts]
    # `max_length` around the longest prompt with <bos>: short by up to 4
    # tokens, exactly enough, or more.
    longest = max(len(ids) for ids in rows) + 1
    max_length = max(1, longest + slack)
    if longest > max_length:
        # Never a silently truncated prompt.
        with pytest.raises(ValueError, match="max_length"):
            preprocessor.generate_preprocess(texts, sequence_length=max_length)
        return
    prompts = preprocessor.generate_preprocess(texts, sequence_length=max_length)
    token_ids = to_numpy(prompts["token_ids"])
    padding_mask = to_numpy(prompts["padding_mask"])
    for row, ids in enumerate(rows):
        n = len(ids) + 1
        np.testing.assert_array_equal(token_ids[row, :n], [tok.start_token_id, *ids])
        np.testing.assert_array_equal(token_ids[row, n:], tok.pad_token_id)
        np.testing.assert_array_equal(padding_mask[row], np.arange(max_length) < n)
    assert preprocessor.generate_postprocess(prompts) == texts


@examples(100)
@given(
    documents=st.lists(any_text, min_size=1, max_size=6),
    sequence_length=st.integers(1, 16),
)
def test_pack_rebuilds_every_document(documents, sequence_length):
    tok = tokenizer("tiny")
    preprocessor = RecurrentGemmaCausalLMPreprocessor(tok)
    x, y, sample_weight = preprocessor.pack(documents, sequence_length)
    token_ids, mask, segment_pos = x["token_ids"], x["padding_mask"], x["segment_pos"]
    assert token_ids.shape[1] == sequence_length
    for value in (mask, segment_pos, y, sample_weight):
        assert value.shape == token_ids.shape
    np.testing.assert_array_equal(sample_weight, mask)

    pieces, used = [], []
    for row in range(len(token_ids)):
        n = int(mask[row].sum())
        np.testing.assert_array_equal(mask[row], np.arange(sequence_length) < n)
        starts = np.flatnonzero(segment_pos[row, :n] == 0)
        assert n == 0 or starts[0] == 0
        for start, end in zip(starts, [*starts[1:], n], strict=True):
            # Positions count from 0 in each piece; the labels are the
            # inputs shifted by one inside it, plus one token after it.
            np.testing.assert_array_equal(
                segment_pos[row, start:end], np.arange(end - start)
            )
            np.testing.assert_array_equal(
                y[row, start : end - 1], token_ids[row, start + 1 : end]
            )
            pieces.append([*token_ids[row, start:end], y[row, end - 1]])
        used.append(n)
    # Rows fill greedily: a row ends only when the next piece does not fit.
    row_of_piece = np.repeat(
        np.arange(len(used)),
        [np.sum(segment_pos[r, : used[r]] == 0) for r in range(len(used))],
    )
    for i in range(1, len(pieces)):
        if row_of_piece[i] != row_of_piece[i - 1]:
            assert used[row_of_piece[i - 1]] + len(pieces[i]) - 1 > sequence_length

    # Consecutive pieces of one document share a token; a document's last
    # piece ends in <eos>, which text never tokenizes to.
    rebuilt, current, previous = [], [], None
    for piece in pieces:
        assert len(piece) - 1 <= sequence_length
        if current:
            # Only a document's last piece may be short.
            assert len(previous) - 1 == sequence_length
            assert piece[0] == current[-1]
            current += piece[1:]
        else:
            current = list(piece)
        if current[-1] == tok.end_token_id:
            rebuilt.append(current)
            current = []
        previous = piece
    assert not current
    expected = [
        [tok.start_token_id, *to_lists(tok(doc)), tok.end_token_id] for doc in documents
    ]
    assert rebuilt == expected


# --- The scan -------------------------------------------------------------------


def numpy_scan(a, x, h0):
    """`h_t = a_t h_{t-1} + x_t` in float64, one step at a time."""
    h = np.zeros(a[:, 0].shape) if h0 is None else h0.astype(np.float64)
    ys = []
    for t in range(a.shape[1]):
        h = a[:, t] * h + x[:, t]
        ys.append(h)
    return np.stack(ys, 1), h


@functools.cache
def scan(implementation):
    fn = functools.partial(rg_lru_scan, implementation=implementation)
    if JAX:
        # Eager JAX compiles each primitive for every new shape; one jit per
        # shape costs about half as much.
        import jax

        return jax.jit(fn)
    return fn


@st.composite
def scan_inputs(draw):
    """`(a, x, h0, cuts)`: random shape, resets (a=0), steps that keep the
    state (a=1, x=0, as padding does), `h0` or none, and chunk boundaries."""
    b = draw(st.integers(1, 3))
    t = draw(st.integers(1, 70))
    width = draw(st.integers(1, 9))
    reset_rate = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    keep_rate = draw(st.sampled_from([0.0, 0.1, 0.5]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    a = rng.uniform(0.0, 1.0, (b, t, width))
    x = rng.normal(size=(b, t, width))
    a[rng.uniform(size=(b, t, width)) < reset_rate] = 0.0
    keep = rng.uniform(size=(b, t, width)) < keep_rate
    a[keep], x[keep] = 1.0, 0.0
    h0 = rng.normal(size=(b, width)).astype("float32") if draw(st.booleans()) else None
    cuts = draw(st.lists(st.integers(1, max(1, t - 1)), max_size=2, unique=True))
    cuts = sorted(c for c in cuts if c < t)
    return a.astype("float32"), x.astype("float32"), h0, cuts


# JAX compiles the scan for every new shape (~0.3 s each), so it draws fewer.
@pytest.mark.parametrize("implementation", ["reference", "doubling"])
@examples(6 if JAX else 40, shrink=not JAX)
@given(inputs=scan_inputs())
def test_scan_in_chunks_matches_sequential_loop(implementation, inputs):
    a, x, h0, cuts = inputs
    y_ref, h_ref = numpy_scan(a, x, h0)
    y, h_last = scan(implementation)(a, x, h0)
    np.testing.assert_allclose(to_numpy(y), y_ref, **TOL)
    np.testing.assert_allclose(to_numpy(h_last), h_ref, **TOL)
    # Chunks, each starting from the state the one before ended in.
    ys, h = [], h0
    for lo, hi in zip([0, *cuts], [*cuts, a.shape[1]], strict=True):
        y_chunk, h = scan(implementation)(a[:, lo:hi], x[:, lo:hi], h)
        ys.append(to_numpy(y_chunk))
    np.testing.assert_allclose(np.concatenate(ys, axis=1), y_ref, **TOL)
    np.testing.assert_allclose(to_numpy(h), h_ref, **TOL)


# --- The model --------------------------------------------------------------------

# Longer than two attention windows (5) and the Conv1D width (4), so chunks
# below, at and above both occur, and the attention ring buffer wraps.
LENGTH = 11
MAX_DOCUMENTS = 4


@pytest.fixture(scope="module")
def griffin():
    lm = tiny_causal_lm("griffin")
    if JAX:
        lm.prefill = _jitted_prefill(lm, LENGTH)
    return lm


def _jitted_prefill(lm, width):
    """`lm.prefill` with each chunk run by one jitted function of `width`.

    Eager JAX compiles every primitive for each new chunk length (~8 s
    each here) and a jit per length costs ~2.5 s, so on JAX each chunk is
    right padded to `width`, which leaves the cache as the real tokens left
    it; `chunk_size` slicing is still the library's. Exact chunk lengths
    run on TensorFlow and torch, eagerly.
    """
    import jax

    step = jax.jit(
        lambda ids, mask, cache: RecurrentGemmaCausalLM.prefill(lm, ids, mask, cache)
    )

    def prefill(token_ids, padding_mask=None, cache=None, chunk_size=None):
        if chunk_size is not None:
            return RecurrentGemmaCausalLM.prefill(
                lm, token_ids, padding_mask, cache, chunk_size
            )
        b, t = token_ids.shape
        ids = np.zeros((b, width), "int32")
        ids[:, :t] = to_numpy(token_ids)
        mask = np.zeros((b, width), "int32")
        mask[:, :t] = 1 if padding_mask is None else to_numpy(padding_mask)
        return step(ids, mask, lm.initial_cache(b) if cache is None else cache)

    return prefill


@functools.cache
def _logits_fn(lm):
    def logits(token_ids, padding_mask, segment_pos):
        inputs = {
            "token_ids": token_ids,
            "padding_mask": padding_mask,
            "segment_pos": segment_pos,
        }
        return lm(inputs)

    if JAX:
        import jax

        return jax.jit(logits)
    return logits


def full_logits(lm, token_ids, padding_mask, segment_pos=None):
    """The forward pass's logits, float64 `[b, t, vocab]`."""
    if segment_pos is None:
        segment_pos = np.cumsum(padding_mask, axis=1, dtype="int32") - 1
    out = _logits_fn(lm)(token_ids, padding_mask, segment_pos.astype("int32"))
    return to_numpy(out).astype(np.float64)


def assert_same_cache(actual, expected):
    """Integer leaves exactly; float leaves to the relative tolerance."""
    leaves = zip(keras.tree.flatten(actual), keras.tree.flatten(expected), strict=True)
    for a, e in leaves:
        a, e = to_numpy(a), to_numpy(e)
        if e.dtype.kind in "iub" or not np.any(e):
            np.testing.assert_array_equal(a, e)
        else:
            assert relative_error(a, e) <= TOL["rtol"]


@examples(4, shrink=False)
@given(
    seed=st.integers(0, 2**32 - 1),
    lengths=st.lists(st.integers(1, LENGTH), min_size=2, max_size=2),
    chunk_size=st.integers(1, LENGTH + 2),
    cuts=st.lists(st.integers(1, LENGTH - 1), max_size=3, unique=True),
)
def test_chunked_prefill_equals_one_call_and_the_forward_pass(
    griffin, seed, lengths, chunk_size, cuts
):
    lm = griffin
    rng = np.random.default_rng(seed)
    vocab = lm.backbone.vocabulary_size
    token_ids = rng.integers(0, vocab, (2, LENGTH)).astype("int32")
    # Right padded: a short row's later chunks are all padding.
    padding_mask = (np.arange(LENGTH)[None] < np.array(lengths)[:, None]).astype(
        "int32"
    )
    one_call = lm.prefill(token_ids, padding_mask)
    assert_same_cache(
        lm.prefill(token_ids, padding_mask, chunk_size=chunk_size), one_call
    )
    # Uneven chunks, passing the cache back by hand.
    cache = None
    for lo, hi in zip([0, *sorted(cuts)], [*sorted(cuts), LENGTH], strict=True):
        cache = lm.prefill(token_ids[:, lo:hi], padding_mask[:, lo:hi], cache)
    assert_same_cache(cache, one_call)
    np.testing.assert_array_equal(to_numpy(cache.num_tokens), lengths)

    expected = full_logits(lm, token_ids, padding_mask)[[0, 1], np.subtract(lengths, 1)]
    next_logits = to_numpy(lm.next_token_logits(cache)).astype(np.float64)
    assert relative_error(next_logits, expected) <= TOL["rtol"]


@st.composite
def packed_rows(draw):
    """Two rows, each: left padding, 1 to 4 documents, right padding."""
    rows = []
    for _ in range(2):
        documents = draw(
            st.lists(st.integers(1, LENGTH), min_size=1, max_size=MAX_DOCUMENTS).map(
                lambda ns: _fit(ns, LENGTH)
            )
        )
        left = draw(st.integers(0, LENGTH - sum(documents)))
        rows.append((left, documents))
    return rows


def _fit(lengths, total):
    """The longest prefix of `lengths` whose sum fits in `total`."""
    kept = []
    for n in lengths:
        if sum(kept) + n > total:
            break
        kept.append(n)
    return kept


@examples(4, shrink=False)
@given(rows=packed_rows(), seed=st.integers(0, 2**32 - 1))
def test_packed_documents_equal_each_document_alone(griffin, rows, seed):
    lm = griffin
    rng = np.random.default_rng(seed)
    vocab = lm.backbone.vocabulary_size
    token_ids = rng.integers(0, vocab, (2, LENGTH)).astype("int32")
    padding_mask = np.zeros((2, LENGTH), "int32")
    segment_pos = np.zeros((2, LENGTH), "int32")
    spans = []
    for r, (left, documents) in enumerate(rows):
        start = left
        for n in documents:
            padding_mask[r, start : start + n] = 1
            segment_pos[r, start : start + n] = np.arange(n)
            spans.append((r, start, n))
            start += n
    packed = full_logits(lm, token_ids, padding_mask, segment_pos)

    # Each document right padded in its own row; spare rows repeat the last.
    alone_ids = np.zeros((2 * MAX_DOCUMENTS, LENGTH), "int32")
    alone_mask = np.zeros((2 * MAX_DOCUMENTS, LENGTH), "int32")
    for i in range(2 * MAX_DOCUMENTS):
        r, start, n = spans[min(i, len(spans) - 1)]
        alone_ids[i, :n] = token_ids[r, start : start + n]
        alone_mask[i, :n] = 1
    alone = full_logits(lm, alone_ids, alone_mask)
    for i, (r, start, n) in enumerate(spans):
        assert relative_error(packed[r, start : start + n], alone[i, :n]) <= TOL["rtol"]
