"""The block layout the Pallas RG-LRU kernels share: plans, padding, block specs.

Shape legend: `b` batch, `t` sequence, `l` lru_width.

A kernel runs on a grid of (batch, width block, time chunk). Each program
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
padded here and sliced off again. Time padding must carry the state through
unchanged (`a = 1`, `x = 0`, or a padding position).

Used by `ops.pallas_rg_lru` (and by the unfused scan kernel that
`tools/benchmark_scan.py` compares it with). Imports of JAX are local so that
this module imports under any backend.
"""

from typing import NamedTuple

LANES = 128
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


def resolve_platform(platform, interpret):
    """The kernel variant to build: `platform`, or JAX's default backend.

    On CPU only the interpreter runs, and it runs the GPU variant.

    Raises:
        ValueError: for a platform with no kernel.
    """
    import jax

    platform = platform or jax.default_backend()
    if platform == "cpu" and interpret:
        platform = "gpu"
    if platform not in PLATFORMS:
        raise ValueError(
            f"No Pallas kernel for platform {platform!r}; expected one of "
            f"{PLATFORMS}, or interpret=True to run on CPU."
        )
    return platform


class Plan(NamedTuple):
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


def _round_up(n, multiple):
    return -(-n // multiple) * multiple


def make_plan(platform, t, l, block_width, time_block):
    """The `Plan` for a `[b, t, l]` call; `block_width`, `time_block` as the
    kernels' arguments of the same names.

    Raises:
        ValueError: for a block size the platform's compiler would reject.
    """
    width_128 = _round_up(l, LANES)
    if platform == "gpu":
        if time_block is not None:
            raise ValueError(
                "`time_block` applies to the TPU kernel only; a GPU program "
                "loops over the whole sequence."
            )
        bw = _GPU_DEFAULT_BLOCK if block_width is None else block_width
        if bw < LANES or bw & (bw - 1):
            raise ValueError(
                "On GPU `block_width` must be a power of two of at least "
                f"{LANES} (Triton loads need a power-of-two size); got {bw}."
            )
        return Plan(platform, l, t, bw, _round_up(l, bw), t, t)

    if block_width is None:
        full = width_128 <= _TPU_FULL_WIDTH_MAX
        bw = width_128 if full else _TPU_DEFAULT_BLOCK
    elif block_width % LANES:
        raise ValueError(
            f"On TPU `block_width` must be a multiple of {LANES}; got {block_width}."
        )
    elif block_width >= l:
        bw = width_128
    elif block_width % (LANES * _TPU_ROWS_MULTIPLE):
        raise ValueError(
            "On TPU a `block_width` below the width must be a multiple of "
            f"{LANES * _TPU_ROWS_MULTIPLE} (whole (8, 128) tiles); got "
            f"{block_width} for width {l}."
        )
    else:
        bw = block_width
    if time_block is None:
        time_block = min(t, max(8, _TPU_BLOCK_ELEMENTS // bw))
    elif time_block < 1:
        raise ValueError(f"`time_block` must be positive; got {time_block}.")
    time_block = min(time_block, t)
    return Plan(
        platform, l, t, bw, _round_up(l, bw), time_block, _round_up(t, time_block)
    )


# Layout: how arrays are padded and reshaped for the kernels, and their blocks.


def to_sequence(plan, array, time_fill):
    """`[b, t, l]` into the kernel layout, padded with zeros / `time_fill`."""
    import jax.numpy as jnp

    pad_t = plan.padded_length - plan.length
    array = jnp.pad(array, ((0, 0), (0, 0), (0, plan.padded_width - plan.width)))
    if pad_t:
        array = jnp.pad(array, ((0, 0), (0, pad_t), (0, 0)), constant_values=time_fill)
    if plan.platform == "tpu":
        b, t, l = array.shape
        array = array.reshape(b, t, l // LANES, LANES)
    return array


def from_sequence(plan, array):
    b, t = array.shape[:2]
    return array.reshape(b, t, plan.padded_width)[:, : plan.length, : plan.width]


def to_state(plan, array):
    """`[b, l]` into the kernel layout, zero padded."""
    import jax.numpy as jnp

    array = jnp.pad(array, ((0, 0), (0, plan.padded_width - plan.width)))
    if plan.platform == "tpu":
        array = array.reshape(array.shape[0], -1, LANES)
    return array


def from_state(plan, array):
    return array.reshape(array.shape[0], plan.padded_width)[:, : plan.width]


def sequence_spec(plan, reverse=False):
    from jax.experimental import pallas as pl

    n = plan.num_chunks

    def chunk(s):
        # The backward pass visits the time chunks last to first.
        return n - 1 - s if reverse else s

    if plan.platform == "gpu":
        return pl.BlockSpec(
            (None, plan.time_block, plan.block_width), lambda i, j, s: (i, 0, j)
        )
    rows = plan.block_width // LANES
    return pl.BlockSpec(
        (None, plan.time_block, rows, LANES),
        lambda i, j, s: (i, chunk(s), j, 0),
    )


def state_spec(plan):
    from jax.experimental import pallas as pl

    if plan.platform == "gpu":
        return pl.BlockSpec((None, plan.block_width), lambda i, j, s: (i, j))
    rows = plan.block_width // LANES
    return pl.BlockSpec((None, rows, LANES), lambda i, j, s: (i, j, 0))


def row_before_chunk_spec(plan):
    """One time step of `y`: the last one before the current (reversed) chunk."""
    import jax.numpy as jnp
    from jax.experimental import pallas as pl

    n, tc = plan.num_chunks, plan.time_block
    rows = plan.block_width // LANES

    def index(i, j, s):
        # Squeezed dims index elements; chunk 0 reads step 0 and ignores it.
        return i, jnp.maximum((n - 1 - s) * tc - 1, 0), j, 0

    return pl.BlockSpec((None, None, rows, LANES), index)


def _compiler_params_type(platform):
    if platform == "gpu":
        from jax.experimental.pallas import triton as pltriton

        return pltriton.CompilerParams
    from jax.experimental.pallas import tpu as pltpu

    return pltpu.CompilerParams


def compiler_params(plan):
    params = _compiler_params_type(plan.platform)
    if plan.platform == "gpu":
        # One warp per 128 lanes: 16-byte float32 accesses per thread. The
        # loop carries a dependence from step to step, so there is nothing
        # for software pipelining to overlap.
        return params(num_warps=min(8, plan.block_width // LANES), num_stages=1)
    # Chunks of one width block must run in order; the carry flows through them.
    return params(dimension_semantics=("parallel", "parallel", "arbitrary"))


def grid(plan, b):
    return (b, plan.padded_width // plan.block_width, plan.num_chunks)


# The per-channel and per-token inputs of the fused kernel (`[l]` and `[b, t]`).


def to_channels(plan, w):
    import jax.numpy as jnp

    w = jnp.pad(w, (0, plan.padded_width - plan.width))
    if plan.platform == "tpu":
        w = w.reshape(-1, LANES)
    return w


def channels_spec(plan):
    from jax.experimental import pallas as pl

    if plan.platform == "gpu":
        return pl.BlockSpec((plan.block_width,), lambda i, j, s: (j,))
    rows = plan.block_width // LANES
    return pl.BlockSpec((rows, LANES), lambda i, j, s: (j, 0))


def to_positions(plan, segment_pos):
    """`[b, t]` padded in time with -1 (padding carries the state through)."""
    import jax.numpy as jnp

    pad_t = plan.padded_length - plan.length
    segment_pos = jnp.pad(segment_pos, ((0, 0), (0, pad_t)), constant_values=-1)
    if plan.platform == "tpu":
        segment_pos = segment_pos.reshape(-1, plan.num_chunks, 1, plan.time_block)
    return segment_pos


def positions_spec(plan, reverse=False):
    from jax.experimental import pallas as pl

    n = plan.num_chunks
    if plan.platform == "gpu":
        return pl.BlockSpec((None, plan.time_block), lambda i, j, s: (i, 0))
    from jax.experimental.pallas import tpu as pltpu

    def index(i, j, s):
        return i, n - 1 - s if reverse else s, 0, 0

    # A block's last two dimensions must be whole, hence the unit axis.
    return pl.BlockSpec(
        (None, None, 1, plan.time_block), index, memory_space=pltpu.SMEM
    )
