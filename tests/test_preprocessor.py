"""`RecurrentGemmaCausalLMPreprocessor` on the tiny SentencePiece vocabulary.

Proves the training layout (`<bos>` first, `<eos>` after the text, right
padding with `<pad>` = 0, `y` the token ids shifted by one, `sample_weight`
zero on padding), the `sequence_length` override and the
`add_start_token`/`add_end_token` switches; that `generate_preprocess` packs
prompts without `<eos>`, right padded with a padding mask, and that
`generate_postprocess` drops `<bos>`/`<eos>`/`<pad>` and gives the text
back; and that a prompt is never silently truncated: one longer than
`sequence_length` raises (naming `max_length`), one exactly that long is
kept whole. Also runs as a `tf.data` map.

Expected ids come from the tokenizer itself, never from hard-coded lists.
"""

import copy

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor
from keras_recurrentgemma import RecurrentGemmaTokenizer
from tests.vocab import tiny_proto

SEQUENCE_LENGTH = 16
PAD, EOS, BOS = 0, 1, 2
TEXTS = ["Hello world!", "The quick brown fox."]


@pytest.fixture(scope="module")
def tokenizer():
    return RecurrentGemmaTokenizer(proto=tiny_proto())


@pytest.fixture(scope="module")
def preprocessor(tokenizer):
    return RecurrentGemmaCausalLMPreprocessor(
        tokenizer, sequence_length=SEQUENCE_LENGTH
    )


def np_(x):
    return keras.ops.convert_to_numpy(x)


def ids_of(tokenizer, text):
    return np.asarray(tokenizer(text)).tolist()


def packed(ids, length, pad=PAD):
    assert len(ids) <= length, "test texts must fit"
    return ids + [pad] * (length - len(ids))


def test_training_call_layout(preprocessor, tokenizer):
    x, y, sample_weight = preprocessor(TEXTS)
    token_ids, padding_mask = np_(x["token_ids"]), np_(x["padding_mask"])
    y, sample_weight = np_(y), np_(sample_weight)
    assert token_ids.shape == (len(TEXTS), SEQUENCE_LENGTH)
    for shape in (padding_mask.shape, y.shape, sample_weight.shape):
        assert shape == token_ids.shape
    for row, text in enumerate(TEXTS):
        # The packer runs on sequence_length + 1 tokens, x drops the last
        # and y the first, so both see `<bos> text <eos> <pad>...`.
        full = packed([BOS] + ids_of(tokenizer, text) + [EOS], SEQUENCE_LENGTH + 1)
        n = len(ids_of(tokenizer, text)) + 2
        assert token_ids[row].tolist() == full[:-1]
        assert y[row].tolist() == full[1:]
        assert padding_mask[row].tolist() == [i < n for i in range(SEQUENCE_LENGTH)]
        # The loss sees every real target, <eos> included, and no padding.
        assert sample_weight[row].tolist() == [
            i < n - 1 for i in range(SEQUENCE_LENGTH)
        ]
    # y is x shifted by one, wherever x is not padding.
    np.testing.assert_array_equal(y[:, :-1], token_ids[:, 1:])
    assert np.all(token_ids[~padding_mask] == PAD)
    assert np.all(y[~sample_weight.astype(bool)] == PAD)


def test_training_call_on_a_single_string(preprocessor):
    x, y, sample_weight = preprocessor(TEXTS[0])
    batched = preprocessor([TEXTS[0]])
    assert np_(x["token_ids"]).shape == (SEQUENCE_LENGTH,)
    np.testing.assert_array_equal(np_(x["token_ids"]), np_(batched[0]["token_ids"])[0])
    np.testing.assert_array_equal(np_(y), np_(batched[1])[0])


def test_sequence_length_override(preprocessor, tokenizer):
    length = len(ids_of(tokenizer, TEXTS[0])) + 4
    x, y, sample_weight = preprocessor(TEXTS[:1], sequence_length=length)
    token_ids = np_(x["token_ids"])[0].tolist()
    assert token_ids == packed([BOS] + ids_of(tokenizer, TEXTS[0]) + [EOS], length)
    assert np_(y).shape == (1, length)
    # The override is per call.
    assert preprocessor.sequence_length == SEQUENCE_LENGTH
    assert np_(preprocessor(TEXTS[:1])[1]).shape == (1, SEQUENCE_LENGTH)


@pytest.mark.parametrize(
    "add_start_token, add_end_token", [(False, True), (True, False), (False, False)]
)
def test_start_and_end_switches(tokenizer, add_start_token, add_end_token):
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        tokenizer,
        sequence_length=SEQUENCE_LENGTH,
        add_start_token=add_start_token,
        add_end_token=add_end_token,
    )
    x, y, _ = preprocessor(TEXTS[:1])
    ids = ids_of(tokenizer, TEXTS[0])
    full = [BOS] * add_start_token + ids + [EOS] * add_end_token
    full = packed(full, SEQUENCE_LENGTH + 1)
    assert np_(x["token_ids"])[0].tolist() == full[:-1]
    assert np_(y)[0].tolist() == full[1:]


def test_generate_preprocess(preprocessor, tokenizer):
    out = preprocessor.generate_preprocess(TEXTS)
    token_ids, padding_mask = np_(out["token_ids"]), np_(out["padding_mask"])
    assert token_ids.shape == (len(TEXTS), SEQUENCE_LENGTH)
    for row, text in enumerate(TEXTS):
        # <bos> and the prompt, no <eos>: generation continues the text.
        prompt = [BOS] + ids_of(tokenizer, text)
        assert token_ids[row].tolist() == packed(prompt, SEQUENCE_LENGTH)
        assert padding_mask[row].tolist() == [
            i < len(prompt) for i in range(SEQUENCE_LENGTH)
        ]
    assert EOS not in token_ids


def test_generate_preprocess_sequence_length(preprocessor):
    out = preprocessor.generate_preprocess(TEXTS, sequence_length=24)
    assert np_(out["token_ids"]).shape == (len(TEXTS), 24)


def test_generate_postprocess_round_trip(preprocessor):
    out = preprocessor.generate_preprocess(TEXTS)
    assert list(preprocessor.generate_postprocess(out)) == TEXTS


def test_generate_postprocess_strips_special_tokens(preprocessor, tokenizer):
    ids = ids_of(tokenizer, TEXTS[0])
    # What generation leaves: <bos>, prompt, <eos>, then <pad>, with a mask
    # that is on everywhere (as with `stop_token_ids=None`).
    row = packed([BOS] + ids + [EOS], SEQUENCE_LENGTH)
    out = preprocessor.generate_postprocess(
        {
            "token_ids": np.array([row], "int32"),
            "padding_mask": np.ones((1, SEQUENCE_LENGTH), bool),
        }
    )
    assert list(out) == [TEXTS[0]]
    # Tokens past the mask are dropped too.
    mask = np.array([[i <= len(ids) for i in range(SEQUENCE_LENGTH)]])
    junk = ids_of(tokenizer, "junk")[0]
    row = [BOS] + ids + [junk] * (SEQUENCE_LENGTH - 1 - len(ids))
    out = preprocessor.generate_postprocess(
        {"token_ids": np.array([row], "int32"), "padding_mask": mask}
    )
    assert list(out) == [TEXTS[0]]


def test_prompt_longer_than_sequence_length_raises(preprocessor, tokenizer):
    long_text = " ".join(TEXTS * 4)
    assert len(ids_of(tokenizer, long_text)) + 1 > SEQUENCE_LENGTH
    with pytest.raises(ValueError, match="max_length"):
        preprocessor.generate_preprocess([TEXTS[0], long_text])
    with pytest.raises(ValueError, match="max_length"):
        preprocessor.generate_preprocess(long_text)


def test_prompt_of_exactly_sequence_length_is_kept(preprocessor, tokenizer):
    text = TEXTS[1]
    prompt = [BOS] + ids_of(tokenizer, text)
    out = preprocessor.generate_preprocess([text], sequence_length=len(prompt))
    assert np_(out["token_ids"])[0].tolist() == prompt
    assert np_(out["padding_mask"])[0].all()
    with pytest.raises(ValueError, match="max_length"):
        preprocessor.generate_preprocess([text], sequence_length=len(prompt) - 1)


def test_no_silent_truncation_without_start_token(tokenizer):
    # With add_start_token=False a prompt of exactly `sequence_length` tokens
    # passes the length check; whatever the packer then does, every prompt
    # token must still be there (or the call must refuse).
    text = TEXTS[1]
    ids = ids_of(tokenizer, text)
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        tokenizer, sequence_length=len(ids), add_start_token=False
    )
    try:
        out = preprocessor.generate_preprocess([text])
    except ValueError as error:
        assert "max_length" in str(error)
        return
    token_ids = np_(out["token_ids"])[0].tolist()
    mask = np_(out["padding_mask"])[0].tolist()
    kept = [t for t, m in zip(token_ids, mask, strict=True) if m and t != BOS]
    assert kept == ids


def test_empty_prompt_list_raises(preprocessor):
    with pytest.raises(ValueError, match="empty"):
        preprocessor.generate_preprocess([])


@pytest.mark.parametrize("sequence_length", [0, -1])
def test_non_positive_generate_sequence_length_raises(preprocessor, sequence_length):
    with pytest.raises(ValueError, match="max_length"):
        preprocessor.generate_preprocess(TEXTS, sequence_length=sequence_length)


@pytest.mark.parametrize("sequence_length", [0, -1])
def test_non_positive_sequence_length_raises(tokenizer, sequence_length):
    with pytest.raises(ValueError, match="sequence_length"):
        RecurrentGemmaCausalLMPreprocessor(tokenizer, sequence_length=sequence_length)


def test_get_config_from_config(preprocessor):
    config = preprocessor.get_config()
    assert config["sequence_length"] == SEQUENCE_LENGTH
    # from_config deserializes the tokenizer inside the dict it is given.
    restored = RecurrentGemmaCausalLMPreprocessor.from_config(copy.deepcopy(config))
    assert isinstance(restored.tokenizer, RecurrentGemmaTokenizer)
    assert restored.get_config() == config


def test_tf_data_pipeline():
    tf = pytest.importorskip("tensorflow")
    # KerasHub preprocessors run in tf.data on every backend; the batches
    # must equal the eager call's. The tokenizer is built here, after the
    # autouse seed fixture: `tf.random.set_seed` resets TF's kernel cache and
    # with it the tf-text SentencePiece resource of any tokenizer made before
    # (tensorflow/text#570), which only the tf.data path uses.
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        RecurrentGemmaTokenizer(proto=tiny_proto()), sequence_length=SEQUENCE_LENGTH
    )
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS))
    ds = ds.map(preprocessor)
    (x, y, sample_weight), *rest = list(ds)
    assert not rest
    eager_x, eager_y, eager_sample_weight = preprocessor(TEXTS)
    np.testing.assert_array_equal(x["token_ids"].numpy(), np_(eager_x["token_ids"]))
    np.testing.assert_array_equal(
        x["padding_mask"].numpy(), np_(eager_x["padding_mask"])
    )
    np.testing.assert_array_equal(y.numpy(), np_(eager_y))
    np.testing.assert_array_equal(sample_weight.numpy(), np_(eager_sample_weight))


def test_generate_preprocess_in_tf_data_refuses_long_prompts():
    tf = pytest.importorskip("tensorflow")
    # Inside a graph the lengths are symbolic; an assertion stands in for the
    # eager ValueError, so truncation is refused there too.
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        RecurrentGemmaTokenizer(proto=tiny_proto()), sequence_length=SEQUENCE_LENGTH
    )
    ds = tf.data.Dataset.from_tensor_slices(TEXTS).batch(len(TEXTS))
    (x,) = list(ds.map(preprocessor.generate_preprocess))
    eager = preprocessor.generate_preprocess(TEXTS)
    np.testing.assert_array_equal(x["token_ids"].numpy(), np_(eager["token_ids"]))
    long_text = tf.data.Dataset.from_tensor_slices([" ".join(TEXTS * 4)]).batch(1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_length"):
        list(long_text.map(preprocessor.generate_preprocess))
