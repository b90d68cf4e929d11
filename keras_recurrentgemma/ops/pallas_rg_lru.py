"""The whole RG-LRU (gates, normalisation, recurrence) in one Pallas kernel.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    i_t = σ(z^x_t)            r_t = σ(z^a_t)
    log a_t = r_t ⊙ w,        w = -8 · softplus(Λ)
    h_t = ā_t ⊙ h_{t-1} + x̄_t

with, per token (`segment_pos` p_t), `ā_t = a_t, x̄_t = sqrt(1 − a_t²) ⊙ i_t ⊙
x_t` inside a document, `ā_t = 0, x̄_t = i_t ⊙ x_t` where one starts (p_t = 0),
and `ā_t = 1, x̄_t = 0` on padding (p_t < 0).

Why a kernel of its own: with the gates outside, XLA writes `ā` and `x̄` in
float32 (8 bytes per element) for the scan kernel to read back, and the
backward pass writes `dā`, `dx̄` for XLA to read again. Here the kernel reads
the three 16-bit streams `x`, `z^x`, `z^a` once and writes `y`; the backward
kernel recomputes the gates from them and writes `dx`, `dz^x`, `dz^a`
directly. No `[b, t, l]` intermediate exists in either direction, so
training also keeps no `ā`, `x̄` for the backward pass.

Backward, with `g_t` the gradient reaching `h_t` (`dy_t`, plus `dh_last` at
the last step, plus what flows back from `h_{t+1}`):

    g_t = dy_t + ā_{t+1} ⊙ g_{t+1}
    dx_t = g_t ⊙ i_t ⊙ m_t                   m_t = sqrt(1 − a_t²) (1 at resets)
    dz^x_t = g_t ⊙ x_t ⊙ m_t ⊙ i_t (1 − i_t)
    d log a_t = g_t ⊙ h_{t-1} ⊙ a_t − g_t ⊙ x_t ⊙ i_t ⊙ a_t² / s_t
    dz^a_t = d log a_t ⊙ w ⊙ r_t (1 − r_t),    dw = Σ_{b,t} d log a_t ⊙ r_t

inside documents (all zero on padding; only `dx`, `dz^x` at resets), where
`s_t = sqrt(max(1 − a_t², 1/(4·1000²)))` caps sqrt's derivative at 1000 as
the official model does. `1 − a_t²` is `−expm1(2 log a_t)` (see
`ops.rg_lru_math`), as in the `keras.ops` gates. `Λ`'s gradient flows through
`w` outside the kernel.

The block layout, padding and platforms are those of `ops.pallas_layout`. The
positions of a program's time steps are read as scalars: a `[t]` block on GPU,
and on TPU a `[time_block]` block in SMEM (scalar memory), reshaped so that
its last two dimensions, `[1, time_block]`, are whole.
"""

import functools
from typing import NamedTuple

from keras_recurrentgemma.ops import pallas_layout as layout
from keras_recurrentgemma.ops import rg_lru_math


def rg_lru_pallas(
    x,
    gate_x,
    gate_a,
    a_param,
    segment_pos,
    h0=None,
    *,
    platform=None,
    interpret=False,
    block_width=None,
    time_block=None,
):
    """The RG-LRU from its gate pre-activations, in one kernel (differentiable).

    Args:
        x: float array `[b, t, l]`, the recurrence's input.
        gate_x: float array `[b, t, l]`, the input gate before its sigmoid.
        gate_a: float array `[b, t, l]`, the `a` gate before its sigmoid.
        a_param: float array `[l]`, `Λ`.
        segment_pos: int array `[b, t]`: 0 starts a document, -1 is padding.
        h0: optional float array `[b, l]`, the state before the first step.
        platform: `"gpu"` (Triton) or `"tpu"` (Mosaic); defaults to
            `jax.default_backend()`, and on CPU (`interpret` only) to "gpu".
        interpret: run in the Pallas interpreter (any device); anything
            `pallas_call` accepts, e.g. `pltpu.InterpretParams()`.
        block_width: lanes per program (see `pallas_layout.make_plan`).
        time_block: TPU only: time steps per grid step.

    Returns:
        `(y, h_last)`, float32 `[b, t, l]` and `[b, l]`. Gradients reach `x`,
        both gates, `a_param` and `h0` in their own dtypes.
    """
    import jax
    import jax.numpy as jnp

    x, gate_x, gate_a = (jnp.asarray(v) for v in (x, gate_x, gate_a))
    a_param = jnp.asarray(a_param)
    segment_pos = jnp.asarray(segment_pos)
    if x.ndim != 3 or not x.shape[0] * x.shape[1] * x.shape[2]:
        raise ValueError(f"`x` must have a nonzero shape [b, t, l]; got {x.shape}.")
    b, t, l = x.shape
    for name, array in (("gate_x", gate_x), ("gate_a", gate_a)):
        if array.shape != x.shape:
            raise ValueError(
                f"`{name}` must have the shape of `x`, {x.shape}; got {array.shape}."
            )
    for name, array in (("x", x), ("gate_x", gate_x), ("gate_a", gate_a)):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a float array; got {array.dtype}.")
    if a_param.shape != (l,):
        raise ValueError(f"`a_param` must have shape {(l,)}; got {a_param.shape}.")
    if segment_pos.shape != (b, t):
        raise ValueError(
            f"`segment_pos` must have shape {(b, t)}; got {segment_pos.shape}."
        )
    if not jnp.issubdtype(segment_pos.dtype, jnp.integer):
        raise TypeError(f"`segment_pos` must be integer; got {segment_pos.dtype}.")
    if h0 is not None:
        h0 = jnp.asarray(h0)
        if h0.shape != (b, l):
            raise ValueError(f"`h0` must have shape {(b, l)}; got {h0.shape}.")

    platform = layout.resolve_platform(platform, interpret)
    plan = layout.make_plan(platform, t, l, block_width, time_block)
    config = _Config(plan, interpret, h0 is not None)
    # softplus is per channel: computed once here, and differentiated by JAX.
    w = -rg_lru_math.C * jax.nn.softplus(a_param.astype(jnp.float32))
    return _differentiable(config)(
        x, gate_x, gate_a, w, segment_pos.astype(jnp.int32), h0
    )


class _Config(NamedTuple):
    plan: layout.Plan
    interpret: object
    has_h0: bool


# The gate arithmetic shared by both kernels, on one time step (float32).


class _Step(NamedTuple):
    x: object
    gate_x: object  # i_t
    gate_a: object  # r_t
    a: object
    a_square: object
    one_minus_a_square: object
    multiplier: object  # m_t
    reset: object
    pad: object

    @property
    def decay(self):  # ā_t
        import jax.numpy as jnp

        return jnp.where(self.reset, 0.0, jnp.where(self.pad, 1.0, self.a))

    @property
    def input(self):  # x̄_t
        import jax.numpy as jnp

        return jnp.where(self.pad, 0.0, self.x * self.gate_x * self.multiplier)


def _gates(x, gate_x, gate_a, w, pos):
    import jax
    import jax.numpy as jnp

    x = x.astype(jnp.float32)
    gate_x = jax.nn.sigmoid(gate_x.astype(jnp.float32))
    gate_a = jax.nn.sigmoid(gate_a.astype(jnp.float32))
    log_a = gate_a * w
    a = jnp.exp(log_a)
    z = 2.0 * log_a
    a_square = jnp.exp(z)
    one_minus_a_square = jnp.where(
        z > rg_lru_math.SERIES_RANGE,
        rg_lru_math.minus_expm1_series(z),
        1.0 - a_square,
    )
    reset, pad = pos == 0, pos < 0
    multiplier = jnp.where(reset, 1.0, jnp.sqrt(one_minus_a_square))
    return _Step(
        x, gate_x, gate_a, a, a_square, one_minus_a_square, multiplier, reset, pad
    )


# Kernels.


def _position(pos_ref, i):
    # A GPU block is `[t]`; a TPU one `[1, time_block]`
    # (see `pallas_layout.positions_spec`).
    return pos_ref[i] if len(pos_ref.shape) == 1 else pos_ref[0, i]


def _forward_kernel(*refs, has_h0, num_chunks):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    refs = list(refs)
    x_ref, gx_ref, ga_ref, w_ref, pos_ref = refs[:5]
    h0_ref = refs[5] if has_h0 else None
    y_ref, h_ref = refs[-2:]

    def initial_state():
        if has_h0:
            return h0_ref[...]
        return jnp.zeros(h_ref.shape, jnp.float32)

    if num_chunks == 1:
        h = initial_state()
    else:

        @pl.when(pl.program_id(2) == 0)
        def _():
            h_ref[...] = initial_state()

        h = h_ref[...]
    w = w_ref[...]

    def step(i, h):
        gates = _gates(x_ref[i], gx_ref[i], ga_ref[i], w, _position(pos_ref, i))
        h = gates.decay * h + gates.input
        y_ref[i] = h
        return h

    h_ref[...] = jax.lax.fori_loop(0, x_ref.shape[0], step, h)


def _backward_kernel(*refs, has_h0, num_chunks):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    refs = list(refs)
    x_ref, gx_ref, ga_ref, w_ref, pos_ref, y_ref, dy_ref, dh_last_ref = refs[:8]
    del refs[:8]
    h0_ref = refs.pop(0) if has_h0 else None
    y_before_ref = refs.pop(0) if num_chunks > 1 else None
    dx_ref, dgx_ref, dga_ref, dw_ref, carry_ref = refs

    def state_before_chunk():
        if has_h0:
            first = h0_ref[...]
        else:
            first = jnp.zeros(carry_ref.shape, jnp.float32)
        if num_chunks == 1:
            return first
        is_first_chunk = pl.program_id(2) == num_chunks - 1
        return jnp.where(is_first_chunk, first, y_before_ref[...])

    # `carry` is ā_{t+1} ⊙ g_{t+1}; `dw` sums d log a ⊙ r over this block's
    # time steps (the batch is summed outside). Both live in their output
    # blocks across time chunks.
    if num_chunks == 1:
        carry = dh_last_ref[...]
        dw = jnp.zeros(dw_ref.shape, jnp.float32)
    else:

        @pl.when(pl.program_id(2) == 0)
        def _():
            carry_ref[...] = dh_last_ref[...]
            dw_ref[...] = jnp.zeros(dw_ref.shape, jnp.float32)

        carry = carry_ref[...]
        dw = dw_ref[...]
    w = w_ref[...]

    def update(i, carry, dw, h_before):
        s = _gates(x_ref[i], gx_ref[i], ga_ref[i], w, _position(pos_ref, i))
        g = dy_ref[i].astype(jnp.float32) + carry
        # Padding passes `g` on to h_{t-1} (ā = 1) and reaches no input.
        g_in = jnp.where(s.pad, 0.0, g)
        gated = g_in * s.gate_x
        dx_ref[i] = (gated * s.multiplier).astype(dx_ref.dtype)
        dgx = g_in * s.x * s.multiplier * s.gate_x * (1.0 - s.gate_x)
        dgx_ref[i] = dgx.astype(dgx_ref.dtype)
        slope = jax.lax.rsqrt(jnp.maximum(s.one_minus_a_square, rg_lru_math.SQRT_FLOOR))
        dlog_a = g_in * h_before * s.a - gated * s.x * s.a_square * slope
        dlog_a = jnp.where(s.reset, 0.0, dlog_a)
        dga_ref[i] = (dlog_a * w * s.gate_a * (1.0 - s.gate_a)).astype(dga_ref.dtype)
        return s.decay * g, dw + dlog_a * s.gate_a

    last = x_ref.shape[0] - 1

    def step(k, state):
        i = last - k
        return update(i, *state, y_ref[i - 1])

    carry, dw = jax.lax.fori_loop(0, last, step, (carry, dw))
    carry, dw = update(0, carry, dw, state_before_chunk())
    carry_ref[...] = carry
    dw_ref[...] = dw


# pallas_call wrappers in the kernel layout.


def _forward_call(config, x, gx, ga, w, pos, h0):
    import jax
    from jax.experimental import pallas as pl

    plan = config.plan
    b = x.shape[0]
    seq, state = layout.sequence_spec(plan), layout.state_spec(plan)
    in_specs = [seq, seq, seq, layout.channels_spec(plan), layout.positions_spec(plan)]
    args = [x, gx, ga, w, pos]
    if config.has_h0:
        in_specs.append(state)
        args.append(h0)
    kernel = functools.partial(
        _forward_kernel, has_h0=config.has_h0, num_chunks=plan.num_chunks
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x.shape, "float32"),
            jax.ShapeDtypeStruct((b,) + x.shape[2:], "float32"),
        ),
        grid=layout.grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, state),
        compiler_params=layout.compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_forward",
    )(*args)


def _backward_call(config, x, gx, ga, w, pos, y, dy, dh_last, h0):
    import jax
    from jax.experimental import pallas as pl

    plan = config.plan
    b = x.shape[0]
    seq = layout.sequence_spec(plan, reverse=True)
    state = layout.state_spec(plan)
    in_specs = [
        seq,
        seq,
        seq,
        layout.channels_spec(plan),
        layout.positions_spec(plan, True),
    ]
    in_specs += [seq, seq, state]
    args = [x, gx, ga, w, pos, y, dy, dh_last]
    if config.has_h0:
        in_specs.append(state)
        args.append(h0)
    if plan.num_chunks > 1:
        in_specs.append(layout.row_before_chunk_spec(plan))
        args.append(y)
    kernel = functools.partial(
        _backward_kernel, has_h0=config.has_h0, num_chunks=plan.num_chunks
    )
    state_shape = jax.ShapeDtypeStruct(dh_last.shape, "float32")
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(x.shape, x.dtype),
            jax.ShapeDtypeStruct(gx.shape, gx.dtype),
            jax.ShapeDtypeStruct(ga.shape, ga.dtype),
            state_shape,
            state_shape,
        ),
        grid=layout.grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, seq, seq, state, state),
        compiler_params=layout.compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_backward",
    )(*args)


# The differentiable function, built once per static configuration.


def _kernel_inputs(config, x, gx, ga, w, pos, h0):
    import jax.numpy as jnp

    plan = config.plan
    sequences = [layout.to_sequence(plan, v, 0) for v in (x, gx, ga)]
    h0_k = None
    if config.has_h0:
        h0_k = layout.to_state(plan, h0.astype(jnp.float32))
    return sequences + [
        layout.to_channels(plan, w),
        layout.to_positions(plan, pos),
        h0_k,
    ]


@functools.cache
def _differentiable(config):
    import jax
    import jax.numpy as jnp

    plan = config.plan

    def forward(x, gx, ga, w, pos, h0):
        y_k, h_last = _forward_call(
            config, *_kernel_inputs(config, x, gx, ga, w, pos, h0)
        )
        outputs = (
            layout.from_sequence(plan, y_k),
            layout.from_state(plan, h_last),
        )
        return outputs, y_k

    @jax.custom_vjp
    def rg_lru(x, gx, ga, w, pos, h0):
        return forward(x, gx, ga, w, pos, h0)[0]

    def rg_lru_fwd(x, gx, ga, w, pos, h0):
        outputs, y_k = forward(x, gx, ga, w, pos, h0)
        # The gates are recomputed from the inputs: nothing else is kept.
        return outputs, (x, gx, ga, w, pos, h0, y_k)

    def rg_lru_bwd(residuals, cotangents):
        x, gx, ga, w, pos, h0, y_k = residuals
        dy, dh_last = cotangents
        inputs = _kernel_inputs(config, x, gx, ga, w, pos, h0)
        dx, dgx, dga, dw, dh0 = _backward_call(
            config,
            *inputs[:5],
            y_k,
            layout.to_sequence(plan, dy.astype(jnp.float32), 0),
            layout.to_state(plan, dh_last.astype(jnp.float32)),
            inputs[5],
        )
        grads = [layout.from_sequence(plan, v) for v in (dx, dgx, dga)]
        dw = layout.from_state(plan, dw).sum(axis=0)
        dh0 = layout.from_state(plan, dh0).astype(h0.dtype) if config.has_h0 else None
        return (*grads, dw, None, dh0)

    rg_lru.defvjp(rg_lru_fwd, rg_lru_bwd)
    return jax.jit(rg_lru)
