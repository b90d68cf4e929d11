"""The official formats load streaming: metadata first, then one tensor at a time.

As `test_streaming_load.py` proves for safetensors: an Orbax folder and an
official `.pt`, written by the real tools from tiny random weights, are
checked from their metadata (names, shapes, dtypes) before any tensor's data
is read, then read, converted and assigned one tensor at a time; and what
loads equals, bit for bit, what the eager path (`read_orbax_params` or
`read_torch_state_dict`, then `backbone_from_official`) loads.

Run once per backend: `KERAS_BACKEND=jax|tensorflow|torch pytest ...`.
"""

import os
import re
import sys
import time
import weakref

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import torch
from recurrentgemma.conversion import flax_params_to_pytorch_state_dict

from keras_recurrentgemma import RecurrentGemmaBackbone
from keras_recurrentgemma.convert import official
from keras_recurrentgemma.convert import official_torch
from keras_recurrentgemma.convert import orbax
from keras_recurrentgemma.convert.official import backbone_from_official
from tests.models import assert_same_weights
from tests.models import variable_buffer_address
from tests.test_convert_official_formats import _flat
from tests.test_official_parity import official_config
from tests.test_official_parity import random_official_params
from tests.tolerances import FLOAT32_SUM

NAME = "griffin"  # Both block types, so every kind of tensor is read.

# Orbax's reader leaves asyncio callbacks behind when tensorstore fails.
_ORBAX_FAILS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


def _bfloat16(params):
    return jax.tree_util.tree_map(
        lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16)), params
    )


class LiveReads:
    """Wraps a reader function: what it read, and how much is held at once.

    An array read from the checkpoint counts as held while it is alive and
    is not the storage of a model variable: on TensorFlow (and on JAX's CPU
    backend) a variable may adopt an aligned host array instead of copying
    it (no memory is spent then), while anything else that keeps a read
    array alive (a second tensor read before the first is assigned, a
    cache, a leak) is counted.
    """

    def __init__(self, monkeypatch):
        self.keys, self.peak, self.model = [], 0, None
        self._alive = {}
        assign = official.assign_backbone_weights

        def capture(backbone, *args, **kwargs):
            self.model = backbone
            return assign(backbone, *args, **kwargs)

        monkeypatch.setattr(official, "assign_backbone_weights", capture)

    def _held_now(self):
        arrays = [r() for r in self._alive.values()]
        arrays = [a for a in arrays if a is not None]
        if not arrays or self.model is None:
            return arrays
        addresses = [variable_buffer_address(v) for v in self.model.weights]
        addresses = [x for x in addresses if x is not None]

        def adopted(array):
            start = array.__array_interface__["data"][0]
            return any(start <= x < start + array.nbytes for x in addresses)

        return [a for a in arrays if not adopted(a)]

    def held(self, expected=0):
        """Read arrays still alive that no model variable is made of.

        JAX copies a host array it does not adopt asynchronously and drops
        its reference a moment after the copy is done; up to a second is
        allowed for that before more than `expected` arrays count as held.
        """
        if keras.config.backend() == "jax" and self.model is not None:
            jax.block_until_ready([v.value for v in self.model.weights])
            for _ in range(100):
                if len(self._held_now()) <= expected:
                    break
                time.sleep(0.01)
        return self._held_now()

    def wrap(self, read, key_of):
        def tracked(*args, **kwargs):
            array = read(*args, **kwargs)
            index = len(self.keys)
            self.keys.append(key_of(*args, **kwargs))
            self._alive[index] = weakref.ref(array)
            self.peak = max(self.peak, len(self.held(expected=1)))
            return array

        return tracked


def _array_name(spec):
    """The array a tensorstore spec of an Orbax checkpoint opens."""
    kvstore = spec["kvstore"]
    # OCDBT: the name is a key of the shared store; otherwise a folder.
    return os.path.basename(kvstore["path"].rstrip("/"))


@pytest.fixture
def orbax_reads(monkeypatch):
    """Every array `backbone_from_orbax` reads, and how many are held at once."""
    reads = LiveReads(monkeypatch)
    monkeypatch.setattr(
        orbax,
        "_read_array",
        reads.wrap(orbax._read_array, lambda spec, context: _array_name(spec)),
    )
    return reads


@pytest.fixture
def torch_reads(monkeypatch):
    """Every tensor (or row slice) read from a `.pt`, and how many held at once."""
    reads = LiveReads(monkeypatch)
    monkeypatch.setattr(
        official_torch,
        "_read_tensor",
        reads.wrap(
            official_torch._read_tensor,
            lambda tensor, *a, rows=None: (tensor.data_ptr(), rows),
        ),
    )
    return reads


# --- Fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    return random_official_params(official_config(NAME), seed=23)


@pytest.fixture(scope="module")
def orbax_dir(params, tmp_path_factory):
    folder = tmp_path_factory.mktemp("flax") / "2b"
    ocp.PyTreeCheckpointer().save(os.fspath(folder), params)
    return folder


@pytest.fixture(scope="module")
def orbax_bf16_dir(params, tmp_path_factory):
    # The other layout (a zarr folder per array, no OCDBT), bfloat16 jax
    # arrays under `params`, as a training loop saves its state.
    folder = tmp_path_factory.mktemp("flax_bf16") / "2b"
    tree = {"params": jax.tree_util.tree_map(jnp.asarray, _bfloat16(params))}
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save(os.fspath(folder), tree)
    return folder


@pytest.fixture(scope="module")
def pt_file(params, tmp_path_factory):
    filename = tmp_path_factory.mktemp("pytorch") / "2b.pt"
    torch.save(flax_params_to_pytorch_state_dict(params), filename)
    return filename


@pytest.fixture(scope="module")
def pt_bf16_file(params, tmp_path_factory):
    filename = tmp_path_factory.mktemp("pytorch_bf16") / "2b.pt"
    state_dict = flax_params_to_pytorch_state_dict(_bfloat16(params))
    assert all(v.dtype == torch.bfloat16 for v in state_dict.values())
    torch.save(state_dict, filename)
    return filename


def _eager_orbax(path, dtype=None):
    return backbone_from_official(orbax.read_orbax_params(path), dtype=dtype)


def _eager_torch(path, dtype=None):
    state_dict = official_torch.read_torch_state_dict(path)
    params = official_torch.params_from_torch_state_dict(state_dict)
    return backbone_from_official(params, dtype=dtype)


# --- Orbax ---------------------------------------------------------------------


def test_orbax_metadata_gives_every_shape_without_reading(
    orbax_reads, orbax_dir, params
):
    lazy = _flat(orbax.lazy_orbax_params(orbax_dir))
    expected = _flat(params)
    assert sorted(lazy) == sorted(expected)
    for key, value in expected.items():
        assert lazy[key].shape == value.shape, key
        assert lazy[key].dtype == value.dtype, key
    assert orbax_reads.keys == []
    # Reading one leaf restores that leaf only, exactly.
    key = "blocks.1/recurrent_block/rg_lru/a_param"
    np.testing.assert_array_equal(lazy[key].read(), expected[key])
    assert orbax_reads.keys == [key.replace("/", ".")]


def test_orbax_load_restores_each_leaf_once_one_at_a_time(orbax_reads, orbax_dir):
    backbone = orbax.backbone_from_orbax(orbax_dir)
    leaves = _flat(orbax.read_orbax_params(orbax_dir))
    # `ffw_up/w` and `ffw_up/b` feed two variables each, yet are read once.
    assert sorted(orbax_reads.keys) == sorted(k.replace("/", ".") for k in leaves)
    assert len(backbone.weights) > len(leaves)
    assert orbax_reads.peak == 1
    assert orbax_reads.held() == []


def test_orbax_preset_load_streams(orbax_reads, orbax_dir):
    # `from_preset` on a download folder goes through `ConvertedPresetLoader`.
    backbone = RecurrentGemmaBackbone.from_preset(os.fspath(orbax_dir.parent))
    assert len(orbax_reads.keys) == len(set(orbax_reads.keys)) > 0
    assert orbax_reads.peak == 1
    assert_same_weights(backbone, _eager_orbax(orbax_dir))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_orbax_load_equals_the_eager_path(orbax_dir, dtype):
    assert_same_weights(
        orbax.backbone_from_orbax(orbax_dir, dtype=dtype),
        _eager_orbax(orbax_dir, dtype=dtype),
    )


def test_bfloat16_non_ocdbt_orbax_equals_the_eager_path(orbax_reads, orbax_bf16_dir):
    lazy = orbax.backbone_from_orbax(orbax_bf16_dir, dtype="bfloat16")
    assert orbax_reads.peak == 1
    assert all(key.startswith("params.") for key in orbax_reads.keys)
    eager = _eager_orbax(orbax_bf16_dir, dtype="bfloat16")
    assert all(v.dtype == "bfloat16" for v in lazy.weights)
    assert_same_weights(lazy, eager)


def test_legacy_msgpack_orbax_still_loads(params, tmp_path):
    # No tree metadata: the single msgpack file is restored whole.
    from flax.serialization import msgpack_serialize

    (tmp_path / "2b").mkdir()
    (tmp_path / "2b" / "checkpoint").write_bytes(msgpack_serialize(params))
    assert_same_weights(
        orbax.backbone_from_orbax(tmp_path), backbone_from_official(params)
    )


def _damaged(params, damage):
    tree = jax.tree_util.tree_map(lambda x: x, params)
    if damage == "missing":
        del tree["blocks.1"]["recurrent_block"]["rg_lru"]["a_gate"]["b"]
        return tree, "blocks.1/recurrent_block/rg_lru/a_gate/b"
    if damage == "misshaped_norm":
        tree["final_norm"]["scale"] = np.zeros((1, params["final_norm"]["scale"].size))
        return tree, "final_norm/scale"
    w = params["blocks.1"]["mlp_block"]["ffw_up"]["w"]
    tree["blocks.1"]["mlp_block"]["ffw_up"]["w"] = np.zeros(
        w.shape[:2] + (w.shape[2] + 1,), w.dtype
    )
    return tree, "blocks.1/mlp_block/ffw_up/w[0]"


_DAMAGES = ["missing", "misshaped_norm", "misshaped_ffw_up"]


@pytest.mark.parametrize("damage", _DAMAGES)
def test_orbax_shape_errors_come_before_any_read(orbax_reads, params, tmp_path, damage):
    tree, name = _damaged(params, damage)
    ocp.PyTreeCheckpointer().save(os.fspath(tmp_path / "2b"), tree)
    with pytest.raises(ValueError, match=re.escape(f"`{name}`")):
        orbax.backbone_from_orbax(tmp_path)
    assert orbax_reads.keys == []


@_ORBAX_FAILS
def test_orbax_damaged_data_is_found_when_read(orbax_dir, tmp_path):
    import shutil

    checkpoint = shutil.copytree(orbax_dir, tmp_path / "2b")
    files = [p for p in checkpoint.rglob("*") if p.is_file()]
    data = max(files, key=lambda p: p.stat().st_size)
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)
    lazy = _flat(orbax.lazy_orbax_params(checkpoint))  # the metadata is intact
    with pytest.raises(ValueError, match=re.escape(os.fspath(checkpoint))) as error:
        for tensor in lazy.values():
            tensor.read()
    assert "truncated, incomplete or corrupt" in str(error.value)
    assert re.search(r"at tensor `[^`]+`", str(error.value))


# --- Official PyTorch ------------------------------------------------------------


def test_pt_load_reads_one_tensor_at_a_time(torch_reads, pt_file):
    backbone = official_torch.backbone_from_official_torch(pt_file)
    # One read per variable: the two halves of `ffw_up` are row slices, and
    # no tensor is read twice.
    assert len(torch_reads.keys) == len(set(torch_reads.keys))
    assert len(torch_reads.keys) == len(backbone.weights)
    assert torch_reads.peak == 1
    assert torch_reads.held() == []


def test_pt_preset_load_streams(torch_reads, pt_file):
    backbone = RecurrentGemmaBackbone.from_preset(os.fspath(pt_file.parent))
    assert len(torch_reads.keys) == len(backbone.weights)
    assert torch_reads.peak == 1
    assert_same_weights(backbone, _eager_torch(pt_file))


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_pt_load_equals_the_eager_path(pt_file, dtype):
    assert_same_weights(
        official_torch.backbone_from_official_torch(pt_file, dtype=dtype),
        _eager_torch(pt_file, dtype=dtype),
    )


def test_bfloat16_pt_equals_the_eager_path(pt_bf16_file):
    lazy = official_torch.backbone_from_official_torch(pt_bf16_file, dtype="bfloat16")
    assert all(v.dtype == "bfloat16" for v in lazy.weights)
    assert_same_weights(lazy, _eager_torch(pt_bf16_file, dtype="bfloat16"))


@pytest.mark.parametrize("damage", _DAMAGES)
def test_pt_shape_errors_come_before_any_read(torch_reads, params, tmp_path, damage):
    tree, name = _damaged(params, damage)
    torch.save(flax_params_to_pytorch_state_dict(tree), tmp_path / "2b.pt")
    # The error names the tensor as the file does.
    key = name.replace("/", ".")
    with pytest.raises(ValueError, match=re.escape(f"`{key}")):
        official_torch.backbone_from_official_torch(tmp_path)
    assert torch_reads.keys == []


def test_a_read_tensor_does_not_alias_the_file(pt_file):
    _, state_dict, mapped = official_torch._load_state_dict(pt_file)
    assert mapped
    regions = official_torch._mapped_regions(pt_file)
    key = "blocks.0.recurrent_block.linear_x.weight"
    lazy = official_torch._lazy_leaf(state_dict[key], True, regions)
    np.testing.assert_array_equal(lazy.read(), state_dict[key].numpy().T)
    # `official` transposes the Flax kernel back to our `[o, i]`, the file's
    # own layout: one straight copy.
    array = lazy.T.read()
    assert array.flags.c_contiguous and array.flags.writeable
    assert not np.shares_memory(array, state_dict[key].numpy())
    np.testing.assert_array_equal(array, state_dict[key].numpy())


def _mapped_rss_kb(filename):
    """Resident kB of this process's mappings of `filename` (/proc/self/smaps)."""
    target, total, inside = os.path.realpath(filename), 0, False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if re.match(r"^[0-9a-f]+-[0-9a-f]+$", fields[0]):
                inside = len(fields) == 6 and fields[5].strip() == target
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc, madvise")
def test_read_pages_of_the_pt_file_are_released(tmp_path):
    rng = np.random.default_rng(0)
    big = rng.normal(size=(1024, 1024)).astype(np.float32)  # 4 MiB
    filename = tmp_path / "big.pt"
    torch.save({"embedder.input_embedding": torch.from_numpy(big)}, filename)
    _, state_dict, _ = official_torch._load_state_dict(filename)
    tensor = state_dict["embedder.input_embedding"]
    regions = official_torch._mapped_regions(filename)
    assert regions
    lazy = official_torch._lazy_leaf(tensor, False, regions)

    # What the measure sees: touching the map makes its pages resident.
    exact = float(big.sum(dtype=np.float64))
    assert float(tensor.sum()) == pytest.approx(exact, rel=FLOAT32_SUM["relative"])
    assert _mapped_rss_kb(filename) >= 4096
    # Reading the tensor copies it out and drops the file's pages it touched.
    np.testing.assert_array_equal(lazy.read(), big)
    assert _mapped_rss_kb(filename) < 64
    # Dropped pages come back from the file, unchanged, if read again; so
    # does a row slice, which drops only its own pages.
    np.testing.assert_array_equal(lazy[256:512].read(), big[256:512])
    assert _mapped_rss_kb(filename) < 64
    np.testing.assert_array_equal(lazy.read(), big)


def test_pt_bfloat16_reads_keep_bits(pt_bf16_file):
    _, state_dict, _ = official_torch._load_state_dict(pt_bf16_file)
    regions = official_torch._mapped_regions(pt_bf16_file)
    key = "blocks.2.attention_block.proj_q.weight"
    lazy = official_torch._lazy_leaf(state_dict[key], True, regions)
    assert lazy.dtype == ml_dtypes.bfloat16
    expected = state_dict[key].view(torch.int16).numpy().T
    np.testing.assert_array_equal(lazy.read().view(np.int16), expected)
