"""The generation tests, and training, with each backend's fast scan path.

The fast path of the backend under test: `"xla"` on TensorFlow, `"pallas"` on
JAX (on CPU its GPU kernel run by Pallas's interpreter,
`KERAS_RECURRENTGEMMA_INTERPRET=1`), `"triton"` on torch (under Triton's
interpreter, `TRITON_INTERPRET=1`, when there is no CUDA). The
generation tests of test_causal_lm.py run again on a model that uses it, and a
model on the same weights with the reference scan must give the same logits,
tokens and gradients.
"""

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma.ops import resolve_implementation
from tests import test_causal_lm as generation
from tests.models import tiny_causal_lm
from tests.tolerances import FAST_PATH_GRADIENTS
from tests.tolerances import PARITY
from tests.tolerances import relative_error

FAST_PATH = {"jax": "pallas", "tensorflow": "xla", "torch": "triton"}[
    keras.config.backend()
]
TOL = PARITY["float32"]["relative"]
GRADIENT_TOL = FAST_PATH_GRADIENTS["float32"]["relative"]


@pytest.fixture(scope="module", autouse=True)
def _interpreters():
    with pytest.MonkeyPatch.context() as patch:
        if FAST_PATH == "pallas":
            import jax

            # On a GPU or TPU (tools/gpu_check.py) the kernel runs there.
            if jax.default_backend() == "cpu":
                patch.setenv("KERAS_RECURRENTGEMMA_INTERPRET", "1")
        if FAST_PATH == "triton":
            import torch

            if not torch.cuda.is_available():
                # Read by our kernels when they are first built, and at each
                # launch, so setting it after `import triton` is enough.
                patch.setenv("TRITON_INTERPRET", "1")
        try:
            resolve_implementation(FAST_PATH)
        except ValueError as error:
            pytest.skip(f"{FAST_PATH} cannot run here: {error}")
        yield


def lm_pair(**kwargs):
    """The same weights with the fast scan and with the reference."""
    kwargs = {"sequence_length": 24, "prefill_chunk_size": 4, **kwargs}
    fast = tiny_causal_lm("griffin", scan_implementation=FAST_PATH, **kwargs)
    reference = tiny_causal_lm("griffin", scan_implementation="reference", **kwargs)
    return fast, reference


@pytest.fixture(scope="module")
def pair():
    return lm_pair()


@pytest.fixture(scope="module")
def fast_lm(pair):
    return pair[0]


def test_logits_match_the_reference(pair):
    fast, reference = pair
    token_ids = generation.random_ids(fast, (2, 13), seed=1)
    mask = np.ones_like(token_ids)
    mask[1, 9:] = 0
    expected = generation.forward_logits(reference, token_ids, mask)
    actual = generation.forward_logits(fast, token_ids, mask)
    assert relative_error(actual, expected) <= TOL


def test_greedy_tokens_match_the_reference(pair):
    fast, reference = pair
    rows = [[2], [2] + list(generation.random_ids(fast, (11,), seed=2))]
    for lm in pair:
        lm.compile(sampler="greedy")
    actual, actual_mask = generation.generate_ids(fast, rows, 24)
    expected, expected_mask = generation.generate_ids(reference, rows, 24)
    np.testing.assert_array_equal(actual, expected)
    np.testing.assert_array_equal(actual_mask, expected_mask)


def test_loss_gradients_match_the_reference(pair):
    fast, reference = pair
    token_ids = generation.random_ids(fast, (2, 9), seed=3)
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    fast_value, fast_grads = weight_gradients(fast.backbone, inputs)
    ref_value, ref_grads = weight_gradients(reference.backbone, inputs)
    assert relative_error(fast_value, ref_value) <= TOL
    for variable, actual, expected in zip(
        fast.backbone.trainable_variables, fast_grads, ref_grads, strict=True
    ):
        assert np.any(expected), variable.path
        assert relative_error(actual, expected) <= GRADIENT_TOL, variable.path


def weight_gradients(backbone, inputs):
    """`mean(hidden²)` and its gradient for every trainable weight, as numpy."""
    variables = backbone.trainable_variables
    backend = keras.config.backend()
    if backend == "jax":
        import jax

        non_trainable = [v.value for v in backbone.non_trainable_variables]

        def loss(values):
            hidden, _ = backbone.stateless_call(values, non_trainable, inputs)
            return jax.numpy.mean(jax.numpy.square(hidden))

        value, grads = jax.value_and_grad(loss)([v.value for v in variables])
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            value = ops.mean(ops.square(backbone(inputs)))
        grads = tape.gradient(value, [v.value for v in variables])
    else:
        import torch

        value = ops.mean(ops.square(backbone(inputs)))
        grads = torch.autograd.grad(value, [v.value for v in variables])
    return ops.convert_to_numpy(value), [ops.convert_to_numpy(g) for g in grads]


# --- The generation tests, on the fast path ---------------------------------


# Each runs a model whose every scan goes through an interpreter, so a few
# seconds each: the greedy sampler and one chunking stand for the rest.
def test_batch_rows_generate_what_they_generate_alone(fast_lm):
    generation.test_batch_rows_generate_what_they_generate_alone(fast_lm, "greedy")


def test_greedy_generation_equals_argmax_of_full_forward(fast_lm):
    generation.test_greedy_generation_equals_argmax_of_full_forward(fast_lm)


def test_padding_leaves_the_cache_untouched(fast_lm):
    generation.test_padding_leaves_the_cache_untouched(fast_lm)


def test_chunked_prefill_equals_one_shot(fast_lm):
    generation.test_chunked_prefill_equals_one_shot(fast_lm, 3)


def test_stop_tokens(fast_lm):
    generation.test_stop_tokens(fast_lm)
