"""Loading under `ModelParallel`: each weight goes straight into its shards.

`from_preset` inside a distribution's scope builds every variable with the
layout `get_layout_map` names, then assigns the checkpoint one tensor at a
time; JAX splits each tensor over the devices as it is assigned, so no
device holds more than its shard and the host holds one tensor. Checked in
a fresh JAX process with 8 virtual CPU devices, against an unsharded load.
"""

import json
from pathlib import Path

import keras
import numpy as np
import pytest

from tests.test_distribution import AXES
from tests.test_distribution import MESH_SHAPE
from tests.test_distribution import SHARDABLE
from tests.test_distribution import expected_spec
from tests.test_distribution import run_with_8_devices


def _run(out_dir):
    """Runs in a fresh JAX process with 8 CPU devices; writes what it saw."""
    from keras_recurrentgemma import RecurrentGemmaBackbone
    from keras_recurrentgemma.distribution import get_layout_map
    from tests.test_hf_parity import make_hf_model

    checkpoint = Path(out_dir) / "hf"
    make_hf_model(SHARDABLE, SHARDABLE["block_types"]).save_pretrained(checkpoint)
    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, AXES, devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh), batch_dim_name="batch"
    )
    reference = RecurrentGemmaBackbone.from_preset(str(checkpoint))
    with distribution.scope():
        sharded = RecurrentGemmaBackbone.from_preset(str(checkpoint))
    report, arrays = {"num_devices": len(devices), "variables": {}}, {}
    for i, (a, b) in enumerate(zip(reference.weights, sharded.weights, strict=True)):
        value = b.value
        spec = tuple(value.sharding.spec)
        report["variables"][b.path] = {
            "spec": list(spec + (None,) * (len(b.shape) - len(spec))),
            "shape": list(b.shape),
            "shard_shapes": sorted(
                {tuple(s.data.shape) for s in value.addressable_shards}
            ),
            "index": i,
        }
        arrays[f"reference_{i}"] = keras.ops.convert_to_numpy(a)
        arrays[f"sharded_{i}"] = keras.ops.convert_to_numpy(b)
    np.savez(Path(out_dir) / "arrays.npz", **arrays)
    (Path(out_dir) / "report.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def sharded_load(tmp_path_factory):
    if keras.config.backend() != "jax":
        pytest.skip(
            "keras.distribution.ModelParallel shards variables on JAX only "
            "(Keras' TensorFlow distribution_lib is a prototype; torch has none)."
        )
    out_dir = tmp_path_factory.mktemp("sharded_load")
    run_with_8_devices("tests.test_sharded_load", "_run", out_dir)
    report = json.loads((out_dir / "report.json").read_text())
    with np.load(out_dir / "arrays.npz") as arrays:
        return report, dict(arrays)


def test_loaded_weights_are_sharded_as_the_layout_says(sharded_load):
    report, _ = sharded_load
    assert report["num_devices"] == 8
    sizes = dict(zip(AXES, MESH_SHAPE, strict=True))
    split = 0
    for path, variable in report["variables"].items():
        spec = expected_spec(path, len(variable["shape"]))
        assert tuple(variable["spec"]) == spec, path
        # Each device holds its shard only: the variable's shape divided
        # along every named axis.
        shard = tuple(
            n // sizes[axis] if axis else n
            for n, axis in zip(variable["shape"], spec, strict=True)
        )
        assert variable["shard_shapes"] == [list(shard)], path
        split += any(spec)
    assert split >= 10  # the large matrices, not just a few vectors


def test_sharded_load_equals_unsharded_load(sharded_load):
    report, arrays = sharded_load
    for path, variable in report["variables"].items():
        i = variable["index"]
        np.testing.assert_array_equal(
            arrays[f"sharded_{i}"], arrays[f"reference_{i}"], err_msg=path
        )
