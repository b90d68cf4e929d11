"""RecurrentGemmaBackbone: config, saving, dtypes, training, inputs."""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.backbone import embedding_normalizer
from tests.conftest import TINY_CONFIGS
from tests.tolerances import SELF_CONSISTENCY
from tests.tolerances import relative_error

TOL = SELF_CONSISTENCY["float32"]


def make_inputs(config, batch=2, length=13, seed=0):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, config["vocabulary_size"], (batch, length)).astype("int32")
    return {"token_ids": ids, "padding_mask": np.ones_like(ids)}


def logits_of(backbone, inputs):
    # `predict` compiles the whole forward once per shape; eager JAX would
    # compile every primitive separately and take minutes.
    hidden = backbone.predict(inputs, verbose=0)
    return ops.convert_to_numpy(backbone.token_embedding(hidden, reverse=True))


def test_embedding_normalizer_is_rounded_to_bfloat16():
    assert embedding_normalizer(2560) == 50.5
    assert embedding_normalizer(4096) == 64.0


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_forward_shape_and_num_layers(name):
    config = TINY_CONFIGS[name]
    backbone = RecurrentGemmaBackbone(**config)
    inputs = make_inputs(config)
    hidden = backbone(inputs)
    assert tuple(hidden.shape) == (2, 13, config["hidden_dim"])
    assert backbone.num_layers == len(config["block_types"])
    types = [b.temporal_block.name for b in backbone.residual_blocks]
    expected = [f"{t}_block" for t in config["block_types"]]
    assert types == expected
    assert np.all(np.isfinite(logits_of(backbone, inputs)))


def test_block_configs_hold_every_constructor_argument():
    # `StoredConfig`: what a block is built with is what it serializes, so
    # a block rebuilt from its config is built the same way.
    import inspect

    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**{**config, "remat": 1})
    for block in backbone.residual_blocks:
        for layer in (block, block.temporal_block, block.mlp_block):
            layer_config = layer.get_config()
            arguments = inspect.signature(type(layer).__init__).parameters
            expected = {n for n in arguments if n not in ("self", "kwargs")}
            assert expected <= set(layer_config), type(layer).__name__
            clone = type(layer).from_config(layer_config)
            assert clone.get_config() == layer_config
        assert block.remat is True


def test_config_round_trip_gives_same_outputs():
    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**config)
    clone = RecurrentGemmaBackbone.from_config(backbone.get_config())
    clone.set_weights(backbone.get_weights())
    assert clone.get_config() == backbone.get_config()
    inputs = make_inputs(config)
    np.testing.assert_allclose(
        logits_of(clone, inputs), logits_of(backbone, inputs), **TOL
    )


def test_keras_file_round_trip(tmp_path):
    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**config)
    path = str(tmp_path / "backbone.keras")
    backbone.save(path)
    restored = keras.saving.load_model(path)
    assert isinstance(restored, RecurrentGemmaBackbone)
    inputs = make_inputs(config)
    np.testing.assert_array_equal(
        logits_of(restored, inputs), logits_of(backbone, inputs)
    )


def test_segment_pos_key_may_be_omitted_in_predict():
    config = TINY_CONFIGS["hawk"]
    backbone = RecurrentGemmaBackbone(**config)
    inputs = make_inputs(config)
    eager = ops.convert_to_numpy(backbone(inputs))
    predicted = backbone.predict(inputs, verbose=0)
    # Compiled (predict) against eager: XLA fuses and reorders sums, which on
    # AVX-512 machines moves a near-zero element by ~1e-6 absolute, so the
    # bound is relative to the largest value, as for the parity tests.
    assert relative_error(predicted, eager) < SELF_CONSISTENCY["float32"]["rtol"]


@pytest.mark.parametrize("name", ["griffin", "attention_first"])
def test_left_padding_matches_unpadded_row(name):
    config = TINY_CONFIGS[name]
    backbone = RecurrentGemmaBackbone(**config)
    ids = make_inputs(config, batch=1, length=11)["token_ids"]
    alone = logits_of(backbone, {"token_ids": ids, "padding_mask": np.ones_like(ids)})
    pad = 4
    padded_ids = np.concatenate([np.full((1, pad), 5, "int32"), ids], axis=1)
    mask = np.concatenate([np.zeros((1, pad), "int32"), np.ones_like(ids)], axis=1)
    padded = logits_of(backbone, {"token_ids": padded_ids, "padding_mask": mask})
    np.testing.assert_allclose(padded[:, pad:], alone, **TOL)


def test_packed_row_matches_documents_run_separately():
    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**config)
    ids = make_inputs(config, batch=1, length=17)["token_ids"]
    split = 7
    segment_pos = np.concatenate([np.arange(split), np.arange(17 - split)])[None]
    packed = logits_of(
        backbone,
        {
            "token_ids": ids,
            "padding_mask": np.ones_like(ids),
            "segment_pos": segment_pos.astype("int32"),
        },
    )
    for lo, hi in ((0, split), (split, 17)):
        doc = ids[:, lo:hi]
        alone = logits_of(
            backbone, {"token_ids": doc, "padding_mask": np.ones_like(doc)}
        )
        np.testing.assert_allclose(packed[:, lo:hi], alone, **TOL)


def test_one_fit_step_lowers_the_loss():
    config = TINY_CONFIGS["griffin"]
    backbone = RecurrentGemmaBackbone(**config)
    hidden = backbone.output
    logits = backbone.token_embedding(hidden, reverse=True)
    model = keras.Model(backbone.input, logits)
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    inputs = make_inputs(config, batch=4, length=12, seed=1)
    inputs["segment_pos"] = np.tile(
        np.concatenate([np.arange(5), np.arange(7)]), (4, 1)
    ).astype("int32")
    labels = np.roll(inputs["token_ids"], -1, axis=1)
    before = model.evaluate(inputs, labels, verbose=0)
    model.fit(inputs, labels, batch_size=4, epochs=1, verbose=0)
    after = model.evaluate(inputs, labels, verbose=0)
    assert after < before


@pytest.mark.parametrize("bad_id", [97, 1000, -1])
def test_out_of_range_token_id_is_a_clear_error(bad_id):
    config = TINY_CONFIGS["hawk"]
    backbone = RecurrentGemmaBackbone(**config)
    inputs = make_inputs(config)
    inputs["token_ids"][1, 3] = bad_id
    with pytest.raises(Exception, match=r"token_ids.*vocabulary_size=97"):
        backbone(inputs)
    with pytest.raises(Exception, match=r"token_ids.*vocabulary_size=97"):
        backbone.predict(inputs, verbose=0)


def test_mismatched_padding_mask_is_a_clear_error():
    config = TINY_CONFIGS["hawk"]
    backbone = RecurrentGemmaBackbone(**config)
    inputs = make_inputs(config)
    inputs["padding_mask"] = inputs["padding_mask"][:, :-1]
    with pytest.raises(ValueError, match="padding_mask.*shape"):
        backbone(inputs)


def test_mismatched_segment_pos_is_a_clear_error():
    config = TINY_CONFIGS["hawk"]
    backbone = RecurrentGemmaBackbone(**config)
    inputs = make_inputs(config)
    inputs["segment_pos"] = np.zeros((2, 5), "int32")
    with pytest.raises(ValueError, match="segment_pos.*shape"):
        backbone(inputs)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"block_types": ["recurrent", "mamba"]}, "block_types"),
        ({"block_types": []}, "block_types"),
        ({"num_heads": 5}, "divisible by num_heads=5"),
        ({"lru_width": 50}, "lru_width"),
    ],
)
def test_bad_config_is_a_clear_error(change, message):
    with pytest.raises(ValueError, match=message):
        RecurrentGemmaBackbone(**{**TINY_CONFIGS["griffin"], **change})
