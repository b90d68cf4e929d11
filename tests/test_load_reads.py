"""How a safetensors load reads its bytes: in parallel chunks, into a reused
buffer on JAX off a CPU, mapped on torch (and on JAX where a tensor lies
aligned), and never into arrays the caller still holds.

The 9B's 17 GB are most of its load time; these tests prove the mechanisms
on tiny checkpoints, `tools/benchmark_real_size.py` measures the time.
"""

import hashlib
import os
import struct

import keras
import numpy as np
import pytest

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.convert import backend_arrays
from keras_recurrentgemma.convert import common
from keras_recurrentgemma.convert import huggingface
from keras_recurrentgemma.convert import safetensors_reader
from keras_recurrentgemma.layers.initialization import skip_random_initialization
from keras_recurrentgemma.utils import host_arrays
from tests.models import assert_same_weights
from tests.models import safetensors_header
from tests.models import variable_buffer_address
from tests.models import write_tiny_hf_checkpoint


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return write_tiny_hf_checkpoint(tmp_path_factory.mktemp("hf"))


@pytest.fixture(scope="module")
def reference(hf_dir):
    return RecurrentGemmaBackbone.from_preset(hf_dir)


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_chunked_parallel_reads_give_the_same_model(monkeypatch, hf_dir, reference):
    # Chunks of 1000 bytes: every tensor but the scalars is read by
    # several threads, the last chunk short.
    monkeypatch.setattr(safetensors_reader, "READ_CHUNK", 1000)
    monkeypatch.setattr(backend_arrays, "mapped_view", lambda tensor, variable: None)
    assert_same_weights(RecurrentGemmaBackbone.from_preset(hf_dir), reference)


@pytest.mark.parametrize(
    "floats, calls",
    [
        (1024, [1024] * 4),  # one READ_CHUNK: divided among the 4 threads
        (3072, [3072] * 4),  # three READ_CHUNKs: still one chunk per thread
        (8192, [4096] * 8),  # larger: READ_CHUNK at most
        (100, [400]),  # under MIN_CHUNK: one call
    ],
)
def test_every_tensor_is_divided_among_all_the_threads(
    monkeypatch, tmp_path, floats, calls
):
    """A tensor of one or a few READ_CHUNKs is split over all READ_THREADS
    threads, not read by one or three of them (the 9B's 32 MiB tensors)."""
    monkeypatch.setattr(safetensors_reader, "READ_THREADS", 4)
    monkeypatch.setattr(safetensors_reader, "READ_CHUNK", 4096)
    monkeypatch.setattr(safetensors_reader, "MIN_CHUNK", 512)
    read_into = safetensors_reader._read_into
    sizes = []

    def counted(fd, view, offset):
        sizes.append(len(view))
        return read_into(fd, view, offset)

    monkeypatch.setattr(safetensors_reader, "_read_into", counted)
    filename = str(tmp_path / "data.bin")
    np.arange(floats + 2, dtype=np.float32).tofile(filename)
    array = safetensors_reader._read(filename, np.float32, 8, (floats,))
    assert sorted(sizes, reverse=True) == calls
    np.testing.assert_array_equal(array, np.arange(2, floats + 2, dtype=np.float32))


@pytest.mark.parametrize("chunk", [1000, 1 << 20])
def test_a_read_past_the_end_names_the_file(monkeypatch, tmp_path, chunk):
    """A file cut short after its header was checked (as when it is being
    replaced while it loads) is an error naming it, in the chunked and
    the one-call read."""
    monkeypatch.setattr(safetensors_reader, "READ_CHUNK", chunk)
    filename = str(tmp_path / "short.safetensors")
    with open(filename, "wb") as f:
        f.write(bytes(4000))
    with pytest.raises(ValueError, match="short.safetensors: truncated"):
        safetensors_reader._read(filename, np.float32, 8, (1200,))


def test_reads_drop_their_pages_from_the_cache_only_when_asked(monkeypatch, tmp_path):
    advice = []
    monkeypatch.setattr(os, "posix_fadvise", lambda *args: advice.append(args[1:]))
    filename = str(tmp_path / "data.bin")
    np.arange(256, dtype=np.float32).tofile(filename)
    plain = safetensors_reader._read(filename, np.float32, 64, (16,))
    assert advice == []
    dropped = safetensors_reader._read(filename, np.float32, 64, (16,), True)
    assert advice == [(64, 64, os.POSIX_FADV_DONTNEED)]
    np.testing.assert_array_equal(plain, dropped)
    np.testing.assert_array_equal(plain, np.arange(16, 32, dtype=np.float32))


def test_checkpoints_larger_than_half_the_free_memory_are_uncached(tmp_path):
    small = tmp_path / "small"
    small.write_bytes(bytes(10))
    assert not safetensors_reader._uncache([str(small)])
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    available = int(info["MemAvailable"].split()[0])
    # A sparse file: its size counts, not what it holds.
    large = tmp_path / "large"
    with open(large, "wb") as f:
        f.truncate(available * 1024 // 2 + (1 << 30))
    assert safetensors_reader._uncache([str(large)])


def test_a_reused_buffer_lends_one_buffer_and_fits_it_to_the_reads():
    with host_arrays.reused_buffer():
        a = host_arrays.read_buffer((1000,), "float32")
        b = host_arrays.read_buffer((10, 20), "bfloat16")
        assert np.shares_memory(a, b) and b.shape == (10, 20)
        assert a.ctypes.data % host_arrays.ALIGNMENT == 0
        with host_arrays.no_reused_buffer():
            assert not np.shares_memory(a, host_arrays.read_buffer((10,), "uint8"))
        large = host_arrays.read_buffer((300 << 20,), "uint8")  # remade larger
        assert not np.shares_memory(a, large)
        assert np.shares_memory(large, host_arrays.read_buffer((100 << 20,), "uint8"))
        # Far smaller than the buffer: remade, so the large one is freed.
        assert not np.shares_memory(large, host_arrays.read_buffer((1000,), "uint8"))
    c, d = (host_arrays.read_buffer((1000,), "float32") for _ in range(2))
    assert not np.shares_memory(c, d)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's device copies")
def test_jax_off_a_cpu_reads_into_one_buffer(monkeypatch, hf_dir, reference):
    """Where XLA copies each array to a device, the host side reuses one
    buffer (exercised on a CPU by saying it is not one)."""
    monkeypatch.setattr(backend_arrays, "jax_on_cpu", lambda: False)
    made = []
    original = host_arrays.aligned_empty

    def counted(shape, dtype):
        made.append(shape)
        return original(shape, dtype)

    monkeypatch.setattr(host_arrays, "aligned_empty", counted)
    loaded = RecurrentGemmaBackbone.from_preset(hf_dir)
    assert_same_weights(loaded, reference)
    # One buffer, remade only to grow (a tiny model's tensors are all
    # under the size it is shrunk from), and no other array read into.
    sizes = [shape[0] for shape in made]
    assert sizes == sorted(sizes) and len(sizes) < 10
    assert len(loaded.weights) > 3 * len(sizes)
    assert not any(getattr(v, "_host_aliased", False) for v in loaded.weights)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's host aliasing")
@pytest.mark.parametrize("step", ["train", "predict"])
def test_jax_weights_alias_the_arrays_read_until_a_step_donates_them(
    hf_dir, reference, step
):
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    causal_lm = RecurrentGemmaCausalLM.from_preset(hf_dir, preprocessor=None)
    backbone = causal_lm.backbone
    aliased = [v for v in backbone.weights if getattr(v, "_host_aliased", False)]
    # All but the convolutions, which are transposed as they are read.
    mapped = {
        path for path, _, how in huggingface.weight_map(backbone) if how != "conv"
    }
    assert {v.path for v in aliased} == mapped
    before = {v.path: variable_buffer_address(v) for v in aliased}
    token_ids = np.array([[1, 5, 9, 3]], "int32")
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    if step == "train":
        backbone.enable_lora(2)
        causal_lm.compile(optimizer="sgd")
        causal_lm.train_on_batch(x, token_ids)
    else:
        causal_lm.predict(x, verbose=0)
        assert_same_weights(backbone, reference)
    # Copied into XLA's own memory before the step donated them.
    assert not any(getattr(v, "_host_aliased", False) for v in backbone.weights)
    assert all(variable_buffer_address(v) != before[v.path] for v in aliased)


def test_a_load_never_aliases_arrays_the_caller_holds(hf_dir, reference):
    """Tensors passed in memory stay the caller's: changing them afterwards
    changes no weight, on backends that take over arrays the loader read."""
    tensors = {
        key: np.array(lazy.read())
        for key, lazy in safetensors_reader.read_checkpoint_tensors(hf_dir).items()
    }
    config = huggingface.config_from_huggingface(huggingface.read_config(hf_dir))
    with skip_random_initialization():
        backbone = RecurrentGemmaBackbone(**config)
    converted = huggingface.convert_weights(backbone, tensors, source="memory")
    common.assign_backbone_weights(backbone, converted, source="memory")
    for array in tensors.values():
        array[...] = 7
    assert_same_weights(backbone, reference)


def file_mappings(filename):
    """The address ranges of `filename`'s maps in this process."""
    with open("/proc/self/maps") as f:
        return [
            [int(n, 16) for n in line.split()[0].split("-")]
            for line in f
            if line.rstrip().endswith(filename)
        ]


def aligned_keys(filename):
    """The keys of the tensors whose data lies on a 64-byte boundary of
    `filename` (a map of it starts on a page)."""
    header, data_start = safetensors_header(filename)
    return {
        key
        for key, info in header.items()
        if key != "__metadata__"
        and (data_start + info["data_offsets"][0]) % host_arrays.ALIGNMENT == 0
    }


@pytest.fixture(scope="module")
def aligned_hf_dir(hf_dir, tmp_path_factory):
    """`hf_dir` with the safetensors header padded (with spaces, as the
    format allows) so that its data, and with it every tensor of the tiny
    model (all multiples of 64 bytes), starts on a 64-byte boundary."""
    out = tmp_path_factory.mktemp("aligned")
    for name in os.listdir(hf_dir):
        with open(os.path.join(hf_dir, name), "rb") as f:
            data = f.read()
        if name == "model.safetensors":
            (size,) = struct.unpack("<Q", data[:8])
            pad = -(8 + size) % host_arrays.ALIGNMENT
            header = data[8 : 8 + size] + b" " * pad
            data = struct.pack("<Q", size + pad) + header + data[8 + size :]
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)
    return str(out)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX's host aliasing")
@pytest.mark.parametrize("aligned", [True, False])
def test_jax_maps_the_tensors_that_lie_aligned(
    hf_dir, aligned_hf_dir, reference, aligned
):
    """XLA takes host memory as it is only on a 64-byte boundary: tensors
    the file holds so are mapped, the rest read (safetensors promises 8)."""
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    directory = aligned_hf_dir if aligned else hf_dir
    filename = os.path.join(directory, "model.safetensors")
    before = file_digest(filename)
    causal_lm = RecurrentGemmaCausalLM.from_preset(directory, preprocessor=None)
    backbone = causal_lm.backbone
    assert_same_weights(backbone, reference)
    keys = aligned_keys(filename)
    # The padded file has every tensor aligned, `transformers`' none.
    assert bool(keys) == aligned
    expected = {
        path
        for path, key, how in huggingface.weight_map(backbone)
        if how != "conv" and key in keys
    }
    regions = file_mappings(filename)
    for variable in backbone.weights:
        address = variable_buffer_address(variable)
        inside = any(start <= address < end for start, end in regions)
        assert inside == (variable.path in expected), variable.path
    # A training step takes XLA's own copies first, and writes none to the
    # file.
    backbone.enable_lora(2)
    causal_lm.compile(optimizer="sgd")
    token_ids = np.array([[1, 5, 9, 3]], "int32")
    x = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    causal_lm.train_on_batch(x, token_ids)
    for variable in backbone.weights:
        address = variable_buffer_address(variable)
        assert not any(start <= address < end for start, end in regions)
    assert file_digest(filename) == before


@pytest.mark.skipif(
    keras.config.backend() != "torch", reason="torch maps every tensor (`mapped_view`)"
)
def test_torch_variables_map_the_checkpoint_copy_on_write(hf_dir, reference):
    filename = os.path.join(hf_dir, "model.safetensors")
    before = file_digest(filename)
    loaded = RecurrentGemmaBackbone.from_preset(hf_dir)
    assert_same_weights(loaded, reference)
    regions = file_mappings(filename)
    assert regions
    # All but the convolutions, which are transposed as they are read.
    mapped = {path for path, _, how in huggingface.weight_map(loaded) if how != "conv"}
    for variable in loaded.weights:
        address = variable_buffer_address(variable)
        inside = any(start <= address < end for start, end in regions)
        assert inside == (variable.path in mapped), variable.path
    # Training writes to private copies: the file is as it was.
    embeddings = loaded.token_embedding.embeddings
    embeddings.assign(embeddings + 1.0)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(embeddings),
        keras.ops.convert_to_numpy(reference.token_embedding.embeddings) + 1.0,
    )
    assert file_digest(filename) == before
