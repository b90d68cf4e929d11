"""`from_preset(..., quantize=mode)`: quantized tensor by tensor while loading.

What is proved, on every backend, for every source format:
- the result equals loading in float and calling `quantize(mode)`: the same
  variables, dtypes and bits, so the same logits, exactly;
- slicing a large tensor (forced here by a tiny slice size) changes nothing;
- the float weights of quantized layers are never variables of the model:
  it is built with the integer layout, and loading draws no random numbers;
- a quantize-on-load model saves and loads like any quantized model;
- a mode that cannot be applied while loading, an already quantized
  preset, and a mis-shaped tensor are errors naming the problem.
`tools/benchmark_real_size.py --quantize int8` measures the released sizes.
"""

import os

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.convert import quantize_on_load
from tests.models import assert_same_weights
from tests.models import safetensors_header
from tests.models import write_tiny_hf_checkpoint
from tests.test_streaming_load import random_draws  # noqa: F401 (fixture)

MODES = ("int8", "int4")
# Run by default on torch only (the quickest suite), on the other backends
# with --run_large: what these tests add to the int8 ones on every backend is
# numpy-side (int4 packing, row slicing, the task loader), not backend code.
TORCH = keras.config.backend() == "torch"
INT4 = pytest.param("int4", marks=[] if TORCH else [pytest.mark.large])


def torch_by_default(test):
    """Runs `test` by default on torch; on the other backends, --run_large."""
    return test if TORCH else pytest.mark.large(test)


IDS = np.array([[2, 17, 42, 7, 99, 5, 60, 61]], "int32")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def keras_preset(hf_dir, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("keras") / "preset")
    RecurrentGemmaCausalLM.from_preset(hf_dir, dtype="bfloat16").save_to_preset(path)
    return path


def logits(backbone):
    inputs = {"token_ids": IDS, "padding_mask": np.ones_like(IDS)}
    return keras.ops.convert_to_numpy(
        keras.ops.cast(
            backbone.token_embedding(backbone(inputs), reverse=True), "float32"
        )
    )


def quantized_after_loading(preset, mode, dtype="bfloat16"):
    backbone = RecurrentGemmaBackbone.from_preset(preset, dtype=dtype)
    backbone.quantize(mode)
    return backbone


@pytest.mark.parametrize("mode", ["int8", INT4])
def test_hf_equals_load_then_quantize(hf_dir, mode):
    reference = quantized_after_loading(hf_dir, mode)
    loaded = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16", quantize=mode)
    assert_same_weights(loaded, reference)
    np.testing.assert_array_equal(logits(loaded), logits(reference))


def test_float32_model_equals_load_then_quantize(hf_dir):
    reference = quantized_after_loading(hf_dir, "int8", dtype="float32")
    loaded = RecurrentGemmaBackbone.from_preset(hf_dir, quantize="int8")
    assert_same_weights(loaded, reference)


@pytest.mark.parametrize("mode", MODES)
def test_slicing_changes_nothing(hf_dir, mode, monkeypatch):
    whole = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16", quantize=mode)
    # About 4 columns or rows a slice: every tensor is cut into many.
    monkeypatch.setattr(quantize_on_load, "_SLICE_BYTES", 64)
    sliced = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16", quantize=mode)
    assert_same_weights(sliced, whole)


# int4 only, to keep the suite's time: the Keras-format path differs from
# the HF one in how tensors are read, not in how a mode quantizes them.
@pytest.mark.parametrize("mode", ["int4"])
def test_keras_preset_equals_load_then_quantize(keras_preset, mode):
    reference = quantized_after_loading(keras_preset, mode)
    loaded = RecurrentGemmaBackbone.from_preset(keras_preset, quantize=mode)
    assert_same_weights(loaded, reference)
    np.testing.assert_array_equal(logits(loaded), logits(reference))


# Generating with a quantized model is tested on every backend by
# tests/test_quantize.py; this adds the task loader's path to it.
@torch_by_default
def test_task_generates_and_matches(hf_dir):
    reference = RecurrentGemmaCausalLM.from_preset(hf_dir, dtype="bfloat16")
    reference.quantize("int8")
    loaded = RecurrentGemmaCausalLM.from_preset(
        hf_dir, dtype="bfloat16", quantize="int8"
    )
    assert_same_weights(loaded.backbone, reference.backbone)
    prompt = "the cat"
    assert loaded.generate(prompt, max_length=12) == reference.generate(
        prompt, max_length=12
    )


# int4 only (the mode whose packing a wrong slice would break); int8's
# slicing is checked by `test_slicing_changes_nothing`.
@pytest.mark.parametrize("mode", [INT4])
def test_embedding_is_read_a_slice_of_rows_at_a_time(hf_dir, mode, monkeypatch):
    from keras_recurrentgemma.convert import safetensors_reader

    # Where the embedding's bytes start and end in the file.
    filename = os.path.join(hf_dir, "model.safetensors")
    header, data_start = safetensors_header(filename)
    begin, end = (
        data_start + n for n in header["model.embed_tokens.weight"]["data_offsets"]
    )
    reads = []
    read = safetensors_reader._read

    def recording_read(filename, dtype, offset, shape, *rest):
        if begin <= offset < end:
            reads.append(tuple(shape))
        return read(filename, dtype, offset, shape, *rest)

    monkeypatch.setattr(safetensors_reader, "_read", recording_read)
    reference = quantized_after_loading(hf_dir, mode)
    vocabulary, hidden = reference.token_embedding.embeddings.shape
    # Slices of 40 rows: several per table, the last one short.
    monkeypatch.setattr(quantize_on_load, "_SLICE_BYTES", 40 * hidden * 2)
    reads.clear()
    loaded = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16", quantize=mode)
    assert (vocabulary, hidden) not in reads
    assert sum(shape[0] for shape in reads) == vocabulary and len(reads) > 2
    # Sliced that finely, still the model that quantizing after loading gives.
    assert_same_weights(loaded, reference)


def test_built_quantized_without_random_draws(hf_dir, random_draws):  # noqa: F811
    loaded = RecurrentGemmaBackbone.from_preset(
        hf_dir, dtype="bfloat16", quantize="int8"
    )
    assert random_draws == []
    targets = quantize_on_load.quantized_targets(loaded)
    assert "token_embedding/embeddings" in targets
    for path, target in targets.items():
        variable = next(v for v in loaded.weights if v.path == path)
        assert variable.dtype == "int8", path
        assert target.float_dtype == "bfloat16"
    # No float copy of any quantized tensor is a variable of the model.
    float_shapes = {(t.float_shape, t.layer.path) for t in targets.values()}
    for variable in loaded.weights:
        layer_path = variable.path.rsplit("/", 1)[0]
        if variable.dtype in ("bfloat16", "float32"):
            assert (tuple(variable.shape), layer_path) not in float_shapes


def test_saves_and_loads_like_a_quantized_model(hf_dir, tmp_path):
    loaded = RecurrentGemmaBackbone.from_preset(
        hf_dir, dtype="bfloat16", quantize="int8"
    )
    loaded.save_to_preset(str(tmp_path / "q"))
    again = RecurrentGemmaBackbone.from_preset(str(tmp_path / "q"))
    assert_same_weights(again, loaded)
    # A quantized preset loaded as it is saves again, unchanged.
    again.save_to_preset(str(tmp_path / "q2"))
    resaved = RecurrentGemmaBackbone.from_preset(str(tmp_path / "q2"))
    assert_same_weights(resaved, loaded)
    with pytest.raises(ValueError, match="already quantized"):
        RecurrentGemmaBackbone.from_preset(str(tmp_path / "q"), quantize="int8")


def test_load_weights_false_builds_quantized(hf_dir):
    model = RecurrentGemmaBackbone.from_preset(
        hf_dir, load_weights=False, dtype="bfloat16", quantize="int8"
    )
    kernel = next(v for v in model.weights if v.path.endswith("ffw_up/kernel"))
    assert kernel.dtype == "int8"


@pytest.mark.parametrize("mode", ["float8", "gptq", "int2"])
def test_unsupported_mode_is_an_error(hf_dir, mode):
    with pytest.raises(ValueError, match=f"quantize='{mode}'"):
        RecurrentGemmaBackbone.from_preset(hf_dir, quantize=mode)


def test_misshaped_tensor_named_before_any_assignment(hf_dir, tmp_path):
    import shutil

    from tests.test_hf_parity import rewrite_weights

    broken = tmp_path / "broken"
    shutil.copytree(hf_dir, broken)
    key = "model.layers.0.mlp_block.up_proj.weight"

    def shrink(tensors):
        tensors[key] = tensors[key][:-1]

    rewrite_weights(broken, shrink)
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        RecurrentGemmaBackbone.from_preset(str(broken), quantize="int8")
