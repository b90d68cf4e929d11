"""`get_layout_map`: the layouts it names, its argument checks, and a
`ModelParallel` model on 8 virtual CPU devices against a single-device one."""

import json
import re
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma.distribution import get_layout_map
from tests.conftest import TINY_CONFIGS
from tests.scripts import ROOT
from tests.scripts import jax_cpu_env
from tests.tolerances import PARITY
from tests.tolerances import relative_error

# Sharded matmuls add their partial sums in another order, so results differ
# by float32 round-off relative to each tensor's scale: `relative_error`
# against the float32 logits bound the project uses everywhere.
TOL = PARITY["float32"]["relative"]

# Griffin's tiny widths already divide a (batch 2, model 4) mesh; only the
# vocabulary (97) does not, and JAX refuses uneven shards. One block of each
# kind keeps the sharded process's compiles short.
SHARDABLE = {
    **TINY_CONFIGS["griffin"],
    "vocabulary_size": 128,
    "block_types": ["recurrent", "attention"],
}
MESH_SHAPE = (2, 4)
AXES = ("batch", "model")

# The docstring's table restated by hand, so that the test checks the map
# against the documented layout rather than against itself. Kernels are
# `[out, in]`: split by output columns, the model axis comes first. Keys are paths
# with `residual_block_<i>/` removed; unlisted weights are replicated.
EXPECTED_LAYOUT = {
    "token_embedding/embeddings": ("model", "batch"),
    "attention_block/proj_q/kernel": ("model", "batch"),
    "attention_block/proj_final/kernel": ("batch", "model"),
    "recurrent_block/linear_x/kernel": ("model", "batch"),
    "recurrent_block/linear_y/kernel": ("model", "batch"),
    "recurrent_block/linear_x/bias": ("model",),
    "recurrent_block/linear_y/bias": ("model",),
    "recurrent_block/conv_1d/w": (None, "model"),
    "recurrent_block/conv_1d/b": ("model",),
    "recurrent_block/rg_lru/a_param": ("model",),
    "recurrent_block/linear_out/kernel": ("batch", "model"),
    "mlp_block/ffw_gate/kernel": ("model", "batch"),
    "mlp_block/ffw_up/kernel": ("model", "batch"),
    "mlp_block/ffw_gate/bias": ("model",),
    "mlp_block/ffw_up/bias": ("model",),
    "mlp_block/ffw_down/kernel": ("batch", "model"),
}
KEY_VALUE = re.compile(r"attention_block/proj_(k|v)/kernel$")


def expected_spec(path, rank):
    key = re.sub(r"^residual_block_\d+/", "", path)
    return EXPECTED_LAYOUT.get(key, (None,) * rank)


def fake_mesh(shape=MESH_SHAPE, axis_names=AXES):
    # Device names are only read when a backend mesh is built, which
    # `get_layout_map` never does, so this runs on every backend.
    devices = [f"cpu:{i}" for i in range(int(np.prod(shape)))]
    return keras.distribution.DeviceMesh(shape, axis_names, devices)


def layout_spec(layout_map, variable):
    layout = layout_map[variable.path]
    return (None,) * len(variable.shape) if layout is None else tuple(layout.axes)


# --- The map itself (any backend) -------------------------------------------


def test_layout_map_follows_the_documented_table():
    layout_map = RecurrentGemmaBackbone.get_layout_map(fake_mesh())
    backbone = RecurrentGemmaBackbone(**SHARDABLE)
    for v in backbone.weights:
        # A path matching two keys raises here (LayoutMap's own check).
        spec = layout_spec(layout_map, v)
        assert len(spec) == len(v.shape), v.path
        assert spec == expected_spec(v.path, len(v.shape)), v.path
    key_value = [v for v in backbone.weights if KEY_VALUE.search(v.path)]
    assert key_value
    for v in key_value:
        assert layout_spec(layout_map, v) == (None, None), v.path


def test_every_large_matrix_is_sharded_over_the_model_axis():
    layout_map = get_layout_map(fake_mesh())
    backbone = RecurrentGemmaBackbone(**SHARDABLE)
    for v in backbone.weights:
        if len(v.shape) == 2 and min(v.shape) > 8 and not KEY_VALUE.search(v.path):
            assert "model" in layout_spec(layout_map, v), v.path


def test_no_data_axis_keeps_weights_whole_across_replicas():
    mesh = fake_mesh(shape=(4,), axis_names=("model",))
    layout_map = get_layout_map(mesh, data_parallel_dim_name=None)
    backbone = RecurrentGemmaBackbone(**SHARDABLE)
    for v in backbone.weights:
        want = tuple(
            None if a == "batch" else a for a in expected_spec(v.path, len(v.shape))
        )
        assert layout_spec(layout_map, v) == want, v.path


def test_layout_map_reaches_paths_under_a_name_scope():
    layout_map = get_layout_map(fake_mesh())
    path = "outer/residual_block_3/mlp_block/ffw_down/kernel"
    assert tuple(layout_map[path].axes) == ("batch", "model")


@pytest.mark.parametrize(
    "axis_names, kwargs, message",
    [
        (("batch",), {}, r"model_parallel_dim_name='model'.*\['batch'\]"),
        (
            ("batch", "model"),
            {"data_parallel_dim_name": "data"},
            r"data_parallel_dim_name='data'.*\['batch', 'model'\]",
        ),
        (
            ("batch", "model"),
            {"model_parallel_dim_name": "tensor"},
            r"model_parallel_dim_name='tensor'.*\['batch', 'model'\]",
        ),
        (
            ("batch", "model"),
            {"data_parallel_dim_name": "model"},
            "different mesh axes",
        ),
    ],
)
def test_bad_axis_names_raise(axis_names, kwargs, message):
    mesh = fake_mesh(shape=(1,) * len(axis_names), axis_names=axis_names)
    with pytest.raises(ValueError, match=message):
        RecurrentGemmaBackbone.get_layout_map(mesh, **kwargs)


def test_not_a_mesh_raises():
    with pytest.raises(TypeError, match="DeviceMesh"):
        get_layout_map(("batch", "model"))


# --- Sharded against unsharded (JAX, 8 virtual devices) ---------------------


def _batch():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, SHARDABLE["vocabulary_size"], (4, 9)).astype("int32")
    mask = np.ones((4, 8), "int32")
    mask[1, 6:] = 0  # right padding
    mask[2, :3] = 0  # left padding
    x = {"token_ids": ids[:, :-1], "padding_mask": mask}
    return x, ids[:, 1:], mask.astype("float32")


def _causal_lm():
    backbone = RecurrentGemmaBackbone(**SHARDABLE)
    return RecurrentGemmaCausalLM(backbone, preprocessor=None)


def _step(model, x, y, sample_weight):
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.1, momentum=0.9),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        weighted_metrics=[],
    )
    loss = model.train_on_batch(x, y, sample_weight=sample_weight)
    return float(np.asarray(loss).reshape(-1)[0])


def _spec_of(variable):
    spec = tuple(variable.value.sharding.spec)
    return list(spec + (None,) * (len(variable.shape) - len(spec)))


def _run_sharded(out_dir):
    """Runs in a fresh JAX process with 8 CPU devices; writes what it saw."""
    from tests.models import randomize

    devices = keras.distribution.list_devices("cpu")
    mesh = keras.distribution.DeviceMesh(MESH_SHAPE, AXES, devices)
    distribution = keras.distribution.ModelParallel(
        layout_map=get_layout_map(mesh), batch_dim_name="batch"
    )
    x, y, sample_weight = _batch()

    reference = _causal_lm()
    randomize(reference, seed=0, scale=0.3)
    with distribution.scope():
        sharded = _causal_lm()
        for v, w in zip(sharded.weights, reference.weights, strict=True):
            v.assign(keras.ops.convert_to_numpy(w))
    arrays = {
        f"initial_{i}": keras.ops.convert_to_numpy(w)
        for i, w in enumerate(reference.weights)
    }
    arrays["logits_reference"] = reference.predict_on_batch(x)
    loss_reference = _step(reference, x, y, sample_weight)
    with distribution.scope():
        arrays["logits_sharded"] = sharded.predict_on_batch(x)
        loss_sharded = _step(sharded, x, y, sample_weight)

    report = {
        "num_devices": len(devices),
        "losses": [loss_reference, loss_sharded],
        "paths": [v.path for v in sharded.weights],
        "reference_paths": [v.path for v in reference.weights],
        "specs": {v.path: _spec_of(v) for v in sharded.weights},
        "optimizer_specs": [
            [v.path, _spec_of(v), _spec_of(ref)]
            for v, ref in zip(
                sharded.optimizer.momentums,
                sharded.trainable_variables,
                strict=True,
            )
        ],
    }
    for i, (a, b) in enumerate(zip(reference.weights, sharded.weights, strict=True)):
        arrays[f"reference_{i}"] = keras.ops.convert_to_numpy(a)
        arrays[f"sharded_{i}"] = keras.ops.convert_to_numpy(b)
    np.savez(Path(out_dir) / "arrays.npz", **arrays)
    (Path(out_dir) / "report.json").write_text(json.dumps(report))


def run_with_8_devices(module, function, out_dir):
    """Runs `module.function(out_dir)` in a fresh JAX process on 8 CPU devices.

    The device count is read when jax starts, hence the fresh process
    (`jax_cpu_env`).
    """
    code = f"import sys; from {module} import {function}; {function}(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, str(out_dir)],
        env=jax_cpu_env(8),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]


@pytest.fixture(scope="module")
def sharded_run(tmp_path_factory):
    if keras.config.backend() != "jax":
        pytest.skip(
            "keras.distribution.ModelParallel shards variables on JAX only "
            "(Keras' TensorFlow distribution_lib is a prototype; torch has none)."
        )
    out_dir = tmp_path_factory.mktemp("sharded")
    run_with_8_devices("tests.test_distribution", "_run_sharded", out_dir)
    report = json.loads((out_dir / "report.json").read_text())
    with np.load(out_dir / "arrays.npz") as arrays:
        return report, dict(arrays)


def test_sharded_forward_matches_single_device(sharded_run):
    report, arrays = sharded_run
    assert report["num_devices"] == 8
    error = relative_error(arrays["logits_sharded"], arrays["logits_reference"])
    assert error < TOL


def test_sharded_training_step_matches_single_device(sharded_run):
    report, arrays = sharded_run
    assert report["paths"] == report["reference_paths"]
    loss_reference, loss_sharded = report["losses"]
    assert abs(loss_sharded - loss_reference) < TOL * abs(loss_reference)
    for i, path in enumerate(report["paths"]):
        reference = arrays[f"reference_{i}"]
        # The step must move every weight, or matching would prove nothing.
        assert not np.array_equal(reference, arrays[f"initial_{i}"]), path
        assert relative_error(arrays[f"sharded_{i}"], reference) < TOL, path


def test_variables_are_sharded_as_the_layout_map_says(sharded_run):
    report, _ = sharded_run
    specs = report["specs"]
    for path, spec in specs.items():
        assert tuple(spec) == expected_spec(path, len(spec)), path
    key_value = [p for p in specs if KEY_VALUE.search(p)]
    assert key_value
    for path in key_value:
        assert specs[path] == [None, None], path
    # Optimizer slots take their variable's layout.
    for path, spec, variable_spec in report["optimizer_specs"]:
        assert spec == variable_spec, path
