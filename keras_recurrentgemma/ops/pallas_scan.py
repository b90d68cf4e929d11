"""The RG-LRU linear recurrence as JAX Pallas kernels, forward and backward.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

    h_t = a_t ⊙ h_{t-1} + x_t,   h_{-1} = h0 (zeros when absent)

Resets need no input of their own: `a_t = 0` where a document starts.

The backward pass is the same recurrence run in reverse. With `g_t` the
gradient reaching `h_t` (`dy_t`, plus `dh_last` at the last step, plus what
flows back from `h_{t+1}`):

    g_t = dy_t + a_{t+1} ⊙ g_{t+1},   dx_t = g_t,
    da_t = g_t ⊙ h_{t-1},             dh0 = a_0 ⊙ g_0

Both kernels use a grid of (batch, width block, time chunk). Each program
walks its time steps in order with the state in float32 registers, so
accumulation is float32 whatever the input dtype.

- `platform="gpu"` (Triton): one time chunk holding the whole sequence; the
  state lives in registers for the whole loop. Triton loads and stores must
  have a power-of-two size, so the width block is a power of two.
- `platform="tpu"` (Mosaic): the width is folded into rows of 128 lanes
  (`[b, t, l] -> [b, t, l / 128, 128]`), so one time step of a block fills
  whole (8, 128) vector registers and time is a leading, untiled axis that a
  loop may index freely. Time is cut into chunks so a block fits in VMEM; the
  chunks of one width block run in order ("arbitrary"), and the state is
  carried between them in the float32 output block, which stays resident
  while its block index does not change.

Widths (and, on TPU, sequence lengths) that do not divide into blocks are
padded inside the wrapper and sliced off again. Time padding uses `a = 1`,
`x = 0`, which carries the state through unchanged.

Imports of JAX are local so that this module imports under any backend.
"""

import functools
from typing import NamedTuple

_LANES = 128
# A width block below the full width on TPU holds whole (8, 128) tiles.
_TPU_ROWS_MULTIPLE = 8
# Default TPU blocks: the whole width up to this many lanes, else 2048.
_TPU_FULL_WIDTH_MAX = 4096
_TPU_DEFAULT_BLOCK = 2048
# About 256 KiB of float32 per array block: the backward kernel double-buffers
# five such blocks, well inside the default scoped VMEM of every TPU.
_TPU_BLOCK_ELEMENTS = 1 << 16
_GPU_DEFAULT_BLOCK = 128
PLATFORMS = ("gpu", "tpu")


def available(platform=None):
    """Whether the Pallas kernel can run on `platform` here.

    Args:
        platform: `"gpu"`, `"tpu"`, or `None` for `jax.default_backend()`.

    Returns:
        `(ok, reason)`: `reason` says what is missing when `ok` is false.
    """
    try:
        import jax
    except ImportError as error:
        return False, f"jax is not installed ({error})"
    platform = platform or jax.default_backend()
    if platform not in PLATFORMS:
        return False, f"Pallas has no compiled lowering for {platform!r}"
    try:
        _compiler_params_type(platform)
    except ImportError as error:
        return False, f"the Pallas {platform} lowering does not import ({error})"
    try:
        if not jax.devices(platform):
            return False, f"no {platform} device"
    except RuntimeError as error:
        return False, f"no {platform} device ({error})"
    return True, ""


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
    import jax
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

    platform = platform or jax.default_backend()
    if platform == "cpu" and interpret:
        platform = "gpu"
    if platform not in PLATFORMS:
        raise ValueError(
            f"No Pallas kernel for platform {platform!r}; expected one of "
            f"{PLATFORMS}, or interpret=True to run on CPU."
        )
    plan = _make_plan(platform, t, l, block_width, time_block)
    config = _Config(plan, interpret, y_dtype.name, h0 is not None, x.dtype.name)
    return _differentiable_scan(config)(a, x, h0)


class _Plan(NamedTuple):
    """Static block layout of one call."""

    platform: str
    width: int  # l
    length: int  # t
    block_width: int
    padded_width: int
    time_block: int
    padded_length: int

    @property
    def num_chunks(self):
        return self.padded_length // self.time_block


class _Config(NamedTuple):
    plan: _Plan
    interpret: object
    y_dtype: str
    has_h0: bool
    x_dtype: str  # Residuals must be arrays, so the dtype of dx travels here.


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def _make_plan(platform, t, l, block_width, time_block):
    width_128 = _round_up(l, _LANES)
    if platform == "gpu":
        if time_block is not None:
            raise ValueError(
                "`time_block` applies to the TPU kernel only; a GPU program "
                "loops over the whole sequence."
            )
        bw = _GPU_DEFAULT_BLOCK if block_width is None else block_width
        if bw < _LANES or bw & (bw - 1):
            raise ValueError(
                "On GPU `block_width` must be a power of two of at least "
                f"{_LANES} (Triton loads need a power-of-two size); got {bw}."
            )
        return _Plan(platform, l, t, bw, _round_up(l, bw), t, t)

    if block_width is None:
        full = width_128 <= _TPU_FULL_WIDTH_MAX
        bw = width_128 if full else _TPU_DEFAULT_BLOCK
    elif block_width % _LANES:
        raise ValueError(
            f"On TPU `block_width` must be a multiple of {_LANES}; got {block_width}."
        )
    elif block_width >= l:
        bw = width_128
    elif block_width % (_LANES * _TPU_ROWS_MULTIPLE):
        raise ValueError(
            "On TPU a `block_width` below the width must be a multiple of "
            f"{_LANES * _TPU_ROWS_MULTIPLE} (whole (8, 128) tiles); got "
            f"{block_width} for width {l}."
        )
    else:
        bw = block_width
    if time_block is None:
        time_block = min(t, max(8, _TPU_BLOCK_ELEMENTS // bw))
    elif time_block < 1:
        raise ValueError(f"`time_block` must be positive; got {time_block}.")
    time_block = min(time_block, t)
    return _Plan(
        platform, l, t, bw, _round_up(l, bw), time_block, _round_up(t, time_block)
    )


# Layout: how arrays are padded and reshaped for the kernels, and their blocks.


def _to_sequence(plan, array, time_fill):
    """`[b, t, l]` into the kernel layout, padded with zeros / `time_fill`."""
    import jax.numpy as jnp

    pad_t = plan.padded_length - plan.length
    array = jnp.pad(array, ((0, 0), (0, 0), (0, plan.padded_width - plan.width)))
    if pad_t:
        array = jnp.pad(array, ((0, 0), (0, pad_t), (0, 0)), constant_values=time_fill)
    if plan.platform == "tpu":
        b, t, l = array.shape
        array = array.reshape(b, t, l // _LANES, _LANES)
    return array


def _from_sequence(plan, array):
    b, t = array.shape[:2]
    return array.reshape(b, t, plan.padded_width)[:, : plan.length, : plan.width]


def _to_state(plan, array):
    """`[b, l]` into the kernel layout, zero padded."""
    import jax.numpy as jnp

    array = jnp.pad(array, ((0, 0), (0, plan.padded_width - plan.width)))
    if plan.platform == "tpu":
        array = array.reshape(array.shape[0], -1, _LANES)
    return array


def _from_state(plan, array):
    return array.reshape(array.shape[0], plan.padded_width)[:, : plan.width]


def _sequence_spec(plan, reverse=False):
    from jax.experimental import pallas as pl

    n = plan.num_chunks

    def chunk(s):
        # The backward pass visits the time chunks last to first.
        return n - 1 - s if reverse else s

    if plan.platform == "gpu":
        return pl.BlockSpec(
            (None, plan.time_block, plan.block_width), lambda i, j, s: (i, 0, j)
        )
    rows = plan.block_width // _LANES
    return pl.BlockSpec(
        (None, plan.time_block, rows, _LANES),
        lambda i, j, s: (i, chunk(s), j, 0),
    )


def _state_spec(plan):
    from jax.experimental import pallas as pl

    if plan.platform == "gpu":
        return pl.BlockSpec((None, plan.block_width), lambda i, j, s: (i, j))
    rows = plan.block_width // _LANES
    return pl.BlockSpec((None, rows, _LANES), lambda i, j, s: (i, j, 0))


def _row_before_chunk_spec(plan):
    """One time step of `y`: the last one before the current (reversed) chunk."""
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    n, tc = plan.num_chunks, plan.time_block
    rows = plan.block_width // _LANES

    def index(i, j, s):
        # Squeezed dims index elements; chunk 0 reads step 0 and ignores it.
        return i, jnp.maximum((n - 1 - s) * tc - 1, 0), j, 0

    return pl.BlockSpec((None, None, rows, _LANES), index)


def _compiler_params_type(platform):
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams


def _compiler_params(plan):
    params = _compiler_params_type(plan.platform)
    if plan.platform == "gpu":
        # One warp per 128 lanes: 16-byte float32 accesses per thread. The
        # loop carries a dependence from step to step, so there is nothing
        # for software pipelining to overlap.
        return params(num_warps=min(8, plan.block_width // _LANES), num_stages=1)
    # Chunks of one width block must run in order; the carry flows through them.
    return params(dimension_semantics=("parallel", "parallel", "arbitrary"))


def _grid(plan, b):
    return (b, plan.padded_width // plan.block_width, plan.num_chunks)


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
    seq, state = _sequence_spec(plan), _state_spec(plan)
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
        grid=_grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, state),
        compiler_params=_compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_scan_forward",
    )(*args)


def _backward_call(config, a, y, dy, dh_last, h0, dx_dtype):
    import jax
    from jax.experimental import pallas as pl

    plan = config.plan
    b = a.shape[0]
    seq, state = _sequence_spec(plan, reverse=True), _state_spec(plan)
    in_specs = [seq, seq, seq, state]
    args = [a, y, dy, dh_last]
    if config.has_h0:
        in_specs.append(state)
        args.append(h0)
    if plan.num_chunks > 1:
        in_specs.append(_row_before_chunk_spec(plan))
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
        grid=_grid(plan, b),
        in_specs=in_specs,
        out_specs=(seq, seq, state),
        compiler_params=_compiler_params(plan),
        interpret=config.interpret,
        name="rg_lru_scan_backward",
    )(*args)


# The differentiable function, built once per static configuration.


def _forward(config, a, x, h0):
    import jax.numpy as jnp

    plan = config.plan
    h0_k = _to_state(plan, h0.astype(jnp.float32)) if config.has_h0 else None
    y_k, h_last = _forward_call(
        config, _to_sequence(plan, a, 1), _to_sequence(plan, x, 0), h0_k
    )
    return (_from_sequence(plan, y_k), _from_state(plan, h_last)), y_k


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
        h0_k = _to_state(plan, h0.astype(jnp.float32)) if config.has_h0 else None
        dx, da, dh0 = _backward_call(
            config,
            _to_sequence(plan, a, 1),
            y_k,
            _to_sequence(plan, dy.astype(y_k.dtype), 0),
            _to_state(plan, dh_last.astype(jnp.float32)),
            h0_k,
            config.x_dtype,
        )
        dh0 = _from_state(plan, dh0).astype(h0.dtype) if config.has_h0 else None
        return _from_sequence(plan, da), _from_sequence(plan, dx), dh0

    scan.defvjp(scan_fwd, scan_bwd)
    return jax.jit(scan)
