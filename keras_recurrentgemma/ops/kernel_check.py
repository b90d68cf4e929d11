"""The check `"auto"` runs before it trusts a kernel on a device, once per process.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

`ops.rg_lru(..., implementation="auto")` picks a kernel on an accelerator
(Pallas on a JAX GPU or TPU, Triton on torch CUDA). The kernels are tested
in interpreters and compiled for their targets without a device, but a
user's device may still reject or miscompile one, and then every call would
fail. So the first time a kernel is about to run on a device (for an input
dtype), `kernel_works` runs it on a small `[2, 9, 160]` input (two width
blocks of the default 128 lanes, an odd length, a document start and
padding, a carried state) and compares it with the `keras.ops` reference on
the same device: for `y`, `h_last` and the gradients of
`Σ y ⊙ w + Σ h_last` with respect to `x`, both gates, `Λ` and `h0`,

    relative_error = max|kernel − reference| / max|reference| ≤ CHECK_TOLERANCE

A kernel that raises, or is off, gets one `KernelFallbackWarning` naming the
kernel, the device and the error, and `"auto"` runs the reference from then
on in this process. A forced implementation is never checked here: it fails
loudly where it fails.
"""

import concurrent.futures
import functools
import warnings

import keras
import numpy as np

# The bound on `relative_error` per input dtype. The kernels agree with the
# reference to float32 round-off (~1e-6, see tests/tolerances.py KERNEL);
# 16-bit gradients are rounded once to the input dtype (bfloat16 unit
# roundoff 2^-8, float16 2^-11). A kernel that miscompiles is off by O(1),
# so the bounds sit well above round-off and far below a real fault.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 2**-5, "float16": 2**-8}

_SHAPE = (2, 9, 160)
# (kernel, device, dtype) -> whether the kernel passed its check there.
_verdicts = {}


class KernelFallbackWarning(RuntimeWarning):
    """A kernel failed its check; `"auto"` runs the reference instead."""


def kernel_works(name, x, kernel, reference):
    """Whether the kernel `name` may run where `x` is, checking it the first time.

    Args:
        name: the implementation name, `"pallas"` or `"triton"`.
        x: the tensor the kernel is about to run on (its device and dtype
            pick the check; it may be a tracer).
        kernel, reference: callables
            `(x, gate_x, gate_a, a_param, segment_pos, h0) -> (y, h_last)`.

    Returns:
        bool. False after a failed check, which warned once.
    """
    dtype = keras.backend.standardize_dtype(x.dtype)
    device = _device(x)
    key = (name, device, dtype)
    if key not in _verdicts:
        try:
            error = _compare(kernel, reference, x, dtype)
        except Exception as exc:  # Any failure of the kernel is the finding.
            error = f"{type(exc).__name__}: {exc}"
        _verdicts[key] = error is None
        if error is not None:
            warnings.warn(
                f"The {name!r} RG-LRU kernel failed its check on {device} "
                f"({dtype}) and will not be used in this process; "
                'scan_implementation="auto" runs the reference instead (force '
                f'scan_implementation="{name}" to see the failure). {error}',
                KernelFallbackWarning,
                stacklevel=3,
            )
    return _verdicts[key]


def _inputs(dtype):
    """The check's input, as float64 / int32 numpy arrays."""
    rng = np.random.default_rng(0)
    b, t, l = _SHAPE
    streams = [rng.normal(size=_SHAPE) for _ in range(3)]  # x, gate_x, gate_a
    a_param = rng.normal(size=(l,))
    segment_pos = np.tile(np.arange(t, dtype="int32"), (b, 1))
    segment_pos[0, 4:] = np.arange(t - 4)  # a second document
    segment_pos[1, -2:] = -1  # padding
    h0 = rng.normal(size=(b, l))
    w = rng.normal(size=_SHAPE)  # the cotangent of y
    return streams, a_param, segment_pos, h0, w


def _compare(kernel, reference, x, dtype):
    """None when the kernel matches the reference, else what differs."""
    run = {"jax": _run_jax, "torch": _run_torch}[keras.config.backend()]
    inputs = _inputs(dtype)
    actual = run(kernel, inputs, dtype, x)
    expected = run(reference, inputs, dtype, x)
    bound = CHECK_TOLERANCE.get(dtype, CHECK_TOLERANCE["float32"])
    names = ("y", "h_last", "dx", "dgate_x", "dgate_a", "da_param", "dh0")
    for what, act, exp in zip(names, actual, expected, strict=True):
        scale = np.max(np.abs(exp))
        error = np.max(np.abs(act - exp)) / scale if scale else np.max(np.abs(act))
        if not error <= bound:  # NaN fails too.
            return (
                f"{what} is off the reference by {error:.3g} (relative; "
                f"allowed {bound:.3g})."
            )
    return None


def _run_jax(fn, inputs, dtype, x):
    """`(y, h_last, *grads)` of `fn` as float64 numpy, evaluated now."""
    # In a thread of its own: JAX's trace state is per thread, so there the
    # check runs eagerly even when the caller is being traced (`jax.jit`),
    # and the verdict is a Python bool. (`jax.ensure_compile_time_eval`
    # would also evaluate inside the kernel's own trace, which Pallas
    # rejects.)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(_run_jax_eagerly, fn, inputs, dtype).result()


def _run_jax_eagerly(fn, inputs, dtype):
    import jax
    import jax.numpy as jnp

    streams, a_param, segment_pos, h0, w = inputs
    streams = [jnp.asarray(v, dtype) for v in streams]
    a_param, h0, w = (jnp.asarray(v, "float32") for v in (a_param, h0, w))
    segment_pos = jnp.asarray(segment_pos)

    def loss(x, gate_x, gate_a, a_param, h0):
        y, h_last = fn(x, gate_x, gate_a, a_param, segment_pos, h0)
        return jnp.sum(y * w) + jnp.sum(h_last), (y, h_last)

    grad = jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)
    grads, outputs = grad(*streams, a_param, h0)
    return [np.asarray(v.astype("float32"), "float64") for v in (*outputs, *grads)]


def _run_torch(fn, inputs, dtype, x):
    """`(y, h_last, *grads)` of `fn` as float64 numpy, run eagerly on `x`'s device."""
    import torch

    # Run eagerly even when the caller is being traced (`make_fx` records
    # every tensor operation; `torch.compile` would compile this too).
    from torch.fx.experimental.proxy_tensor import disable_proxy_modes_tracing

    @torch.compiler.disable
    def run():
        streams, a_param, segment_pos, h0, w = inputs
        with (
            disable_proxy_modes_tracing(),
            torch.inference_mode(False),
            torch.enable_grad(),
        ):
            device = x.device

            def tensor(v, dtype):
                t = torch.tensor(v, device=device).to(getattr(torch, dtype))
                return t.requires_grad_() if t.is_floating_point() else t

            leaves = [tensor(v, dtype) for v in streams]
            leaves += [tensor(a_param, "float32"), tensor(h0, "float32")]
            pos = torch.tensor(segment_pos, device=device)
            y, h_last = fn(*leaves[:4], pos, leaves[4])
            w_t = torch.tensor(w, device=device, dtype=torch.float32)
            loss = (y * w_t).sum() + h_last.sum()
            grads = torch.autograd.grad(loss, leaves)
            return [
                v.detach().float().cpu().numpy().astype("float64")
                for v in (y, h_last, *grads)
            ]

    return run()


def _device(x):
    """The device `x` runs on, in words (e.g. `gpu (NVIDIA H200)`)."""
    if keras.config.backend() == "torch":
        return _torch_device_words(str(x.device))
    import jax

    device = jax.devices()[0]
    return f"{device.platform} ({device.device_kind})"


@functools.cache
def _torch_device_words(device):
    # Cached: eager torch decoding asks at every layer of every step.
    import torch

    if device.startswith("cuda"):
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return device
