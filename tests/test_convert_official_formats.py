"""The official checkpoint files, written by the real tools, and the references.

One tiny Griffin tree with every leaf random is written the way the Kaggle
downloads hold it: an Orbax folder `2b/` saved by
`orbax.checkpoint.PyTreeCheckpointer`, and a `2b.pt` saved by `torch.save`
from `recurrentgemma.conversion.flax_params_to_pytorch_state_dict`, each next
to a `tokenizer.model`. Both are found, read and converted, and our logits
are compared with the official JAX and PyTorch models' and with
`reference_logits`; so is a Hugging Face directory written by
`save_pretrained`. Then every way a file can be broken must be a `ValueError`
that says which file.

Run once per backend: `KERAS_BACKEND=jax|tensorflow|torch pytest ...`.
"""

import os
import re
import shutil
import sys

import jax
import jax.numpy as jnp
import keras
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import recurrentgemma.jax
import recurrentgemma.torch
import torch
from recurrentgemma.conversion import flax_params_to_pytorch_state_dict

from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from keras_recurrentgemma.convert.official import backbone_from_official
from keras_recurrentgemma.convert.official_torch import backbone_from_official_torch
from keras_recurrentgemma.convert.official_torch import find_torch_checkpoint
from keras_recurrentgemma.convert.official_torch import params_from_torch_state_dict
from keras_recurrentgemma.convert.official_torch import read_torch_state_dict
from keras_recurrentgemma.convert.orbax import backbone_from_orbax
from keras_recurrentgemma.convert.orbax import find_orbax_checkpoint
from keras_recurrentgemma.convert.orbax import read_orbax_params
from keras_recurrentgemma.convert.reference import griffin_config
from keras_recurrentgemma.convert.reference import reference_logits
from tests.conftest import TINY_CONFIGS
from tests.test_official_parity import official_config
from tests.test_official_parity import random_official_params
from tests.tolerances import PARITY
from tests.tolerances import REFERENCE_RUNNER
from tests.tolerances import relative_error

NAME = "griffin"  # Both block types, lru_width != hidden_dim.
CONFIG = TINY_CONFIGS[NAME]
WINDOW = CONFIG["attention_window_size"]
SEQ_LEN = 3 * WINDOW
MODEL_DIR = "2b"
PT_FILE = "2b.pt"


def _flat(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _assert_same_tree(actual, expected):
    actual, expected = _flat(actual), _flat(expected)
    assert sorted(actual) == sorted(expected)
    for key, value in expected.items():
        assert actual[key].dtype == value.dtype, key
        np.testing.assert_array_equal(actual[key], value, err_msg=key)


def _logits(backbone, ids):
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids)}
    if keras.config.backend() == "jax":
        # One compiled call is seconds faster than eager JAX on a new model.
        def forward(x):
            hidden = backbone(x)
            return backbone.token_embedding(hidden, reverse=True)

        logits = jax.jit(forward)(inputs)
    else:
        logits = backbone.token_embedding(backbone(inputs), reverse=True)
    return keras.ops.convert_to_numpy(keras.ops.cast(logits, "float32"))


def _assert_parity(ours, expected):
    assert ours.shape == expected.shape
    error = relative_error(ours, expected)
    print(f"relative error {error:.2e}")
    assert error <= PARITY["float32"]["relative"], error


def _weights(backbone):
    return {v.path: keras.ops.convert_to_numpy(v) for v in backbone.weights}


def _kaggle_folder(root, name):
    folder = root / name
    folder.mkdir()
    # Kaggle ships the tokenizer beside the weights; the finders skip it.
    (folder / "tokenizer.model").write_bytes(b"not used here")
    return folder


def _save_orbax(folder, params):
    ocp.PyTreeCheckpointer().save(os.fspath(folder), params)


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _data_file(checkpoint):
    """The largest file of an Orbax folder: array data, not metadata."""
    files = [
        os.path.join(root, name)
        for root, _, names in os.walk(checkpoint)
        for name in names
    ]
    return max(files, key=os.path.getsize)


def _truncate(filename):
    with open(filename, "r+b") as f:
        f.truncate(os.path.getsize(filename) // 2)


# --- Fixtures ------------------------------------------------------------------


@pytest.fixture(scope="module")
def params():
    return random_official_params(official_config(NAME), seed=11)


@pytest.fixture(scope="module")
def ids():
    rng = np.random.default_rng(3)
    return rng.integers(0, CONFIG["vocabulary_size"], (2, SEQ_LEN)).astype(np.int32)


@pytest.fixture(scope="module")
def orbax_download(params, tmp_path_factory):
    folder = _kaggle_folder(tmp_path_factory.mktemp("flax"), "recurrentgemma-2b")
    _save_orbax(folder / MODEL_DIR, params)
    return folder


@pytest.fixture(scope="module")
def torch_download(params, tmp_path_factory):
    folder = _kaggle_folder(tmp_path_factory.mktemp("pytorch"), "recurrentgemma-2b")
    torch.save(flax_params_to_pytorch_state_dict(params), folder / PT_FILE)
    return folder


@pytest.fixture(scope="module")
def official_jax_logits(params, ids):
    model = recurrentgemma.jax.Griffin(
        official_config(NAME), gradient_checkpointing=False
    )
    segment_pos = np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32), ids.shape)

    @jax.jit
    def forward(params, tokens, segment_pos):
        logits, _ = model.apply(
            {"params": params}, tokens, segment_pos, return_cache=False
        )
        return logits

    return np.asarray(forward(params, ids, segment_pos), np.float32)


@pytest.fixture(scope="module")
def official_torch_logits(params, ids):
    model = recurrentgemma.torch.Griffin(
        official_config(NAME), gradient_checkpointing=False, dtype=torch.float32
    )
    model.load_state_dict(flax_params_to_pytorch_state_dict(params))
    segment_pos = torch.arange(SEQ_LEN).expand(ids.shape[0], SEQ_LEN)
    with torch.no_grad():
        logits, _ = model.eval()(
            torch.from_numpy(ids).long(), segment_pos, return_cache=False
        )
    return logits.numpy()


@pytest.fixture(scope="module")
def orbax_backbone(orbax_download):
    return backbone_from_orbax(orbax_download, attention_window_size=WINDOW)


@pytest.fixture(scope="module")
def torch_backbone(torch_download):
    return backbone_from_official_torch(torch_download, attention_window_size=WINDOW)


# --- Orbax ---------------------------------------------------------------------


def test_finds_the_orbax_folder_of_a_kaggle_download(orbax_download):
    checkpoint = os.fspath(orbax_download / MODEL_DIR)
    assert find_orbax_checkpoint(orbax_download) == checkpoint
    assert find_orbax_checkpoint(checkpoint) == checkpoint
    # What orbax-checkpoint 0.12 writes (OCDBT): the detection relies on the
    # first two.
    names = set(os.listdir(checkpoint))
    assert {"_METADATA", "manifest.ocdbt", "ocdbt.process_0"} <= names


def test_reads_orbax_params_exactly(orbax_download, params):
    _assert_same_tree(read_orbax_params(orbax_download), params)


@pytest.mark.parametrize("wrapped", [False, True], ids=["tree", "params_wrapped"])
def test_reads_bfloat16_and_non_ocdbt_orbax(params, tmp_path, wrapped):
    # The non-OCDBT layout (one zarr folder per array) is what older Orbax
    # wrote by default; jax arrays, as a training loop would save them.
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    tree = {"params": bf16} if wrapped else bf16
    checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(use_ocdbt=False))
    checkpointer.save(os.fspath(tmp_path / MODEL_DIR), tree)
    assert find_orbax_checkpoint(tmp_path) == os.fspath(tmp_path / MODEL_DIR)
    restored = read_orbax_params(tmp_path)
    expected = jax.tree_util.tree_map(lambda x: x.astype(ml_dtypes.bfloat16), params)
    _assert_same_tree(restored, {"params": expected} if wrapped else expected)


def test_reads_legacy_msgpack_checkpoint(params, tmp_path):
    # Early Orbax and Flax savers aggregated the whole tree into one msgpack
    # file named `checkpoint`; Orbax 0.12 still restores it.
    from flax.serialization import msgpack_serialize

    (tmp_path / MODEL_DIR).mkdir()
    (tmp_path / MODEL_DIR / "checkpoint").write_bytes(msgpack_serialize(params))
    assert find_orbax_checkpoint(tmp_path) == os.fspath(tmp_path / MODEL_DIR)
    _assert_same_tree(read_orbax_params(tmp_path), params)


def test_orbax_backbone_matches_official_jax(orbax_backbone, ids, official_jax_logits):
    assert orbax_backbone.attention_window_size == WINDOW
    _assert_parity(_logits(orbax_backbone, ids), official_jax_logits)


def test_orbax_reference_logits_match_ours(
    orbax_download, orbax_backbone, ids, official_jax_logits
):
    # The official config is read off the checkpoint (with the window given),
    # as the converter reads ours; that it equals what the backbone's config
    # gives is checked separately.
    reference = reference_logits(
        "orbax", orbax_download, ids, attention_window_size=WINDOW
    )
    assert reference.dtype == np.float32
    np.testing.assert_allclose(
        reference, official_jax_logits, **REFERENCE_RUNNER["float32"]
    )
    _assert_parity(_logits(orbax_backbone, ids), reference)


def test_griffin_config_from_backbone(orbax_backbone):
    assert griffin_config(orbax_backbone.get_config()) == official_config(NAME)


# --- PyTorch -------------------------------------------------------------------


def test_finds_the_pt_file(torch_download):
    filename = os.fspath(torch_download / PT_FILE)
    assert find_torch_checkpoint(torch_download) == filename
    assert find_torch_checkpoint(filename) == filename


def test_torch_state_dict_inverts_the_official_conversion(torch_download, params):
    state_dict = read_torch_state_dict(torch_download)
    assert "blocks.0.recurrent_block.linear_x.weight" in state_dict
    _assert_same_tree(params_from_torch_state_dict(state_dict), params)


def test_torch_backbone_matches_official_torch(
    torch_backbone, ids, official_torch_logits
):
    _assert_parity(_logits(torch_backbone, ids), official_torch_logits)


def test_torch_reference_logits_match_ours(
    torch_download, torch_backbone, ids, official_torch_logits
):
    reference = reference_logits(
        "official_torch", torch_download / PT_FILE, ids, backbone=torch_backbone
    )
    assert reference.dtype == np.float32
    np.testing.assert_allclose(
        reference, official_torch_logits, **REFERENCE_RUNNER["float32"]
    )
    _assert_parity(_logits(torch_backbone, ids), reference)


def test_bfloat16_pt_keeps_every_bit(params, tmp_path):
    bf16 = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.bfloat16), params)
    state_dict = flax_params_to_pytorch_state_dict(bf16)
    assert all(v.dtype == torch.bfloat16 for v in state_dict.values())
    torch.save(state_dict, tmp_path / PT_FILE)
    ours = backbone_from_official_torch(tmp_path, dtype="bfloat16")
    expected = backbone_from_official(
        jax.tree_util.tree_map(lambda x: np.asarray(x), bf16), dtype="bfloat16"
    )
    assert all(v.dtype == "bfloat16" for v in ours.weights)
    got, want = _weights(ours), _weights(expected)
    assert sorted(got) == sorted(want)
    for path in want:
        # bfloat16 -> float32 is exact, so equal float32 values are equal bits.
        np.testing.assert_array_equal(
            np.asarray(got[path], np.float32), np.asarray(want[path], np.float32)
        )


def test_wrapped_and_prefixed_state_dicts(params, tmp_path):
    state_dict = flax_params_to_pytorch_state_dict(params)
    prefixed = {f"module.{k}": v for k, v in state_dict.items()}
    torch.save({"state_dict": prefixed, "step": 3}, tmp_path / "model.pth")
    _assert_same_tree(
        params_from_torch_state_dict(read_torch_state_dict(tmp_path)), params
    )


# --- Hugging Face reference ----------------------------------------------------


def test_huggingface_reference_logits_match_ours(tmp_path):
    pytest.importorskip("transformers")
    from tests.test_hf_parity import make_hf_model

    model = make_hf_model(CONFIG, CONFIG["block_types"], seed=0)
    model.save_pretrained(tmp_path)
    # transformers 5.23 is a valid reference only inside the window (SPEC §6).
    ids = np.random.default_rng(5).integers(0, CONFIG["vocabulary_size"], (2, WINDOW))
    reference = reference_logits("huggingface", tmp_path, ids)
    assert reference.shape == (2, WINDOW, CONFIG["vocabulary_size"])
    _assert_parity(_logits(backbone_from_huggingface(tmp_path), ids), reference)


# --- Bad input -----------------------------------------------------------------


def test_truncated_pt_names_the_file(torch_download, tmp_path):
    filename = tmp_path / PT_FILE
    shutil.copy(torch_download / PT_FILE, filename)
    _truncate(filename)
    with pytest.raises(ValueError, match=re.escape(os.fspath(filename))):
        backbone_from_official_torch(tmp_path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello, not a checkpoint", "list"],
    ids=["empty", "text", "not_a_state_dict"],
)
def test_not_a_torch_checkpoint_names_the_file(tmp_path, content):
    filename = tmp_path / PT_FILE
    if content == "list":
        torch.save([torch.zeros(3)], filename)
    else:
        filename.write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(os.fspath(filename))):
        read_torch_state_dict(filename)


def test_two_pt_files_are_listed(tmp_path):
    for name in ("2b.pt", "2b-it.pth"):
        (tmp_path / name).write_bytes(b"")
    with pytest.raises(ValueError, match=r"2b-it\.pth.*2b\.pt"):
        find_torch_checkpoint(tmp_path)


@pytest.mark.parametrize(
    "key, shape",
    [
        ("blocks.0.recurrent_block.conv_1d.b", (49,)),
        ("blocks.2.attention_block.proj_q.weight", (32, 31)),
        ("blocks.1.mlp_block.ffw_up.w", (2, 32, 47)),
    ],
)
def test_misshaped_torch_tensor_is_named(params, tmp_path, key, shape):
    state_dict = flax_params_to_pytorch_state_dict(params)
    state_dict[key] = torch.zeros(shape)
    torch.save(state_dict, tmp_path / PT_FILE)
    with pytest.raises(ValueError, match=re.escape(f"`{key}")):
        backbone_from_official_torch(tmp_path, attention_window_size=WINDOW)


def test_missing_torch_tensor_is_named(params, tmp_path):
    state_dict = flax_params_to_pytorch_state_dict(params)
    del state_dict["blocks.1.recurrent_block.rg_lru.a_gate.b"]
    torch.save(state_dict, tmp_path / PT_FILE)
    with pytest.raises(
        ValueError, match=r"`blocks\.1\.recurrent_block\.rg_lru\.a_gate\.b`"
    ):
        backbone_from_official_torch(tmp_path)


def test_linear_weight_must_be_2d(params):
    state_dict = flax_params_to_pytorch_state_dict(params)
    state_dict["blocks.0.recurrent_block.linear_x.weight"] = torch.zeros(48)
    with pytest.raises(ValueError, match="linear_x.weight"):
        params_from_torch_state_dict(state_dict)


# Orbax's reader leaves asyncio callbacks behind when tensorstore fails; they
# surface later as "Event loop is closed", which is not what is tested here.
_ORBAX_FAILS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning"
)


@_ORBAX_FAILS
@pytest.mark.parametrize("damage", ["delete", "truncate"])
def test_damaged_orbax_data_names_the_folder(orbax_download, tmp_path, damage):
    checkpoint = _copy(orbax_download / MODEL_DIR, tmp_path / MODEL_DIR)
    data = _data_file(checkpoint)
    if damage == "delete":
        os.remove(data)
    else:
        _truncate(data)
    with pytest.raises(ValueError, match=re.escape(os.fspath(checkpoint))):
        backbone_from_orbax(tmp_path)


@_ORBAX_FAILS
def test_orbax_without_metadata_names_the_folder(orbax_download, tmp_path):
    checkpoint = _copy(orbax_download / MODEL_DIR, tmp_path / MODEL_DIR)
    os.remove(checkpoint / "_METADATA")
    # `manifest.ocdbt` still marks it as a checkpoint; reading it must fail
    # clearly.
    with pytest.raises(ValueError, match=re.escape(os.fspath(checkpoint))):
        read_orbax_params(tmp_path)


def test_unfinished_orbax_save(orbax_download, tmp_path):
    unfinished = _copy(
        orbax_download / MODEL_DIR, tmp_path / f"{MODEL_DIR}.orbax-checkpoint-tmp-17"
    )
    assert find_orbax_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="unfinished"):
        read_orbax_params(unfinished)


def test_two_orbax_folders_are_listed(orbax_download, tmp_path):
    for name in ("2b", "2b-it"):
        _copy(orbax_download / MODEL_DIR, tmp_path / name)
    with pytest.raises(ValueError, match=r"2b'.*2b-it"):
        find_orbax_checkpoint(tmp_path)


def test_neither_format(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    # TensorFlow's `checkpoint` index is text, not a Flax msgpack checkpoint.
    (tmp_path / "sub" / "checkpoint").write_text('model_checkpoint_path: "x"')
    assert find_orbax_checkpoint(tmp_path) is None
    assert find_torch_checkpoint(tmp_path) is None
    assert find_orbax_checkpoint(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="not an Orbax checkpoint"):
        backbone_from_orbax(tmp_path)
    with pytest.raises(ValueError, match="no PyTorch checkpoint"):
        backbone_from_official_torch(tmp_path)


@pytest.mark.parametrize(
    "module, call, hint",
    [
        ("orbax.checkpoint", lambda d: read_orbax_params(d), "pip install orbax"),
        ("torch", lambda d: read_torch_state_dict(d), "pip install torch"),
        (
            "transformers",
            lambda d: reference_logits("huggingface", d, [[1, 2]]),
            "pip install transformers",
        ),
        (
            "recurrentgemma.jax",
            lambda d: reference_logits("orbax", d, [[1, 2]]),
            re.escape("pip install 'recurrentgemma[jax]'"),
        ),
    ],
)
def test_missing_package_says_what_to_install(
    orbax_download, torch_download, monkeypatch, module, call, hint
):
    folder = torch_download if module == "torch" else orbax_download
    # A None entry makes `import module` raise ImportError.
    monkeypatch.setitem(sys.modules, module, None)
    with pytest.raises(ImportError, match=hint):
        call(folder)


def test_reference_rejects_bad_arguments(orbax_download, orbax_backbone):
    with pytest.raises(ValueError, match="Unknown source_format"):
        reference_logits("gguf", orbax_download, [[1, 2]])
    with pytest.raises(ValueError, match="token_ids"):
        reference_logits("orbax", orbax_download, [1, 2])
    with pytest.raises(ValueError, match="config.json"):
        reference_logits("huggingface", orbax_download, [[1, 2]], window=3)
    config = {**orbax_backbone.get_config(), "conv1d_temporal_width": 3}
    with pytest.raises(ValueError, match="conv1d_temporal_width"):
        griffin_config(config)
