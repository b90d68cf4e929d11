"""An interrupted LoRA fit, resumed, ends where the uninterrupted one does.

Three ways back (issue 20): `BackupAndRestore`, a `ModelCheckpoint` weights
file + `load_weights`, and a `save_lora_weights` file loaded into a fresh
model. Every run starts from the same frozen weights and LoRA factors, has
shuffling off, and is compared bit for bit with the run that was not
interrupted: the same operations on the same values in the same order.
"""

import h5py
import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import lora
from tests.models import tiny_causal_lm
from tests.tolerances import LORA_MERGED

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello there, general.",
    "A longer line of text for the second batch.",
    "Short one",
]
EPOCHS = 3
BATCH_SIZE = 2  # two steps per epoch


class Interrupted(Exception):
    pass


class Interrupt(keras.callbacks.Callback):
    """Raises after `epochs` whole epochs, or inside epoch `epochs` after
    step `batch` (as a preempted session would)."""

    def __init__(self, epochs, batch=None):
        super().__init__()
        self.epochs, self.batch, self.epoch = epochs, batch, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.batch is not None and (self.epoch, batch) == (self.epochs, self.batch):
            raise Interrupted(f"epoch {self.epoch} step {batch}")

    def on_epoch_end(self, epoch, logs=None):
        if self.batch is None and epoch + 1 == self.epochs:
            raise Interrupted(f"after epoch {epoch + 1}")


def set_factors(lm, seed):
    """Factors drawn from `seed`; B non-zero too, so a load that zeroes it
    cannot pass."""
    rng = np.random.default_rng(seed)
    for _, layer in lora.enabled_layers(lm.backbone):
        for factor in (layer.lora_kernel_a, layer.lora_kernel_b):
            factor.assign(rng.normal(scale=0.1, size=factor.shape).astype("float32"))


def new_optimizer(kind):
    if kind == "adam":
        return keras.optimizers.Adam(1e-2)
    return keras.optimizers.SGD(0.5)


class Runner:
    """The tiny Griffin with rank-2 LoRA, compiled once.

    Each model's first `fit` compiles the train step (tens of seconds on a
    busy CPU), so most runs reuse one: `reset` puts back the starting
    weights and optimizer state, as a new process would build them.
    """

    def __init__(self, optimizer="adam"):
        self.lm = tiny_causal_lm("griffin", sequence_length=16)
        self.lm.backbone.enable_lora(2)
        self.lm.compile(optimizer=new_optimizer(optimizer), sampler="greedy")
        self.lm.optimizer.build(self.lm.trainable_variables)
        self.start = [keras.ops.convert_to_numpy(v) for v in self.lm.weights]
        self.slots = [
            keras.ops.convert_to_numpy(v) for v in self.lm.optimizer.variables
        ]

    def reset(self, factor_seed=0):
        for v, value in zip(self.lm.weights, self.start, strict=True):
            v.assign(value)
        for v, value in zip(self.lm.optimizer.variables, self.slots, strict=True):
            v.assign(value)
        set_factors(self.lm, factor_seed)
        # `BackupAndRestore` leaves the restored epoch in Keras's private
        # `_initial_epoch`, which every later `fit` of the model obeys over
        # its `initial_epoch` argument; a new process starts without it.
        self.lm._initial_epoch = None
        return self.lm


def fit(lm, epochs=EPOCHS, **kwargs):
    history = lm.fit(
        TEXT, batch_size=BATCH_SIZE, epochs=epochs, shuffle=False, verbose=0, **kwargs
    )
    return history.history["loss"]


def state(lm):
    return {v.path: keras.ops.convert_to_numpy(v).copy() for v in lm.backbone.weights}


def assert_same_state(actual, expected):
    assert sorted(actual) == sorted(expected)
    for path, value in expected.items():
        np.testing.assert_array_equal(actual[path], value, err_msg=path)


@pytest.fixture(scope="module")
def runners():
    """Two compiled models (one interrupted, one resuming) and the
    `(final backbone weights, per-epoch losses)` of the run never stopped."""
    first, second = Runner(), Runner()
    losses = fit(first.reset())
    return first, second, (state(first.lm), losses)


@pytest.mark.parametrize(
    "epochs, batch",
    [(1, None), (2, None), (1, 0)],
    ids=["after-epoch-1", "after-epoch-2", "inside-epoch-2"],
)
def test_backup_and_restore_resumes_exactly(runners, tmp_path, epochs, batch):
    first, second, (expected, expected_losses) = runners
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(Interrupted):
        fit(first.reset(), callbacks=[backup, Interrupt(epochs, batch)])

    # As a new process: the same model and LoRA, other starting factors.
    resumed = second.reset(factor_seed=7)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    losses = fit(resumed, callbacks=[backup])
    assert len(losses) == EPOCHS - epochs  # restarted at the backed-up epoch
    assert_same_state(state(resumed), expected)
    assert losses[-1] == expected_losses[-1]


def test_backup_and_restore_into_a_new_model_object(runners, tmp_path):
    first, _, (expected, expected_losses) = runners
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    with pytest.raises(Interrupted):
        fit(first.reset(), callbacks=[backup, Interrupt(2)])
    resumed = Runner().reset(factor_seed=7)
    backup = keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))
    losses = fit(resumed, callbacks=[backup])
    assert_same_state(state(resumed), expected)
    assert losses == expected_losses[2:]


@pytest.mark.parametrize("epochs", [1, 2])
def test_model_checkpoint_weights_continue_exactly(runners, tmp_path, epochs):
    first, second, (expected, expected_losses) = runners
    path = str(tmp_path / "ckpt.weights.h5")
    checkpoint = keras.callbacks.ModelCheckpoint(path, save_weights_only=True)
    fit(first.reset(), epochs=epochs, callbacks=[checkpoint])

    resumed = second.reset(factor_seed=7)
    resumed.load_weights(path)
    losses = fit(resumed, initial_epoch=epochs)
    assert_same_state(state(resumed), expected)
    assert losses[-1] == expected_losses[-1]


def test_save_lora_weights_continues_exactly(tmp_path):
    # A LoRA file holds the factors only, so plain SGD (no optimizer state)
    # is what it can resume exactly.
    sgd = Runner(optimizer="sgd")
    expected_losses = fit(sgd.reset())
    expected = state(sgd.lm)
    fresh = tiny_causal_lm("griffin", sequence_length=16)
    fresh_start = state(fresh)
    for epochs in (1, 2):
        fit(sgd.reset(), epochs=epochs)
        path = tmp_path / f"after_{epochs}.lora.h5"
        sgd.lm.backbone.save_lora_weights(path)
        for v in fresh.backbone.weights:  # the weights before LoRA was on
            if v.path in fresh_start:
                v.assign(fresh_start[v.path])
        fresh.backbone.load_lora_weights(path)
        fresh.compile(optimizer=new_optimizer("sgd"), sampler="greedy")
        losses = fit(fresh, initial_epoch=epochs)
        assert_same_state(state(fresh), expected)
        assert losses[-1] == expected_losses[-1]


def test_weights_file_keeps_factors_and_a_merged_kernel(runners, tmp_path):
    lm = runners[0].reset()
    path = tmp_path / "lora.weights.h5"
    lm.save_weights(path)
    x = {"token_ids": np.array([[2, 9, 4, 7]]), "padding_mask": np.ones((1, 4))}

    # Into a model without LoRA: the merged kernels, the same outputs.
    plain = tiny_causal_lm("griffin", sequence_length=16, seed=3)
    plain.load_weights(path)
    assert not lora.enabled_layers(plain.backbone)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(plain(x)),
        keras.ops.convert_to_numpy(lm(x)),
        **LORA_MERGED["float32"],  # `lm` applies its factors unmerged
    )
    # Keras's entry "0" is the merged kernel; the extra entries are apart.
    layer = lora.enabled_layers(lm.backbone)[0][1]
    with h5py.File(path, "r") as f:
        entries = [g for g in _groups(f) if g.endswith(layer.path.split("/")[-1])]
        group = f[entries[0]]["vars"]
        assert sorted(group) == [
            "0",
            "1",
            "kernel_layout_oi",  # `layers.kernel_layout`
            "lora_kernel_a",
            "lora_kernel_b",
            "unmerged_kernel",
        ]
        np.testing.assert_array_equal(
            group["0"][()], keras.ops.convert_to_numpy(layer.kernel)
        )


def _groups(f):
    names = []
    f.visit(lambda name: names.append(name) if name.endswith("/vars") else None)
    return [name[: -len("/vars")] for name in names]


def test_whole_model_saves_merge(runners, tmp_path):
    lm = runners[0].reset()
    x = {"token_ids": np.array([[2, 9, 4, 7]]), "padding_mask": np.ones((1, 4))}
    hidden = keras.ops.convert_to_numpy(lm.backbone(x))

    preset = tmp_path / "preset"
    lm.backbone.save_to_preset(str(preset))
    with h5py.File(preset / "model.weights.h5", "r") as f:
        names = []
        f.visit(names.append)
    assert not [n for n in names if "lora" in n or "unmerged" in n]
    from_preset = RecurrentGemmaBackbone.from_preset(str(preset))

    lm.backbone.save(tmp_path / "backbone.keras")
    from_keras = keras.saving.load_model(tmp_path / "backbone.keras")
    for loaded in (from_preset, from_keras):
        assert not lora.enabled_layers(loaded)
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(loaded(x)), hidden, **LORA_MERGED["float32"]
        )
