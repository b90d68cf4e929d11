"""`ops.xla_cpu`: the products and lookups of `keras.ops`, without XLA's
float32 copies of bfloat16 weights on a CPU.

On every backend each function equals the `keras.ops` expression it stands
for (values, and the lookup's gradient). On JAX on a CPU, a compiled loop
that multiplies by a bfloat16 kernel `[out, in]`, takes logits against a
bfloat16 table or looks rows up in it holds no float32 copy of the kernel or
table: the
copy XLA otherwise hoists out of a `generate` loop (21 GiB for the 2B);
and the gradient of a product with respect to its input holds none either
(what a LoRA step needs of a frozen kernel).
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.ops import xla_cpu
from tests.backend_grad import value_and_grad
from tests.tolerances import KERNEL
from tests.tolerances import SELF_CONSISTENCY

JAX = keras.config.backend() == "jax"
# At least `MIN_WIDTH`, so that JAX on a CPU takes the bfloat16 path.
I, O, V = 64, 96, 128


def tensor(shape, dtype, seed):
    values = np.random.default_rng(seed).normal(size=shape).astype("float32")
    return ops.cast(values, dtype)


def to_numpy(x):
    return np.asarray(ops.convert_to_numpy(ops.cast(x, "float32")), "float64")


def tolerance(dtype):
    # Both sides sum exact products in float32 and round once; the order of
    # the sums may move that rounding by one bfloat16 ulp.
    return KERNEL["bfloat16"] if dtype == "bfloat16" else SELF_CONSISTENCY["float32"]


@pytest.fixture(params=["matrix first", "x first"])
def order(request, monkeypatch):
    """Each order of a few-row product on JAX, whichever this CPU measures
    faster (`matrix_first`); other backends have one."""
    if request.param == "x first" and not JAX:
        pytest.skip("one order outside JAX")
    first = request.param == "matrix first"
    monkeypatch.setattr(xla_cpu, "matrix_first", lambda *_: first)
    return first


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("lead", [(), (1,), (1, 1), (3, 1), (8, 1), (2, 5), (1, 70)])
def test_matmul_transposed_equals_keras_matmul(lead, dtype, order):
    # (1, 70) has more rows than MAX_STACKED_ROWS: `x @ mᵀ`, not `(m xᵀ)ᵀ`.
    x, table = tensor(lead + (I,), dtype, 2), tensor((V, I), dtype, 3)
    y = xla_cpu.matmul_transposed(x, table)
    assert tuple(y.shape) == lead + (V,)
    expected = ops.matmul(x, ops.transpose(table))
    np.testing.assert_allclose(to_numpy(y), to_numpy(expected), **tolerance(dtype))


@pytest.mark.parametrize("lead", [(1, 1), (2, 40)])
def test_products_have_keras_gradients(lead):
    # Of a bfloat16 product. On JAX on a CPU, (1, 1) takes `jnp.matmul`'s
    # gradients and (2, 40), at least MIN_WIDTH rows, the module's own.
    x = np.random.default_rng(8).normal(size=lead + (I,)).astype("float32")
    weight = np.random.default_rng(9).normal(size=(V, I)).astype("float32")

    def loss(product):
        def fn(x, weight):
            y = product(ops.cast(x, "bfloat16"), ops.cast(weight, "bfloat16"))
            return ops.sum(ops.square(ops.cast(y, "float32")))

        return fn

    ours = loss(xla_cpu.matmul_transposed)
    plain = loss(lambda x, m: ops.matmul(x, ops.transpose(m)))
    _, grads = value_and_grad(ours, x, weight)
    _, expected = value_and_grad(plain, x, weight)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, **KERNEL["bfloat16"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_take_rows_equals_take_and_has_its_gradient(dtype):
    table = np.random.default_rng(4).normal(size=(V, I)).astype("float32")
    ids = np.array([[3, 0], [127, 3]], "int32")  # 3 twice: summed gradients
    weights = np.random.default_rng(5).normal(size=(2, 2, I)).astype("float32")

    def loss(take):
        def fn(t):
            rows = take(ops.cast(t, dtype), ops.convert_to_tensor(ids))
            return ops.sum(ops.cast(rows, "float32") * ops.convert_to_tensor(weights))

        return fn

    value, (grad,) = value_and_grad(loss(xla_cpu.take_rows), table)
    plain = loss(lambda t, i: ops.take(t, i, axis=0))
    expected_value, (expected,) = value_and_grad(plain, table)
    np.testing.assert_array_equal(value, expected_value)
    np.testing.assert_allclose(grad, expected, **tolerance(dtype))


def temporary_bytes(fn, *args):
    """Bytes of scratch memory `fn`'s compiled (CPU) program allocates."""
    import jax

    compiled = jax.jit(fn).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


@pytest.mark.skipif(not JAX, reason="XLA's CPU conversions: JAX")
def test_a_jax_decode_loop_holds_no_float32_copy_of_the_weights(order):
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("XLA's CPU")
    kernel = tensor((O, I), "bfloat16", 6)  # `[out, in]`, as `layers.dense`
    table = tensor((V, I), "bfloat16", 7)

    def decode_loop(take, product, logits):
        # One token per step, as `generate`'s loop feeds them.
        def run(kernel, table):
            def body(i, state):
                token, x = state
                x = x + take(table, token)[:, 0]
                hidden = product(x[:, None], kernel)[:, 0, :I]
                scores = logits(hidden, table)
                return jax.numpy.argmax(scores, -1)[:, None].astype("int32"), hidden

            start = (
                jax.numpy.zeros((1, 1), "int32"),
                jax.numpy.zeros((1, I), "bfloat16"),
            )
            return jax.lax.fori_loop(0, 4, body, start)

        return run

    ours = decode_loop(
        xla_cpu.take_rows, xla_cpu.matmul_transposed, xla_cpu.matmul_transposed
    )
    # Under the bfloat16 table's size; a float32 copy of either weight would
    # be at least 4 I O bytes.
    assert temporary_bytes(ours, kernel, table) < 2 * I * O

    # The same loop through `keras.ops` does hold them: what the test guards.
    plain = decode_loop(
        lambda t, i: ops.take(t, i, 0),
        lambda h, t: ops.matmul(h, ops.transpose(t)),
        lambda h, t: ops.matmul(h, ops.transpose(t)),
    )
    assert temporary_bytes(plain, kernel, table) >= 4 * (I * O + V * I)


@pytest.mark.skipif(not JAX, reason="XLA's CPU conversions: JAX")
def test_a_jax_input_gradient_holds_no_float32_copy_of_the_weight():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("XLA's CPU")
    rows, width = xla_cpu.MIN_WIDTH, 512
    x = tensor((1, rows, width), "bfloat16", 10)
    weight = tensor((width, width), "bfloat16", 11)

    def input_gradient(product):
        def loss(x, weight):
            y = product(x, weight)
            return jax.numpy.sum(jax.numpy.square(y.astype("float32")))

        return jax.grad(loss)

    ours = input_gradient(xla_cpu.matmul_transposed)
    plain = input_gradient(lambda x, m: ops.matmul(x, ops.transpose(m)))
    # A float32 copy of the weight is 4 width² bytes; the step's own
    # tensors (rows x width, float32) are an eighth of that.
    assert temporary_bytes(ours, x, weight) < 4 * width * width
    # `keras.ops`'s gradient does convert it: what the test guards.
    assert temporary_bytes(plain, x, weight) >= 4 * width * width


@pytest.mark.skipif(not JAX, reason="XLA's CPU: JAX")
def test_the_faster_order_is_measured_once_per_shape_also_under_jit():
    import jax

    if jax.default_backend() != "cpu":
        pytest.skip("XLA's CPU")
    xla_cpu.matrix_first.cache_clear()
    x, kernel = tensor((1, 1, I), "bfloat16", 12), tensor((O, I), "bfloat16", 13)
    # Measured while `jax.jit` traces: concrete arrays, not tracers.
    y = jax.jit(xla_cpu.matmul_transposed)(x, kernel)
    expected = ops.matmul(x, ops.transpose(kernel))
    np.testing.assert_allclose(to_numpy(y), to_numpy(expected), **KERNEL["bfloat16"])
    info = xla_cpu.matrix_first.cache_info()
    assert (info.misses, info.currsize) == (1, 1)
    choice = xla_cpu.matrix_first((O, I), 2, "bfloat16")
    assert isinstance(choice, bool)
    xla_cpu.matmul_transposed(x, kernel)
    assert xla_cpu.matrix_first.cache_info().misses == 1
