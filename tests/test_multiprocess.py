"""`keras.distribution` across two JAX processes on this machine.

Two worker processes (tests/multiprocess_worker.py) join one JAX cluster on
127.0.0.1 through `keras.distribution.initialize`, with 2 CPU devices each,
and run the same two-step LoRA `fit` under `DataParallel` over the 4
devices and under `ModelParallel` with `get_layout_map`, on a (batch 2,
model 2) mesh whose batch axis spans the processes and on a (1, 4) mesh
whose model axis does. A third process runs the same `fit` on one device.
The loss and every weight must agree, and each process must have fed its
own share of the global batch.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest

from tests.scripts import ROOT
from tests.scripts import jax_cpu_env
from tests.tolerances import MULTIPROCESS
from tests.tolerances import relative_error

pytestmark = pytest.mark.skipif(
    keras.config.backend() != "jax",
    reason="multi-process keras.distribution runs on JAX only "
    "(jax.distributed; Keras' TensorFlow distribution_lib is a prototype and "
    "torch has none).",
)

TOL = MULTIPROCESS["float32"]["relative"]
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
TIMEOUT_S = 300
NAMES = ("data_parallel", "model_parallel", "tensor_parallel")


def _free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(process):
    """Kills a still-running launched process and its process group."""
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait(timeout=30)


def _tail(log, n=4000):
    return log.read_text(errors="replace")[-n:] if log.exists() else ""


def _run_all(out_dir):
    """Starts the reference and the workers; waits for all, or kills all.

    A worker whose peer died would wait in a collective until JAX's own
    timeout, so the first failure stops the others at once.
    """
    port = _free_port()
    jobs = {"reference": ["reference", str(out_dir)]}
    for i in range(NUM_PROCESSES):
        jobs[f"worker_{i}"] = ["worker", str(out_dir), str(port), str(i)]
        jobs[f"worker_{i}"].append(str(NUM_PROCESSES))
    processes, logs = {}, {}
    try:
        for name, args in jobs.items():
            logs[name] = out_dir / f"{name}.log"
            with open(logs[name], "wb") as log:
                processes[name] = subprocess.Popen(
                    [sys.executable, "-m", "tests.multiprocess_worker", *args],
                    env=jax_cpu_env(DEVICES_PER_PROCESS),
                    cwd=ROOT,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        deadline = time.monotonic() + TIMEOUT_S
        while time.monotonic() < deadline:
            codes = {name: p.poll() for name, p in processes.items()}
            failed = [name for name, code in codes.items() if code not in (None, 0)]
            if failed:
                name = failed[0]
                pytest.fail(f"{name} exited with {codes[name]}:\n{_tail(logs[name])}")
            if all(code == 0 for code in codes.values()):
                return
            time.sleep(0.2)
        pytest.fail(
            f"not done after {TIMEOUT_S} s; worker_0's log:\n" + _tail(logs["worker_0"])
        )
    finally:
        for process in processes.values():
            _stop(process)


def _load(out_dir, name):
    report = json.loads((out_dir / f"{name}.json").read_text())
    with np.load(out_dir / f"{name}.npz") as arrays:
        return report, dict(arrays)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("multiprocess")
    _run_all(out_dir)
    results = {"reference": _load(out_dir, "reference")}
    for name in NAMES:
        for i in range(NUM_PROCESSES):
            results[name, i] = _load(out_dir, f"{name}_p{i}")
    return results


def _weights(arrays, prefix="weight:"):
    return {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}


def test_workers_form_one_cluster(runs):
    for name in NAMES:
        for i in range(NUM_PROCESSES):
            report, _ = runs[name, i]
            assert report["process_index"] == i
            assert report["num_processes"] == NUM_PROCESSES
            assert report["num_local_devices"] == DEVICES_PER_PROCESS
            assert report["num_devices"] == NUM_PROCESSES * DEVICES_PER_PROCESS
            # Every mesh holds the devices of both processes.
            assert sorted(report["mesh_processes"]) == [0, 0, 1, 1], name


def test_each_process_feeds_its_share_of_the_global_batch(runs):
    from tests.multiprocess_worker import GLOBAL_BATCH
    from tests.multiprocess_worker import global_data

    first_batch = global_data()[0]["token_ids"][:GLOBAL_BATCH]
    half = GLOBAL_BATCH // NUM_PROCESSES
    for i in range(NUM_PROCESSES):
        # One model replica per process: the batch is split between them.
        for name in ("data_parallel", "model_parallel"):
            local = np.asarray(runs[name, i][0]["local_token_ids"])
            np.testing.assert_array_equal(
                local, first_batch[i * half : (i + 1) * half], err_msg=name
            )
        # One replica over both processes: each feeds the whole batch.
        local = np.asarray(runs["tensor_parallel", i][0]["local_token_ids"])
        np.testing.assert_array_equal(local, first_batch)


@pytest.mark.parametrize("name", NAMES)
def test_loss_matches_one_process(runs, name):
    reference = float(runs["reference"][1]["loss"])
    for i in range(NUM_PROCESSES):
        loss = float(runs[name, i][1]["loss"])
        assert abs(loss - reference) <= TOL * abs(reference), (i, loss, reference)


@pytest.mark.parametrize("name", NAMES)
def test_updated_weights_match_one_process(runs, name):
    reference_report, reference_arrays = runs["reference"]
    reference = _weights(reference_arrays)
    initial = _weights(reference_arrays, "initial:")
    trainable = set(reference_report["trainable"])
    # Only the LoRA factors train, and the two steps move every one of them.
    assert trainable and all("lora_kernel" in path for path in trainable)
    for path in trainable:
        assert not np.array_equal(reference[path], initial[path]), path
    for i in range(NUM_PROCESSES):
        report, arrays = runs[name, i]
        assert set(report["trainable"]) == trainable
        weights = _weights(arrays)
        assert sorted(weights) == sorted(reference)
        for path, value in weights.items():
            if path in trainable:
                assert relative_error(value, reference[path]) < TOL, (i, path)
            else:
                np.testing.assert_array_equal(value, initial[path], err_msg=path)


def test_layout_map_splits_weights_between_processes(runs):
    for i in range(NUM_PROCESSES):
        # DataParallel keeps a whole copy in every process.
        fractions = runs["data_parallel", i][0]["local_fraction"]
        assert set(fractions.values()) == {1.0}
        for name in ("model_parallel", "tensor_parallel"):
            fractions = runs[name, i][0]["local_fraction"]
            # The vocabulary-split embedding: half of it in each process.
            assert fractions["token_embedding/embeddings"] == 0.5, name
            assert fractions["residual_block_0/mlp_block/ffw_down/kernel"] == 0.5
            # Weights the map leaves out, LoRA factors included, are whole.
            for path, fraction in fractions.items():
                if "lora_kernel" in path or "proj_k" in path:
                    assert fraction == 1.0, (name, path)
