"""Dense products and embedding lookups as `keras.ops` computes them,
except on XLA's CPU with bfloat16.

XLA on a CPU (JAX) multiplies bfloat16 matrices natively (its YNNPACK
library) only as bfloat16 x bfloat16 -> float32, with neither operand a
single row or column; and it gathers bfloat16 rows from a float32 copy of
the table. Anything else it computes after converting the whole bfloat16
operand to float32. In a compiled `generate` those conversions depend on
nothing the loop changes, so XLA hoists them out of it: a float32 copy of
every kernel and of the embedding, twice the weights (the 2B's `generate`
peaked at 21.4 GiB for 5 GiB of weights), lives for the whole call.

Every weight here is a matrix `[out, in]` multiplied transposed: the
projections' kernels (`layers.dense`) and the tied embedding's logits. On
JAX on a CPU, for bfloat16:
- `matmul_transposed` computes a few rows (a decode step's one row per
  sequence, a single row taken as two equal rows, one kept) as
  `(matrix @ xᵀ)ᵀ` or `x @ matrixᵀ`, whichever this CPU's library runs
  faster (`matrix_first`, measured once per shape); more rows (a prompt,
  a training batch) contract both operands' last axes directly. It asks
  for a float32 product and rounds it back to bfloat16 (the numbers XLA
  produced anyway, up to the order of the sums);
- its gradients are products of the same kind, so a training step
  converts no weight either (`_products`);
- `take_rows` ties the table to the ids it gathers, so that only those
  rows are converted.

Measured on this project's Intel CPU: one row times the 2B's
`[7680, 2560]` kernel, 0.9 ms for eight kernels in a row (4.7 for the
same product of a kernel stored `[2560, 7680]`); the logits of one row against a
`[64000, 2560]` table, 6 ms instead of 47. In float32 a few rows take the
same `(matrix @ xᵀ)ᵀ`, with JAX's own gradients (`_products`). Other
backends, devices and dtypes get `keras.ops` itself.
"""

import functools
import math
import time

import keras
from keras import ops

# XLA hands a bfloat16 product to its library only above a few elements per
# dimension, and runs any other bfloat16 x bfloat16 -> float32 product into
# an error ("Unsupported element type for DotThunk"); the float32 copies this
# module avoids only matter for large weights anyway. Both weight dimensions
# must be at least this.
MIN_WIDTH = 64

# Up to this many rows (a decode step has one per sequence),
# `matmul_transposed` takes whichever order `matrix_first` measured faster;
# more are `x @ mᵀ`.
MAX_STACKED_ROWS = 64

# `matrix_first`'s measurement: the least time of this many products in
# each order, a matrix of at most this many elements (128 MiB in bfloat16),
# and the other order must be this much faster to be taken.
MEASURE_REPEATS = 5
MEASURE_ELEMENTS = 2**26
MEASURE_MARGIN = 0.1


def matmul_transposed(x, matrix):
    """`x [..., in] @ matrix [out, in]ᵀ` → `[..., out]` (a projection, the tied
    embedding's logits), as `keras.ops.matmul(x, keras.ops.transpose(matrix))`.

    On XLA's CPU with bfloat16: up to `MAX_STACKED_ROWS` rows, computed as
    `(matrix @ xᵀ)ᵀ` or as `x @ matrixᵀ`, whichever `matrix_first`
    measured faster for this shape on this CPU; more rows contract both
    operands' last axes directly.
    """
    x, matrix = ops.convert_to_tensor(x), ops.convert_to_tensor(matrix)
    if not all(isinstance(n, int) for n in x.shape[:-1]):
        return ops.matmul(x, ops.transpose(matrix))
    if _xla_cpu_bfloat16(x, matrix):
        return _products()[0](x, matrix)
    if _xla_cpu(x, matrix, "float32"):
        # The same forms: XLA's own `x @ matrixᵀ` of one float32 row took
        # 30 ms for a `[2560, 7680]` matrix, against 2.3 matrix first (2.8
        # against 2.3 for `[7680, 2560]`). No copy to avoid here: JAX's
        # gradients serve.
        return _products()[1](x, matrix)
    return ops.matmul(x, ops.transpose(matrix))


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
    """`matmul_transposed` for XLA's CPU: `(bfloat16, float32)`, the
    bfloat16 one with its own gradients.

    Every product, the gradients' too, is one the library runs:
    bfloat16 x bfloat16 -> float32, rounded back. With `jnp.matmul`'s own
    gradients a training step converted every weight to float32 for its
    backward product (the 2B's LoRA step peaked at 22.6 GiB for 5 GiB of
    weights). Fewer than `MIN_WIDTH` rows (a contraction over so few the
    library may refuse) take `jnp.matmul`'s gradients instead; such a step
    is small.
    """
    import jax
    import jax.numpy as jnp

    def as_rows(x):
        return jnp.reshape(x, (-1, x.shape[-1]))

    def product(x, matrix):
        rows = as_rows(x)
        n = rows.shape[0]
        if n > MAX_STACKED_ROWS:
            y = _dot(rows, matrix, 1, 1)
        else:
            if n == 1 and matrix.dtype == jnp.bfloat16:
                # The library takes no one-row operand: two equal rows, one
                # kept. (In float32 the second row would cost 20%.)
                rows = jnp.broadcast_to(rows, (2, rows.shape[1]))
            if matrix_first(tuple(matrix.shape), rows.shape[0], str(matrix.dtype)):
                y = jnp.transpose(_dot(matrix, rows, 1, 1)[:, :n])
            else:
                y = _dot(rows, matrix, 1, 1)[:n]
        return jnp.reshape(y.astype(matrix.dtype), x.shape[:-1] + (-1,))

    def gradients(x, matrix, grad):
        """For `grad [.., out]`: `grad · matrix` over `out`, and `gradᵀ x`."""
        rows, grad_rows = as_rows(x), as_rows(grad)
        grad_x = _dot(grad_rows, matrix, 1, 0).astype(x.dtype)
        grad_matrix = _dot(grad_rows, rows, 0, 0).astype(matrix.dtype)
        return jnp.reshape(grad_x, x.shape), grad_matrix

    def plain(x, matrix):
        return jnp.matmul(x, matrix.T)

    bfloat16 = jax.custom_vjp(product)

    def forward(*args):
        return bfloat16(*args), args

    def backward(args, grad):
        if math.prod(args[0].shape[:-1]) < MIN_WIDTH:
            return jax.vjp(plain, *args)[1](grad)
        return gradients(*args, grad)

    bfloat16.defvjp(forward, backward)
    return bfloat16, product


def _dot(a, b, a_axis, b_axis):
    """`a [m, ·] · b [·, n]` contracted over the two named axes, in float32."""
    import jax

    numbers = (((a_axis,), (b_axis,)), ((), ()))
    return jax.lax.dot_general(a, b, numbers, preferred_element_type="float32")


@functools.cache
def matrix_first(shape, rows, dtype):
    """Whether `rows` rows times a matrix of `shape` `[out, in]` run faster
    as `(matrix @ xᵀ)ᵀ` than as `x @ matrixᵀ` on this CPU (measured once
    per shape in a process, when the product is first traced).

    Which order the library runs faster depends on the CPU. Least of
    `MEASURE_REPEATS` one-row products (two rows given, one kept), bfloat16:
    on an Intel Xeon with AMX, the 2B's `[7680, 2560]` took 0.9 ms matrix
    first against 1.6; on an AMD EPYC (AVX-512 BF16, no AMX), the 9B's
    `[12288, 4096]` 9.5 ms against 6.4, and `[4096, 12288]` 11.6 against
    6.7 (torch 5.3 and 5.1), where the 2B's kernels took about the same
    either way. Both orders sum the same float32 products, in their own
    order. The matrix stays first unless the other order is faster by
    more than `MEASURE_MARGIN`, so that noise does not swap them.
    """
    import jax
    import jax.numpy as jnp

    out_dim, in_dim = shape
    # The product is row by row of the matrix: a large one (the 9B's
    # embedding) is timed on its first rows, enough to exceed the caches.
    out_dim = min(out_dim, max(MIN_WIDTH, MEASURE_ELEMENTS // in_dim))

    def first(x, matrix):
        return _dot(matrix, x, 1, 1)

    def second(x, matrix):
        return _dot(x, matrix, 1, 1)

    # Concrete arrays and calls, also while an outer function is traced.
    with jax.ensure_compile_time_eval():
        # Written values: untouched zero pages would read faster than weights.
        matrix = jnp.full((out_dim, in_dim), 0.01, dtype)
        x = jnp.full((rows, in_dim), 0.01, dtype)
        forms = [jax.jit(first), jax.jit(second)]
        least = [float("inf")] * 2
        for _ in range(MEASURE_REPEATS + 1):  # The first call compiles.
            for i, form in enumerate(forms):
                start = time.perf_counter()
                form(x, matrix).block_until_ready()
                least[i] = min(least[i], time.perf_counter() - start)
    return least[1] * (1 + MEASURE_MARGIN) >= least[0]


def _xla_cpu_bfloat16(x, weight):
    """Whether `x` times the 2-D `weight` is one of this module's bfloat16
    cases."""
    return _xla_cpu(x, weight, "bfloat16")


def _xla_cpu(x, weight, dtype):
    """Whether `x` and the 2-D `weight`, both `dtype`, multiply on XLA's
    CPU without a distribution."""
    if keras.config.backend() != "jax" or len(weight.shape) != 2:
        return False
    dtypes = {keras.backend.standardize_dtype(t.dtype) for t in (x, weight)}
    if dtypes != {dtype} or min(weight.shape) < MIN_WIDTH:
        return False
    # Under a distribution XLA partitions the product, and a shard may be
    # one the library refuses.
    if keras.distribution.distribution() is not None:
        return False
    import jax

    return jax.default_backend() == "cpu"
