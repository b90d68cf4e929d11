"""`quantize("int8")` on RecurrentGemmaCausalLM.

What is proved, on every backend:
- the `Dense` projections and the tied token embedding become int8; the
  RG-LRU gates, `a_param`, the Conv1D, the norms and every bias keep their
  float values bit for bit;
- logits stay within `INT8_RELATIVE` of the float model's and are
  soft-capped once, and greedy generation (the compiled loop, on int8
  weights) mostly agrees with it;
- `filters` narrows the quantized layers and never widens them;
- bad modes and a second `quantize` are clear errors that change nothing;
- a quantized model survives `save_to_preset` / `from_preset` and `.keras`;
- (large) the trained preset keeps its logits and greedy choices.
"""

import gc
import re
import warnings
import weakref

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.layers.dense import Dense
from tests.models import assert_same_weights
from tests.models import randomize
from tests.models import tiny_causal_lm
from tests.test_causal_lm import generate_ids
from tests.tolerances import QUANTIZED
from tests.tolerances import QUANTIZED_SOFT_CAP
from tests.tolerances import relative_error

INT8_RELATIVE = QUANTIZED["int8"]["relative"]
GREEDY_AGREEMENT = QUANTIZED["int8"]["greedy_agreement"]
# Written for this file, in the style of the preset's Python documentation.
TEXTS = (
    "The method returns a copy of the string with leading and trailing "
    "whitespace removed, unless other characters are given to strip.",
    "Each thread waits on the lock before it reads the shared counter, so "
    "no two threads change the value at the same time.",
    "When the archive cannot be opened, the function raises an error that "
    "names the file and the reason the operation failed.",
)
# The trained preset on TEXTS, int8 against float, measured alike on jax,
# tensorflow and torch (`test_trained_preset_agrees`): relative error
# 1.21e-2 to 1.23e-2, the same argmax at 70 of 72 positions, and the float
# model's greedy choice at 71 of the int8 run's 72 new tokens.
PRESET_TOP1 = 0.9
PROMPTS = [[2, 17, 42, 7], [2, 99, 5], [2, 60, 61, 62, 63], [2, 8]]
# Prompt plus new tokens; the logit tests use the same shape.
LENGTH = 17
# Variables that must stay float, by path; each matches several layers.
FLOAT_ONLY = ("rg_lru/a_param", "input_gate/", "a_gate/", "conv_1d/", "norm/scale")


def float_model(seed=0, **overrides):
    """The tiny Griffin, weights redrawn at scale 0.1.

    `tiny_causal_lm`'s scale 0.5 makes each layer amplify ~3×; that untrained
    model is chaotic (int8 errors of 17-35% at the logits over 3 seeds,
    measured), which says nothing about quantization. At 0.1 the logits stay
    under 4 and the int8 error matches the trained preset's.
    """
    causal_lm = tiny_causal_lm("griffin", seed=seed, **overrides)
    randomize(causal_lm.backbone, seed=seed, scale=0.1)
    causal_lm.compile(sampler="greedy")
    return causal_lm


def quantized_paths(model):
    return sorted(
        layer.path for layer in model._flatten_layers() if layer.quantization_mode
    )


def numpy_weights(model):
    return {v.path: ops.convert_to_numpy(v) for v in model.weights}


def logits(causal_lm, token_ids):
    # Eager: on jax each op compiles once per shape and serves every model,
    # where a compiled predict would compile again for each.
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return np.asarray(ops.convert_to_numpy(causal_lm(inputs)), np.float64)


@pytest.fixture(scope="module")
def token_ids():
    shape = (len(PROMPTS), LENGTH)
    return np.random.default_rng(1).integers(6, 97, size=shape).astype("int32")


@pytest.fixture(scope="module")
def quantize_warnings():
    return []


@pytest.fixture(scope="module")
def stale_generate_functions():
    return []


@pytest.fixture(scope="module")
def pair(quantize_warnings, stale_generate_functions):
    """`(float, int8)`: the same weights, the second quantized.

    The second made its float generate function first, which `quantize`
    must drop.
    """
    reference, quantized = float_model(), float_model()
    stale_generate_functions.append(quantized.make_generate_function())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quantized.quantize("int8")
    quantize_warnings.extend(str(w.message) for w in caught)
    return reference, quantized


def test_projections_and_embedding_become_int8(pair, quantize_warnings):
    reference, quantized = pair
    dense = [
        layer.path for layer in reference._flatten_layers() if isinstance(layer, Dense)
    ]
    assert dense
    assert quantized_paths(quantized) == sorted(dense + ["token_embedding"])
    weights = {v.path: v for v in quantized.weights}
    for path in dense:
        assert weights[f"{path}/kernel"].dtype == "int8"
        assert weights[f"{path}/kernel_scale"].dtype == "float32"
    assert weights["token_embedding/embeddings"].dtype == "int8"
    # Keras warns for every layer it cannot quantize; none is offered to it.
    assert not [w for w in quantize_warnings if "quantize" in w]


def test_gates_a_param_conv_norms_and_biases_are_unchanged(pair):
    reference, quantized = pair
    before, after = numpy_weights(reference), numpy_weights(quantized)
    kept = [p for p in before if not re.search(r"/(kernel|embeddings)$", p)]
    for name in FLOAT_ONLY:
        assert any(name in p for p in kept), name
    for path in kept:
        assert after[path].dtype == np.float32, path
        np.testing.assert_array_equal(after[path], before[path], err_msg=path)


def test_logits_stay_close(pair, token_ids):
    reference, quantized = pair
    expected = logits(reference, token_ids)
    actual = logits(quantized, token_ids)
    assert relative_error(actual, expected) <= INT8_RELATIVE


def test_int8_logits_are_soft_capped_once(pair, token_ids):
    # Under the cap of 30 the logits stay below 4, where tanh is nearly the
    # identity. The same int8 weights with a cap of 1 must give tanh(u) for
    # the uncapped int8 logits u = 30 atanh(l / 30). The copy is built from
    # the quantized config, as a preset loads, so no second `quantize` runs.
    _, quantized = pair
    config = {**quantized.backbone.get_config(), "logits_soft_cap": 1.0}
    backbone = RecurrentGemmaBackbone.from_config(config)
    backbone.set_weights(quantized.backbone.get_weights())
    capped = RecurrentGemmaCausalLM(backbone)
    assert quantized_paths(capped) == quantized_paths(quantized)
    uncapped = 30.0 * np.arctanh(logits(quantized, token_ids) / 30.0)
    actual = logits(capped, token_ids)
    assert np.abs(actual).max() > 0.9
    np.testing.assert_allclose(
        actual, np.tanh(uncapped), **QUANTIZED_SOFT_CAP["float32"]
    )


def test_greedy_generation_mostly_agrees(pair, stale_generate_functions):
    # This model's greedy runs mostly repeat the prompt's last token, so
    # agreement here shows little beyond a working loop on int8 weights;
    # `test_trained_preset_agrees` is the meaningful check.
    reference, quantized = pair
    assert quantized.make_generate_function() is not stale_generate_functions[0]
    generated, _ = generate_ids(quantized, PROMPTS, LENGTH)
    choices = logits(reference, generated).argmax(-1)
    agree = []
    for row, prompt in enumerate(PROMPTS):
        np.testing.assert_array_equal(generated[row, : len(prompt)], prompt)
        # Token j is chosen from the logits at j - 1.
        new = generated[row, len(prompt) :]
        agree.append(new == choices[row, len(prompt) - 1 : -1])
    assert np.concatenate(agree).mean() >= GREEDY_AGREEMENT


def test_filters_narrow_and_never_widen():
    causal_lm = float_model()
    # "gate" also names the RG-LRU gates, which must stay float.
    causal_lm.quantize("int8", filters=["gate"])
    assert [p.rsplit("/", 1)[-1] for p in quantized_paths(causal_lm)] == [
        "ffw_gate"
    ] * len(causal_lm.backbone.block_types)


@pytest.mark.parametrize(
    "mode, message",
    [
        ("int3", "Invalid quantization mode"),
        (None, "either `mode` or `config`"),
        ("gptq", "GPTQConfig"),
    ],
)
def test_bad_mode_is_a_clear_error_and_changes_nothing(mode, message):
    causal_lm = float_model()
    before = numpy_weights(causal_lm)
    with pytest.raises(ValueError, match=re.escape(message)):
        causal_lm.quantize(mode)
    assert quantized_paths(causal_lm) == []
    after = numpy_weights(causal_lm)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_gptq_config_is_refused_before_any_layer_changes():
    causal_lm = float_model()
    config = keras.quantizers.GPTQConfig(
        dataset=["x"], tokenizer=causal_lm.preprocessor.tokenizer
    )
    with pytest.raises(ValueError, match="not supported for RecurrentGemma"):
        causal_lm.quantize(config=config)
    assert quantized_paths(causal_lm) == []


def test_quantizing_twice_is_a_clear_error(pair):
    _, quantized = pair
    before = numpy_weights(quantized)
    with pytest.raises(ValueError, match="already quantized"):
        quantized.quantize("int8")
    after = numpy_weights(quantized)
    for path, value in before.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_save_to_preset_round_trip(pair, token_ids, tmp_path):
    _, quantized = pair
    quantized.save_to_preset(str(tmp_path))
    loaded = RecurrentGemmaCausalLM.from_preset(str(tmp_path))
    assert quantized_paths(loaded) == quantized_paths(quantized)
    assert_same_weights(loaded, quantized)
    np.testing.assert_array_equal(
        logits(loaded, token_ids), logits(quantized, token_ids)
    )


def test_keras_file_round_trip(pair, token_ids, tmp_path):
    _, quantized = pair
    path = str(tmp_path / "quantized.keras")
    quantized.save(path)
    with warnings.catch_warnings():
        # Keras does not re-run a custom `compile` on load, and says so.
        warnings.filterwarnings("ignore", message=".*compile\\(\\)")
        loaded = keras.saving.load_model(path)
    assert isinstance(loaded, RecurrentGemmaCausalLM)
    assert_same_weights(loaded, quantized)
    np.testing.assert_array_equal(
        logits(loaded, token_ids), logits(quantized, token_ids)
    )
    # A model loaded from a quantized file saves again, to either format
    # (its layers are rebuilt under the saved `DTypePolicyMap`).
    loaded.save(str(tmp_path / "again.keras"))
    loaded.save_to_preset(str(tmp_path / "again_preset"))
    again = RecurrentGemmaCausalLM.from_preset(str(tmp_path / "again_preset"))
    np.testing.assert_array_equal(
        logits(again, token_ids), logits(quantized, token_ids)
    )


def test_backbone_quantize_also_takes_the_embedding():
    backbone = float_model().backbone
    dense = [
        layer.path for layer in backbone._flatten_layers() if isinstance(layer, Dense)
    ]
    backbone.quantize("int8")
    assert quantized_paths(backbone) == sorted(dense + ["token_embedding"])


@pytest.mark.parametrize("model", ["backbone", "causal_lm"])
def test_quantize_frees_each_float_kernel_without_collecting(monkeypatch, model):
    """Keras runs a full `gc.collect()` for each kernel it deletes (0.4-1.6 s
    each beside a loaded model); `quantize` turns that off, and the float
    kernels are freed by their reference counts all the same."""
    causal_lm = float_model()
    target = causal_lm.backbone if model == "backbone" else causal_lm
    kernels = [
        weakref.ref(layer._kernel)
        for layer in causal_lm.backbone._flatten_layers()
        if isinstance(layer, Dense)
    ]
    collects = []
    monkeypatch.setattr(gc, "collect", lambda *args: collects.append(args) or 0)
    gc.disable()
    try:
        target.quantize("int8")
        assert collects == []
        assert kernels and all(ref() is None for ref in kernels)
    finally:
        gc.enable()


@pytest.mark.large
def test_trained_preset_agrees():
    # Measured values beside PRESET_TOP1; the bounds are the tiny model's.
    name = "griffin_tiny_pydocs_en"
    reference = RecurrentGemmaCausalLM.from_preset(name)
    quantized = RecurrentGemmaCausalLM.from_preset(name)
    quantized.quantize("int8")
    tokenizer = reference.preprocessor.tokenizer
    rows = [[tokenizer.start_token_id] + list(tokenizer.tokenize(t)) for t in TEXTS]
    length = min(len(r) for r in rows)
    token_ids = np.array([r[:length] for r in rows], "int32")
    expected = logits(reference, token_ids)
    actual = logits(quantized, token_ids)
    assert relative_error(actual, expected) <= INT8_RELATIVE
    top1 = np.mean(actual.argmax(-1) == expected.argmax(-1))
    assert top1 >= PRESET_TOP1

    prompt_length = 6
    generated, _ = generate_ids(
        quantized, [list(r[:prompt_length]) for r in token_ids], prompt_length + 24
    )
    choices = logits(reference, generated).argmax(-1)
    agree = generated[:, prompt_length:] == choices[:, prompt_length - 1 : -1]
    assert agree.mean() >= GREEDY_AGREEMENT
