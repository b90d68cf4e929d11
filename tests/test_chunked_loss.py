"""The chunked training loss: the same loss, gradients and steps as the full
logits give (`keras_recurrentgemma.chunked_loss`)."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import chunked_loss
from tests.models import tiny_causal_lm
from tests.tolerances import CHUNKED_LOSS
from tests.tolerances import relative_error

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there",
    "A third, longer row of training text that fills the whole sequence.",
]
SEQUENCE_LENGTH = 24
# 5 and 7 leave a short last chunk; 8 divides 24; 24 and 100 are one chunk.
CHUNK_SIZES = (1, 5, 7, 8, 24, 100)


def numpy(x):
    return ops.convert_to_numpy(x)


def lora_causal_lm(use_lora=True, **kwargs):
    """A tiny causal LM; with LoRA, factors drawn the same in every model
    (B = 0 would hide A's gradient)."""
    causal_lm = tiny_causal_lm("griffin", sequence_length=SEQUENCE_LENGTH, **kwargs)
    if use_lora:
        causal_lm.backbone.enable_lora(2)
        rng = np.random.default_rng(1)
        for layer in causal_lm.backbone._flatten_layers():
            if getattr(layer, "lora_enabled", False):
                for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
                    factor.assign(rng.normal(scale=0.1, size=factor.shape))
    return causal_lm


def batch(causal_lm):
    """`(x, y, sample_weight)` of `TEXTS`, padded, with about half of the
    labels set to the model's own top token so accuracy is not trivially 0."""
    x, y, sample_weight = causal_lm.preprocessor(TEXTS)
    x = {k: numpy(v) for k, v in x.items()}
    y, sample_weight = numpy(y).copy(), numpy(sample_weight).astype("float32")
    top = numpy(causal_lm(x)).argmax(-1)
    y[:, ::2] = top[:, ::2]
    assert 0 < sample_weight.sum() < sample_weight.size  # padding is present
    return x, y, sample_weight


def loss_and_grads(causal_lm, loss_fn):
    """`loss_fn()` and its gradient for every trainable weight, as numpy."""
    variables = causal_lm.trainable_variables
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        def fn(values):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, values, strict=True))
            ):
                return loss_fn()

        loss, grads = jax.value_and_grad(fn)([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn()
        grads = tape.gradient(loss, variables)
    else:
        for v in variables:
            v.value.grad = None
        loss = loss_fn()
        loss.backward()
        grads = [v.value.grad for v in variables]
    assert all(g is not None for g in grads)
    return float(numpy(loss)), {
        v.path: numpy(g) for v, g in zip(variables, grads, strict=True)
    }


def plain_loss(causal_lm, x, y, sample_weight):
    loss = keras.losses.SparseCategoricalCrossentropy(
        from_logits=True, reduction="mean_with_sample_weight"
    )
    return loss(y, causal_lm(x), sample_weight=sample_weight)


def chunked(causal_lm, x, y, sample_weight, chunk_size):
    return chunked_loss.chunked_cross_entropy(
        lambda h: causal_lm.backbone.token_embedding(h, reverse=True),
        causal_lm.backbone(x),
        y,
        sample_weight,
        chunk_size,
    )


def assert_same_grads(actual, expected):
    assert sorted(actual) == sorted(expected)
    bound = CHUNKED_LOSS["float32"]["relative"]
    errors = {p: relative_error(actual[p], g) for p, g in expected.items()}
    assert max(errors.values()) < bound, errors
    # A gradient that is 0 everywhere would pass any relative check vacuously.
    assert all(np.abs(g).max() > 0 for g in expected.values())


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("use_lora", [True, False])
def test_chunked_loss_and_gradients_equal_the_full_logits_ones(chunk_size, use_lora):
    causal_lm = lora_causal_lm(use_lora)
    x, y, sample_weight = batch(causal_lm)
    if use_lora:
        assert all("lora_kernel" in v.path for v in causal_lm.trainable_variables)
    else:  # the tied embedding trains too, through both of its uses
        assert any("embeddings" in v.path for v in causal_lm.trainable_variables)
    loss, grads = loss_and_grads(
        causal_lm, lambda: plain_loss(causal_lm, x, y, sample_weight)
    )
    chunked_value, chunked_grads = loss_and_grads(
        causal_lm, lambda: chunked(causal_lm, x, y, sample_weight, chunk_size)
    )
    np.testing.assert_allclose(
        chunked_value, loss, rtol=CHUNKED_LOSS["float32"]["relative"]
    )
    assert_same_grads(chunked_grads, grads)


def test_chunked_loss_without_sample_weight_is_the_mean_over_all_tokens():
    causal_lm = lora_causal_lm()
    x, y, _ = batch(causal_lm)
    expected = numpy(plain_loss(causal_lm, x, y, None))
    for chunk_size in (5, 8):
        actual = numpy(chunked(causal_lm, x, y, None, chunk_size))
        np.testing.assert_allclose(
            actual, expected, rtol=CHUNKED_LOSS["float32"]["relative"]
        )


def test_chunked_loss_of_all_padding_is_zero():
    causal_lm = lora_causal_lm()
    x, y, sample_weight = batch(causal_lm)
    loss = chunked(causal_lm, x, y, np.zeros_like(sample_weight), 5)
    assert float(numpy(loss)) == 0.0


def one_sgd_step(causal_lm, x, y, sample_weight, loss_chunk_size, **compile_kwargs):
    """Logs and each trainable weight's update of one SGD step."""
    causal_lm.compile(
        optimizer=keras.optimizers.SGD(0.5),
        sampler="greedy",
        loss_chunk_size=loss_chunk_size,
        **compile_kwargs,
    )
    before = {v.path: numpy(v) for v in causal_lm.trainable_weights}
    logs = causal_lm.train_on_batch(x, y, sample_weight=sample_weight, return_dict=True)
    updates = {v.path: numpy(v) - before[v.path] for v in causal_lm.trainable_weights}
    return {k: float(numpy(v)) for k, v in logs.items()}, updates


# Every pair of (chunk size 5 or 8, weighted or not, remat or not) once: four
# steps instead of all eight combinations, as no check depends on all three.
@pytest.mark.parametrize(
    "chunk_size, weighted, remat",
    [(5, True, False), (8, False, False), (5, False, True), (8, True, True)],
)
def test_fit_step_with_the_chunked_loss_moves_weights_as_the_full_logits(
    chunk_size, weighted, remat
):
    models = [lora_causal_lm(remat=remat) for _ in range(2)]
    x, y, sample_weight = batch(models[0])
    if not weighted:
        sample_weight = None
    plain_logs, plain_updates = one_sgd_step(models[0], x, y, sample_weight, None)
    logs, updates = one_sgd_step(models[1], x, y, sample_weight, chunk_size)
    assert models[1]._loss_chunk_size == chunk_size
    assert models[0]._loss_chunk_size is None
    assert sorted(logs) == sorted(plain_logs) == ["loss", "sparse_categorical_accuracy"]
    bound = CHUNKED_LOSS["float32"]["relative"]
    np.testing.assert_allclose(logs["loss"], plain_logs["loss"], rtol=bound)
    # The same hits over the same weights; only the float32 division differs
    # (Keras averages each row first). One hit more or less is 1/55 off.
    accuracy = logs["sparse_categorical_accuracy"]
    np.testing.assert_allclose(
        accuracy, plain_logs["sparse_categorical_accuracy"], rtol=bound
    )
    assert 0.3 < accuracy < 0.8  # about half the labels are the top token
    assert_same_grads(updates, plain_updates)
    # After training, `call` and `predict` give the full logits again.
    backbone = models[1].backbone
    expected = numpy(backbone.token_embedding(backbone(x), reverse=True))
    np.testing.assert_array_equal(numpy(models[1](x)), expected)
    predicted = models[1].predict(x, verbose=0)
    assert predicted.shape == (len(TEXTS), SEQUENCE_LENGTH, backbone.vocabulary_size)


def test_fit_is_chunked_by_default_and_learns():
    causal_lm = lora_causal_lm()
    causal_lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    assert causal_lm._loss_chunk_size == chunked_loss.DEFAULT_LOSS_CHUNK_SIZE
    causal_lm.compile(
        optimizer=keras.optimizers.Adam(1e-2), sampler="greedy", loss_chunk_size=7
    )
    history = causal_lm.fit(TEXTS, batch_size=3, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_fit_without_metrics_skips_them():
    causal_lm = lora_causal_lm()
    x, y, sample_weight = batch(causal_lm)
    logs, updates = one_sgd_step(causal_lm, x, y, sample_weight, 5, weighted_metrics=[])
    assert sorted(logs) == ["loss"]
    assert all(np.abs(u).max() > 0 for u in updates.values())


def test_a_user_loss_gets_the_full_logits():
    causal_lm = lora_causal_lm()
    x, y, sample_weight = batch(causal_lm)
    seen = []
    base = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def loss(y_true, y_pred):
        seen.append(tuple(y_pred.shape)[-1])
        return base(y_true, y_pred)

    causal_lm.compile(optimizer="sgd", loss=loss, sampler="greedy")
    assert causal_lm._loss_chunk_size is None
    causal_lm.train_on_batch(x, y, sample_weight=sample_weight)
    assert seen and set(seen) == {causal_lm.backbone.vocabulary_size}


def test_float16_loss_scaling_works_with_the_chunked_loss():
    # Pure float16 weights with float32 LoRA factors: `compile` wraps the
    # optimizer in a LossScaleOptimizer, which scales the chunked loss too.
    results = []
    for loss_chunk_size in (None, 5):
        causal_lm = lora_causal_lm(dtype="float16")
        x, y, sample_weight = batch(causal_lm)
        results.append(one_sgd_step(causal_lm, x, y, sample_weight, loss_chunk_size))
        assert isinstance(causal_lm.optimizer, keras.optimizers.LossScaleOptimizer)
    (plain_logs, plain_updates), (logs, updates) = results
    bound = CHUNKED_LOSS["float16"]["relative"]
    np.testing.assert_allclose(logs["loss"], plain_logs["loss"], rtol=bound)
    errors = {p: relative_error(updates[p], u) for p, u in plain_updates.items()}
    assert max(errors.values()) < bound, errors
    assert all(np.abs(u).max() > 0 for u in plain_updates.values())


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "256", 8.0])
def test_bad_loss_chunk_size_is_a_value_error(bad):
    causal_lm = lora_causal_lm()
    with pytest.raises(ValueError, match="`loss_chunk_size` must be a positive int"):
        causal_lm.compile(optimizer="sgd", loss_chunk_size=bad)


def test_chunked_loss_checks_its_inputs():
    causal_lm = lora_causal_lm()
    x, y, sample_weight = batch(causal_lm)
    with pytest.raises(ValueError, match="labels"):
        chunked(causal_lm, x, y[:, :, None, None], sample_weight, 5)
    with pytest.raises(ValueError, match="sample_weight"):
        chunked(causal_lm, x, y, sample_weight[:, 0], 5)
    with pytest.raises(ValueError, match="`loss_chunk_size` must be a positive int"):
        chunked(causal_lm, x, y, sample_weight, 0)
