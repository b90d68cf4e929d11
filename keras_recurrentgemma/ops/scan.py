"""The RG-LRU linear recurrence, and which implementation runs where.

Shape legend used in this package: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

Layers call `ops.rg_lru` (the whole unit, gates included), never this module
directly, and never branch on the backend themselves. `ops.rg_lru` asks
`resolve_implementation` which implementation runs for the backend and
device: a kernel of the whole unit (`"pallas"`, `"triton"`), or the gates in
`keras.ops` followed by `rg_lru_scan`, the bare recurrence in `keras.ops`
below. `rg_lru_scan_reference` is the truth every fast path is tested
against.
"""

import functools
import os

import keras
from keras import ops

IMPLEMENTATIONS = ("auto", "reference", "doubling", "xla", "pallas", "triton")


def _float32_with_h0(a, x, h0):
    """`a`, `x` in float32, with `h0` folded into the first input.

    Folding equals prepending the step (a=1, x=h0), so a scan that starts
    from zero state gives the states that start from `h0`.
    """
    a = ops.cast(a, "float32")
    x = ops.cast(x, "float32")
    if h0 is not None:
        first = x[:, :1] + a[:, :1] * ops.expand_dims(ops.cast(h0, "float32"), 1)
        x = ops.concatenate([first, x[:, 1:]], axis=1)
    return a, x


def rg_lru_scan_reference(a, x, h0=None):
    """Reference recurrence in `keras.ops`, accumulated in float32.

    Args:
        a: float tensor `[b, t, l]`, the per-step decay (already zeroed where a
            document starts).
        x: float tensor `[b, t, l]`, the per-step input.
        h0: optional float tensor `[b, l]`, the state before the first step.

    Returns:
        `(y, h_last)`: `y` float32 `[b, t, l]` holding every state, and
        `h_last` float32 `[b, l]`, the state after the last step.
    """
    a, x = _float32_with_h0(a, x, h0)
    if x.shape[1] is None:
        y = _sequential_scan(a, x)
    else:
        y = _odd_even_scan(a, x)
    return y, y[:, -1]


def _odd_even_scan(a, x):
    """Every prefix of the recurrence in `O(t)` work and `2 log2 t` rounds.

    The pairing of `jax.lax.associative_scan`, unrolled into two loops. It is
    written out rather than calling `keras.ops.associative_scan` because
    torch's version of that recurses through a closure that refers to
    itself: the cycle keeps every call's inputs alive until Python's cycle
    collector runs, so a long chunked prefill grows by about a chunk's
    activations per chunk. Plain loops leave nothing behind. Pairs are taken
    by reshaping rather than strided slicing, whose gradient XLA rejects on
    TensorFlow.
    """
    # Up: level k+1 composes the pairs (2j, 2j+1) of level k.
    levels = []
    while x.shape[1] > 1:
        levels.append((a, x))
        a_even, a_odd = _pairs(a, 0, x.shape[1] // 2)
        x_even, x_odd = _pairs(x, 0, x.shape[1] // 2)
        a, x = a_even * a_odd, a_odd * x_even + x_odd
    # Down: level k+1's prefixes are level k's prefixes at odd positions;
    # the even ones add one step to the prefix before them. Prefixes start
    # from zero state, so only their `x` part is needed.
    prefix = x
    for a, x in reversed(levels):
        t = x.shape[1]
        _, a_later = _pairs(a, 1, (t - 1) // 2)
        _, x_later = _pairs(x, 1, (t - 1) // 2)
        later = a_later * prefix[:, : (t - 1) // 2] + x_later
        even = ops.concatenate([x[:, :1], later], axis=1)
        both = ops.stack([even[:, : t // 2], prefix], axis=2)
        prefix = ops.reshape(both, (-1, t // 2 * 2, x.shape[2]))
        if t % 2:
            prefix = ops.concatenate([prefix, even[:, -1:]], axis=1)
    return prefix


def _pairs(v, start, count):
    """`(v[:, start + 2j], v[:, start + 2j + 1])` for `j < count`."""
    if count == 0:
        return v[:, :0], v[:, :0]
    v = ops.reshape(v[:, start : start + 2 * count], (-1, count, 2, v.shape[2]))
    return v[:, :, 0], v[:, :, 1]


def _sequential_scan(a, x):
    # `associative_scan` needs a static length; TensorFlow retraces `predict`
    # and `fit` with an unknown one once a second sequence length arrives.
    steps = ops.moveaxis(ops.stack([a, x], axis=0), 2, 0)  # [t, 2, b, l]

    def step(h, a_x):
        h = a_x[0] * h + a_x[1]
        return h, h

    _, y = ops.scan(step, ops.zeros_like(x[:, 0]), steps)
    return ops.moveaxis(y, 0, 1)


def rg_lru_scan_doubling(a, x, h0=None):
    """The recurrence by recursive doubling, in `keras.ops` with static shapes.

    Round `r` composes every step with the one `2^r` before it (Hillis and
    Steele), so `ceil(log2 t)` rounds of elementwise work give every prefix:
    fewer, larger steps than the reference's `2 log2 t`, at `O(t log t)`
    work. Same arguments and results as `rg_lru_scan_reference`.
    """
    a, x = _float32_with_h0(a, x, h0)
    t = x.shape[1]
    if t is None:
        y = _sequential_scan(a, x)
        return y, y[:, -1]
    shift = 1
    while shift < t:
        # Steps before the start compose with the identity map (a=1, x=0).
        a_before = ops.concatenate([ops.ones_like(a[:, :shift]), a[:, :-shift]], 1)
        x_before = ops.concatenate([ops.zeros_like(x[:, :shift]), x[:, :-shift]], 1)
        x = a * x_before + x
        a = a * a_before
        shift *= 2
    return x, x[:, -1]


def rg_lru_scan(a, x, h0=None, implementation="auto"):
    """Runs the RG-LRU recurrence with the best implementation available.

    Args:
        a: float tensor `[b, t, l]`.
        x: float tensor `[b, t, l]`.
        h0: optional float tensor `[b, l]`.
        implementation: one of `IMPLEMENTATIONS`:
            - `"auto"`: the fastest path for the backend and device (see
              `resolve_implementation`);
            - `"reference"`: the `keras.ops` recurrence above;
            - `"doubling"`: `rg_lru_scan_doubling`, uncompiled;
            - `"xla"` (TensorFlow): the reference compiled with XLA
              (`tf.function(jit_compile=True)`) whoever calls it; 4-13x
              faster than `"doubling"` under XLA on CPU, forward and
              backward;
            - `"pallas"`, `"triton"`: the kernels compute the whole unit,
              gates included, and are reached through `ops.rg_lru`; here
              `"auto"` runs the reference where it would pick one, and a
              forced one raises a `ValueError` saying so.
            A forced implementation that cannot run here raises a
            `ValueError` saying why.

    Returns:
        `(y, h_last)`, both float32, as in `rg_lru_scan_reference`.
    """
    name = resolve_implementation(implementation, x)
    if name in KERNELS:
        if implementation != "auto":
            raise ValueError(
                f"rg_lru_scan has no {name!r} kernel: the {name} kernel "
                "computes the whole RG-LRU, gates included; call "
                "`keras_recurrentgemma.ops.rg_lru` with this implementation, "
                "or rg_lru_scan with 'reference', 'doubling' or 'xla'."
            )
        name = "reference"
    if name == "doubling":
        return rg_lru_scan_doubling(a, x, h0)
    if name == "xla":
        if x.shape[1] is None:
            # A length known only at run time takes the sequential scan,
            # whose gradient XLA cannot compile on its own (a TensorArray of
            # unknown size); the caller's own compilation still applies.
            return rg_lru_scan_reference(a, x, h0)
        return _xla_reference()(a, x, h0)
    return _compiled_reference()(a, x, h0)


# The backend each fast path runs on.
_FAST_PATH_BACKENDS = {"xla": "tensorflow", "pallas": "jax", "triton": "torch"}
# The fast paths that are kernels of their own (rather than `keras.ops`).
KERNELS = ("pallas", "triton")


def resolve_implementation(implementation="auto", x=None):
    """The implementation `rg_lru_scan` runs for `implementation` here.

    `"auto"` gives `"pallas"` on JAX with a GPU or TPU, `"xla"` on
    TensorFlow, `"triton"` on torch when `x` (or, without `x`, the default
    device) is on CUDA and Triton is installed, and `"reference"` otherwise.
    (`ops.rg_lru` then checks a kernel once per device before trusting it;
    see `ops.kernel_check`.) With the environment variable
    `KERAS_RECURRENTGEMMA_INTERPRET=1`, a forced `"pallas"` runs in Pallas's
    interpreter on CPU (Triton's needs `TRITON_INTERPRET=1`), which is how
    the tests cover the kernels; `"auto"` never picks an interpreter.

    Raises:
        ValueError: for an unknown name, or a forced fast path that cannot
            run on this backend and device (the message says why).
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown scan implementation {implementation!r} for backend "
            f"{keras.config.backend()!r}; expected one of {IMPLEMENTATIONS}."
        )
    if implementation == "auto":
        backend = keras.config.backend()
        fast = {v: k for k, v in _FAST_PATH_BACKENDS.items()}[backend]
        if backend == "tensorflow":
            return fast
        if not _on_accelerator(x):
            return "reference"
        return fast if _unavailable(fast, x) is None else "reference"
    if implementation in _FAST_PATH_BACKENDS:
        why = _unavailable(implementation, x)
        if why is not None:
            raise ValueError(
                f"Scan implementation {implementation!r} cannot run here: "
                f"{why}. Use implementation='auto' or 'reference'."
            )
    return implementation


def _on_accelerator(x):
    """Whether `x` (JAX: the default device) is on a GPU or TPU (torch: CUDA).

    The interpreters do not count: they are for tests, far slower than the
    reference.
    """
    if keras.config.backend() == "torch":
        return _torch_device(x).type == "cuda"
    import jax

    return jax.default_backend() in ("gpu", "tpu") and not _interpret()


def _unavailable(name, x):
    """Why the fast path `name` cannot run on this backend and device, or None."""
    backend = keras.config.backend()
    if backend != _FAST_PATH_BACKENDS[name]:
        return f"it needs the {_FAST_PATH_BACKENDS[name]} backend, not {backend!r}"
    if name == "xla":
        return None
    if name == "pallas":
        import jax

        platform = jax.default_backend()
        if platform not in ("gpu", "tpu") and not _interpret():
            return (
                f"Pallas kernels need a GPU or TPU and JAX's default device is "
                f"{platform!r} (KERAS_RECURRENTGEMMA_INTERPRET=1 runs them in "
                "the interpreter, slowly)"
            )
        if _interpret():
            return None
        from keras_recurrentgemma.ops import pallas_layout

        ok, reason = pallas_layout.available(platform)
        return None if ok else reason
    from keras_recurrentgemma.ops import triton_launch

    ok, reason = triton_launch.available(_torch_device(x))
    return None if ok else reason


def _torch_device(x):
    """Where torch will run on `x`: its device, or Keras's default for arrays."""
    import torch
    from keras.src.backend.torch.core import get_device

    return x.device if isinstance(x, torch.Tensor) else torch.device(get_device())


def _interpret():
    return os.environ.get("KERAS_RECURRENTGEMMA_INTERPRET", "") == "1"


@functools.cache
def _compiled_reference():
    # Eager JAX compiles each primitive of the scan separately, seconds per
    # new shape; one jit is ~8x faster and is inlined when the caller is
    # already being traced.
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(rg_lru_scan_reference)
    return rg_lru_scan_reference


@functools.cache
def _xla_reference():
    import tensorflow as tf

    # Inlined into an enclosing XLA computation; a cluster of its own when
    # called eagerly or from a graph that is not compiled.
    return tf.function(rg_lru_scan_reference, jit_compile=True)
