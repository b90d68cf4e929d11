"""The project's code outside this test process: its scripts (tools/,
examples/) loaded as modules, and fresh JAX processes' environments."""

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_script(path, name):
    """The module of the Python file `path`, imported under `name`; tools/
    and examples/ are not packages."""
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def jax_cpu_env(devices):
    """The environment of a fresh JAX process on `devices` CPU devices that
    imports this checkout.

    XLA reads the device count when JAX starts, hence a fresh process. The
    optimization level conftest.py puts in `XLA_FLAGS` comes along, so the
    process compiles as this one does.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    flags = f"{flags} --xla_force_host_platform_device_count={devices}"
    return {
        **os.environ,
        "KERAS_BACKEND": "jax",
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": flags.strip(),
        "PYTHONPATH": os.pathsep.join(
            [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
