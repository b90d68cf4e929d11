"""Reduced precision: float16 and bfloat16 policies against float32.

What keeps float16 working: the residual stream is summed in float32, the
RG-LRU state stays float32 between calls, attention's softmax and the logit
soft cap run in float32, and the soft cap is applied before the vocabulary
product can overflow. `tools/benchmark_numerics.py` measures the same
policies over 256 generated tokens on the shipped preset.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.layers import RecurrentBlock
from keras_recurrentgemma.layers import ResidualBlock
from keras_recurrentgemma.layers.embedding import ReversibleEmbedding
from keras_recurrentgemma.layers.recurrent_block import RecurrentBlockCache
from tests.models import randomize
from tests.models import tiny_causal_lm
from tests.tolerances import REDUCED_PRECISION
from tests.tolerances import SOFT_CAP
from tests.tolerances import relative_error

POLICIES = ("float16", "mixed_float16", "bfloat16", "mixed_bfloat16")
FLOAT16_MAX = 65504.0


def numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), np.float64)


def float_and_policy_models(policy, seed=0):
    """The tiny Griffin at scale 0.1 (see test_quantize), in float32 and
    `policy`, with the same weights."""
    reference = tiny_causal_lm("griffin", seed=seed)
    randomize(reference.backbone, seed=seed, scale=0.1)
    candidate = tiny_causal_lm("griffin", seed=seed, dtype=policy)
    candidate.backbone.set_weights(reference.backbone.get_weights())
    return reference, candidate


def token_ids(causal_lm, shape=(2, 24), seed=0):
    vocabulary_size = causal_lm.backbone.vocabulary_size
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocabulary_size, shape).astype("int32")


@pytest.mark.parametrize("policy", POLICIES)
def test_policy_logits_stay_close_to_float32(policy):
    reference, candidate = float_and_policy_models(policy)
    variable_dtype = keras.dtype_policies.get(policy).variable_dtype
    for weight in candidate.backbone.weights:
        assert keras.backend.standardize_dtype(weight.dtype) == variable_dtype
    ids = token_ids(reference)
    expected = numpy(reference.score(ids))
    actual_logits = candidate.score(ids)
    assert keras.backend.standardize_dtype(actual_logits.dtype) == (
        candidate.backbone.compute_dtype
    )
    actual = numpy(actual_logits)
    assert np.isfinite(actual).all()
    bounds = REDUCED_PRECISION[candidate.backbone.compute_dtype]
    assert relative_error(actual, expected) < bounds["relative"]
    agreement = np.mean(actual.argmax(-1) == expected.argmax(-1))
    assert agreement >= bounds["argmax_agreement"]


@pytest.mark.parametrize("policy", ("float16", "bfloat16"))
def test_rg_lru_state_is_not_rounded_between_calls(policy):
    # A padded token (segment_pos -1) leaves the state as it is, so the state
    # that comes out must be the float32 state that went in, bit for bit;
    # Keras's autocast used to round it to the compute dtype on the way in.
    block = ResidualBlock(
        "recurrent",
        hidden_dim=8,
        intermediate_dim=16,
        num_heads=2,
        lru_width=8,
        attention_window_size=4,
        dtype=policy,
    )
    block.build((1, 1, 8))
    state = 1.0 + np.arange(1, 9, dtype="float32") * 2.0**-20
    assert np.any(state.astype(keras.backend.standardize_dtype(policy)) != state)
    cache = RecurrentBlockCache(
        rg_lru_state=ops.convert_to_tensor(state[None]),
        conv1d_state=ops.zeros((1, 3, 8), block.compute_dtype),
    )
    x = ops.ones((1, 1, 8), block.compute_dtype)
    _, new_cache = block(x, ops.convert_to_tensor([[-1]], "int32"), cache)
    new_state = ops.convert_to_numpy(new_cache.rg_lru_state)
    assert new_state.dtype == np.float32
    np.testing.assert_array_equal(new_state[0], state)


def test_recurrent_block_returns_a_float32_state_under_float16():
    block = RecurrentBlock(hidden_dim=8, lru_width=8, num_heads=2, dtype="float16")
    x = ops.ones((1, 3, 8), "float16")
    _, cache = block(x, ops.convert_to_tensor([[0, 1, 2]], "int32"))
    assert keras.backend.standardize_dtype(cache.rg_lru_state.dtype) == "float32"


def test_residual_stream_beyond_float16_range_stays_finite():
    # Each MLP adds 30000 to every channel: after three blocks the stream
    # is past float16's 65504, and only a float32 sum keeps it.
    reference, candidate = float_and_policy_models("float16")
    for model in (reference, candidate):
        for block in model.backbone.residual_blocks:
            bias = block.mlp_block.ffw_down.bias
            bias.assign(ops.full(bias.shape, 30000.0, bias.dtype))
    largest = []

    def watch(x, i):
        largest.append(float(np.abs(numpy(x)).max()))
        return x

    ids = token_ids(reference, (1, 12))
    expected = numpy(reference.score(ids, layer_intercept_fn=watch))
    assert max(largest) > FLOAT16_MAX
    actual = numpy(candidate.score(ids))
    assert np.isfinite(actual).all()
    bounds = REDUCED_PRECISION["float16"]
    assert relative_error(actual, expected) < bounds["relative"]


@pytest.mark.parametrize("policy", ("float16", "mixed_float16"))
def test_soft_cap_is_applied_before_the_product_overflows(policy):
    embedding = ReversibleEmbedding(16, 8, logit_soft_cap=30.0, dtype=policy)
    embedding.build((None,))
    weights = np.random.default_rng(0).normal(size=(16, 8)).astype("float32")
    embedding.embeddings.assign(weights)
    # h fits float16 but |h · e| passes 65504: the product overflows unless
    # h is divided by the cap first.
    hidden = np.random.default_rng(1).normal(size=(2, 3, 8)) * 1e4
    exact = np.tanh(hidden @ weights.T / 30.0) * 30.0
    assert np.abs(hidden @ weights.T).max() > FLOAT16_MAX
    logits = embedding(ops.convert_to_tensor(hidden, "float16"), reverse=True)
    assert keras.backend.standardize_dtype(logits.dtype) == "float16"
    np.testing.assert_allclose(numpy(logits), exact, **SOFT_CAP["float16"])

    # Near the cap, tanh must see a float32 argument, not one rounded to
    # float16 twice.
    small = hidden * 1e-3
    exact = np.tanh(small @ weights.T / 30.0) * 30.0
    logits = embedding(ops.convert_to_tensor(small, "float16"), reverse=True)
    np.testing.assert_allclose(numpy(logits), exact, **SOFT_CAP["float16"])


def test_generate_under_float16():
    # mixed_float16 computes alike; its logits are checked above.
    reference, candidate = float_and_policy_models("float16")
    candidate.preprocessor = None
    candidate.compile(sampler="greedy")
    prompt = {
        "token_ids": np.pad(token_ids(reference, (2, 6)), [[0, 0], [0, 10]]),
        "padding_mask": np.pad(np.ones((2, 6), "int32"), [[0, 0], [0, 10]]),
    }
    out = candidate.generate(prompt, stop_token_ids=None)
    generated = ops.convert_to_numpy(out["token_ids"])
    vocabulary_size = reference.backbone.vocabulary_size
    assert generated.shape == (2, 16)
    assert ((generated >= 0) & (generated < vocabulary_size)).all()
    # Each new token is what float32 picks after the same prefix.
    choices = numpy(reference.score(generated)).argmax(-1)
    agreement = np.mean(generated[:, 6:] == choices[:, 5:-1])
    assert agreement >= REDUCED_PRECISION["float16"]["argmax_agreement"]


def fit_losses(causal_lm, epochs=4):
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2))
    x = token_ids(causal_lm, (4, 9))
    data = {"token_ids": x[:, :-1], "padding_mask": np.ones((4, 8), "int32")}
    history = causal_lm.fit(
        data, x[:, 1:], batch_size=4, epochs=epochs, verbose=0, shuffle=False
    )
    return history.history["loss"]


def test_fit_mixed_float16_scales_the_loss_and_learns():
    _, causal_lm = float_and_policy_models("mixed_float16")
    causal_lm.preprocessor = None
    losses = fit_losses(causal_lm)
    assert isinstance(causal_lm.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    for weight in causal_lm.backbone.weights:
        assert np.isfinite(numpy(weight)).all(), weight.path


def test_fit_float16_with_lora_scales_the_loss_and_learns():
    _, causal_lm = float_and_policy_models("float16")
    causal_lm.preprocessor = None
    causal_lm.backbone.enable_lora(4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses = fit_losses(causal_lm)
    # No float16 weight is trainable, so no warning about them.
    assert not [w for w in caught if "weights are float16" in str(w.message)]
    # Keras wraps the optimizer for "mixed_float16" only; we do for float16.
    assert isinstance(causal_lm.optimizer, keras.optimizers.LossScaleOptimizer)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]


def test_fit_with_float16_weights_warns():
    _, causal_lm = float_and_policy_models("float16")
    causal_lm.preprocessor = None
    causal_lm.compile(optimizer="adam", auto_scale_loss=False)
    assert not isinstance(causal_lm.optimizer, keras.optimizers.LossScaleOptimizer)
    x = token_ids(causal_lm, (2, 5))
    with pytest.warns(UserWarning, match="trainable weights are float16"):
        # One epoch: with `grain` installed KerasHub's `fit` refuses
        # `epochs=0` (the warning itself comes before training starts).
        causal_lm.fit(
            {"token_ids": x[:, :-1], "padding_mask": np.ones((2, 4), "int32")},
            x[:, 1:],
            epochs=1,
            verbose=0,
        )
