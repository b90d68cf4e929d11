"""The RG-LRU linear recurrence and the one dispatcher every caller goes through.

Shape legend used in this package: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

`rg_lru_scan` is the single entry point. It picks an implementation at run time
from the backend and device; the `keras.ops` reference below is the truth that
every fast path is tested against. Layers call `rg_lru_scan` and never branch on
the backend themselves.
"""

import functools

import keras
from keras import ops

IMPLEMENTATIONS = ("auto", "reference", "doubling")


def _combine(left, right):
    # Composition of two affine maps h -> a*h + x, applied left first.
    a_l, x_l = left
    a_r, x_r = right
    return a_l * a_r, a_r * x_l + x_r


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
    if x.shape[1] == 1:
        y = x
    elif x.shape[1] is None:
        y = _sequential_scan(a, x)
    else:
        _, y = ops.associative_scan(_combine, (a, x), axis=1)
        # TensorFlow loses the static rank inside tf.function without this.
        y = ops.reshape(y, ops.shape(x))
    return y, y[:, -1]


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
    Steele), so `ceil(log2 t)` rounds of elementwise work give every prefix.
    Unlike TensorFlow's `associative_scan`, whose odd/even branches XLA
    rejects, every shape here is static, so `tf.function(jit_compile=True)`
    compiles it. Same arguments and results as `rg_lru_scan_reference`.
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
        implementation: `"auto"` picks the fastest path for the current
            backend and device; `"reference"` forces the `keras.ops` version;
            `"doubling"` forces `rg_lru_scan_doubling` (what `"auto"` uses on
            TensorFlow, where it is the form XLA compiles).

    Returns:
        `(y, h_last)`, both float32, as in `rg_lru_scan_reference`.
    """
    if resolve_implementation(implementation) == "doubling":
        return rg_lru_scan_doubling(a, x, h0)
    return _compiled_reference()(a, x, h0)


def resolve_implementation(implementation="auto"):
    """The implementation `rg_lru_scan` runs for `implementation` here."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(
            f"Unknown scan implementation {implementation!r} for backend "
            f"{keras.config.backend()!r}; expected one of {IMPLEMENTATIONS}."
        )
    if implementation != "auto":
        return implementation
    if keras.config.backend() == "tensorflow":
        return "doubling"
    return "reference"


@functools.cache
def _compiled_reference():
    # Eager JAX compiles each primitive of the associative scan separately,
    # seconds per new shape; one jit is ~8x faster and is inlined when the
    # caller is already being traced.
    if keras.config.backend() == "jax":
        import jax

        return jax.jit(rg_lru_scan_reference)
    return rg_lru_scan_reference
