"""The backbone as a Keras layer: a head on `keras.Input`s, trained and saved.

The KerasHub way to put a classifier on a backbone (issue 20): call it on
symbolic `token_ids` and `padding_mask`, with or without `segment_pos`.
"""

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from tests.conftest import TINY_CONFIGS
from tests.tolerances import SELF_CONSISTENCY

CONFIG = TINY_CONFIGS["griffin"]
X = {
    "token_ids": np.array([[2, 17, 42, 7], [2, 5, 8, 0]], "int32"),
    "padding_mask": np.array([[1, 1, 1, 1], [1, 1, 1, 0]], "int32"),
}
SEGMENT_POS = np.array([[0, 1, 0, 1], [0, 1, 2, 0]], "int32")
Y = np.array([0, 2])


def classifier(backbone, with_segment_pos):
    """Mean-pooled hidden states into a 3-way softmax."""
    inputs = {
        "token_ids": keras.Input(shape=(None,), dtype="int32", name="token_ids"),
        "padding_mask": keras.Input(shape=(None,), dtype="int32", name="padding_mask"),
    }
    if with_segment_pos:
        inputs["segment_pos"] = keras.Input(
            shape=(None,), dtype="int32", name="segment_pos"
        )
    hidden = backbone(inputs)
    assert tuple(hidden.shape) == (None, None, CONFIG["hidden_dim"])
    pooled = keras.layers.GlobalAveragePooling1D()(hidden)
    outputs = keras.layers.Dense(3, activation="softmax", name="head")(pooled)
    return keras.Model(inputs, outputs)


def data(with_segment_pos):
    return {**X, "segment_pos": SEGMENT_POS} if with_segment_pos else dict(X)


@pytest.mark.parametrize("with_segment_pos", [False, True], ids=["plain", "packed"])
def test_head_on_the_backbone_trains_and_round_trips(tmp_path, with_segment_pos):
    backbone = RecurrentGemmaBackbone(**CONFIG)
    model = classifier(backbone, with_segment_pos)
    x = data(with_segment_pos)
    # The functional model computes what the backbone and head compute.
    pooled = keras.ops.mean(backbone(x), axis=1)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(x)),
        keras.ops.convert_to_numpy(model.get_layer("head")(pooled)),
        **SELF_CONSISTENCY["float32"],
    )

    model.compile(
        optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy"
    )
    head_before = keras.ops.convert_to_numpy(model.get_layer("head").kernel)
    embedding_before = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)
    history = model.fit(x, Y, batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    # Both the head and the backbone moved.
    head_after = keras.ops.convert_to_numpy(model.get_layer("head").kernel)
    assert not np.array_equal(head_after, head_before)
    assert not np.array_equal(
        keras.ops.convert_to_numpy(backbone.token_embedding.embeddings),
        embedding_before,
    )

    path = tmp_path / "classifier.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert isinstance(loaded.get_layer(backbone.name), RecurrentGemmaBackbone)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(loaded(x)),
        keras.ops.convert_to_numpy(model(x)),
        **SELF_CONSISTENCY["float32"],
    )


def test_output_spec_without_segment_pos():
    backbone = RecurrentGemmaBackbone(**CONFIG)
    for inputs in (
        {k: keras.KerasTensor((2, 7), dtype="int32") for k in X},
        {k: keras.KerasTensor((None, None), dtype="int32") for k in X},
    ):
        spec = backbone.compute_output_spec(inputs)
        shape = (*inputs["token_ids"].shape, CONFIG["hidden_dim"])
        assert tuple(spec.shape) == shape
        assert spec.dtype == "float32"
