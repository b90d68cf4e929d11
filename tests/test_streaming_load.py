"""Loading streams: headers first, then one tensor at a time, no random draws.

The released 2B and 9B only load in the host memory Kaggle has if no copy of
the checkpoint is held beside the model and no random initial values are
drawn for weights that are about to be overwritten. These tests prove the
mechanisms on tiny checkpoints; `tools/benchmark_real_size.py` measures the
released sizes.
"""

import weakref

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.convert import backend_arrays
from keras_recurrentgemma.convert import common
from keras_recurrentgemma.convert import huggingface
from keras_recurrentgemma.convert import safetensors_reader
from keras_recurrentgemma.layers.initialization import skip_random_initialization
from tests.conftest import TINY_CONFIGS
from tests.models import assert_same_weights
from tests.models import variable_buffer_address
from tests.models import write_tiny_hf_checkpoint

RANDOM_FUNCTIONS = ("normal", "uniform", "truncated_normal")


def calls_of(monkeypatch, owner, name):
    """The positional arguments of each call of `owner.name` from now on,
    which still runs as before."""
    calls, original = [], getattr(owner, name)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(owner, name, recorded)
    return calls


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture
def random_draws(monkeypatch):
    """Counts calls of the backend's random number generators."""
    from keras.src.backend import random as backend_random

    calls = []
    for name in RANDOM_FUNCTIONS:
        original = getattr(backend_random, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(backend_random, name, counted)
    return calls


def test_random_draws_are_counted(random_draws, hf_dir):
    # Without this the next test could pass because nothing was counted.
    config = huggingface.config_from_huggingface(huggingface.read_config(hf_dir))
    RecurrentGemmaBackbone(**config)
    assert random_draws


def test_loading_draws_no_random_numbers(random_draws, hf_dir):
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir)
    assert random_draws == []
    # Every weight came from the file, none was left at its zero start.
    for variable in backbone.weights:
        if "bias" in variable.path or variable.path.endswith("/b"):
            continue
        assert np.any(keras.ops.convert_to_numpy(variable)), variable.path


def test_skip_random_initialization_is_scoped(random_draws, hf_dir):
    config = huggingface.config_from_huggingface(huggingface.read_config(hf_dir))
    with skip_random_initialization():
        zeros = RecurrentGemmaBackbone(**config)
    assert random_draws == []
    assert not np.any(keras.ops.convert_to_numpy(zeros.token_embedding.embeddings))
    RecurrentGemmaBackbone(**config)
    assert random_draws


def test_keras_preset_load_draws_no_random_numbers(random_draws, hf_dir, tmp_path):
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir)
    backbone.save_to_preset(str(tmp_path / "preset"))
    random_draws.clear()
    loaded = RecurrentGemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert random_draws == []
    assert_same_weights(backbone, loaded)


def test_bfloat16_keras_preset_load_makes_no_float32_copy(tmp_path):
    """Keras's torch backend reads a bfloat16 array through a float32 copy
    (the 2B's `.h5` load peaked at 11.1 GiB); ours hands torch the bits.
    NumPy's allocations are traced, torch's and XLA's are not: what is
    traced is the arrays read from the file, and any float32 copy of one."""
    import tracemalloc

    # An 8 MiB embedding, so that the model's own Python objects (about
    # 1 MiB traced) are small beside it.
    config = {**TINY_CONFIGS["griffin"], "vocabulary_size": 131072}
    backbone = RecurrentGemmaBackbone(**config, dtype="bfloat16")
    backbone.save_to_preset(str(tmp_path / "preset"))
    largest = max(np.prod(v.shape) for v in backbone.weights) * 2
    tracemalloc.start()
    try:
        loaded = RecurrentGemmaBackbone.from_preset(
            str(tmp_path / "preset"), dtype="bfloat16"
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert_same_weights(backbone, loaded)
    assert loaded.token_embedding.embeddings.dtype == "bfloat16"
    # The largest bfloat16 tensor is read whole (1 x); Keras's float32 copy
    # made it 4.1 x on torch. NumPy also allocates the variables'
    # placeholders (`calloc`ed: traced, never resident, see
    # `LoadPlaceholder`): 2.1 x on JAX and torch, 3.1 x on TensorFlow with
    # the aligned copy DLPack hands over. Copies XLA makes itself are not
    # traced.
    bound = {"torch": 2.5, "jax": 2.5}.get(keras.config.backend(), 3.5)
    assert peak < bound * largest, (peak, largest)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's immutable arrays")
def test_jax_keras_preset_load_frees_each_placeholder_first(monkeypatch, tmp_path):
    """A JAX variable's zero placeholder is freed before its weight is
    converted: the arrays alive never exceed one model's weights."""
    import jax

    from keras_recurrentgemma import preset_loader_keras

    backbone = RecurrentGemmaBackbone(**TINY_CONFIGS["griffin"])
    backbone.save_to_preset(str(tmp_path / "preset"))
    sizes = [np.prod(v.shape) * 4 for v in backbone.weights]
    weight_bytes, largest = sum(sizes), max(sizes)
    # Whatever else is alive (the saved model, constants) before the load.
    before = sum(a.nbytes for a in jax.live_arrays())
    alive = []
    original = preset_loader_keras._BackendTensorStore.__getitem__

    def counted(self, key):
        value = original(self, key)
        alive.append(sum(a.nbytes for a in jax.live_arrays()))
        return value

    monkeypatch.setattr(preset_loader_keras._BackendTensorStore, "__getitem__", counted)
    loaded = RecurrentGemmaBackbone.from_preset(str(tmp_path / "preset"))
    assert len(alive) == len(loaded.weights)
    # Without the release the largest weight's placeholder and value are
    # alive at once; a few bytes of scalars may be made while loading.
    assert max(alive) - before < weight_bytes + largest // 2


def test_hf_load_holds_one_tensor_at_a_time(monkeypatch, hf_dir):
    """Each tensor read is gone before the next one is read, unless it became
    its variable's own buffer (TensorFlow takes an aligned array as it is,
    torch on a CPU any array the loader read)."""
    original = safetensors_reader._read
    alive, held, opened = {}, [], []

    def tracked(*args, **kwargs):
        array = original(*args, **kwargs)
        key = len(opened)
        opened.append(key)
        alive[key] = weakref.ref(array)
        held.append(set(alive))
        weakref.finalize(array, alive.pop, key, None)
        return array

    monkeypatch.setattr(safetensors_reader, "_read", tracked)
    # Every tensor read, none mapped (torch maps them: `test_load_reads`).
    monkeypatch.setattr(backend_arrays, "mapped_view", lambda tensor, variable: None)
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir)
    assert len(opened) == len(backbone.weights)
    adopted = {key: ref() for key, ref in alive.items()}
    if keras.config.backend() in ("tensorflow", "torch"):
        # A tensor that needs no transpose or cast, like the embedding, is
        # taken without a copy: the array read is the variable's buffer.
        buffers = {variable_buffer_address(v) for v in backbone.weights}
        assert {a.ctypes.data for a in adopted.values()} <= buffers
        embedding = variable_buffer_address(backbone.token_embedding.embeddings)
        assert embedding in {a.ctypes.data for a in adopted.values()}
    else:
        assert not adopted
    assert max(len(keys - set(adopted)) for keys in held) == 1


def test_headers_are_checked_before_any_data_is_read(monkeypatch, hf_dir, tmp_path):
    """A mis-shaped tensor fails from the headers: nothing was read."""
    import json
    import shutil
    import struct

    bad = tmp_path / "bad"
    shutil.copytree(hf_dir, bad)
    path = bad / huggingface.WEIGHTS_FILE
    data = path.read_bytes()
    (size,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + size])
    key = "model.final_norm.weight"
    # Same bytes, other shape: a 2-D norm scale, which no variable has.
    n = header[key]["shape"][0]
    header[key]["shape"] = [1, n]
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + size :])

    reads = calls_of(monkeypatch, safetensors_reader, "_read")
    with pytest.raises(ValueError, match=key):
        RecurrentGemmaBackbone.from_preset(str(bad))
    assert reads == []


def test_bfloat16_checkpoint_loads_bit_for_bit(hf_dir):
    tensors = safetensors_reader.read_checkpoint_tensors(hf_dir)
    backbone = RecurrentGemmaBackbone.from_preset(hf_dir, dtype="bfloat16")
    expected = np.asarray(tensors["model.embed_tokens.weight"]).astype(
        ml_dtypes.bfloat16
    )
    loaded = keras.ops.convert_to_numpy(backbone.token_embedding.embeddings)
    assert loaded.dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(loaded.view(np.uint16), expected.view(np.uint16))


def test_bfloat16_kernels_load_without_a_host_transpose(monkeypatch, tmp_path):
    # HF stores each `nn.Linear` weight as [out, in], as our kernels are: the
    # loader copies it as it is, on every backend.
    import torch

    from tests.test_hf_parity import make_hf_model

    config = dict(TINY_CONFIGS["griffin"])
    hf = make_hf_model(config, config["block_types"], seed=5).to(torch.bfloat16)
    hf.save_pretrained(str(tmp_path))
    transposes = calls_of(monkeypatch, backend_arrays, "_transpose_2d")
    backbone = RecurrentGemmaBackbone.from_preset(str(tmp_path), dtype="bfloat16")
    # Only the depthwise conv weights, `(l, 1, k)` -> `(k, l)`, are
    # transposed (on torch and TensorFlow; JAX's `device_put` does it).
    conv_shapes = {
        tuple(v.shape) for v in backbone.weights if v.path.endswith("conv_1d/w")
    }
    assert {tuple(args[0].shape) for args in transposes} <= conv_shapes
    state = hf.state_dict()
    for i, hf_key, ours in [
        (0, "mlp_block.down_proj", "mlp_block/ffw_down"),
        (1, "temporal_block.linear_x", "recurrent_block/linear_x"),
    ]:
        expected = state[f"model.layers.{i}.{hf_key}.weight"].float().numpy()
        variables = {v.path: v for v in backbone.weights}
        loaded = variables[f"residual_block_{i}/{ours}/kernel"]
        loaded = keras.ops.convert_to_numpy(loaded).astype(np.float32)
        np.testing.assert_array_equal(loaded, expected, err_msg=hf_key)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_backend_tensor_keeps_bits(dtype):
    rng = np.random.default_rng(0)
    array = rng.normal(size=(5, 7)).astype(np.dtype(dtype))
    tensor = backend_arrays.backend_tensor(array)
    back = keras.ops.convert_to_numpy(tensor)
    assert back.dtype == array.dtype
    np.testing.assert_array_equal(back, array)


@pytest.mark.parametrize("shape", [(3, 700), (513, 260), (1, 1)])
def test_host_copy_of_a_transpose(shape):
    rng = np.random.default_rng(1)
    source = rng.normal(size=shape).astype(ml_dtypes.bfloat16)
    copy = backend_arrays.host_copy(source.T, ml_dtypes.bfloat16)
    assert copy.flags.c_contiguous and copy.flags.writeable
    np.testing.assert_array_equal(copy, source.T)
    widened = backend_arrays.host_copy(source.T, np.float32)
    np.testing.assert_array_equal(widened, source.T.astype(np.float32))


def test_lazy_tensor_records_transforms():
    array = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)
    reads = []
    lazy = common.LazyTensor(
        array.shape,
        array.dtype,
        lambda: reads.append(1) or array,
        read_rows=lambda a, b: reads.append((a, b)) or array[a:b],
    )
    views = {
        "T": (lazy.T, array.T),
        "index": (lazy[1], array[1]),
        "index, then T": (lazy[0].T, array[0].T),
        "fancy": (lazy[1, 0, 0], array[1, 0, 0]),
        "reshape": (lazy.reshape(6, 4), array.reshape(6, 4)),
        "rows": (lazy[1:5], array[1:5]),
    }
    assert reads == []  # shapes come without reading
    for name, (view, expected) in views.items():
        assert view.shape == expected.shape, name
        np.testing.assert_array_equal(view.read(), expected, err_msg=name)
    # A row slice reads just its rows.
    assert (1, 2) in reads
