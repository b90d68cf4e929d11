"""tools/gpu_check.py on a machine without an accelerator: its refusal and its plan.

What it runs on a GPU or TPU is the kernel tests and the benchmarks; here
only the plan is checked (`--dry-run`), so this stays fast on every backend.
"""

import json
import os

import pytest

from tools import gpu_check

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def dry_run(monkeypatch, capsys, found, *flags):
    monkeypatch.setattr(gpu_check, "accelerators", lambda: found)
    assert gpu_check.main(["--dry-run", *flags]) == 0
    return json.loads(capsys.readouterr().out)


def test_without_an_accelerator_it_says_so_and_fails(monkeypatch, capsys, tmp_path):
    monkeypatch.setattr(gpu_check, "accelerators", lambda: {})
    out = tmp_path / "report.json"
    assert gpu_check.main(["--out", str(out)]) == 2
    assert "no GPU or TPU here" in capsys.readouterr().err
    assert not out.exists()


def test_allow_cpu_plans_the_interpreted_kernels(monkeypatch, capsys):
    report = dry_run(monkeypatch, capsys, {}, "--allow-cpu", "--quick")
    assert report["interpreted"] is True
    steps = {(s["backend"], s["name"]): s for s in report["steps"]}
    names = ("tests", "auto", "benchmark_scan", "benchmark_generate")
    assert sorted(steps) == sorted((b, n) for b in ("jax", "torch") for n in names)
    assert steps["jax", "benchmark_scan"]["env"]["KERAS_RECURRENTGEMMA_INTERPRET"]
    assert steps["torch", "benchmark_scan"]["env"]["TRITON_INTERPRET"] == "1"
    # Every file a step names is there to run.
    for step in report["steps"]:
        for word in step["command"]:
            if word.endswith(".py"):
                assert os.path.exists(os.path.join(ROOT, word)), word
    kernel_tests = steps["jax", "tests"]["command"]
    assert "tests/test_rg_lru_pallas.py" in kernel_tests
    assert "tests/test_kernel_fallback.py" in kernel_tests


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_an_accelerator_gets_its_backend_on_the_device(monkeypatch, capsys, backend):
    report = dry_run(monkeypatch, capsys, {backend: "gpu (test)"})
    assert report["interpreted"] is False
    assert {s["backend"] for s in report["steps"]} == {backend}
    for step in report["steps"]:
        assert step["env"] == {"KERAS_BACKEND": backend}
    [generate] = [s for s in report["steps"] if s["name"] == "benchmark_generate"]
    assert generate["command"][-2:] == ["--config", "2b"]
