"""Shared fixtures: tiny model configs and seeded inputs.

Run one pytest process per backend: `KERAS_BACKEND=jax|tensorflow|torch`.
"""

import os

# XLA compiles at LLVM's optimization level 0 in the tests (JAX; TensorFlow's
# few XLA compiles too), and in the processes they start, which inherit it.
# The tiny models' compiles, not their runs, are most of the JAX suite's
# time, and level 0 halves them. Only the machine code changes: the
# optimized HLO (fusion, buffers, what is hoisted out of a loop: what our
# memory tests check) of a bfloat16 backbone's forward pass, its gradient
# and a scan over `matmul_transposed` was the same text at level 0 and at
# the default level. Benchmarks and users get XLA's default. A level
# already in `XLA_FLAGS` wins.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(
        [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]
    ).strip()

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

# Tiny configs covering the block patterns the issue names; lru_width differs
# from hidden_dim in two, and every window is short so tests run past it.
TINY_CONFIGS = {
    "griffin": dict(
        vocabulary_size=97,
        hidden_dim=32,
        intermediate_dim=48,
        num_heads=4,
        block_types=["recurrent", "recurrent", "attention"],
        lru_width=48,
        attention_window_size=5,
    ),
    "hawk": dict(
        vocabulary_size=97,
        hidden_dim=32,
        intermediate_dim=64,
        num_heads=2,
        block_types=["recurrent", "recurrent"],
        attention_window_size=5,
    ),
    "attention_only": dict(
        vocabulary_size=97,
        hidden_dim=32,
        intermediate_dim=48,
        num_heads=4,
        block_types=["attention", "attention"],
        attention_window_size=3,
    ),
    "attention_first": dict(
        vocabulary_size=97,
        hidden_dim=24,
        intermediate_dim=40,
        num_heads=2,
        block_types=["attention", "recurrent", "recurrent", "attention"],
        lru_width=32,
        attention_window_size=4,
    ),
}


def pytest_addoption(parser):
    parser.addoption(
        "--run_large", action="store_true", help="Also run tests marked large."
    )


def pytest_configure(config):
    config.addinivalue_line("markers", "large: slow test, skipped by default")
    config.addinivalue_line("markers", "program: runs the package as a program")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--run_large"):
        return
    skip = pytest.mark.skip(reason="large test; pass --run_large")
    for item in items:
        if "large" in item.keywords:
            item.add_marker(skip)


def pytest_report_header(config):
    requested = os.environ.get("KERAS_BACKEND")
    return f"keras backend: {keras.config.backend()} (KERAS_BACKEND={requested})"


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)
    np.random.seed(0)
