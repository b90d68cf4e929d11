"""Hostile input at every public entry point: handled, or a clear error.

Issue 7's list, in one place. For each input either the result is right or
the error is a `ValueError` / `TypeError` (`FileNotFoundError` for a missing
file) whose message names the argument, shape or file at fault, never an
exception from inside a backend:

- text: the empty string, whitespace only, control characters, lone
  surrogates and bytes that are not UTF-8 (replaced by U+FFFD, as Python's
  `errors="replace"` does), very long unicode (truncated for training,
  refused for generation, which never cuts a prompt silently);
- token ids out of range or negative, and float ids;
- padding masks that are not a prefix: left padding is refused where the
  entry point needs right padding (`generate`, `prefill`, `call_with_cache`)
  and handled by the backbone (test_backbone.py proves it; `score` runs the
  same forward, and an eager forward here would cost JAX ~10 s of kernel
  compiles); padding between tokens is refused;
- a batch of size 0 and rows of no tokens; `max_length` <= 0 or not an int;
- damaged Keras presets (weights missing, truncated or garbage, configs with
  wrong types, signs or shapes, invalid JSON, a vocabulary that is not
  SentencePiece) and damaged converted checkpoints (safetensors, `.pt`,
  Orbax);
- loading never runs code from a file: a pickle payload in a `.pt`, a
  Keras lambda, or a config naming `os.system` is refused and the payload's
  marker file never appears, even with unsafe deserialization turned on.

Generation compiles once: every successful `generate` here is the one
batched call of `test_generate_continues_hostile_text`; every refusal
comes before compilation.
"""

import json
import os
import pathlib
import pickle
import re
import shutil

import keras
import numpy as np
import pytest
from keras import ops
from keras.src.saving import serialization_lib

import keras_recurrentgemma
from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor
from keras_recurrentgemma import RecurrentGemmaTokenizer
from tests.models import tiny_causal_lm

MAX_LENGTH = 16
# The tiny vocabulary's size (checked by the `lm` fixture).
VOCAB = 357
REPLACEMENT = "\ufffd"
CONTROL = "a\x00\x07\x1b[0m\r\x7f\u200b"
LONG_UNICODE = "日本語😀" * 2000

# (input, the text it stands for once made valid).
HOSTILE_TEXT = {
    "empty": ("", ""),
    "whitespace": (" \t\n\r  ", " \t\n\r  "),
    "control": (CONTROL, CONTROL),
    "lone_surrogates": ("ab\ud800cd\udfff", f"ab{REPLACEMENT}cd{REPLACEMENT}"),
    "surrogate_pair": ("x\ud83d\ude00", "x😀"),
    "bad_utf8": (b"ok\xff\xfe", f"ok{REPLACEMENT}{REPLACEMENT}"),
}
SHORT_PROMPTS = ["empty", "whitespace", "control", "lone_surrogates", "bad_utf8"]


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(x))


def ids_and_mask(token_ids, padding_mask=None):
    token_ids = np.asarray(token_ids, "int32")
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids)
    return {"token_ids": token_ids, "padding_mask": np.asarray(padding_mask, "int32")}


@pytest.fixture(scope="module")
def lm():
    causal_lm = tiny_causal_lm("griffin", sequence_length=MAX_LENGTH)
    assert causal_lm.backbone.vocabulary_size == VOCAB
    causal_lm.compile(sampler="greedy")
    return causal_lm


@pytest.fixture(scope="module")
def bare_lm(lm):
    """The same model without a preprocessor: `generate` takes token dicts."""
    causal_lm = RecurrentGemmaCausalLM(lm.backbone, preprocessor=None)
    causal_lm.compile(sampler="greedy")
    return causal_lm


# --- Text ----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(HOSTILE_TEXT))
def test_tokenizer_round_trips_hostile_text(lm, name):
    text, valid = HOSTILE_TEXT[name]
    tokenizer = lm.preprocessor.tokenizer
    ids = tokenizer(text)
    assert tokenizer.unk_token_id not in to_numpy(ids).tolist()
    assert tokenizer.detokenize(ids) == valid
    # A batch, as a list and as a numpy array of str, gives the same rows.
    batch = tokenizer([text, "hi"])
    assert tokenizer.detokenize(batch) == [valid, "hi"]
    if isinstance(text, str):
        assert tokenizer.detokenize(tokenizer(np.array([text, "hi"]))) == [valid, "hi"]


def test_tokenizer_handles_very_long_unicode(lm):
    tokenizer = lm.preprocessor.tokenizer
    ids = tokenizer(LONG_UNICODE)
    assert tokenizer.detokenize(ids) == LONG_UNICODE


def test_preprocessor_packs_hostile_text(lm):
    preprocessor = lm.preprocessor
    texts = [HOSTILE_TEXT[n][0] for n in SHORT_PROMPTS] + [LONG_UNICODE]
    x, y, sample_weight = preprocessor(texts)
    token_ids, mask = to_numpy(x["token_ids"]), to_numpy(x["padding_mask"])
    assert token_ids.shape == mask.shape == (len(texts), MAX_LENGTH)
    assert to_numpy(y).shape == to_numpy(sample_weight).shape == token_ids.shape
    tokenizer = preprocessor.tokenizer
    assert np.all(token_ids[:, 0] == tokenizer.start_token_id)
    # The empty string is <bos> <eos>; the long text is cut to the length.
    np.testing.assert_array_equal(token_ids[0, :3], [2, tokenizer.end_token_id, 0])
    assert mask[0].sum() == 2
    assert mask[-1].all()
    expected = tokenizer(LONG_UNICODE)[: MAX_LENGTH - 1]
    np.testing.assert_array_equal(token_ids[-1, 1:], expected)


def test_generate_preprocess_packs_hostile_text(lm):
    preprocessor = lm.preprocessor
    texts = [HOSTILE_TEXT[n][0] for n in SHORT_PROMPTS]
    x = preprocessor.generate_preprocess(texts)
    token_ids, mask = to_numpy(x["token_ids"]), to_numpy(x["padding_mask"])
    assert token_ids.shape == mask.shape == (len(texts), MAX_LENGTH)
    # The empty prompt is <bos> alone, then padding.
    assert token_ids[0, 0] == preprocessor.tokenizer.start_token_id
    assert mask[0].tolist() == [True] + [False] * (MAX_LENGTH - 1)


def test_long_prompt_is_refused_not_truncated(lm):
    message = rf"Prompt 1 is \d+ tokens long.*max_length={MAX_LENGTH}"
    with pytest.raises(ValueError, match=message):
        lm.generate(["hi", LONG_UNICODE], max_length=MAX_LENGTH)


def test_generate_continues_hostile_text(lm):
    prompts = [HOSTILE_TEXT[n][0] for n in SHORT_PROMPTS]
    # A single int stop id is accepted as a 1-tuple.
    end = lm.preprocessor.tokenizer.end_token_id
    outputs = lm.generate(prompts, max_length=MAX_LENGTH, stop_token_ids=end)
    assert len(outputs) == len(prompts)
    for name, output in zip(SHORT_PROMPTS, outputs, strict=True):
        assert isinstance(output, str)
        assert output.startswith(HOSTILE_TEXT[name][1]), name


# --- Tokenizer ids -------------------------------------------------------------


@pytest.mark.parametrize(
    "ids, error, message",
    [
        ([5, -1], ValueError, rf"token id -1, outside \[0, vocabulary_size={VOCAB}\)"),
        ([[5], [VOCAB]], ValueError, rf"token id {VOCAB}, outside"),
        (np.array([[1, 10**9]]), ValueError, r"token id 1000000000, outside"),
        ([1.5, 2.0], TypeError, "integer token ids"),
    ],
)
def test_detokenize_refuses_bad_ids(lm, ids, error, message):
    with pytest.raises(error, match=message):
        lm.preprocessor.tokenizer.detokenize(ids)


def test_tokenizer_refuses_non_text(lm):
    with pytest.raises(ValueError, match="string"):
        lm.preprocessor.tokenizer(5)


# --- Token ids at the model ----------------------------------------------------


@pytest.mark.parametrize("bad_id", [VOCAB, -1, 2**31 - 1])
def test_bad_token_ids_are_refused_everywhere(lm, bare_lm, bad_id):
    ids = [[2, 40, bad_id, 41]]
    message = (
        rf"`token_ids` contains id {bad_id}, outside \[0, vocabulary_size={VOCAB}\)"
    )
    with pytest.raises(ValueError, match=message):
        lm.backbone(ids_and_mask(ids))
    with pytest.raises(ValueError, match=message):
        lm.score(np.array(ids, "int32"))
    with pytest.raises(ValueError, match=message):
        lm.prefill(np.array(ids, "int32"))
    with pytest.raises(ValueError, match=message):
        bare_lm.generate(ids_and_mask(ids), stop_token_ids=None)


def test_bad_target_ids_are_refused(lm):
    ids = np.array([[2, 40, 41]], "int32")
    with pytest.raises(ValueError, match=rf"`target_ids` contains id {VOCAB}"):
        lm.score(ids, scoring_mode="loss", target_ids=np.array([[40, 41, VOCAB]]))
    with pytest.raises(ValueError, match=r"`target_ids` contains id -1"):
        lm.score(ids, scoring_mode="loss", target_ids=np.array([[40, 41, -1]]))
    with pytest.raises(ValueError, match=r"`target_ids` has shape \(1, 2\)"):
        lm.score(ids, scoring_mode="loss", target_ids=np.array([[40, 41]]))


def test_float_token_ids_are_refused_by_generate(bare_lm):
    inputs = {"token_ids": np.array([[2.0, 5.5]]), "padding_mask": np.ones((1, 2))}
    with pytest.raises(TypeError, match="`token_ids` must be integers"):
        bare_lm.generate(inputs, stop_token_ids=None)


@pytest.mark.parametrize(
    "stop_token_ids, error, message",
    [
        ((VOCAB,), ValueError, rf"`stop_token_ids` contains id {VOCAB}, outside"),
        ((1, -1), ValueError, r"`stop_token_ids` contains id -1, outside"),
        (("a",), TypeError, "stop_token_ids"),
        (1.5, TypeError, "stop_token_ids"),
    ],
)
def test_bad_stop_token_ids(bare_lm, stop_token_ids, error, message):
    with pytest.raises(error, match=message):
        bare_lm.generate(ids_and_mask([[2, 40]]), stop_token_ids=stop_token_ids)


def test_one_dimensional_token_ids(lm, bare_lm):
    message = r"`token_ids` must be \[batch, length\]; got shape \(3,\)"
    with pytest.raises(ValueError, match=message):
        lm.score(np.array([2, 40, 41], "int32"))
    with pytest.raises(ValueError, match=message):
        lm.prefill(np.array([2, 40, 41], "int32"))
    with pytest.raises(ValueError, match=r"\[batch, max_length\]"):
        bare_lm.generate(ids_and_mask([2, 40, 41]), stop_token_ids=None)


# --- Padding masks that are not a prefix ----------------------------------------


def test_left_padding_is_refused_where_right_padding_is_required(lm, bare_lm):
    ids = np.array([[5, 2, 40, 41]], "int32")
    mask = np.array([[0, 1, 1, 1]], "int32")
    with pytest.raises(ValueError, match="`padding_mask` must be right padded"):
        bare_lm.generate(ids_and_mask(ids, mask), stop_token_ids=None)
    with pytest.raises(ValueError, match="`padding_mask` must be right padded"):
        lm.prefill(ids, padding_mask=mask)
    cache = lm.initial_cache(1)
    with pytest.raises(ValueError, match="`padding_mask` must be right padded"):
        lm.call_with_cache(ids, cache, padding_mask=mask)


# Row 0 has padding between its tokens.
GAP_IDS = np.array([[2, 40, 41, 42, 43, 44], [2, 40, 41, 42, 0, 0]], "int32")
GAP_MASK = np.array([[1, 1, 0, 1, 1, 1], [1, 1, 1, 1, 0, 0]], "int32")


def test_padding_between_tokens_is_refused_by_score(lm):
    with pytest.raises(ValueError, match="`padding_mask` has padding between tokens"):
        lm.score(GAP_IDS, padding_mask=GAP_MASK)


def test_padding_between_tokens_is_refused_by_backbone(lm):
    # The layer that checks the backbone's inputs, called alone: a full
    # eager forward would cost JAX ~10 s for the same error.
    with pytest.raises(ValueError, match="`padding_mask` has padding between tokens"):
        lm.backbone.segment_positions(GAP_IDS, GAP_MASK)


# --- Empty batches and rows -----------------------------------------------------


@pytest.mark.parametrize("shape", [(0, 4), (1, 0)])
def test_empty_token_ids_are_refused(lm, bare_lm, shape):
    ids = np.zeros(shape, "int32")
    message = re.escape(f"`token_ids` has shape {shape}: an empty batch or no tokens")
    with pytest.raises(ValueError, match=message):
        lm.backbone(ids_and_mask(ids))
    with pytest.raises(ValueError, match=message):
        lm.score(ids)
    with pytest.raises(ValueError, match=message):
        lm.prefill(ids)
    expected = "empty batch" if shape[0] == 0 else "no tokens"
    with pytest.raises(ValueError, match=expected):
        bare_lm.generate(ids_and_mask(ids), stop_token_ids=None)


@pytest.mark.parametrize("empty", [[], (), np.array([], dtype=str)])
def test_empty_batch_of_strings(lm, empty):
    with pytest.raises(ValueError, match="empty"):
        lm.generate(empty, max_length=MAX_LENGTH)
    with pytest.raises(ValueError, match="empty batch"):
        lm.preprocessor.generate_preprocess(empty)
    with pytest.raises(ValueError, match="empty batch of strings"):
        lm.preprocessor(empty)
    assert to_numpy(lm.preprocessor.tokenizer(list(empty))).size == 0


# --- max_length and sequence_length ---------------------------------------------


@pytest.mark.parametrize(
    "max_length, error",
    [(0, ValueError), (-3, ValueError), (2.5, TypeError), ("16", TypeError)]
    + [(True, TypeError)],
)
def test_bad_max_length(lm, bare_lm, max_length, error):
    with pytest.raises(error, match="`max_length` must be a positive int"):
        lm.generate("hi", max_length=max_length)
    with pytest.raises(error, match="`max_length` must be a positive int"):
        bare_lm.generate(ids_and_mask([[2, 40]]), max_length=max_length)
    with pytest.raises(error, match="`max_length` must be a positive int"):
        lm.preprocessor.generate_preprocess(["hi"], sequence_length=max_length)
    with pytest.raises(error, match="`sequence_length` must be a positive int"):
        lm.preprocessor(["hi"], sequence_length=max_length)
    with pytest.raises(error, match="`sequence_length` must be a positive int"):
        RecurrentGemmaCausalLMPreprocessor(
            lm.preprocessor.tokenizer, sequence_length=max_length
        )


# --- Damaged Keras presets -------------------------------------------------------

WEIGHTS = "model.weights.h5"
VOCABULARY = os.path.join("assets", "tokenizer", "vocabulary.spm")


@pytest.fixture(scope="module")
def preset(lm, tmp_path_factory):
    path = tmp_path_factory.mktemp("preset") / "tiny"
    lm.save_to_preset(str(path))
    return path


def damaged_copy(preset, tmp_path):
    return pathlib.Path(shutil.copytree(preset, tmp_path / "damaged"))


def edit_json(path, change):
    config = json.loads(path.read_text())
    change(config)
    path.write_text(json.dumps(config))


def set_backbone_arg(name, value):
    """Changes a backbone argument in config.json and in task.json."""

    def damage(directory):
        edit_json(
            directory / "config.json", lambda c: c["config"].update({name: value})
        )
        edit_json(
            directory / "task.json",
            lambda c: c["config"]["backbone"]["config"].update({name: value}),
        )

    return damage


def truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


PRESET_DAMAGE = {
    "weights_missing": (
        lambda d: (d / WEIGHTS).unlink(),
        FileNotFoundError,
        r"no `model\.weights\.h5`.*load_weights=False",
    ),
    "weights_truncated": (
        lambda d: truncate(d / WEIGHTS),
        ValueError,
        r"cannot load `model\.weights\.h5`",
    ),
    "weights_garbage": (
        lambda d: (d / WEIGHTS).write_bytes(os.urandom(4096)),
        ValueError,
        r"cannot load `model\.weights\.h5`",
    ),
    "hidden_dim_string": (
        set_backbone_arg("hidden_dim", "abc"),
        ValueError,
        r"\.json: `hidden_dim` must be a positive int; got 'abc'",
    ),
    "hidden_dim_negative": (
        set_backbone_arg("hidden_dim", -32),
        ValueError,
        r"\.json: `hidden_dim` must be a positive int; got -32",
    ),
    "num_heads_zero": (
        set_backbone_arg("num_heads", 0),
        ValueError,
        r"\.json: `num_heads` must be a positive int; got 0",
    ),
    "vocabulary_size_zero": (
        set_backbone_arg("vocabulary_size", 0),
        ValueError,
        r"\.json: `vocabulary_size` must be a positive int",
    ),
    "block_types_string": (
        set_backbone_arg("block_types", "recurrent"),
        ValueError,
        r"\.json: `block_types` must be a list",
    ),
    "epsilon_string": (
        set_backbone_arg("layer_norm_epsilon", "tiny"),
        ValueError,
        r"\.json: `layer_norm_epsilon` must be a non-negative number",
    ),
    "dtype_unknown": (
        set_backbone_arg("dtype", "float33"),
        ValueError,
        r"\.json: .*float33",
    ),
    "weights_of_another_shape": (
        set_backbone_arg("hidden_dim", 64),
        ValueError,
        r"cannot load `model\.weights\.h5`.*shapes disagree",
    ),
    "config_invalid_json": (
        lambda d: (d / "config.json").write_text('{"class_name": '),
        ValueError,
        r"config\.json: cannot read JSON",
    ),
    "config_not_an_object": (
        lambda d: (d / "config.json").write_text("[1, 2]"),
        ValueError,
        r"config\.json: expected a JSON object",
    ),
    "task_invalid_json": (
        lambda d: (d / "task.json").write_bytes(b"\xff\xfe{"),
        ValueError,
        r"task\.json: cannot read JSON",
    ),
    "task_without_registered_name": (
        lambda d: edit_json(d / "task.json", lambda c: c.pop("registered_name")),
        ValueError,
        r"task\.json: not a serialized Keras object",
    ),
    "preprocessor_sequence_length_string": (
        lambda d: edit_json(
            d / "task.json",
            lambda c: c["config"]["preprocessor"]["config"].update(
                sequence_length="long"
            ),
        ),
        ValueError,
        r"(?s)task\.json: .*`sequence_length` must be a positive int; got 'long'",
    ),
    "vocabulary_random_bytes": (
        lambda d: (d / VOCABULARY).write_bytes(os.urandom(2048)),
        ValueError,
        r"vocabulary\.spm is not a SentencePiece model",
    ),
    "vocabulary_missing": (
        lambda d: (d / VOCABULARY).unlink(),
        FileNotFoundError,
        r"vocabulary\.spm",
    ),
}


@pytest.mark.filterwarnings("ignore:Skipping nested container")
@pytest.mark.parametrize("damage", sorted(PRESET_DAMAGE))
def test_damaged_preset_names_the_problem(preset, tmp_path, damage):
    apply, error, message = PRESET_DAMAGE[damage]
    directory = damaged_copy(preset, tmp_path)
    apply(directory)
    with pytest.raises(error, match=message):
        RecurrentGemmaCausalLM.from_preset(str(directory))


@pytest.mark.parametrize(
    "filename, content, message",
    [
        ("tokenizer.json", "", r"tokenizer\.json: cannot read JSON"),
        ("preprocessor.json", "{", r"preprocessor\.json: cannot read JSON"),
    ],
)
def test_damaged_preprocessing_json(preset, tmp_path, filename, content, message):
    directory = damaged_copy(preset, tmp_path)
    (directory / filename).write_text(content)
    cls = {
        "tokenizer.json": RecurrentGemmaTokenizer,
        "preprocessor.json": RecurrentGemmaCausalLMPreprocessor,
    }[filename]
    with pytest.raises(ValueError, match=message):
        cls.from_preset(str(directory))


def test_damaged_config_json_fails_the_backbone(preset, tmp_path):
    directory = damaged_copy(preset, tmp_path)
    edit_json(directory / "config.json", lambda c: c["config"].update(hidden_dim=0))
    with pytest.raises(ValueError, match=r"config\.json: `hidden_dim` must be"):
        RecurrentGemmaBackbone.from_preset(str(directory))


# --- Damaged converted checkpoints ------------------------------------------------

HF_CONFIG = {
    "model_type": "recurrent_gemma",
    "vocab_size": VOCAB,
    "hidden_size": 32,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 1,
    "num_hidden_layers": 3,
    "lru_width": 48,
    "attention_window_size": 5,
    "block_types": ["recurrent", "recurrent", "attention"],
}


def write_hf_directory(path, config=HF_CONFIG):
    from safetensors.numpy import save_file

    path.mkdir()
    (path / "config.json").write_text(json.dumps(config))
    embedding = np.zeros((VOCAB, 32), "float32")
    save_file({"model.embed_tokens.weight": embedding}, str(path / "model.safetensors"))
    return path


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: truncate(d / "model.safetensors"), "not a readable safetensors"),
        (
            lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 7),
            "not a readable",
        ),
        (lambda d: (d / "model.safetensors").unlink(), "expected model.safetensors"),
    ],
    ids=["truncated", "garbage", "missing"],
)
def test_damaged_safetensors_names_the_file(tmp_path, damage, message):
    directory = write_hf_directory(tmp_path / "hf")
    damage(directory)
    with pytest.raises(ValueError, match=rf"{re.escape(str(directory))}.*{message}"):
        RecurrentGemmaBackbone.from_preset(str(directory))


def test_missing_safetensors_shard_names_it(tmp_path):
    directory = write_hf_directory(tmp_path / "hf")
    (directory / "model.safetensors").rename(
        directory / "model-00001-of-00002.safetensors"
    )
    index = {
        "weight_map": {
            "model.embed_tokens.weight": "model-00001-of-00002.safetensors",
            "model.final_norm.weight": "model-00002-of-00002.safetensors",
        }
    }
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"shard model-00002-of-00002\.safetensors"):
        RecurrentGemmaBackbone.from_preset(str(directory))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": "abc"}, r"`hidden_size` must be a positive int; got 'abc'"),
        ({"num_hidden_layers": 0}, r"`num_hidden_layers` must be a positive int"),
        ({"vocab_size": -1}, r"`vocab_size` must be a positive int"),
        ({"rms_norm_eps": "small"}, r"`rms_norm_eps` must be a number"),
        ({"block_types": 7}, r"`block_types` must be a list"),
    ],
)
@pytest.mark.parametrize("load_weights", [True, False])
def test_hugging_face_config_with_wrong_types(tmp_path, change, message, load_weights):
    directory = write_hf_directory(tmp_path / "hf", {**HF_CONFIG, **change})
    with pytest.raises(ValueError, match=r"config\.json: config " + message):
        RecurrentGemmaBackbone.from_preset(str(directory), load_weights=load_weights)


def test_converted_tokenizer_that_is_not_sentencepiece(tmp_path):
    directory = write_hf_directory(tmp_path / "hf")
    (directory / "tokenizer.model").write_bytes(os.urandom(1024))
    with pytest.raises(ValueError, match=r"tokenizer\.model is not a SentencePiece"):
        RecurrentGemmaTokenizer.from_preset(str(directory))


def test_damaged_torch_checkpoint_names_the_file(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "2b.pt"
    torch.save({"embedder.input_embedding": torch.zeros(VOCAB, 32)}, path)
    truncate(path)
    with pytest.raises(ValueError, match=re.escape(str(path)) + ".*truncated"):
        RecurrentGemmaBackbone.from_preset(str(tmp_path))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_damaged_orbax_checkpoint_names_the_folder(tmp_path):
    pytest.importorskip("orbax.checkpoint")
    checkpoint = tmp_path / "2b"
    checkpoint.mkdir()
    (checkpoint / "_METADATA").write_bytes(os.urandom(256))
    (checkpoint / "manifest.ocdbt").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(str(checkpoint)) + ".*Orbax"):
        RecurrentGemmaBackbone.from_preset(str(tmp_path))


# --- Loading never runs code from a file ------------------------------------------


class _Payload:
    """Unpickling this creates `marker`: proof that code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_payload_is_live(tmp_path):
    # The payload below does run when unpickled naively; the tests prove
    # that no loader does.
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(_Payload(marker))).close()
    assert marker.exists()


@pytest.mark.parametrize("format", ["zip", "legacy_pickle"])
def test_torch_checkpoint_with_pickle_payload_is_refused(tmp_path, format):
    torch = pytest.importorskip("torch")
    marker = tmp_path / "ran"
    path = tmp_path / "2b.pt"
    state = {"embedder.input_embedding": torch.zeros(3), "x": _Payload(marker)}
    if format == "zip":
        torch.save(state, path)
    else:
        path.write_bytes(pickle.dumps(state, protocol=2))
    with pytest.raises(ValueError, match=re.escape(str(path))):
        RecurrentGemmaCausalLM.from_preset(str(tmp_path))
    assert not marker.exists()


def test_hugging_face_pickle_weights_are_never_read(tmp_path):
    marker = tmp_path / "ran"
    directory = write_hf_directory(tmp_path / "hf")
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(ValueError, match="only safetensors"):
        RecurrentGemmaBackbone.from_preset(str(directory))
    assert not marker.exists()


def _lambda_layer(marker):
    layer = keras.layers.Lambda(lambda x, m=str(marker): open(m, "w") and x)
    return keras.saving.serialize_keras_object(layer)


def _os_system(marker):
    return {
        "module": "os",
        "class_name": "system",
        "config": {"command": f"touch {marker}"},
        "registered_name": "os>system",
    }


def _os_system_function(marker):
    return {
        "module": "os",
        "class_name": "function",
        "config": "system",
        "registered_name": "system",
    }


UNSAFE_CONFIGS = {
    # (file, where the payload goes, the class whose from_preset reads it)
    "task_preprocessor_lambda": (
        "task.json",
        lambda c, p: c["config"].update(preprocessor=p),
        _lambda_layer,
        RecurrentGemmaCausalLM,
    ),
    "backbone_dtype_os_system": (
        "config.json",
        lambda c, p: c["config"].update(dtype=p),
        _os_system,
        RecurrentGemmaBackbone,
    ),
    "backbone_dtype_function": (
        "config.json",
        lambda c, p: c["config"].update(dtype=p),
        _os_system_function,
        RecurrentGemmaBackbone,
    ),
    "tokenizer_os_system": (
        "tokenizer.json",
        lambda c, p: (c.clear(), c.update(p)),
        _os_system,
        RecurrentGemmaTokenizer,
    ),
    "preprocessor_tokenizer_lambda": (
        "preprocessor.json",
        lambda c, p: c["config"].update(tokenizer=p),
        _lambda_layer,
        RecurrentGemmaCausalLMPreprocessor,
    ),
}


@pytest.mark.parametrize("unsafe_mode", [False, True], ids=["default", "unsafe_on"])
@pytest.mark.parametrize("case", sorted(UNSAFE_CONFIGS))
def test_configs_that_would_run_code_are_refused(preset, tmp_path, case, unsafe_mode):
    filename, insert, payload, cls = UNSAFE_CONFIGS[case]
    marker = tmp_path / "ran"
    directory = damaged_copy(preset, tmp_path)
    edit_json(directory / filename, lambda c: insert(c, payload(marker)))
    # `unsafe_on` is a user who called
    # `keras.config.enable_unsafe_deserialization()`: presets stay safe.
    with serialization_lib.SafeModeScope(not unsafe_mode):
        with pytest.raises(ValueError, match=re.escape(filename)):
            cls.from_preset(str(directory))
    assert not marker.exists()


def test_no_loader_can_unpickle():
    """Static audit of the package: no pickle, torch.load only weights_only."""
    root = pathlib.Path(keras_recurrentgemma.__file__).parent
    torch_loads = 0
    for path in root.rglob("*.py"):
        text = path.read_text(encoding="utf-8")
        for unsafe in (
            "import pickle",
            "allow_pickle=True",
            "safe_mode=False",
            "SafeModeScope(False)",
            "weights_only=False",
        ):
            assert unsafe not in text, (path, unsafe)
        for call in re.findall(r"torch\.load\((.*?)\)", text, flags=re.S):
            if "..." not in call:  # a docstring's sketch
                torch_loads += 1
                assert "weights_only=True" in call, path
    assert torch_loads >= 1
