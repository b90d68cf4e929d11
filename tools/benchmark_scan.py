"""Speed of the RG-LRU scan, h_t = a_t * h_{t-1} + x_t, against its peers.

    KERAS_BACKEND=jax python tools/benchmark_scan.py                 # [8, 4096, 2560]
    KERAS_BACKEND=torch python tools/benchmark_scan.py --check
    KERAS_BACKEND=tensorflow python tools/benchmark_scan.py \\
        --batch 2 --length 512 --width 256 --iters 3                # a CPU smoke run

On the backend of `KERAS_BACKEND` and its first device, it draws `a` in
[0.9, 0.999) and `x` scaled by sqrt(1 - a^2) (so the states stay near unit
size, as in the RG-LRU) as `[batch, length, width]` arrays of `--dtype`, and
prints one JSON object with:

- `device`, `backend`, `versions`, `shape`, `dtype`;
- `copy`: the device's copy bandwidth, from an out-of-place pass over a
  large float32 buffer (1 GiB on an accelerator, 64 MiB on a CPU;
  `--copy-mib`), counting bytes read and written;
- `floor`: the time the scan cannot beat at that bandwidth. Forward: read
  `a` and `x`, write `y` (float32). Forward and backward: that, plus the
  backward's read of `a`, the float32 `y` and the cotangent and its write of
  `da` and `dx` (a backward that recomputes the states from `x` instead of
  reading `y` would move less);
- `implementations`: each name of `rg_lru_scan(..., implementation=name)`
  (default: every name in `IMPLEMENTATIONS`; `"pallas"` and `"triton"` are
  the unfused kernels of tools/pallas_scan_unfused.py and
  tools/triton_scan_unfused.py), compiled the backend's natural
  way (`jax.jit`; `tf.function(jit_compile=True)`, then plain `tf.function`
  if XLA refuses it; torch eager). `fwd_ms` is the forward, `fwd_bwd_ms` the
  gradient of `sum(y * cot)` with respect to `a` and `x`, `fwd_gbps` the
  forward's bytes (its own output dtype) over its time. A name that raises is
  reported with its error instead, so the tool keeps working as names are
  added or are meant for another backend;
- `peers`: on JAX the official `recurrentgemma.jax.scan.linear_scan` with
  each scan type (its Pallas type only on a GPU or TPU), on torch
  `accelerated_scan` (CUDA only; it takes `[batch, width, length]`, so its
  inputs are transposed before timing). Ours carry `ratio_to` each peer that
  ran: our time over theirs, below 1 where ours is faster. The peers write
  `y` in the input dtype, ours in float32: less for them to write.

Every time is the median over `--iters` calls, in ms, each call followed by
a device synchronization (`block_until_ready`, `torch.cuda.synchronize`,
TensorFlow's `sync_devices`), after `--warmup` calls; `*_first_call_ms` is
the first of those, compilation included, and `*_min_ms` the fastest timed
call (steadier than the median on a shared CPU, where torch's threads also
wait on each other: `OMP_NUM_THREADS=1` steadies them).

- `rg_lru` (unless `--no-unit`): the whole unit as the layer runs it,
  `ops.rg_lru(x, gate_x, gate_a, a_param, segment_pos)` from the three
  `--dtype` streams, for each implementation name, forward and gradient with
  respect to the three streams, with its own `floor` (the forward reads the
  three streams and writes `y`; the backward reads them, `y` and the
  cotangent and writes their three gradients). Where the scan kernel also
  does the gate arithmetic (`"pallas"`, `"triton"`), this is what fusing it
  saves over the gates in `keras.ops` around the kernel.

`--check` adds each candidate's largest absolute error in `y` (and in `da`,
`dx`, which come in the input dtype, with the backward) against a float64
numpy loop over the same rounded inputs, with `max_abs_reference` for scale.
"""

import argparse
import functools
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
import types

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402

ACCUMULATION = "float32"
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4, "float64": 8}


def _error(exc):
    """An exception as one short line for the JSON."""
    message = str(exc)
    if "in user code:" in message:
        # tf.function puts the traceback first; the error itself comes last.
        lines = message.splitlines()
        starts = [
            i
            for i, line in enumerate(lines)
            if re.match(r"\s*\w+(Error|Exception): ", line)
        ]
        if starts:
            message = "\n".join(lines[starts[-1] :])
    message = " ".join(message.split())
    if len(message) > 400:
        message = message[:400] + " ..."
    if message.startswith(f"{type(exc).__name__}: "):
        return message
    return f"{type(exc).__name__}: {message}"


def _sig(value, digits=3):
    # GB/s spans 1 on a busy CPU to thousands on a GPU; fixed decimals don't.
    return float(f"{value:.{digits}g}")


def _version(name):
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git_state():
    # The figures belong to a state of the code; the device machine may have
    # no git, so this is best effort.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


class _JaxBackend:
    name = "jax"
    compile_modes = ("jax.jit",)

    def __init__(self):
        import jax
        import jax.numpy as jnp

        self.jax, self.jnp = jax, jnp
        self.dev = jax.devices()[0]
        self.platform = self.dev.platform
        self.accelerated = self.platform != "cpu"

    def device(self):
        return {
            "platform": self.platform,
            "name": getattr(self.dev, "device_kind", str(self.dev)),
            "count": len(self.jax.devices()),
        }

    def versions(self):
        return {"jax": _version("jax"), "jaxlib": _version("jaxlib")}

    def tensor(self, array, dtype):
        return self.jax.device_put(self.jnp.asarray(array, dtype=dtype), self.dev)

    def numpy(self, t):
        return np.asarray(t.astype(self.jnp.float32))

    def sync(self, out):
        self.jax.block_until_ready(out)

    def forward(self, fn, mode):
        return self.jax.jit(fn)

    def forward_backward(self, fn, mode):
        jax, jnp = self.jax, self.jnp

        def loss(*args):
            *inputs, cot = args
            return jnp.sum(fn(*inputs).astype(jnp.float32) * cot)

        def grads(*args):
            return jax.grad(loss, argnums=tuple(range(len(args) - 1)))(*args)

        return jax.jit(grads)

    def copy_call(self, nbytes):
        # `s + 1` rather than a plain copy, which XLA may turn into aliasing.
        src = self.jnp.zeros(nbytes // 4, self.jnp.float32)
        fn = self.jax.jit(lambda s: s + 1)
        return lambda: fn(src)

    def release(self):
        pass


class _TensorFlowBackend:
    name = "tensorflow"
    compile_modes = ("tf.function(jit_compile=True)", "tf.function")

    def __init__(self):
        import tensorflow as tf

        self.tf = tf
        gpus = tf.config.list_physical_devices("GPU")
        self.accelerated = bool(gpus)
        self.gpu = gpus[0] if gpus else None
        self.device_name = "/GPU:0" if gpus else "/CPU:0"

    def device(self):
        if self.gpu is None:
            return {"platform": "cpu", "name": platform.processor() or "cpu"}
        details = self.tf.config.experimental.get_device_details(self.gpu)
        return {
            "platform": "gpu",
            "name": details.get("device_name", self.gpu.name),
            "count": len(self.tf.config.list_physical_devices("GPU")),
        }

    def versions(self):
        return {"tensorflow": self.tf.__version__}

    def tensor(self, array, dtype):
        with self.tf.device(self.device_name):
            return self.tf.cast(self.tf.constant(array), dtype)

    def numpy(self, t):
        return self.tf.cast(t, self.tf.float32).numpy()

    def sync(self, out):
        # Eager TensorFlow returns before a GPU has finished; on a CPU it
        # has already finished.
        if self.gpu is not None:
            self.tf.test.experimental.sync_devices()

    def _function(self, fn, mode):
        return self.tf.function(fn, jit_compile=mode.endswith("(jit_compile=True)"))

    def forward(self, fn, mode):
        return self._function(fn, mode)

    def forward_backward(self, fn, mode):
        tf = self.tf

        def grads(*args):
            *inputs, cot = args
            with tf.GradientTape() as tape:
                tape.watch(inputs)
                loss = tf.reduce_sum(tf.cast(fn(*inputs), tf.float32) * cot)
            return tuple(tape.gradient(loss, inputs))

        return self._function(grads, mode)

    def copy_call(self, nbytes):
        with self.tf.device(self.device_name):
            src = self.tf.zeros([nbytes // 4], self.tf.float32)
        fn = self.tf.function(lambda s: s + 1, jit_compile=True)
        return lambda: fn(src)

    def release(self):
        pass


class _TorchBackend:
    name = "torch"
    compile_modes = ("eager",)

    def __init__(self):
        import torch
        from keras import ops

        self.torch, self.ops = torch, ops
        # Keras picks the device; tensors made through it land there.
        self.dev = ops.convert_to_tensor(np.zeros(1, "float32")).device
        self.accelerated = self.dev.type != "cpu"

    def device(self):
        if self.dev.type == "cuda":
            return {
                "platform": "cuda",
                "name": self.torch.cuda.get_device_name(self.dev),
                "count": self.torch.cuda.device_count(),
            }
        return {"platform": self.dev.type, "name": platform.processor() or "cpu"}

    def versions(self):
        return {"torch": self.torch.__version__, "triton": _version("triton")}

    def tensor(self, array, dtype):
        return self.ops.cast(self.ops.convert_to_tensor(array), dtype).contiguous()

    def numpy(self, t):
        return t.detach().float().cpu().numpy()

    def sync(self, out):
        if self.dev.type == "cuda":
            self.torch.cuda.synchronize(self.dev)

    def forward(self, fn, mode):
        torch = self.torch

        def call(*inputs):
            # Without autograd's bookkeeping, as in inference.
            with torch.no_grad():
                return fn(*inputs)

        return call

    def forward_backward(self, fn, mode):
        torch = self.torch

        def grads(*args):
            *inputs, cot = args
            inputs = [t.detach().requires_grad_() for t in inputs]
            loss = (fn(*inputs).float() * cot).sum()
            return torch.autograd.grad(loss, inputs)

        return grads

    def copy_call(self, nbytes):
        src = self.torch.zeros(nbytes // 4, dtype=self.torch.float32, device=self.dev)
        dst = self.torch.empty_like(src)
        return lambda: dst.copy_(src)

    def release(self):
        if self.dev.type == "cuda":
            self.torch.cuda.empty_cache()


def make_backend(name):
    return {
        "jax": _JaxBackend,
        "tensorflow": _TensorFlowBackend,
        "torch": _TorchBackend,
    }[name]()


class Candidate:
    """One scan to time: `fn(a, x) -> y` on `[b, t, l]` arrays.

    `prepare` maps an input to the layout `fn` takes (done once, outside the
    timing), `restore` maps a numpy output of that layout back to `[b, t, l]`.
    """

    def __init__(self, name, fn, prepare=None, restore=None, note=None):
        self.name = name
        self.fn = fn
        self.prepare = prepare or (lambda t: t)
        self.restore = restore or (lambda array: array)
        self.note = note


def time_call(backend, call, warmup, iters):
    """`(first call ms, [timed ms], last output)`, each call synchronized."""
    times = []
    out = None
    for _ in range(max(warmup, 1) + iters):
        out = None  # Frees the previous output before the next call.
        start = time.perf_counter()
        out = call()
        backend.sync(out)
        times.append((time.perf_counter() - start) * 1e3)
    return times[0], times[-iters:], out


def measure_copy(backend, nbytes, iters):
    call = backend.copy_call(nbytes)
    _, times, _ = time_call(backend, call, 2, max(iters, 10))
    median_ms = statistics.median(times)
    moved = 2 * (nbytes // 4) * 4
    return {
        "bytes_read_and_written": moved,
        "median_ms": round(median_ms, 4),
        "bandwidth_gbps": _sig(moved / median_ms / 1e6),
    }


def scan_bytes(n, in_itemsize, out_itemsize):
    """Least traffic of the forward and of forward plus backward."""
    forward = n * (2 * in_itemsize + out_itemsize)
    # Backward: read a, y and the cotangent (y's dtype); write da and dx.
    backward = n * (3 * in_itemsize + 2 * out_itemsize)
    return forward, forward + backward


def reference(a, x, cot, backward):
    """`y`, and `da`, `dx` of `sum(y * cot)`, by a float64 loop over time."""
    a = a.astype(np.float64)
    x = x.astype(np.float64)
    y = np.empty_like(x)
    h = np.zeros_like(x[:, 0])
    for t in range(x.shape[1]):
        h = a[:, t] * h + x[:, t]
        y[:, t] = h
    if not backward:
        return y, None, None
    # dL/dh_t = cot_t + a_{t+1} dL/dh_{t+1}; dx_t = dL/dh_t; da_t = dx_t h_{t-1}.
    cot = cot.astype(np.float64)
    dx = np.empty_like(x)
    g = np.zeros_like(x[:, 0])
    for t in range(x.shape[1] - 1, -1, -1):
        g = cot[:, t] + (a[:, t + 1] * g if t + 1 < x.shape[1] else 0.0)
        dx[:, t] = g
    da = np.zeros_like(x)
    da[:, 1:] = dx[:, 1:] * y[:, :-1]
    return y, da, dx


def _max_abs(actual, expected):
    return float(np.max(np.abs(actual.astype(np.float64) - expected)))


def time_compiled(backend, build, call_args, modes, args):
    """Builds and times a call under the first compile mode that works.

    Returns `(mode, first ms, [timed ms], last output, errors)`, with `mode`
    None when every mode failed; `errors` maps each failed mode to its error.
    """
    errors = {}
    for mode in modes:
        try:
            call = functools.partial(build(mode), *call_args)
            first, times, out = time_call(backend, call, args.warmup, args.iters)
        except Exception as exc:
            errors[mode] = _error(exc)
            continue
        return mode, first, times, out, errors
    return None, None, None, None, errors


def _errors_entry(errors):
    # One message when every compile mode failed alike: naming them adds
    # nothing.
    if len(set(errors.values())) == 1:
        return next(iter(errors.values()))
    return errors


def run_candidate(backend, candidate, inputs, args, floor, expected):
    """Times one candidate; an exception becomes an `error` entry."""
    import keras

    a, x, cot = (candidate.prepare(t) for t in inputs)
    n = int(np.prod(args.shape))
    entry = {}
    if candidate.note:
        entry["note"] = candidate.note

    build = functools.partial(backend.forward, candidate.fn)
    mode, first, times, y, errors = time_compiled(
        backend, build, (a, x), backend.compile_modes, args
    )
    if mode is None:
        entry["error"] = _errors_entry(errors)
        return entry
    if errors:
        entry["compile_errors"] = errors
    out_dtype = keras.backend.standardize_dtype(y.dtype)
    fwd_bytes, _ = scan_bytes(n, ITEMSIZE[args.dtype], ITEMSIZE[out_dtype])
    median = statistics.median(times)
    entry.update(
        {
            "compile": mode,
            "y_dtype": out_dtype,
            "fwd_ms": round(median, 4),
            "fwd_min_ms": round(min(times), 4),
            "fwd_first_call_ms": round(first, 1),
            "fwd_gbps": _sig(fwd_bytes / median / 1e6),
            "fwd_fraction_of_copy_bandwidth": _sig(
                fwd_bytes / median / 1e6 / floor["copy_gbps"]
            ),
        }
    )
    if expected is not None:
        y = candidate.restore(backend.numpy(y))
        entry["check"] = {"y_max_abs_error": _max_abs(y, expected[0])}
    del y
    gc.collect()

    if args.backward:
        # From the forward's mode on: XLA may compile a forward but not its
        # gradient (TensorFlow's associative scan).
        modes = backend.compile_modes[backend.compile_modes.index(mode) :]
        build = functools.partial(backend.forward_backward, candidate.fn)
        bwd_mode, first, times, grads, errors = time_compiled(
            backend, build, (a, x, cot), modes, args
        )
        if bwd_mode is None:
            entry["fwd_bwd_error"] = _errors_entry(errors)
        else:
            if bwd_mode != mode:
                entry["fwd_bwd_compile"] = bwd_mode
                entry["fwd_bwd_compile_errors"] = errors
            entry["fwd_bwd_ms"] = round(statistics.median(times), 4)
            entry["fwd_bwd_min_ms"] = round(min(times), 4)
            entry["fwd_bwd_first_call_ms"] = round(first, 1)
            if expected is not None:
                da, dx = (candidate.restore(backend.numpy(g)) for g in grads)
                entry["check"]["da_max_abs_error"] = _max_abs(da, expected[1])
                entry["check"]["dx_max_abs_error"] = _max_abs(dx, expected[2])
            del grads
    gc.collect()
    backend.release()
    return entry


def unit_bytes(n, in_itemsize):
    """Least traffic of the whole RG-LRU: forward, and forward plus backward."""
    forward = n * (3 * in_itemsize + 4)
    # Backward: read the three streams, y and the cotangent; write 3 grads.
    backward = n * (3 * in_itemsize + 4 + 4 + 3 * in_itemsize)
    return forward, forward + backward


def run_unit(backend, names, args, gbps):
    """Times `ops.rg_lru` from its gate pre-activations for each name."""
    from keras import ops

    from keras_recurrentgemma.layers.rg_lru import RingInitializer
    from keras_recurrentgemma.ops import rg_lru

    b, t, l = args.shape
    rng = np.random.default_rng(args.seed + 1)
    streams = [
        backend.tensor(rng.standard_normal(args.shape, dtype=np.float32), args.dtype)
        for _ in range(3)
    ]
    cot = backend.tensor(rng.standard_normal(args.shape, dtype=np.float32), "float32")
    a_param = backend.tensor(
        ops.convert_to_numpy(RingInitializer(seed=args.seed)((l,))), "float32"
    )
    # One document per row, as in training on unpacked rows.
    segment_pos = backend.tensor(np.tile(np.arange(t), (b, 1)), "int32")
    n = b * t * l
    fwd_bytes, fwd_bwd_bytes = unit_bytes(n, ITEMSIZE[args.dtype])
    result = {
        "floor": {
            "fwd_bytes": fwd_bytes,
            "fwd_ms": _sig(fwd_bytes / gbps / 1e6),
            "fwd_bwd_bytes": fwd_bwd_bytes,
            "fwd_bwd_ms": _sig(fwd_bwd_bytes / gbps / 1e6),
        }
    }
    for name in names:
        print(f"timing rg_lru {name}", file=sys.stderr, flush=True)

        def fn(x, gate_x, gate_a, name=name):
            return rg_lru(x, gate_x, gate_a, a_param, segment_pos, implementation=name)[
                0
            ]

        entry = {}
        for key, build, call_args in (
            ("fwd", backend.forward, streams),
            ("fwd_bwd", backend.forward_backward, streams + [cot]),
        ):
            mode, first, times, out, errors = time_compiled(
                backend,
                functools.partial(build, fn),
                call_args,
                backend.compile_modes,
                args,
            )
            del out
            if mode is None:
                entry[f"{key}_error"] = _errors_entry(errors)
                continue
            entry[f"{key}_compile"] = mode
            entry[f"{key}_ms"] = round(statistics.median(times), 4)
            entry[f"{key}_min_ms"] = round(min(times), 4)
            entry[f"{key}_first_call_ms"] = round(first, 1)
        gc.collect()
        backend.release()
        result[name] = entry
    return result


# The kernels of the bare recurrence live beside this tool (the package's
# kernels compute the whole unit, gates included; see `rg_lru` below).
UNFUSED_KERNELS = ("pallas", "triton")


def _unfused_kernel(name):
    """`(a, x) -> (y, h_last)` of tools/{name}_scan_unfused.py."""
    from keras_recurrentgemma.ops import scan

    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    if name == "pallas":
        from pallas_scan_unfused import rg_lru_scan_pallas

        return functools.partial(rg_lru_scan_pallas, interpret=scan._interpret())
    from triton_scan_unfused import rg_lru_scan_triton

    return rg_lru_scan_triton


def our_candidates(names, x):
    """Ours, by name; `x` is an input, for what `"auto"` resolves to here."""
    from keras_recurrentgemma.ops import scan

    candidates = []
    for name in names:

        def fn(a, x, name=name):
            if name in UNFUSED_KERNELS:
                return _unfused_kernel(name)(a, x)[0]
            return scan.rg_lru_scan(a, x, implementation=name)[0]

        note = None
        if name == "auto" and hasattr(scan, "resolve_implementation"):
            try:
                resolved = scan.resolve_implementation("auto", x)
                note = f"resolves to {resolved!r} here"
            except Exception as exc:
                note = f"resolve_implementation failed: {_error(exc)}"
        candidates.append(Candidate(name, fn, note=note))
    return candidates


def _import_official_scan():
    try:
        from recurrentgemma import common
        from recurrentgemma.jax import scan
    except ImportError as exc:
        if "shard_map" not in str(exc):
            raise
        # Newer JAX may drop `jax.experimental.shard_map`; the scans used
        # here never reach the sharded path that needs it.
        import jax

        shim = types.ModuleType("jax.experimental.shard_map")
        shim.shard_map = jax.shard_map
        sys.modules["jax.experimental.shard_map"] = shim
        from recurrentgemma import common
        from recurrentgemma.jax import scan
    return common, scan


def peer_candidates(backend):
    """`(candidates, notes)`: the outside scans to compare with here."""
    if backend.name == "jax":
        if importlib.util.find_spec("recurrentgemma") is None:
            return [], {"recurrentgemma": "not installed"}
        try:
            common, official = _import_official_scan()
        except Exception as exc:
            return [], {"recurrentgemma": _error(exc)}
        candidates, notes = [], {}
        for scan_type in ("LINEAR_NATIVE", "ASSOCIATIVE_NATIVE", "LINEAR_PALLAS"):
            name = f"recurrentgemma.{scan_type.lower()}"
            if scan_type == "LINEAR_PALLAS" and not backend.accelerated:
                # Its `pallas_call` has no interpret mode, which a CPU needs.
                notes[name] = "skipped: needs a GPU or TPU"
                continue

            def fn(a, x, scan_type=scan_type):
                # Official argument order is (x, a); y comes in x's dtype.
                scan_type = getattr(common.ScanType, scan_type)
                return official.linear_scan(x, a, scan_type=scan_type)[0]

            candidates.append(Candidate(name, fn))
        return candidates, notes

    if backend.name == "torch":
        if importlib.util.find_spec("accelerated_scan") is None:
            return [], {"accelerated_scan": "not installed"}
        if backend.dev.type != "cuda":
            return [], {"accelerated_scan": "skipped: its kernels need CUDA"}
        candidates = []
        for module in ("warp", "triton"):
            name = f"accelerated_scan.{module}"

            def fn(a, x, module=module):
                # Imported on first use: `warp` compiles its CUDA on import,
                # and a failure belongs to this candidate only.
                scan = importlib.import_module(f"accelerated_scan.{module}").scan
                return scan(a, x)

            candidates.append(
                Candidate(
                    name,
                    fn,
                    prepare=lambda t: t.transpose(1, 2).contiguous(),
                    restore=lambda array: np.swapaxes(array, 1, 2),
                    note="inputs transposed to [batch, width, length] before timing",
                )
            )
        return candidates, {}
    return [], {"note": f"no peer scan is measured on {backend.name}"}


def make_inputs(backend, args):
    """`a`, `x` in `--dtype` and a float32 cotangent, as tensors and numpy."""
    rng = np.random.default_rng(args.seed)
    a = rng.uniform(0.9, 0.999, args.shape).astype(np.float32)
    x = rng.standard_normal(args.shape, dtype=np.float32)
    x *= np.sqrt(1.0 - a * a)
    cot = rng.standard_normal(args.shape, dtype=np.float32)
    tensors = (
        backend.tensor(a, args.dtype),
        backend.tensor(x, args.dtype),
        backend.tensor(cot, "float32"),
    )
    del a, x, cot
    # The reference sees what the scans see: the values after rounding.
    arrays = tuple(backend.numpy(t) for t in tensors)
    return tensors, arrays


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--width", type=int, default=2560)
    parser.add_argument(
        "--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"]
    )
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--implementations",
        nargs="+",
        help="names for rg_lru_scan(implementation=...); default: every name "
        "in keras_recurrentgemma.ops.scan.IMPLEMENTATIONS",
    )
    parser.add_argument(
        "--backward",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the gradient with respect to a and x",
    )
    parser.add_argument(
        "--peers",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the official recurrentgemma scans (JAX) or "
        "accelerated_scan (torch)",
    )
    parser.add_argument(
        "--unit",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the whole RG-LRU (ops.rg_lru, gates included)",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare every output with a float64 numpy loop",
    )
    parser.add_argument(
        "--copy-mib",
        type=int,
        help="buffer size of the bandwidth measure (default: 1024 on an "
        "accelerator, 64 on a CPU)",
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.shape = (args.batch, args.length, args.width)

    import keras

    from keras_recurrentgemma.ops import scan

    backend = make_backend(keras.config.backend())
    names = args.implementations or list(scan.IMPLEMENTATIONS)

    copy_mib = args.copy_mib or (1024 if backend.accelerated else 64)
    copy = measure_copy(backend, copy_mib * 2**20, args.iters)
    gbps = copy["bandwidth_gbps"]
    n = int(np.prod(args.shape))
    fwd_bytes, fwd_bwd_bytes = scan_bytes(n, ITEMSIZE[args.dtype], 4)
    floor = {
        "copy_gbps": gbps,
        "fwd_bytes": fwd_bytes,
        "fwd_ms": _sig(fwd_bytes / gbps / 1e6),
        "fwd_bwd_bytes": fwd_bwd_bytes,
        "fwd_bwd_ms": _sig(fwd_bwd_bytes / gbps / 1e6),
        "assumes": "y and the cotangent in float32; forward reads a, x and "
        "writes y; backward reads a, y, cot and writes da, dx",
    }

    tensors, arrays = make_inputs(backend, args)
    expected = reference(*arrays, args.backward) if args.check else None
    del arrays

    result = {
        "backend": backend.name,
        "device": backend.device(),
        "host": {"cpu_count": os.cpu_count(), "machine": platform.machine()},
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "keras": keras.__version__,
            **backend.versions(),
            "recurrentgemma": _version("recurrentgemma"),
            "accelerated_scan": _version("accelerated-scan"),
            "keras_recurrentgemma_git": _git_state(),
        },
        "shape": list(args.shape),
        "dtype": args.dtype,
        "accumulation": ACCUMULATION,
        "iters": args.iters,
        "warmup": args.warmup,
        "backward": args.backward,
        "copy": copy,
        "floor": floor,
    }
    if expected is not None:
        result["check"] = {
            "reference": "float64 numpy loop over the rounded inputs",
            "max_abs_reference": {
                key: float(np.max(np.abs(value)))
                for key, value in zip(("y", "da", "dx"), expected, strict=True)
                if value is not None
            },
        }

    ours = {}
    for candidate in our_candidates(names, tensors[1]):
        print(f"timing {candidate.name}", file=sys.stderr, flush=True)
        ours[candidate.name] = run_candidate(
            backend, candidate, tensors, args, floor, expected
        )
    result["implementations"] = ours

    if args.peers:
        peers, notes = peer_candidates(backend)
        result["peers"] = dict(notes)
        for candidate in peers:
            print(f"timing {candidate.name}", file=sys.stderr, flush=True)
            result["peers"][candidate.name] = run_candidate(
                backend, candidate, tensors, args, floor, expected
            )
        for entry in ours.values():
            ratios = {}
            for name, peer in result["peers"].items():
                if not isinstance(peer, dict):
                    continue
                ratio = {
                    key: round(entry[key] / peer[key], 3)
                    for key in ("fwd_ms", "fwd_bwd_ms")
                    if key in entry and key in peer
                }
                if ratio:
                    ratios[name] = ratio
            if ratios:
                entry["ratio_to"] = ratios

    if args.unit:
        result["rg_lru"] = run_unit(backend, names, args, gbps)

    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
