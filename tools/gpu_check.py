"""The first thing to run with a GPU or TPU: the kernels there, and their speed.

    python tools/gpu_check.py                      # writes gpu_check.json
    python tools/gpu_check.py --quick --out r.json # small benchmarks
    python tools/gpu_check.py --dry-run            # the plan, nothing run
    python tools/gpu_check.py --allow-cpu --quick  # no accelerator: interpreted

It finds the accelerators JAX and torch see (a JAX GPU or TPU runs the
Pallas kernels, torch CUDA the Triton ones) and, for each backend that has
one, runs in a subprocess of its own (`KERAS_BACKEND` set):

- `tests`: the kernel tests on the device, not interpreted (the test
  modules use the device when there is one): tests/test_rg_lru_*.py,
  tests/test_scan_*.py, tests/test_kernel_fallback.py, tests/test_fast_paths.py;
- `auto`: `ops.rg_lru(..., implementation="auto")` once, and the verdict of
  the check "auto" runs before it trusts a kernel on a device
  (`ops.kernel_check`): true means the kernel ran and matched the reference;
- `benchmark_scan`: tools/benchmark_scan.py --check (the scan and the whole
  unit, every implementation, against the peers);
- `benchmark_generate`: tools/benchmark_generate.py (greedy generation).

and writes one JSON report (`--out`): the machine, and per step its command,
exit status, seconds, and its JSON output (the benchmarks') or the tail of
what it printed. It exits 0 when every step passed, 1 otherwise. On a
machine with no accelerator it says so and exits 2, unless `--allow-cpu`,
which runs the same steps with the interpreters (Pallas's,
`KERAS_RECURRENTGEMMA_INTERPRET=1`; Triton's, `TRITON_INTERPRET=1`) on the
backends that have a kernel: slow, so use it with `--quick`.
"""

import argparse
import json
import os
import platform
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = {
    "jax": ["tests/test_rg_lru_pallas.py", "tests/test_scan_pallas.py"],
    "torch": ["tests/test_rg_lru_triton.py", "tests/test_scan_triton.py"],
}
COMMON_TESTS = ["tests/test_kernel_fallback.py", "tests/test_fast_paths.py"]
# Prints the verdict of `ops.kernel_check` after one "auto" call, as JSON.
AUTO_SNIPPET = """
import json, numpy as np
from keras import ops
from keras_recurrentgemma.ops import kernel_check, resolve_implementation, rg_lru
rng = np.random.default_rng(0)
b, t, l = 2, 64, 256
x, gx, ga = (ops.convert_to_tensor(rng.normal(size=(b, t, l))) for _ in "123")
x, gx, ga = (ops.cast(v, "float32") for v in (x, gx, ga))
a_param = ops.cast(rng.normal(size=(l,)), "float32")
pos = ops.convert_to_tensor(np.tile(np.arange(t, dtype="int32"), (b, 1)))
name = resolve_implementation("auto", x)
y, _ = rg_lru(x, gx, ga, a_param, pos)
print(json.dumps({"auto": name, "verdicts": [
    {"kernel": k[0], "device": k[1], "dtype": k[2], "passed": v}
    for k, v in kernel_check._verdicts.items()]}))
"""


def accelerators():
    """`{backend: device in words}` for JAX's GPU/TPU and torch's CUDA."""
    found = {}
    try:
        import jax

        if jax.default_backend() in ("gpu", "tpu"):
            device = jax.devices()[0]
            found["jax"] = f"{device.platform} ({device.device_kind})"
    except Exception as error:  # A broken install is reported, not fatal.
        print(f"gpu_check: JAX sees no accelerator ({error})", file=sys.stderr)
    try:
        import torch

        if torch.cuda.is_available():
            found["torch"] = f"cuda ({torch.cuda.get_device_name(0)})"
    except Exception as error:
        print(f"gpu_check: torch sees no CUDA ({error})", file=sys.stderr)
    return found


def plan(backends, quick, interpreted):
    """The steps: `[{name, backend, command, env}]`."""
    python = sys.executable
    steps = []
    for backend in backends:
        # The test modules choose device or interpreter themselves.
        tests_env = {"KERAS_BACKEND": backend}
        env = dict(tests_env)
        if interpreted:
            env.update(
                {"KERAS_RECURRENTGEMMA_INTERPRET": "1"}
                if backend == "jax"
                else {"TRITON_INTERPRET": "1"}
            )
        tests = TESTS[backend] + COMMON_TESTS
        pytest = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0"]
        if quick:
            pytest += ["-x"]
        steps.append(_step("tests", backend, pytest + tests, tests_env))
        steps.append(_step("auto", backend, [python, "-c", AUTO_SNIPPET], env))
        scan = [python, "tools/benchmark_scan.py", "--check"]
        if quick:
            scan += ["--batch", "2", "--length", "256", "--width", "256"]
            scan += ["--iters", "3", "--warmup", "1", "--copy-mib", "16"]
        steps.append(_step("benchmark_scan", backend, scan, env))
        generate = [python, "tools/benchmark_generate.py"]
        if quick or interpreted:
            generate += ["--config", "cpu7m", "--batch-sizes", "1", "--new-tokens"]
            generate += ["16", "--short-new-tokens", "4", "--repeats", "1"]
            generate += ["--skip", "prefill", "memory", "--no-oracles"]
        else:
            generate += ["--config", "2b"]
        steps.append(_step("benchmark_generate", backend, generate, env))
    return steps


def _step(name, backend, command, env):
    return {"name": name, "backend": backend, "command": command, "env": env}


def run_step(step, timeout):
    """Runs one step; returns it with `returncode`, `seconds`, and output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", **step["env"])
    start = time.perf_counter()
    try:
        done = subprocess.run(
            step["command"],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        returncode, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as expired:
        returncode = "timeout"
        out = (expired.stdout or b"").decode(errors="replace")
        err = (expired.stderr or b"").decode(errors="replace")
    result = dict(step, returncode=returncode)
    result["seconds"] = round(time.perf_counter() - start, 1)
    result["json"] = _last_json(out)
    if result["json"] is None or returncode != 0:
        result["output_tail"] = (out + err)[-4000:]
    return result


def _last_json(text):
    """The last line of `text` that is a JSON object, or None."""
    for line in reversed(text.strip().splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="gpu_check.json", help="the JSON report")
    parser.add_argument(
        "--allow-cpu",
        action="store_true",
        help="without an accelerator, run the interpreted kernels instead",
    )
    parser.add_argument("--quick", action="store_true", help="small benchmarks")
    parser.add_argument(
        "--dry-run", action="store_true", help="print the plan as JSON, run nothing"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800, help="seconds per step (default 1800)"
    )
    args = parser.parse_args(argv)

    found = accelerators()
    interpreted = not found
    if interpreted and not args.allow_cpu:
        print(
            "gpu_check: no GPU or TPU here (JAX runs on CPU and torch sees no "
            "CUDA), so there is nothing to check on a device. Run it on a "
            "machine with one, or pass --allow-cpu to run the interpreted "
            "kernels instead.",
            file=sys.stderr,
        )
        return 2
    backends = sorted(found) if found else ["jax", "torch"]
    steps = plan(backends, args.quick, interpreted)
    report = {
        "machine": {"host": platform.node(), "python": platform.python_version()},
        "accelerators": found,
        "interpreted": interpreted,
    }
    if args.dry_run:
        print(json.dumps(dict(report, steps=steps), indent=1))
        return 0
    results = []
    for step in steps:
        print(f"gpu_check: {step['backend']} {step['name']} ...", file=sys.stderr)
        results.append(run_step(step, args.timeout))
        print(
            f"gpu_check: {step['backend']} {step['name']}: exit "
            f"{results[-1]['returncode']} in {results[-1]['seconds']} s",
            file=sys.stderr,
        )
    report["steps"] = results
    report["ok"] = all(r["returncode"] == 0 for r in results)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"ok": report["ok"], "report": os.path.abspath(args.out)}))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
