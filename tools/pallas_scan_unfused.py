"""The bare RG-LRU recurrence as JAX Pallas kernels, kept for comparison.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

Not part of the package: the layers run `keras_recurrentgemma.ops.rg_lru`,
whose Pallas kernel (`ops.pallas_rg_lru`) also computes the gates. This one
takes `a` and `x` already computed, which is what `tools/benchmark_scan.py`
measures the fused kernel against (and what the official package's Pallas
scan does). It shares the fused kernel's block layout
(`ops.pallas_layout`); `tests/test_scan_pallas.py` tests it.

Resets need no input of their own: `a_t = 0` where a document starts. The
backward pass is the same recurrence run in reverse. With `g_t` the
gradient reaching `h_t` (`dy_t`, plus `dh_last` at the last step, plus what
flows back from `h_{t+1}`):

    g_t = dy_t + a_{t+1} ⊙ g_{t+1},   dx_t = g_t,
    da_t = g_t ⊙ h_{t-1},             dh0 = a_0 ⊙ g_0

Time padding uses `a = 1`, `x = 0`, which carries the state through.
"""

import functools
from typing import NamedTuple

from keras_recurrentgemma.ops import pallas_layout as layout


def rg_lru_scan_pallas(
    a,
    x,
    h0=None,
    *,
    platform=None,
    interpret=False,
    block_width=None,
    time_block=None,
    y_dtype="float32",
):
    """Runs the RG-LRU recurrence with a Pallas kernel (differentiable).

    Args:
        a: float array `[b, t, l]` (float32 or bfloat16), the decay, zero
            at resets.
        x: float array `[b, t, l]` (float32 or bfloat16), the input.
        h0: optional float array `[b, l]`, the state before the first step.
            Defaults to zeros, with no gradient.
        platform: `"gpu"` (Triton) or `"tpu"` (Mosaic) kernel. Defaults to
            `jax.default_backend()`; on CPU only `interpret=True` runs, and
            then the GPU variant is the default.
        interpret: run the kernel with the Pallas interpreter (any device).
            Anything `pallas_call` accepts, e.g. `pltpu.InterpretParams()`.
        block_width: lanes per program. A power of two, at least 128, on GPU
            (defaults to 128); on TPU a multiple of 1024, or any multiple of
            128 not below the width, for one block (defaults to the whole
            width up to 4096 lanes, else 2048).
        time_block: TPU only: time steps per grid step. Defaults to about
            256 KiB of float32 per block.
        y_dtype: dtype of `y`. The state saved for the backward pass is `y`,
            so a 16-bit `y` also rounds the `h_{t-1}` that `da` uses.

    Returns:
        `(y, h_last)`: `y` `[b, t, l]` in `y_dtype` holding every state, and
        `h_last` float32 `[b, l]`. Gradients come back in the input dtypes.
    """
    import jax.numpy as jnp

    a = jnp.asarray(a)
    x = jnp.asarray(x)
    if a.ndim != 3 or a.shape != x.shape:
        raise ValueError(
            f"`a` and `x` must both have shape [b, t, l]; got {a.shape} and {x.shape}."
        )
    b, t, l = a.shape
    if t == 0 or l == 0 or b == 0:
        raise ValueError(f"Every dimension of `a` must be nonzero; got {a.shape}.")
    for name, array in (("a", a), ("x", x)):
        if not jnp.issubdtype(array.dtype, jnp.floating):
            raise TypeError(f"`{name}` must be a float array; got {array.dtype}.")
    if h0 is not None:
        h0 = jnp.asarray(h0)
        if h0.shape != (b, l):
            raise ValueError(f"`h0` must have shape {(b, l)}; got {h0.shape}.")
    y_dtype = jnp.dtype(y_dtype)
    if not jnp.issubdtype(y_dtype, jnp.floating):
        raise TypeError(f"`y_dtype` must be a float dtype; got {y_dtype}.")

    platform = layout.resolve_platform(platform, interpret)
    plan = layout.make_plan(platform, t, l, block_width, time_block)
    config = _Config(plan, interpret, y_dtype.name, h0 is not None, x.dtype.name)
    return _differentiable_scan(config)(a, x, h0)


class _Config(NamedTuple):
    plan: layout.Plan
    interpret: object
    y_dtype: str
    has_h0: bool
    x_dtype: str  # Residuals must be arrays, so the dtype of dx travels here.


# Kernels. One row is one time step of a block: `[block_width]` on GPU,
# `[block_width / 128, 128]` on TPU.


def _forward_kernel(*refs, has_h0, num_chunks):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    if has_h0:
        a_ref, x_ref, h0_ref, y_ref, h_ref = refs
    else:
        a_ref, x_ref, y_ref, h_ref = refs

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

    def step(i, h):
        h = a_ref[i].astype(jnp.float32) * h + x_ref[i].astype(jnp.float32)
        y_ref[i] = h.astype(y_ref.dtype)
        return h

    h_ref[...] = jax.lax.fori_loop(0, a_ref.shape[0], step, h)


def _backward_kernel(*refs, has_h0, num_chunks):
    import jax
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    refs = list(refs)
    a_ref, y_ref, dy_ref, dh_last_ref = refs[:4]
    del refs[:4]
    h0_ref = refs.pop(0) if has_h0 else None
    y_before_ref = refs.pop(0) if num_chunks > 1 else None
    dx_ref, da_ref, carry_ref = refs

    def state_before_chunk():
        if has_h0:
            first = h0_ref[...]
        else:
            first = jnp.zeros(carry_ref.shape, jnp.float32)
        if num_chunks == 1:
            return first
        is_first_chunk = pl.program_id(2) == num_chunks - 1
        return jnp.where(is_first_chunk, first, y_before_ref[...].astype(jnp.float32))

    # `carry` is a_{t+1} ⊙ g_{t+1}, the gradient h_t receives from h_{t+1}.
    if num_chunks == 1:
        carry = dh_last_ref[...]
    else:

        @pl.when(pl.program_id(2) == 0)
        def _():
            carry_ref[...] = dh_last_ref[...]

        carry = carry_ref[...]

    def update(i, carry, h_before):
        g = dy_ref[i].astype(jnp.float32) + carry
        dx_ref[i] = g.astype(dx_ref.dtype)
        da_ref[i] = (g * h_before).astype(da_ref.dtype)
        return a_ref[i].astype(jnp.float32) * g

    last = a_ref.shape[0] - 1

    def step(k, carry):
        i = last - k
        return update(i, carry, y_ref[i - 1].astype(jnp.float32))

    # Step 0 of the chunk reads its h_{t-1} from outside the block.
    carry = jax.lax.fori_loop(0, last, step, carry)
    carry_ref[...] = update(0, carry, state_before_chunk())


# pallas_call wrappers in the kernel layout.


def _forward_call(config, a, x, h0):
    import jax
    from jax.experimental import pallas as pl

    plan = config.plan
    b = a.shape[0]
    seq, state = layout.sequence_spec(plan), layout.state_spec(plan)
    in_specs = [seq, seq] + ([state] if config.has_h0 else [])
    args = (a, x) + ((h0,) if config.has_h0 else ())
    kernel = functools.partial(
        _forward_kernel, has_h0=config.has_h0, num_chunks=plan.num_chunks
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(a.shape, config.y_dtype),
            jax.ShapeDtypeStruct((b,) + a.shape[2:], "float32"),
        ),
        grid=layout.grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, state),
        compiler_params=layout.compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_scan_forward",
    )(*args)


def _backward_call(config, a, y, dy, dh_last, h0, dx_dtype):
    import jax
    from jax.experimental import pallas as pl

    plan = config.plan
    b = a.shape[0]
    seq, state = layout.sequence_spec(plan, reverse=True), layout.state_spec(plan)
    in_specs = [seq, seq, seq, state]
    args = [a, y, dy, dh_last]
    if config.has_h0:
        in_specs.append(state)
        args.append(h0)
    if plan.num_chunks > 1:
        in_specs.append(layout.row_before_chunk_spec(plan))
        args.append(y)
    kernel = functools.partial(
        _backward_kernel, has_h0=config.has_h0, num_chunks=plan.num_chunks
    )
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct(a.shape, dx_dtype),
            jax.ShapeDtypeStruct(a.shape, a.dtype),
            jax.ShapeDtypeStruct(dh_last.shape, "float32"),
        ),
        grid=layout.grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, seq, state),
        compiler_params=layout.compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_scan_backward",
    )(*args)


# The differentiable function, built once per static configuration.


def _forward(config, a, x, h0):
    import jax.numpy as jnp

    plan = config.plan
    h0_k = layout.to_state(plan, h0.astype(jnp.float32)) if config.has_h0 else None
    y_k, h_last = _forward_call(
        config, layout.to_sequence(plan, a, 1), layout.to_sequence(plan, x, 0), h0_k
    )
    return (layout.from_sequence(plan, y_k), layout.from_state(plan, h_last)), y_k


@functools.cache
def _differentiable_scan(config):
    import jax

    @jax.custom_vjp
    def scan(a, x, h0):
        return _forward(config, a, x, h0)[0]

    def scan_fwd(a, x, h0):
        outputs, y_k = _forward(config, a, x, h0)
        # The states stay in the kernel layout: the backward pass reads them
        # there, and padding them again would cost a copy.
        return outputs, (a, y_k, h0)

    def scan_bwd(residuals, cotangents):
        import jax.numpy as jnp

        a, y_k, h0 = residuals
        dy, dh_last = cotangents
        plan = config.plan
        h0_k = layout.to_state(plan, h0.astype(jnp.float32)) if config.has_h0 else None
        dx, da, dh0 = _backward_call(
            config,
            layout.to_sequence(plan, a, 1),
            y_k,
            layout.to_sequence(plan, dy.astype(y_k.dtype), 0),
            layout.to_state(plan, dh_last.astype(jnp.float32)),
            h0_k,
            config.x_dtype,
        )
        dh0 = layout.from_state(plan, dh0).astype(h0.dtype) if config.has_h0 else None
        return layout.from_sequence(plan, da), layout.from_sequence(plan, dx), dh0

    scan.defvjp(scan_fwd, scan_bwd)
    return jax.jit(scan)
