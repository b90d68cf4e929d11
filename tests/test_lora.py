"""LoRA: default targets, only factors train, save/load, and bad input."""

import keras
import numpy as np
import pytest
from keras_hub.models import Backbone

from keras_recurrentgemma import lora
from keras_recurrentgemma.layers.dense import Dense
from tests.backend_grad import value_and_grad
from tests.models import tiny_causal_lm
from tests.tolerances import LORA_MERGED

TEXT = ["The quick brown fox jumps over the lazy dog."] * 4
INPUTS = {
    "token_ids": np.array([[2, 270, 316, 262, 281, 1]], "int32"),
    "padding_mask": np.ones((1, 6), "int32"),
}


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def lora_layers(backbone):
    return [layer for _, layer in lora.enabled_layers(backbone)]


def set_factors(backbone, seed):
    """Non-zero factors (B starts at zero, which would hide a load bug)."""
    rng = np.random.default_rng(seed)
    for layer in lora_layers(backbone):
        for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
            factor.assign(rng.normal(scale=0.1, size=factor.shape).astype("float32"))


@pytest.fixture(scope="module")
def tuned():
    """A tiny Griffin with default LoRA, its frozen weights before `fit`, and
    the loss history of a short `fit` on raw strings."""
    lm = tiny_causal_lm("griffin", sequence_length=16)
    lm.backbone.enable_lora(4)
    frozen = {v.path: to_numpy(v).copy() for v in lm.non_trainable_weights}
    lm.compile(optimizer=keras.optimizers.Adam(1e-2), sampler="greedy")
    history = lm.fit(TEXT, batch_size=2, epochs=3, verbose=0)
    return lm, frozen, history.history["loss"]


def test_default_targets_are_query_value_and_recurrent_inputs(tuned):
    lm, _, _ = tuned
    names = sorted({layer.name for layer in lora_layers(lm.backbone)})
    assert names == ["linear_x", "linear_y", "proj_q", "proj_v"]
    # Every recurrent and attention block got its pair: 2 + 2 + 1 blocks' worth.
    assert len(lora_layers(lm.backbone)) == 2 * 2 + 2


def test_only_lora_factors_train(tuned):
    lm, _, _ = tuned
    lora_params = sum(
        4 * (layer._kernel.shape[0] + layer._kernel.shape[1])
        for layer in lora_layers(lm.backbone)
    )
    trainable = lm.trainable_weights
    assert {v.path.rsplit("/", 1)[-1] for v in trainable} == {
        "lora_kernel_a",
        "lora_kernel_b",
    }
    assert sum(int(np.prod(v.shape)) for v in trainable) == lora_params
    assert lm.backbone.count_params() > 10 * lora_params


def test_fit_lowers_loss_and_leaves_frozen_weights_bit_identical(tuned):
    lm, frozen, losses = tuned
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]
    after = {v.path: to_numpy(v) for v in lm.non_trainable_weights}
    assert sorted(after) == sorted(frozen)
    for path, value in frozen.items():
        np.testing.assert_array_equal(after[path], value, err_msg=path)


def test_a_lora_layer_applies_its_factors_unmerged(monkeypatch):
    # Keras's float call builds W + s·A B (a full [out, in] tensor, which the
    # backward pass keeps) by reading `kernel`; ours must not read it, and
    # must give the merged form's outputs and factor gradients.
    rng = np.random.default_rng(0)
    layer = Dense(6, dtype="float32")
    layer.build((None, None, 5))
    layer.enable_lora(2)
    for variable in layer.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32"))
    w, bias, a, b = (
        to_numpy(v).astype("float64")
        for v in (layer._kernel, layer.bias, layer.lora_kernel_a, layer.lora_kernel_b)
    )
    s = layer.lora_alpha / layer.lora_rank
    x = rng.normal(size=(1, 3, 5)).astype("float32")
    g = rng.normal(size=(1, 3, 6)).astype("float32")

    def refuse(self):
        raise AssertionError("the call built the merged kernel")

    monkeypatch.setattr(Dense, "kernel", property(refuse))
    np.testing.assert_allclose(
        to_numpy(layer(x)), x @ (w + s * a @ b).T + bias, **LORA_MERGED["float32"]
    )

    def weighted_sum(factor_a, factor_b):
        values = {id(layer.lora_kernel_a): factor_a, id(layer.lora_kernel_b): factor_b}
        trainable = [values.get(id(v), v.value) for v in layer.trainable_variables]
        frozen = [v.value for v in layer.non_trainable_variables]
        y, _ = layer.stateless_call(trainable, frozen, x)
        return keras.ops.sum(keras.ops.multiply(y, g))

    _, (grad_a, grad_b) = value_and_grad(
        weighted_sum, a.astype("float32"), b.astype("float32")
    )
    # y = s · x Bᵀ Aᵀ over rows x [n, in], upstream g [n, out].
    rows, up = x[0], g[0]
    np.testing.assert_allclose(
        grad_a, s * up.T @ (rows @ b.T), **LORA_MERGED["float32"]
    )
    np.testing.assert_allclose(grad_b, s * a.T @ up.T @ rows, **LORA_MERGED["float32"])


def test_a_16_bit_lora_layer_keeps_its_dtype():
    # Float32 factors under a bfloat16 kernel: the low-rank term is cast to
    # the layer's compute dtype, as Keras's merged kernel is.
    layer = Dense(4, dtype="bfloat16")
    layer.build((None, None, 3))
    layer.enable_lora(2)
    layer.lora_kernel_b.assign(np.ones(layer.lora_kernel_b.shape, "float32"))
    out = layer(np.ones((1, 2, 3), "float32"))
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"


def test_save_and_load_lora_weights_round_trip(tuned, tmp_path):
    lm, _, _ = tuned
    path = tmp_path / "tuned.lora.h5"
    lm.backbone.save_lora_weights(path)
    fresh = tiny_causal_lm("griffin", sequence_length=16)
    fresh.backbone.load_lora_weights(path)
    assert lm.backbone._lora_rank == fresh.backbone._lora_rank == 4
    for a, b in zip(lora_layers(lm.backbone), lora_layers(fresh.backbone), strict=True):
        assert a.path == b.path
        np.testing.assert_array_equal(
            to_numpy(a.lora_kernel_a), to_numpy(b.lora_kernel_a)
        )
        np.testing.assert_array_equal(
            to_numpy(a.lora_kernel_b), to_numpy(b.lora_kernel_b)
        )
    np.testing.assert_array_equal(to_numpy(lm(INPUTS)), to_numpy(fresh(INPUTS)))
    # The reloaded model trains the same factors.
    assert {v.path for v in fresh.trainable_weights} == {
        v.path for v in lm.trainable_weights
    }


def test_custom_targets_round_trip_without_naming_them_again(tmp_path):
    lm = tiny_causal_lm("griffin")
    lm.backbone.enable_lora(2, target_layer_names=["ffw_up", "proj_k"])
    set_factors(lm.backbone, seed=1)
    path = tmp_path / "custom.lora.h5"
    lm.backbone.save_lora_weights(path)
    fresh = tiny_causal_lm("griffin")
    fresh.backbone.load_lora_weights(path)  # the file records its targets
    assert sorted({x.name for x in lora_layers(fresh.backbone)}) == ["ffw_up", "proj_k"]
    np.testing.assert_array_equal(to_numpy(lm(INPUTS)), to_numpy(fresh(INPUTS)))


def test_files_load_in_keras_hub_and_back(tmp_path):
    # Same layout as KerasHub's `Backbone.save_lora_weights`, so a file moves
    # between the two libraries in both directions.
    lm = tiny_causal_lm("griffin")
    lm.backbone.enable_lora(3)
    set_factors(lm.backbone, seed=2)
    ours = tmp_path / "ours.lora.h5"
    lm.backbone.save_lora_weights(ours)
    theirs_reader = tiny_causal_lm("griffin")
    Backbone.load_lora_weights(theirs_reader.backbone, str(ours))
    np.testing.assert_array_equal(to_numpy(lm(INPUTS)), to_numpy(theirs_reader(INPUTS)))

    theirs = tmp_path / "theirs.lora.h5"
    Backbone.save_lora_weights(lm.backbone, str(theirs))
    ours_reader = tiny_causal_lm("griffin")
    ours_reader.backbone.load_lora_weights(theirs)
    np.testing.assert_array_equal(to_numpy(lm(INPUTS)), to_numpy(ours_reader(INPUTS)))


def test_save_replaces_the_file_only_when_complete(tmp_path, monkeypatch):
    lm = tiny_causal_lm("griffin")
    lm.backbone.enable_lora(2)
    path = tmp_path / "kept.lora.h5"
    lm.backbone.save_lora_weights(path)
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise KeyboardInterrupt("interrupted mid-save")

    monkeypatch.setattr(lora.h5py, "File", fail)
    with pytest.raises(KeyboardInterrupt):
        lm.backbone.save_lora_weights(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept.lora.h5"]


# --- Bad input --------------------------------------------------------------


@pytest.mark.parametrize("rank", [0, -1, 2.5, True, "4", None])
def test_rank_must_be_a_positive_int(rank):
    lm = tiny_causal_lm("hawk")
    with pytest.raises(ValueError, match="rank.*positive int"):
        lm.backbone.enable_lora(rank)
    assert not lora.enabled_layers(lm.backbone)
    assert len(lm.backbone.trainable_weights) == len(lm.backbone.weights)


def test_unknown_target_names_list_the_valid_ones():
    lm = tiny_causal_lm("griffin")
    with pytest.raises(ValueError, match=r"\['nope'\].*Valid.*'linear_x'.*'proj_q'"):
        lm.backbone.enable_lora(2, target_layer_names=["proj_q", "nope"])
    with pytest.raises(ValueError, match="empty"):
        lm.backbone.enable_lora(2, target_layer_names=[])
    assert not lora.enabled_layers(lm.backbone)


def test_enabling_twice_is_an_error():
    lm = tiny_causal_lm("hawk")
    lm.backbone.enable_lora(2)
    with pytest.raises(ValueError, match="already enabled.*rank 2"):
        lm.backbone.enable_lora(4)


def test_save_needs_lora_and_the_suffix(tmp_path):
    lm = tiny_causal_lm("hawk")
    with pytest.raises(ValueError, match="enable_lora"):
        lm.backbone.save_lora_weights(tmp_path / "x.lora.h5")
    lm.backbone.enable_lora(2)
    with pytest.raises(ValueError, match=r"\.lora\.h5"):
        lm.backbone.save_lora_weights(tmp_path / "x.h5")


@pytest.fixture(scope="module")
def griffin_rank2_file(tmp_path_factory):
    lm = tiny_causal_lm("griffin")
    lm.backbone.enable_lora(2)
    path = tmp_path_factory.mktemp("lora") / "griffin.lora.h5"
    lm.backbone.save_lora_weights(path)
    return path


def test_load_with_another_rank(griffin_rank2_file):
    lm = tiny_causal_lm("griffin")
    lm.backbone.enable_lora(4)
    with pytest.raises(ValueError, match=r"griffin\.lora\.h5 has rank 2.*rank 4"):
        lm.backbone.load_lora_weights(griffin_rank2_file)


@pytest.mark.parametrize(
    "config, message",
    [
        ("hawk", "proj_q.*does not have"),  # no attention blocks
        ("attention_first", "different architecture"),  # blocks elsewhere
    ],
)
def test_load_into_another_architecture(griffin_rank2_file, config, message):
    lm = tiny_causal_lm(config)
    with pytest.raises(ValueError, match=r"griffin\.lora\.h5.*" + message):
        lm.backbone.load_lora_weights(griffin_rank2_file)
    # A failed load leaves the model as it was: no LoRA, nothing frozen.
    assert not lora.enabled_layers(lm.backbone)
    assert len(lm.backbone.trainable_weights) == len(lm.backbone.weights)


def test_load_into_a_model_of_another_size(griffin_rank2_file):
    lm = tiny_causal_lm("griffin", lru_width=64)
    with pytest.raises(ValueError, match=r"linear_x.*shapes.*another size"):
        lm.backbone.load_lora_weights(griffin_rank2_file)
    assert not lora.enabled_layers(lm.backbone)


def test_load_of_files_that_are_not_lora_weights(tmp_path):
    lm = tiny_causal_lm("hawk")
    with pytest.raises(ValueError, match="missing.lora.h5 does not exist"):
        lm.backbone.load_lora_weights(tmp_path / "missing.lora.h5")
    text = tmp_path / "text.lora.h5"
    text.write_text("not hdf5")
    with pytest.raises(ValueError, match="text.lora.h5 is not a readable HDF5"):
        lm.backbone.load_lora_weights(text)
    weights = tmp_path / "model.weights.h5"
    lm.save_weights(weights)
    with pytest.raises(ValueError, match="model.weights.h5 holds no LoRA weights"):
        lm.backbone.load_lora_weights(weights)
    assert not lora.enabled_layers(lm.backbone)
