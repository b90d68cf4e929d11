"""The Griffin layers: known values, numpy references, serialization, bfloat16.

Shape legend: `b` batch, `t` sequence, `d` hidden_dim, `l` lru_width,
`n` heads, `k` head_dim.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.layers import RGLRU
from keras_recurrentgemma.layers import BlockDiagonalLinear
from keras_recurrentgemma.layers import Conv1D
from keras_recurrentgemma.layers import LocalAttentionBlock
from keras_recurrentgemma.layers import MLPBlock
from keras_recurrentgemma.layers import RecurrentBlock
from keras_recurrentgemma.layers import ResidualBlock
from keras_recurrentgemma.layers import RMSNormalization
from keras_recurrentgemma.layers import SegmentPositions
from keras_recurrentgemma.ops.rg_lru import sqrt_bound_derivative
from tests.backend_grad import value_and_grad
from tests.tolerances import LOCAL_ATTENTION_NUMPY
from tests.tolerances import SELF_CONSISTENCY

TOL = SELF_CONSISTENCY["float32"]

B, T, D, L, HEADS, WINDOW = 2, 11, 16, 24, 2, 3
# Row 0: two pads, a document of 4 tokens, then a second document (packed).
# Row 1: continues a document from before the chunk, then two new documents.
SEGMENT_POS = np.array(
    [
        [-1, -1, 0, 1, 2, 3, 0, 1, 2, 3, 4],
        [5, 6, 7, 0, 1, 2, 0, 1, 2, 3, 4],
    ],
    dtype="int32",
)


def to_numpy(x):
    x = ops.convert_to_numpy(ops.cast(x, "float32"))
    return np.asarray(x, dtype=np.float64)


def dtype_of(x):
    return keras.backend.standardize_dtype(x.dtype)


def randomize_weights(layer, seed=0, scale=0.5):
    """Replaces every weight (biases and zero-initialised scales included)."""
    rng = np.random.default_rng(seed)
    layer.set_weights(
        [rng.normal(scale=scale, size=w.shape).astype("float32") for w in layer.weights]
    )


def random_x(width, seed=1):
    return np.random.default_rng(seed).normal(size=(B, T, width)).astype("float32")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.log1p(np.exp(x))


def same_document(segment_pos):
    """`[b, t, t]`: query and key lie in the same document (from positions)."""
    doc = np.cumsum(segment_pos == 0, axis=1)
    return doc[:, :, None] == doc[:, None, :]


# --- RMSNormalization ------------------------------------------------------


def test_rms_normalization_official_vector():
    # `recurrentgemma/jax/layers_test.py`, scale initialised to zeros.
    layer = RMSNormalization()
    y = layer(np.array([[0.1, 0.2]], dtype="float32"))
    np.testing.assert_allclose(
        to_numpy(y)[0], [0.6324429, 1.2648858], rtol=TOL["rtol"], atol=TOL["atol"]
    )


# --- Conv1D ----------------------------------------------------------------


def numpy_conv1d(x, w, b, segment_pos):
    """y_t = b + Σ_s w[k-1-s] x_{t-s}, skipping t-s<0 and document starts."""
    k = w.shape[0]
    y = np.zeros(x.shape) + b
    for row in range(x.shape[0]):
        for t in range(x.shape[1]):
            for s in range(k):
                if t - s < 0:
                    continue
                if np.any(segment_pos[row, t - s + 1 : t + 1] == 0):
                    continue
                y[row, t] += w[k - 1 - s] * x[row, t - s]
    return y


@pytest.mark.parametrize("temporal_width", [1, 2, 4])
def test_conv1d_matches_numpy_loop(temporal_width):
    x = random_x(L)
    layer = Conv1D(temporal_width)
    layer.build(x.shape)
    randomize_weights(layer)
    w, b = (to_numpy(v) for v in (layer.w, layer.b))
    y, _ = layer(x, SEGMENT_POS)
    np.testing.assert_allclose(to_numpy(y), numpy_conv1d(x, w, b, SEGMENT_POS), **TOL)


def test_conv1d_unpacked_rows_use_full_window():
    # Without document starts inside the row, every earlier token counts.
    x = random_x(L)
    positions = np.tile(np.arange(10, 10 + T, dtype="int32"), (B, 1))
    layer = Conv1D(4)
    layer.build(x.shape)
    randomize_weights(layer)
    w, b = (to_numpy(v) for v in (layer.w, layer.b))
    full = np.zeros(x.shape) + b
    for s in range(4):
        full[:, s:] += w[3 - s] * x[:, : T - s]
    np.testing.assert_allclose(to_numpy(layer(x, positions)[0]), full, **TOL)


# One token per row, as a decode step feeds it: padding, a document start, a
# continued document, and one continued past the attention window.
STEP_POS = np.array([[-1], [0], [2], [7]], dtype="int32")


def chunk_of_step(x):
    """`x` `[b, 1, ...]` followed by a padding column: the chunk path's view
    of a single token (the padding changes neither output nor cache)."""
    return np.concatenate([x, np.zeros_like(x)], axis=1)


def assert_step_equals_chunk(layer, x, cache):
    """`layer` on one token equals its chunk path on that token plus padding."""
    rows = len(STEP_POS)
    padded = np.concatenate([STEP_POS, np.full((rows, 1), -1, "int32")], axis=1)
    y, new_cache = layer(x, STEP_POS, cache)
    y_chunk, chunk_cache = layer(chunk_of_step(x), padded, cache)
    # A padding token's output is unused (attention gives it no key).
    real = STEP_POS[:, 0] >= 0
    np.testing.assert_allclose(to_numpy(y)[real], to_numpy(y_chunk)[real, :1], **TOL)
    for got, want in zip(
        keras.tree.flatten(new_cache), keras.tree.flatten(chunk_cache), strict=True
    ):
        np.testing.assert_array_equal(to_numpy(got), to_numpy(want))


@pytest.mark.parametrize("temporal_width", [1, 2, 4])
def test_conv1d_one_token_step_equals_the_chunk_path(temporal_width):
    rng = np.random.default_rng(3)
    rows = len(STEP_POS)
    x = rng.normal(size=(rows, 1, L)).astype("float32")
    state = rng.normal(size=(rows, temporal_width - 1, L)).astype("float32")
    layer = Conv1D(temporal_width)
    layer.build(x.shape)
    randomize_weights(layer)
    assert_step_equals_chunk(layer, x, state)


# --- RG-LRU ----------------------------------------------------------------


def numpy_rg_lru(x, segment_pos, h0, a_param, w_in, b_in, w_a, b_a):
    """SPEC §2 RG-LRU, one step at a time in float64; padding keeps the state."""
    b, t, l = x.shape
    h = w_in.shape[0]
    xb = x.reshape(b, t, h, l // h)
    gate_x = sigmoid(np.einsum("bthi,hij->bthj", xb, w_in) + b_in).reshape(b, t, l)
    gate_a = sigmoid(np.einsum("bthi,hij->bthj", xb, w_a) + b_a).reshape(b, t, l)
    log_a = -8.0 * gate_a * softplus(a_param)
    a = np.exp(log_a)
    a_square = np.exp(2.0 * log_a)
    reset = (segment_pos == 0)[..., None]
    multiplier = np.where(reset, 1.0, np.sqrt(1.0 - a_square))
    x_hat = x * gate_x * multiplier
    pad = (segment_pos < 0)[..., None]
    state = np.zeros((b, l)) if h0 is None else h0.astype(np.float64)
    ys = []
    for step in range(t):
        new = a[:, step] * (1.0 - reset[:, step]) * state + x_hat[:, step]
        state = np.where(pad[:, step], state, new)
        ys.append(state)
    return np.stack(ys, axis=1), state


def build_rg_lru(x):
    layer = RGLRU(HEADS)
    layer.build(x.shape)
    randomize_weights(layer)
    return layer


def rg_lru_params(layer):
    return [
        to_numpy(v)
        for v in (
            layer.a_param,
            layer.input_gate.w,
            layer.input_gate.b,
            layer.a_gate.w,
            layer.a_gate.b,
        )
    ]


@pytest.mark.parametrize("with_h0", [False, True])
def test_rg_lru_matches_sequential_numpy(with_h0):
    x = random_x(L)
    h0 = np.random.default_rng(2).normal(size=(B, L)).astype("float32")
    h0 = h0 if with_h0 else None
    layer = build_rg_lru(x)
    y, h_last = layer(x, SEGMENT_POS, h0)
    y_ref, h_ref = numpy_rg_lru(x, SEGMENT_POS, h0, *rg_lru_params(layer))
    assert dtype_of(h_last) == "float32"
    np.testing.assert_allclose(to_numpy(y), y_ref, **TOL)
    np.testing.assert_allclose(to_numpy(h_last), h_ref, **TOL)


def test_rg_lru_h0_reaches_only_the_first_document():
    # Row 1 continues a document from h0 until position 0 at index 3; row 0
    # starts with pads, which carry h0 along, then resets at index 2.
    x = random_x(L)
    h0 = np.random.default_rng(3).normal(size=(B, L)).astype("float32")
    layer = build_rg_lru(x)
    y_with, _ = layer(x, SEGMENT_POS, h0)
    y_without, _ = layer(x, SEGMENT_POS)
    diff = np.abs(to_numpy(y_with) - to_numpy(y_without)).max(axis=-1)
    first_reset = [2, 3]
    for row, start in enumerate(first_reset):
        assert np.all(diff[row, :start] > 0.0)
        np.testing.assert_array_equal(diff[row, start:], 0.0)


@pytest.mark.parametrize("x", [0.0, 1e-12, 1e-9, 1e-7])
def test_sqrt_bound_derivative_caps_gradient_at_1000(x):
    value, (grad,) = value_and_grad(
        lambda v: ops.sum(sqrt_bound_derivative(v)), np.array([x], "float32")
    )
    np.testing.assert_allclose(value, np.sqrt(np.float32(x)), **TOL)
    np.testing.assert_allclose(grad, [1000.0], **TOL)


def test_sqrt_bound_derivative_is_sqrt_above_the_cap():
    x = np.array([2.5e-7, 1e-4, 0.25, 0.81, 1.0], "float32")
    value, (grad,) = value_and_grad(lambda v: ops.sum(sqrt_bound_derivative(v)), x)
    np.testing.assert_allclose(value, np.sqrt(x.astype(np.float64)).sum(), **TOL)
    np.testing.assert_allclose(grad, 0.5 / np.sqrt(x.astype(np.float64)), **TOL)


# --- LocalAttentionBlock ---------------------------------------------------


def numpy_rope(x, positions, max_wavelength=10_000):
    """Rotate-half RoPE on the first half of the last axis of `[b, t, n, k]`."""
    rope_dim = x.shape[-1] // 2
    half = rope_dim // 2
    frequencies = max_wavelength ** (-2.0 * np.arange(half) / rope_dim)
    theta = positions[:, :, None, None] * frequencies
    x1, x2, rest = x[..., :half], x[..., half:rope_dim], x[..., rope_dim:]
    sin, cos = np.sin(theta), np.cos(theta)
    return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], -1)


def numpy_local_attention(x, segment_pos, window, num_heads, wq, wk, wv, wo, bo):
    b, t, d = x.shape
    k_dim = d // num_heads
    q = numpy_rope((x @ wq).reshape(b, t, num_heads, k_dim), segment_pos)
    k = numpy_rope((x @ wk)[:, :, None], segment_pos)[:, :, 0]
    v = x @ wv
    out = np.zeros((b, t, num_heads, k_dim))
    visible = same_document(segment_pos) & (segment_pos >= 0)[:, None, :]
    for row in range(b):
        for query in range(t):
            if segment_pos[row, query] < 0:
                continue  # padding queries see no key; their output is unused
            keys = [
                key
                for key in range(max(0, query - window), query + 1)
                if visible[row, query, key]
            ]
            scores = q[row, query] @ k[row, keys].T / np.sqrt(k_dim)  # [n, s]
            p = np.exp(scores - scores.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[row, query] = p @ v[row, keys]
    return out.reshape(b, t, d) @ wo + bo


@pytest.mark.parametrize("window", [1, WINDOW, T])
def test_local_attention_matches_numpy(window):
    x = random_x(D)
    layer = LocalAttentionBlock(D, HEADS, window)
    layer.build(x.shape)
    randomize_weights(layer)
    # The reference multiplies `x @ W` with `W [in, out]`; ours are
    # stored `[out, in]`.
    kernels = [
        to_numpy(dense.kernel).T
        for dense in (layer.proj_q, layer.proj_k, layer.proj_v, layer.proj_final)
    ]
    weights = kernels + [to_numpy(layer.proj_final.bias)]
    expected = numpy_local_attention(x, SEGMENT_POS, window, HEADS, *weights)
    real = SEGMENT_POS >= 0
    y, _ = layer(x, SEGMENT_POS)
    np.testing.assert_allclose(
        to_numpy(y)[real], expected[real], **LOCAL_ATTENTION_NUMPY["float32"]
    )


def test_local_attention_one_token_step_equals_the_chunk_path():
    from keras_recurrentgemma.layers.local_attention import AttentionBlockCache

    rng = np.random.default_rng(4)
    rows, k_dim = len(STEP_POS), D // HEADS
    x = rng.normal(size=(rows, 1, D)).astype("float32")
    # Slot positions need not be consistent for the two paths to agree; empty
    # slots (-1) and ones outside the window are both covered.
    cache = AttentionBlockCache(
        keys=rng.normal(size=(rows, WINDOW, k_dim)).astype("float32"),
        values=rng.normal(size=(rows, WINDOW, k_dim)).astype("float32"),
        positions=np.array(
            [[-1, 1, 2], [3, 4, -1], [0, 1, -1], [6, 3, 5]], dtype="int32"
        ),
    )
    layer = LocalAttentionBlock(D, HEADS, WINDOW)
    layer.build(x.shape)
    randomize_weights(layer)
    assert_step_equals_chunk(layer, x, cache)


# --- Every layer: serialization and bfloat16 --------------------------------


def residual_block(block_type):
    return lambda dtype: ResidualBlock(
        block_type,
        hidden_dim=D,
        intermediate_dim=40,
        num_heads=HEADS,
        lru_width=L,
        attention_window_size=WINDOW,
        dtype=dtype,
    )


def model_inputs(width):
    return lambda: (random_x(width), SEGMENT_POS)


# name: (factory(dtype) -> layer, inputs() -> positional call args)
LAYERS = {
    "rms_normalization": (
        lambda dtype: RMSNormalization(dtype=dtype),
        lambda: (random_x(D),),
    ),
    "block_diagonal_linear": (
        lambda dtype: BlockDiagonalLinear(HEADS, dtype=dtype),
        lambda: (random_x(L),),
    ),
    "conv1d": (lambda dtype: Conv1D(4, dtype=dtype), model_inputs(L)),
    "rg_lru": (
        lambda dtype: RGLRU(HEADS, dtype=dtype),
        lambda: (
            random_x(L),
            SEGMENT_POS,
            np.random.default_rng(4).normal(size=(B, L)).astype("float32"),
        ),
    ),
    "recurrent_block": (
        lambda dtype: RecurrentBlock(D, L, HEADS, dtype=dtype),
        model_inputs(D),
    ),
    "local_attention_block": (
        lambda dtype: LocalAttentionBlock(D, HEADS, WINDOW, dtype=dtype),
        model_inputs(D),
    ),
    "mlp_block": (lambda dtype: MLPBlock(D, 40, dtype=dtype), lambda: (random_x(D),)),
    "residual_block_recurrent": (residual_block("recurrent"), model_inputs(D)),
    "residual_block_attention": (residual_block("attention"), model_inputs(D)),
    "segment_positions": (
        lambda dtype: SegmentPositions(97),
        lambda: (
            np.random.default_rng(5).integers(0, 97, size=(B, T)).astype("int32"),
            (SEGMENT_POS >= 0).astype("int32"),
            np.maximum(SEGMENT_POS, 0),
        ),
    ),
}


def outputs(layer, args):
    """Every output tensor, caches included, flattened in a fixed order."""
    return keras.tree.flatten(layer(*args))


def assert_same_outputs(original, copy, args):
    expected = outputs(original, args)  # builds `original` if needed
    outputs(copy, args)  # builds the copy
    copy.set_weights(original.get_weights())
    actual = outputs(copy, args)
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert dtype_of(a) == dtype_of(e)
        np.testing.assert_array_equal(to_numpy(a), to_numpy(e))


def built_layer(name):
    """Layer `name` built on its inputs, with random weights, and the inputs."""
    factory, inputs = LAYERS[name]
    args = inputs()
    layer = factory(None)
    outputs(layer, args)
    if layer.weights:
        randomize_weights(layer, scale=0.3)
    return layer, args


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_get_config_round_trip(name):
    layer, args = built_layer(name)
    config = layer.get_config()
    copy = type(layer).from_config(config)
    assert copy.get_config() == config
    assert_same_outputs(layer, copy, args)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_keras_serialization_round_trip(name):
    layer, args = built_layer(name)
    serialized = keras.saving.serialize_keras_object(layer)
    copy = keras.saving.deserialize_keras_object(serialized)
    assert type(copy) is type(layer)
    assert copy.get_config() == layer.get_config()
    assert_same_outputs(layer, copy, args)


@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"segment_positions"}))
def test_bfloat16_outputs(name):
    factory, inputs = LAYERS[name]
    layer = factory("bfloat16")
    result = outputs(layer, inputs())
    assert all(w.dtype == "bfloat16" for w in layer.weights)
    assert dtype_of(result[0]) == "bfloat16"
    assert np.all(np.isfinite(to_numpy(result[0])))
    if name == "rg_lru":
        assert dtype_of(result[1]) == "float32"
        assert np.all(np.isfinite(to_numpy(result[1])))
