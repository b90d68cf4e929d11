"""Dense products and embedding lookups as `keras.ops` computes them,
except on XLA's CPU with bfloat16.

XLA on a CPU (JAX) multiplies bfloat16 matrices natively (its YNNPACK
library) only as bfloat16 x bfloat16 -> float32, with neither operand a
single row or column or read transposed; and it gathers bfloat16 rows from
a float32 copy of the table. Anything else it computes after converting the
whole bfloat16 operand to float32. In a compiled `generate` those
conversions depend on nothing the loop changes, so XLA hoists them out of
it: a float32 copy of every kernel and of the embedding, twice the weights
(the 2B's `generate` peaked at 21.4 GiB for 5 GiB of weights), lives for
the whole call.

So on JAX on a CPU, for bfloat16:
- `matmul` asks for a float32 product and rounds it back to bfloat16 (the
  numbers XLA produced anyway, up to the order of the sums), multiplying a
  single row (a decode step's `[1, d]`) as two equal rows, one kept;
- `matmul_transposed` (the tied embedding's logits) computes
  `(matrix @ xᵀ)ᵀ`, `xᵀ` built column by column;
- `take_rows` ties the table to the ids it gathers, so that only those
  rows are converted.

Measured on this project's CPU: one row times the 2B's `[2560, 7680]`
kernel, 1.9 ms either way; the logits of one row against a `[64000, 2560]`
table, 6 ms instead of 47. Other backends, devices and dtypes get
`keras.ops` itself.
"""

import functools
import math

import keras
from keras import ops

# XLA hands a bfloat16 product to its library only above a few elements per
# dimension, and runs any other bfloat16 x bfloat16 -> float32 product into
# an error ("Unsupported element type for DotThunk"); the float32 copies this
# module avoids only matter for large weights anyway. Both weight dimensions
# must be at least this.
MIN_WIDTH = 64

# Up to this many rows, `matmul_transposed` builds the transposed input row
# by row (a decode step has one per sequence); more go through `keras.ops`.
MAX_STACKED_ROWS = 64


def matmul(x, kernel):
    """`x [..., i] @ kernel [i, o]` → `[..., o]`, as `keras.ops.matmul`."""
    # Converted first: a variable reads as the compute dtype under autocast.
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    if not _xla_cpu_bfloat16(x, kernel):
        return ops.matmul(x, kernel)
    return _products()[0](x, kernel)


def matmul_transposed(x, matrix):
    """`x [..., i] @ matrix [o, i]ᵀ` → `[..., o]` (the tied embedding's
    logits), as `keras.ops.matmul(x, keras.ops.transpose(matrix))`.

    On XLA's CPU with bfloat16 and at most `MAX_STACKED_ROWS` rows, computed
    as `(matrix @ xᵀ)ᵀ`: `matrix` is then read as stored, and `xᵀ` is built
    column by column from `x`'s rows, so no operand is a transposed view,
    which the bfloat16 kernel cannot read (XLA would convert the whole
    `matrix`, 2.4 GiB of float32 for the 2B's embedding, instead).
    """
    x, matrix = ops.convert_to_tensor(x), ops.convert_to_tensor(matrix)
    lead = tuple(x.shape[:-1])
    if (
        not _xla_cpu_bfloat16(x, matrix)
        or not all(isinstance(n, int) for n in lead)
        or math.prod(lead) > MAX_STACKED_ROWS
    ):
        return ops.matmul(x, ops.transpose(matrix))
    return _products()[1](x, matrix)


def take_rows(table, ids):
    """`table [v, d]` rows at `ids [...]` → `[..., d]`, as
    `keras.ops.take(table, ids, axis=0)`."""
    table, ids = ops.convert_to_tensor(table), ops.convert_to_tensor(ids)
    if _xla_cpu_bfloat16(table, table):
        import jax

        # Tied to `ids` by the barrier, `table` is no longer invariant in a
        # decode loop: XLA then converts only the rows it gathers, at each
        # step, instead of hoisting a float32 copy of the whole table out
        # of the loop. Both pass through unchanged (gradients included).
        table, ids = jax.lax.optimization_barrier((table, ids))
    return ops.take(table, ids, axis=0)


@functools.cache
def _products():
    """`(matmul, matmul_transposed)` for XLA's CPU with bfloat16.

    Forward only: their gradients are `jnp.matmul`'s, which XLA computes
    its own way (training converts each weight for its product and drops
    the copy; no loop holds it).
    """
    import jax
    import jax.numpy as jnp

    def product(x, kernel):
        lead = tuple(x.shape[:-1])
        rows = jnp.reshape(x, (-1, x.shape[-1]))
        if rows.shape[0] == 1:
            # The library takes no one-row operand: two equal rows, one kept.
            rows = jnp.broadcast_to(rows, (2, rows.shape[1]))
        y = jnp.matmul(rows, kernel, preferred_element_type=jnp.float32)
        return jnp.reshape(y[: math.prod(lead)].astype(kernel.dtype), lead + (-1,))

    def product_transposed(x, matrix):
        lead = tuple(x.shape[:-1])
        n = math.prod(lead)
        rows = jnp.reshape(x, (n, x.shape[-1]))
        columns = [rows[r] for r in range(n)] * (2 if n == 1 else 1)
        y = jnp.matmul(
            matrix, jnp.stack(columns, axis=-1), preferred_element_type=jnp.float32
        )
        y = jnp.transpose(y[:, :n]).astype(matrix.dtype)
        return jnp.reshape(y, lead + (matrix.shape[0],))

    def plain(x, kernel):
        return jnp.matmul(x, kernel)

    def plain_transposed(x, matrix):
        return jnp.matmul(x, matrix.T)

    def with_plain_gradient(fn, reference):
        fn = jax.custom_vjp(fn)

        def forward(*args):
            return fn(*args), args

        def backward(args, grad):
            return jax.vjp(reference, *args)[1](grad)

        fn.defvjp(forward, backward)
        return fn

    return (
        with_plain_gradient(product, plain),
        with_plain_gradient(product_transposed, plain_transposed),
    )


def _xla_cpu_bfloat16(x, weight):
    """Whether `x` times the 2-D `weight` is one of this module's cases."""
    if keras.config.backend() != "jax" or len(weight.shape) != 2:
        return False
    dtypes = {keras.backend.standardize_dtype(t.dtype) for t in (x, weight)}
    if dtypes != {"bfloat16"} or min(weight.shape) < MIN_WIDTH:
        return False
    # Under a distribution XLA partitions the product, and a shard may be
    # one the library refuses.
    if keras.distribution.distribution() is not None:
        return False
    import jax

    return jax.default_backend() == "cpu"
