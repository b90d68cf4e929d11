"""Tiny causal LMs with random weights, shared by the generation tests."""

import json
import struct

import keras
import numpy as np

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor
from keras_recurrentgemma import RecurrentGemmaTokenizer
from tests.conftest import TINY_CONFIGS
from tests.vocab import tiny_proto


def tiny_tokenizer():
    return RecurrentGemmaTokenizer(proto=tiny_proto())


def randomize(model, seed=0, scale=0.5):
    """Replaces every weight, so no zero-initialised bias hides a bug."""
    rng = np.random.default_rng(seed)
    for w in model.weights:
        values = rng.normal(scale=scale, size=w.shape)
        w.assign(values.astype(w.dtype if w.dtype != "bfloat16" else "float32"))


def document_positions(b, t, seed):
    """`segment_pos` `[b, t]` (int32) for the kernel tests: each row continues
    a document (so `h0` matters), starts a new one inside the row, and every
    other row ends in two padding steps (-1)."""
    rng = np.random.default_rng(seed)
    pos = np.empty((b, t), "int32")
    for row in range(b):
        start = int(rng.integers(0, 50))
        pos[row] = np.arange(start, start + t)
        if t > 3:
            cut = int(rng.integers(1, t - 1))
            pos[row, cut:] = np.arange(t - cut)
        if row % 2 and t > 2:
            pos[row, -2:] = -1
    return pos


def tiny_causal_lm(
    config="griffin",
    sequence_length=32,
    prefill_chunk_size=1024,
    dtype="float32",
    seed=0,
    **overrides,
):
    """A `RecurrentGemmaCausalLM` on a `TINY_CONFIGS` entry and the tiny vocab.

    The vocabulary size is the tiny SentencePiece model's, so sampled ids
    detokenize.
    """
    tokenizer = tiny_tokenizer()
    kwargs = {**TINY_CONFIGS[config], **overrides}
    kwargs["vocabulary_size"] = tokenizer.vocabulary_size()
    backbone = RecurrentGemmaBackbone(**kwargs, dtype=dtype)
    randomize(backbone, seed=seed)
    preprocessor = RecurrentGemmaCausalLMPreprocessor(
        tokenizer, sequence_length=sequence_length
    )
    return RecurrentGemmaCausalLM(
        backbone, preprocessor, prefill_chunk_size=prefill_chunk_size
    )


def assert_same_weights(a, b):
    """Every variable of `a` and `b`: same paths, dtypes and bits."""
    wa = {v.path: keras.ops.convert_to_numpy(v) for v in a.weights}
    wb = {v.path: keras.ops.convert_to_numpy(v) for v in b.weights}
    assert sorted(wa) == sorted(wb)
    for path in wa:
        assert wa[path].dtype == wb[path].dtype, path
        np.testing.assert_array_equal(wa[path], wb[path], err_msg=path)


def write_tiny_hf_checkpoint(path, seed=3):
    """A tiny Griffin written by `transformers`' `save_pretrained`, plus the
    tiny vocabulary's `tokenizer.model`: a Hugging Face repo in miniature."""
    from tests.test_hf_parity import make_hf_model

    config = dict(TINY_CONFIGS["griffin"])
    config["vocabulary_size"] = tiny_tokenizer().vocabulary_size()
    model = make_hf_model(config, config["block_types"], seed=seed)
    model.save_pretrained(str(path))
    (path / "tokenizer.model").write_bytes(tiny_proto())
    return str(path)


def safetensors_header(filename):
    """`(header, data_start)` of a `.safetensors` file: its JSON header and
    the file offset its tensors' `data_offsets` count from."""
    with open(filename, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


def variable_buffer_address(variable):
    """Where a variable's data starts in host memory, to see whether it took
    over an array the loader read (TensorFlow through DLPack, JAX on a CPU);
    `None` on a backend that cannot say."""
    value = variable.value
    if hasattr(value, "unsafe_buffer_pointer"):  # jax
        return value.unsafe_buffer_pointer()
    if hasattr(value, "data_ptr"):  # torch
        return value.data_ptr()
    if hasattr(value, "read_value"):  # TensorFlow
        # A read shares the variable's buffer, and so does `np.asarray` of
        # an eager tensor (`convert_to_numpy` copies).
        return np.asarray(value.read_value()).ctypes.data
    return None
