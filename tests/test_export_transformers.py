"""`export_to_transformers`: our models as Hugging Face checkpoints.

Each export is loaded by `transformers` (`AutoModelForCausalLM`,
`AutoTokenizer`) and compared with our model: logits within the HF parity
tolerance (up to the attention window, the only range where HF's
RecurrentGemma is a valid reference, see tests/test_hf_parity.py), greedy
tokens, tokenizer ids; and loaded back by our own HF loader bit for bit.
"""

import json
import os

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaTokenizer
from keras_recurrentgemma import presets
from keras_recurrentgemma.convert import to_transformers
from keras_recurrentgemma.convert.to_transformers import export_to_transformers
from tests.conftest import TINY_CONFIGS
from tests.models import assert_same_weights
from tests.models import safetensors_header
from tests.models import tiny_causal_lm
from tests.models import tiny_tokenizer
from tests.tolerances import LORA_EFFECT
from tests.tolerances import PARITY
from tests.tolerances import relative_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

SHIPPED = presets.preset_directory(presets.DEFAULT_PRESET)
# Text the tokenizers must agree on: whitespace runs, newlines, tabs, code,
# compatibility characters (NFKC folds them), bytes outside the vocabulary
# (byte fallback), turn markers, and nothing at all.
STRINGS = [
    "The quick brown fox jumps over the lazy dog.",
    "  two  spaces\nand a newline  ",
    "def f(x):\n    return x ** 2\t# tab",
    "ﬁ full-width Ａ 1234 ½",
    "émoji 😀 and ünïcode, 中文",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "x <end_of_turn> y",
    "",
    " ",
]


def hf_logits(model, ids):
    with torch.no_grad():
        out = model(torch.tensor(ids, dtype=torch.long), use_cache=False)
    return out.logits.float().numpy()


def our_logits(backbone, ids):
    hidden = backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)})
    logits = backbone.token_embedding(hidden, reverse=True)
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def token_ids(vocabulary_size, length, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocabulary_size, size=(2, length)).astype("int32")
    ids[:, 0] = 2  # <bos>
    return ids


def exported_dtypes(path):
    names = [n for n in os.listdir(path) if n.endswith(".safetensors")]
    return {
        info["dtype"]
        for name in names
        for key, info in safetensors_header(os.path.join(path, name))[0].items()
        if key != "__metadata__"
    }


@pytest.mark.parametrize("config", ["griffin", "hawk", "attention_only"])
def test_hf_logits_equal_ours(config, tmp_path):
    causal_lm = tiny_causal_lm(config)
    export_to_transformers(causal_lm, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(model).__name__ == "RecurrentGemmaForCausalLM"
    backbone = causal_lm.backbone
    ids = token_ids(backbone.vocabulary_size, backbone.attention_window_size - 1)
    error = relative_error(our_logits(backbone, ids), hf_logits(model, ids))
    assert error <= PARITY["float32"]["relative"], error


def test_lora_is_merged(tmp_path):
    causal_lm = tiny_causal_lm("griffin")
    backbone = causal_lm.backbone
    ids = token_ids(backbone.vocabulary_size, backbone.attention_window_size - 1)
    before = our_logits(backbone, ids)
    backbone.enable_lora(2)
    rng = np.random.default_rng(1)
    for v in backbone.weights:
        if "lora_kernel" in v.path:  # B starts at zero: LoRA would be a no-op
            v.assign(rng.normal(scale=0.3, size=v.shape).astype(v.dtype))
    with_lora = our_logits(backbone, ids)
    # The factors matter, so a dropped merge would show.
    assert relative_error(with_lora, before) > LORA_EFFECT["float32"]["relative_min"]
    export_to_transformers(causal_lm, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    error = relative_error(with_lora, hf_logits(model, ids))
    assert error <= PARITY["float32"]["relative"], error


def test_hf_greedy_tokens_equal_ours(tmp_path):
    # A window longer than prompt + new tokens: past it HF attends without
    # one, so it is no reference there.
    causal_lm = tiny_causal_lm("griffin", attention_window_size=24)
    export_to_transformers(causal_lm, tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "The quick brown"
    prompt_ids = tokenizer(prompt)["input_ids"]
    max_length = 20
    with torch.no_grad():
        hf_out = model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_length=max_length,
            do_sample=False,
            eos_token_id=None,
        )[0].tolist()
    bare = RecurrentGemmaCausalLM(causal_lm.backbone, preprocessor=None)
    bare.compile(sampler="greedy")
    padded = np.zeros((1, max_length), "int32")
    padded[0, : len(prompt_ids)] = prompt_ids
    mask = (np.arange(max_length) < len(prompt_ids)).astype("int32")[None]
    ours = bare.generate(
        {"token_ids": padded, "padding_mask": mask},
        max_length=max_length,
        stop_token_ids=None,
    )
    ours = keras.ops.convert_to_numpy(ours["token_ids"])[0].tolist()
    assert len(hf_out) == max_length
    assert ours == hf_out
    assert len(set(hf_out[len(prompt_ids) :])) > 1  # not one repeated token


@pytest.mark.parametrize("vocabulary", ["shipped", "tiny"])
def test_hf_tokenizer_ids_equal_ours(vocabulary, tmp_path):
    if vocabulary == "shipped":
        if SHIPPED is None or not os.path.isdir(SHIPPED):
            pytest.skip("the shipped preset is not in this checkout")
        tokenizer = RecurrentGemmaTokenizer.from_preset(SHIPPED)
    else:
        tokenizer = tiny_tokenizer()
    export_to_transformers(tokenizer, tmp_path / "tok")
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in STRINGS:
        ours = [tokenizer.start_token_id]
        ours += [int(i) for i in keras.ops.convert_to_numpy(tokenizer.tokenize(text))]
        assert hf(text)["input_ids"] == ours, text
        decoded = hf.decode(ours, skip_special_tokens=True)
        assert decoded == tokenizer.detokenize(ours[1:]), text


def test_gemma_style_vocabulary_uses_transformers_gemma_tokenizer(tmp_path):
    # The released vocabulary is BPE with Gemma's settings: transformers'
    # own Gemma converter reads `tokenizer.model`, as in the released repos.
    from tests.vocab import tiny_proto

    proto = tiny_proto(turn_markers=False, model_type="bpe")
    tokenizer = RecurrentGemmaTokenizer(proto=proto)
    export_to_transformers(tokenizer, tmp_path / "tok")
    with open(tmp_path / "tok" / "tokenizer_config.json") as f:
        assert json.load(f)["tokenizer_class"] == "GemmaTokenizer"
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path / "tok")
    for text in STRINGS[:3]:
        ours = [2] + [
            int(i) for i in keras.ops.convert_to_numpy(tokenizer.tokenize(text))
        ]
        assert hf(text)["input_ids"] == ours, text


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_round_trip_is_bit_exact_and_sharded(dtype, tmp_path):
    causal_lm = tiny_causal_lm("attention_first", dtype=dtype)
    causal_lm.instruction_tuned = True  # generation_config stops at <end_of_turn>
    path = tmp_path / "hf"
    # 20 kB shards: the tiny model's ~60 kB of bfloat16 needs several.
    causal_lm.export_to_transformers(path, max_shard_size=2e-5)
    names = sorted(os.listdir(path))
    shards = [n for n in names if n.startswith("model-") and n.endswith(".safetensors")]
    assert len(shards) > 2 and "model.safetensors" not in names
    with open(path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert sorted(set(index["weight_map"].values())) == shards
    assert exported_dtypes(path) == {"BF16" if dtype == "bfloat16" else "F32"}
    with open(path / "config.json") as f:
        config = json.load(f)
    assert config["dtype"] == dtype
    assert config["intermediate_size"] == 2 * causal_lm.backbone.intermediate_dim
    assert config["block_types"] == causal_lm.backbone.block_types
    with open(path / "generation_config.json") as f:
        stops = json.load(f)["eos_token_id"]
    tokenizer = causal_lm.preprocessor.tokenizer
    assert stops == [tokenizer.end_token_id, tokenizer.end_of_turn_id]

    back = RecurrentGemmaCausalLM.from_preset(str(path), dtype=dtype)
    assert_same_weights(back.backbone, causal_lm.backbone)
    # transformers reads the shards too, in the exported dtype.
    model = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert str(model.dtype) == f"torch.{dtype}"
    embed = model.model.embed_tokens.weight.detach().float().numpy()
    ours = keras.ops.convert_to_numpy(
        keras.ops.cast(causal_lm.backbone.token_embedding.embeddings, "float32")
    )
    np.testing.assert_array_equal(embed, ours)


def test_backbone_and_preprocessor_export_their_own_part(tmp_path):
    causal_lm = tiny_causal_lm("griffin")
    # The methods, as KerasHub names them on each class.
    causal_lm.backbone.export_to_transformers(tmp_path / "model")
    assert not os.path.exists(tmp_path / "model" / "tokenizer.model")
    assert os.path.exists(tmp_path / "model" / "model.safetensors")
    tokenizer_files = ["tokenizer.json", "tokenizer.model", "tokenizer_config.json"]
    causal_lm.preprocessor.export_to_transformers(tmp_path / "tok")
    assert sorted(os.listdir(tmp_path / "tok")) == tokenizer_files
    causal_lm.preprocessor.tokenizer.export_to_transformers(tmp_path / "tok2")
    assert sorted(os.listdir(tmp_path / "tok2")) == tokenizer_files
    with pytest.raises(ValueError, match="overwrite"):
        causal_lm.preprocessor.tokenizer.export_to_transformers(tmp_path / "tok2")


def _unrepresentable(case):
    config = {**TINY_CONFIGS["griffin"], "vocabulary_size": 400}
    if case == "no soft cap":
        return RecurrentGemmaBackbone(**config, logits_soft_cap=None)
    if case == "unscaled":
        return RecurrentGemmaBackbone(**config, embeddings_scale_by_sqrt_dim=False)
    backbone = RecurrentGemmaBackbone(**config)
    backbone.quantize("int8", filters="proj_q")  # one layer is enough, and fast
    return backbone


@pytest.mark.parametrize(
    "case,message",
    [
        ("no soft cap", "logits_soft_cap"),
        ("unscaled", "embeddings_scale_by_sqrt_dim"),
        ("quantized", "int8"),
    ],
)
def test_unrepresentable_model_raises_before_writing(case, message, tmp_path):
    backbone = _unrepresentable(case)
    with pytest.raises(ValueError, match=message):
        export_to_transformers(backbone, tmp_path / "hf")
    assert os.listdir(tmp_path) == []  # no target, no staging directory


def test_bad_arguments_raise_before_writing(tmp_path):
    with pytest.raises(ValueError, match="RecurrentGemmaCausalLM"):
        export_to_transformers(object(), tmp_path / "hf")
    causal_lm = tiny_causal_lm("griffin")
    with pytest.raises(ValueError, match="max_shard_size"):
        export_to_transformers(causal_lm, tmp_path / "hf", max_shard_size=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is a file"):
        export_to_transformers(causal_lm, tmp_path / "file")
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_existing_directory_needs_overwrite(tmp_path):
    causal_lm = tiny_causal_lm("griffin")
    target = tmp_path / "hf"
    target.mkdir()
    (target / "model-00001-of-00009.safetensors").write_text("stale")
    with pytest.raises(ValueError, match="overwrite=True"):
        export_to_transformers(causal_lm, target)
    assert os.listdir(target) == ["model-00001-of-00009.safetensors"]
    export_to_transformers(causal_lm, target, overwrite=True)
    assert "model-00001-of-00009.safetensors" not in os.listdir(target)
    assert os.listdir(tmp_path) == ["hf"]  # nothing left beside it
    back = RecurrentGemmaBackbone.from_preset(str(target))
    assert_same_weights(back, causal_lm.backbone)


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    causal_lm = tiny_causal_lm("griffin")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(to_transformers, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export_to_transformers(causal_lm, tmp_path / "hf")
    assert os.listdir(tmp_path) == []
    # With overwrite, the old export survives a failed one.
    monkeypatch.undo()
    export_to_transformers(causal_lm, tmp_path / "hf")
    before = sorted(os.listdir(tmp_path / "hf"))
    monkeypatch.setattr(to_transformers, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        export_to_transformers(causal_lm, tmp_path / "hf", overwrite=True)
    assert sorted(os.listdir(tmp_path / "hf")) == before
    assert os.listdir(tmp_path) == ["hf"]
