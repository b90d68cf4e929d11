"""One process of the multi-process `keras.distribution` test.

    python -m tests.multiprocess_worker reference OUT_DIR
    python -m tests.multiprocess_worker worker OUT_DIR PORT PROCESS_ID NUM_PROCESSES

`reference` runs the LoRA `fit` on one device, without a distribution.
`worker` joins a JAX cluster on 127.0.0.1:PORT through
`keras.distribution.initialize`, then runs the same `fit` under each entry of
`DISTRIBUTIONS`, on a mesh over every process's devices. Each run writes
`<name>.npz` (the updated weights, gathered from all processes, and the
loss) and `<name>.json` (what the process saw) into OUT_DIR; a worker's
files end in `_p<PROCESS_ID>`. The launcher (tests/test_multiprocess.py)
sets `KERAS_BACKEND=jax`, `JAX_PLATFORMS=cpu` and the number of CPU
devices per process in `XLA_FLAGS`, which JAX reads when it starts.
"""

import json
import sys
from pathlib import Path

import keras
import numpy as np

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.distribution import get_layout_map
from tests.conftest import TINY_CONFIGS

# Griffin's tiny widths divide a 4-device mesh; the vocabulary (97) does not.
CONFIG = {
    **TINY_CONFIGS["griffin"],
    "vocabulary_size": 128,
    "block_types": ["recurrent", "attention"],
}
LORA_RANK = 4
GLOBAL_BATCH = 8
STEPS = 2
SEQUENCE_LENGTH = 8

# name -> (mesh shape, axis names); `None` is `DataParallel` over every device.
# "model_parallel" splits the batch (and, by the layout map, the large
# matrices' other dimension) across the processes and the model axis within
# each; "tensor_parallel" splits the model axis across processes, so every
# process holds a quarter of each large matrix and feeds the whole batch.
DISTRIBUTIONS = {
    "data_parallel": None,
    "model_parallel": ((2, 2), ("batch", "model")),
    "tensor_parallel": ((1, 4), ("batch", "model")),
}


def global_data():
    """`STEPS` global batches of `(x, y, sample_weight)` with padding."""
    rng = np.random.default_rng(1)
    n = GLOBAL_BATCH * STEPS
    ids = rng.integers(0, CONFIG["vocabulary_size"], (n, SEQUENCE_LENGTH + 1))
    ids = ids.astype("int32")
    mask = np.ones((n, SEQUENCE_LENGTH), "int32")
    mask[1::4, 5:] = 0  # right padding
    mask[2::4, :3] = 0  # left padding
    x = {"token_ids": ids[:, :-1], "padding_mask": mask}
    return x, ids[:, 1:], mask.astype("float32")


def global_dataset():
    import tensorflow as tf

    return tf.data.Dataset.from_tensor_slices(global_data()).batch(GLOBAL_BATCH)


def initial_weights(model):
    """The same values in every process, drawn with numpy by path."""
    rng = np.random.default_rng(0)
    return {
        v.path: rng.normal(scale=0.3, size=v.shape).astype("float32")
        for v in sorted(model.weights, key=lambda v: v.path)
    }


def lora_causal_lm():
    backbone = RecurrentGemmaBackbone(**CONFIG)
    backbone.enable_lora(LORA_RANK)
    model = RecurrentGemmaCausalLM(backbone, preprocessor=None)
    values = initial_weights(model)
    for v in model.weights:
        v.assign(values[v.path])
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    return model


def to_numpy(variables):
    """`{path: value}`, gathered when other processes hold parts of a value.

    One `process_allgather` for all of them: it compiles once per call.
    """
    from jax.experimental import multihost_utils

    values = [v.value for v in variables]
    if not all(value.is_fully_addressable for value in values):
        values = multihost_utils.process_allgather(values, tiled=True)
    paths = [v.path for v in variables]
    return {p: np.asarray(value) for p, value in zip(paths, values, strict=True)}


def local_fraction(value):
    held = np.zeros(value.shape, bool)
    for shard in value.addressable_shards:
        held[shard.index] = True
    return float(held.mean())


def fit(model, dataset):
    history = model.fit(
        dataset, epochs=1, steps_per_epoch=STEPS, shuffle=False, verbose=0
    )
    return history.history["loss"][0]


def write(out_dir, name, model, loss, report, initial=None):
    arrays = {f"weight:{p}": a for p, a in to_numpy(model.weights).items()}
    for path, value in (initial or {}).items():
        arrays[f"initial:{path}"] = value
    arrays["loss"] = np.asarray(loss, "float64")
    np.savez(Path(out_dir) / f"{name}.npz", **arrays)
    report["trainable"] = [v.path for v in model.trainable_weights]
    (Path(out_dir) / f"{name}.json").write_text(json.dumps(report))


def run_reference(out_dir):
    keras.utils.set_random_seed(0)
    model = lora_causal_lm()
    initial = to_numpy(model.weights)
    loss = fit(model, global_dataset())
    write(out_dir, "reference", model, loss, {"num_processes": 1}, initial)


def make_distribution(name):
    devices = keras.distribution.list_devices("cpu")
    if DISTRIBUTIONS[name] is None:
        return keras.distribution.DataParallel(devices=devices)
    shape, axes = DISTRIBUTIONS[name]
    mesh = keras.distribution.DeviceMesh(shape, axes, devices)
    return keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh), batch_dim_name="batch"
    )


def run_worker(out_dir, port, process_id, num_processes):
    import jax

    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{port}",
        num_processes=num_processes,
        process_id=process_id,
    )
    keras.utils.set_random_seed(0)
    by_id = {d.id: d for d in jax.devices()}
    for name in DISTRIBUTIONS:
        distribution = make_distribution(name)
        # `fit` gets the global dataset, as a user passes it, and shards it
        # with the distribution's own `distribute_dataset` before KerasHub's
        # preprocessing (training.py); `local_x` is the share that gives.
        local_x = next(iter(distribution.distribute_dataset(global_dataset())))[0]
        with distribution.scope():
            model = lora_causal_lm()
            loss = fit(model, global_dataset())
        assert distribution.auto_shard_dataset, "fit left sharding off"
        mesh = distribution.device_mesh
        report = {
            "num_processes": jax.process_count(),
            "process_index": jax.process_index(),
            "num_devices": jax.device_count(),
            "num_local_devices": jax.local_device_count(),
            # The process owning each mesh device, in mesh order.
            "mesh_processes": [
                by_id[int(n.split(":")[1])].process_index for n in mesh.devices.flat
            ],
            "mesh_shape": list(mesh.shape),
            "local_token_ids": local_x["token_ids"].numpy().tolist(),
            # Share of each weight's elements held in this process.
            "local_fraction": {v.path: local_fraction(v.value) for v in model.weights},
        }
        write(out_dir, f"{name}_p{process_id}", model, loss, report)


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "reference":
        run_reference(out)
    else:
        run_worker(out, *(int(a) for a in sys.argv[3:6]))
