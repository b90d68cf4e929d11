"""`RecurrentGemmaTokenizer` on the tiny SentencePiece vocabulary.

Proves that the special ids (`<pad>`, `<eos>`, `<bos>`, `<unk>`) and the two
turn markers are read from the proto (and that the markers are `None` when
the vocabulary lacks them), that text survives a tokenize/detokenize round
trip, unicode included through byte fallback, that a turn marker is a single
token, that a proto loads from bytes and from a file path, that the
tokenizer survives `get_config`/`from_config` and Keras (de)serialization
(the vocabulary travelling as an asset, KerasHub's convention), and that a
file that is not a SentencePiece model is refused with a `ValueError` that
names it.
"""

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaTokenizer
from keras_recurrentgemma.tokenizer import END_OF_TURN
from keras_recurrentgemma.tokenizer import START_OF_TURN
from tests.vocab import tiny_proto


def proto_without_turn_markers():
    """A second tiny vocabulary: the same special ids, no turn markers."""
    return tiny_proto(turn_markers=False)


@pytest.fixture(scope="module")
def tokenizer():
    return RecurrentGemmaTokenizer(proto=tiny_proto())


def as_list(ids):
    return np.asarray(ids).tolist()


def test_special_token_ids(tokenizer):
    assert tokenizer.pad_token_id == 0
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    assert tokenizer.unk_token_id == 3
    # The ids must agree with the proto's pieces, not just with the numbers
    # the official vocabulary happens to use.
    assert tokenizer.id_to_token(tokenizer.pad_token_id) == "<pad>"
    assert tokenizer.id_to_token(tokenizer.end_token_id) == "<eos>"
    assert tokenizer.id_to_token(tokenizer.start_token_id) == "<bos>"
    assert tokenizer.id_to_token(tokenizer.unk_token_id) == "<unk>"
    # generate_postprocess strips exactly these.
    assert sorted(tokenizer.special_token_ids) == [0, 1, 2]


def test_turn_marker_ids_are_looked_up(tokenizer):
    assert tokenizer.start_of_turn_id == 4
    assert tokenizer.end_of_turn_id == 5
    assert tokenizer.id_to_token(tokenizer.start_of_turn_id) == START_OF_TURN
    assert tokenizer.id_to_token(tokenizer.end_of_turn_id) == END_OF_TURN
    assert tokenizer.token_to_id(START_OF_TURN) == tokenizer.start_of_turn_id
    assert tokenizer.token_to_id(END_OF_TURN) == tokenizer.end_of_turn_id


def test_turn_marker_ids_are_none_without_markers():
    tokenizer = RecurrentGemmaTokenizer(proto=proto_without_turn_markers())
    assert tokenizer.start_of_turn_id is None
    assert tokenizer.end_of_turn_id is None
    # The other special ids do not depend on the markers.
    assert tokenizer.end_token_id == 1
    assert tokenizer.start_token_id == 2
    # Without the user-defined piece, the marker's text is split up.
    assert len(as_list(tokenizer(END_OF_TURN))) > 1


@pytest.mark.parametrize(
    "text",
    [
        "The quick brown fox jumps over the lazy dog.",
        "Numbers like 1, 2, 3 and 42 appear in text too.",
        # Words the vocabulary never saw are spelled with smaller pieces.
        "Zebras quizzically juxtapose vexing waltzes.",
    ],
)
def test_round_trip(tokenizer, text):
    ids = tokenizer(text)
    assert tokenizer.unk_token_id not in as_list(ids)
    assert tokenizer.detokenize(ids) == text


@pytest.mark.parametrize(
    "text",
    [
        "café naïve façade über",  # accents
        "rain 🌧️ and sun 😀",  # emoji, one with a variation selector
        "日本語のテキスト 中文",  # CJK, absent from the training text
        "Ωμέγα — “quotes” ✓",
    ],
)
def test_unicode_round_trip_uses_byte_fallback(tokenizer, text):
    ids = as_list(tokenizer(text))
    # Byte fallback spells unseen characters as <0x..> pieces, never <unk>.
    assert tokenizer.unk_token_id not in ids
    pieces = [tokenizer.id_to_token(i) for i in ids]
    assert any(p.startswith("<0x") for p in pieces)
    assert tokenizer.detokenize(ids) == text


def test_batch_round_trip(tokenizer):
    texts = ["Hello world!", "café 😀 日本", "A"]
    ids = tokenizer(texts)
    assert len(ids) == 3
    # Each row is the row of the unbatched call.
    for text, row in zip(texts, ids, strict=True):
        assert as_list(row) == as_list(tokenizer(text))
    assert list(tokenizer.detokenize(ids)) == texts


def test_tokenizer_adds_no_special_tokens(tokenizer):
    # <bos> and <eos> are the preprocessor's job.
    ids = as_list(tokenizer("Hello world"))
    assert tokenizer.start_token_id not in ids
    assert tokenizer.end_token_id not in ids
    assert tokenizer.pad_token_id not in ids


def test_turn_markers_are_single_tokens(tokenizer):
    sot, eot = tokenizer.start_of_turn_id, tokenizer.end_of_turn_id
    ids = as_list(tokenizer(f"Hi{START_OF_TURN}there{END_OF_TURN}friend"))
    assert ids.count(sot) == 1 and ids.count(eot) == 1
    # No piece of the markers' text ("<", "start", ...) is left around them:
    # the text between the markers tokenizes as it does alone.
    between = ids[ids.index(sot) + 1 : ids.index(eot)]
    assert tokenizer.detokenize(between).strip() == "there"
    assert sot in as_list(tokenizer(START_OF_TURN))
    assert eot in as_list(tokenizer(END_OF_TURN))
    assert tokenizer.detokenize([sot]) == START_OF_TURN
    assert tokenizer.detokenize([eot]) == END_OF_TURN


def test_proto_from_file_path_and_bytes(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(tiny_proto())
    from_path = RecurrentGemmaTokenizer(proto=str(path))
    from_bytes = RecurrentGemmaTokenizer(proto=tiny_proto())
    # The file's bytes are held, so the tokenizer no longer needs the file.
    assert from_path.proto == tiny_proto()
    assert from_path.vocabulary_size() == from_bytes.vocabulary_size()
    assert from_path.end_of_turn_id == from_bytes.end_of_turn_id
    text = "The river ran to the sea. 日本"
    assert as_list(from_path(text)) == as_list(from_bytes(text))


def _same_tokenizer(a, b):
    assert a.vocabulary_size() == b.vocabulary_size()
    for name in (
        "pad_token_id",
        "end_token_id",
        "start_token_id",
        "unk_token_id",
        "start_of_turn_id",
        "end_of_turn_id",
    ):
        assert getattr(a, name) == getattr(b, name), name
    text = f"{START_OF_TURN}user Hello café 😀{END_OF_TURN}"
    assert as_list(a(text)) == as_list(b(text))


def test_get_config_from_config(tokenizer, tmp_path):
    config = tokenizer.get_config()
    # KerasHub keeps the vocabulary out of the config: it is an asset.
    assert config["proto"] is None
    restored = RecurrentGemmaTokenizer.from_config(config)
    assert isinstance(restored, RecurrentGemmaTokenizer)
    assert restored.get_config() == config
    assert restored.end_of_turn_id is None  # no vocabulary yet
    tokenizer.save_assets(str(tmp_path))
    restored.load_assets(str(tmp_path))
    _same_tokenizer(restored, tokenizer)


def test_keras_serialization_round_trip(tokenizer, tmp_path):
    serialized = keras.saving.serialize_keras_object(tokenizer)
    # Registered, so it deserializes without `custom_objects`.
    assert serialized["registered_name"] == (
        "keras_recurrentgemma>RecurrentGemmaTokenizer"
    )
    restored = keras.saving.deserialize_keras_object(serialized)
    assert type(restored) is RecurrentGemmaTokenizer
    assert restored.get_config() == tokenizer.get_config()
    tokenizer.save_assets(str(tmp_path))
    restored.load_assets(str(tmp_path))
    _same_tokenizer(restored, tokenizer)


def test_not_a_sentencepiece_file_names_the_file(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"<html>404: not a SentencePiece model</html>\x00\xff" * 8)
    with pytest.raises(ValueError, match="tokenizer.model") as info:
        RecurrentGemmaTokenizer(proto=str(path))
    assert str(path) in str(info.value)


def test_not_a_sentencepiece_proto_bytes():
    with pytest.raises(ValueError, match="SentencePiece"):
        RecurrentGemmaTokenizer(proto=b"\x00\xffdefinitely not a model" * 8)
