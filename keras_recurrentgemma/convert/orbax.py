"""Reading the official Flax checkpoints, as Orbax wrote them.

Kaggle's `google/recurrentgemma/flax/<variant>` download holds a checkpoint
folder such as `2b/` next to `tokenizer.model`. `find_orbax_checkpoint`
locates it, `read_orbax_params` restores the parameter tree as numpy, and
`backbone_from_orbax` converts it with `official.build_backbone`, streaming:
`lazy_orbax_params` gives the tree from the checkpoint's metadata (names,
shapes, dtypes), every shape is checked, then one array at a time is read
(with tensorstore, as Orbax reads it), converted and assigned.
"""

import os
import re
from collections.abc import Mapping

import numpy as np

from keras_recurrentgemma.convert.common import LazyTensor
from keras_recurrentgemma.convert.common import checkpoint_in
from keras_recurrentgemma.convert.common import locate_checkpoint
from keras_recurrentgemma.convert.common import read_json_object
from keras_recurrentgemma.convert.common import to_numpy
from keras_recurrentgemma.convert.official import build_backbone

# Files that only an Orbax (or Flax) checkpoint folder holds: the PyTree
# metadata (orbax >= 0.5), the OCDBT root manifest, and the msgpack
# `checkpoint` of older Flax/Orbax saves.
_ORBAX_MARKERS = ("_METADATA", "manifest.ocdbt")
_LEGACY_CHECKPOINT_FILE = "checkpoint"
# Orbax writes into `<name>.orbax-checkpoint-tmp-<timestamp>` (or, in 0.12,
# `<name>.orbax-checkpoint-tmp`) and renames it once the save is complete.
_ORBAX_TMP = ".orbax-checkpoint-tmp"


def _is_msgpack_map(filename):
    # TensorFlow checkpoints also have a file named `checkpoint`, but theirs
    # is a text proto; Flax's starts with a msgpack map header.
    try:
        with open(filename, "rb") as f:
            first = f.read(1)
    except OSError:
        return False
    return bool(first) and (0x80 <= first[0] <= 0x8F or first[0] in (0xDE, 0xDF))


def is_orbax_checkpoint(path):
    """True if `path` is a folder written by Orbax (or the older Flax saver).

    Args:
        path: str or path-like.

    Returns:
        bool. A folder holding `_METADATA` or `manifest.ocdbt` (what
        `orbax.checkpoint.PyTreeCheckpointer().save` writes, with and without
        OCDBT), or a msgpack `checkpoint` file (older Flax and Orbax saves).
    """
    path = os.fspath(path)
    if not os.path.isdir(path):
        return False
    if any(os.path.isfile(os.path.join(path, name)) for name in _ORBAX_MARKERS):
        return True
    return _is_msgpack_map(os.path.join(path, _LEGACY_CHECKPOINT_FILE))


def find_orbax_checkpoint(directory):
    """Finds the Orbax checkpoint folder of a downloaded model.

    The Kaggle Flax downloads hold the checkpoint in a subfolder named after
    the model (`2b/`, `2b-it/`, ...) next to `tokenizer.model`.

    Args:
        directory: str or path-like. The checkpoint folder itself, or a folder
            with exactly one checkpoint folder directly inside it. Unfinished
            saves (`*.orbax-checkpoint-tmp*`) are not counted.

    Returns:
        The checkpoint folder as a str, or `None` if there is none.

    Raises:
        ValueError: if `directory` holds several checkpoint folders (they are
            listed).
    """
    directory = os.fspath(directory)
    if is_orbax_checkpoint(directory):
        return directory
    return checkpoint_in(directory, _is_finished_checkpoint, "Orbax")


def _is_finished_checkpoint(path):
    return _ORBAX_TMP not in os.path.basename(path) and is_orbax_checkpoint(path)


def _orbax_error_detail(error):
    # tensorstore appends its whole JSON spec to the message; the part before
    # it says what failed and where.
    message = str(error).split(" [tensorstore_spec=")[0].strip()
    message = " ".join(message.split())
    return message[:600] or type(error).__name__


def _orbax_file_in(message, path):
    """The file a tensorstore message names, if it is inside `path`."""
    for name in re.findall(r'local file "([^"]+)"', message):
        if not name.endswith("/") and os.path.abspath(name).startswith(
            os.path.abspath(path)
        ):
            return name
    return None


def _import_orbax():
    try:
        import orbax.checkpoint as ocp
    except ImportError as e:
        raise ImportError(
            "Reading an Orbax (Flax) checkpoint needs the `orbax-checkpoint` "
            "package: `pip install orbax-checkpoint`."
        ) from e
    return ocp


def _numpy_restore_args(ocp, checkpointer, path):
    """Restore arguments that ask for numpy leaves, or None if unknown.

    Restored as numpy, the arrays never go to an accelerator (a 2B
    checkpoint would otherwise take device memory just to be converted).
    """
    import jax

    try:
        metadata = checkpointer.metadata(path)
    except Exception:  # Old layouts: the plain restore still works.
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping):
        return None
    return jax.tree_util.tree_map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree
    )


def _checkpoint_folder(path):
    """The absolute checkpoint folder of `path`, or a ValueError saying why not."""
    checkpoint = locate_checkpoint(
        path,
        find_orbax_checkpoint,
        f"not an Orbax checkpoint (no {' or '.join(_ORBAX_MARKERS)} in it or in a "
        "folder directly inside it).",
    )
    checkpoint = os.path.abspath(checkpoint)
    if _ORBAX_TMP in os.path.basename(checkpoint):
        raise ValueError(
            f"{checkpoint}: an unfinished Orbax save (Orbax renames the folder "
            "once every file is written); save or download it again."
        )
    return checkpoint


def _unreadable(checkpoint, error, tensor=None):
    # tensorstore reports missing and truncated files as ValueError,
    # FileNotFoundError or OSError with a spec dump; say what it means.
    detail = _orbax_error_detail(error)
    culprit = _orbax_file_in(detail, checkpoint)
    return ValueError(
        f"{checkpoint}: cannot read this Orbax checkpoint; it is truncated, "
        "incomplete or corrupt"
        + (f" (file {culprit})" if culprit else "")
        + (f" at tensor `{tensor}`" if tensor else "")
        + f". Orbax said: {detail}"
    )


def read_orbax_params(path):
    """Reads an official Orbax checkpoint into a nested dict of numpy arrays.

    This holds the whole checkpoint in memory; `backbone_from_orbax` reads
    one tensor at a time instead (see `lazy_orbax_params`).

    Args:
        path: str or path-like. The checkpoint folder, or a folder holding
            exactly one (see `find_orbax_checkpoint`).

    Returns:
        The restored tree as nested dicts of numpy arrays; bfloat16 tensors
        stay `ml_dtypes.bfloat16`. It is whatever was saved, e.g. the Griffin
        tree, or `{"params": tree}`.

    Raises:
        ImportError: if `orbax-checkpoint` is not installed.
        ValueError: if `path` is not an Orbax checkpoint, is an unfinished
            save, or is truncated, incomplete or corrupt (the message names
            the folder, and the file when Orbax reports it).
    """
    checkpoint = _checkpoint_folder(path)
    ocp = _import_orbax()
    checkpointer = ocp.PyTreeCheckpointer()
    try:
        restore_args = _numpy_restore_args(ocp, checkpointer, checkpoint)
        if restore_args is None:
            tree = checkpointer.restore(checkpoint)
        else:
            tree = checkpointer.restore(
                checkpoint, args=ocp.args.PyTreeRestore(restore_args=restore_args)
            )
    except MemoryError:
        raise
    except Exception as e:
        raise _unreadable(checkpoint, e) from e
    if not isinstance(tree, Mapping):
        raise ValueError(
            f"{checkpoint}: the Orbax checkpoint holds a {type(tree).__name__}, "
            "not a tree of named parameters."
        )
    return _to_numpy_tree(tree)


def _metadata_tree(checkpointer, checkpoint):
    """The saved tree with an `ArrayMetadata` (name, shape, dtype) per leaf.

    `None` when the checkpoint has no readable tree metadata (the msgpack
    layout of older saves, or a damaged `_METADATA`), or a leaf is not a
    named array: then only a whole restore can tell.
    """
    try:
        metadata = checkpointer.metadata(checkpoint)
    except Exception:
        return None
    tree = getattr(metadata, "item_metadata", metadata)
    tree = getattr(tree, "tree", tree)
    if not isinstance(tree, Mapping) or not tree:
        return None
    for leaf in _flat_leaves(tree).values():
        try:
            np.dtype(leaf.dtype)
            tuple(int(n) for n in leaf.shape)
        except Exception:
            return None
        if not isinstance(getattr(leaf, "name", None), str):
            return None
    return tree


def _flat_leaves(tree, keys=()):
    leaves = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            leaves.update(_flat_leaves(value, keys + (key,)))
        else:
            leaves[keys + (key,)] = value
    return leaves


def _read_array(spec, context):
    """Reads one array of the checkpoint with tensorstore, as numpy.

    Synchronous, so nothing (such as an asyncio future) keeps the array
    alive after its caller drops it.
    """
    import tensorstore as ts

    store = ts.open(ts.Spec(spec), open=True, context=context).result()
    return np.asarray(store.read().result())


class _ArrayReader:
    """Reads a checkpoint's arrays one at a time, as Orbax's numpy restore does.

    Each array is opened with the tensorstore spec Orbax builds for it
    (OCDBT or one folder per array, zarr v2 or v3, from `_METADATA`), so
    only that array's chunks are read. `official.build_backbone` splits
    `ffw_up/w` and `ffw_up/b` into two variables each, assigned one after
    the other, so the latest array is kept for the next read; it is dropped
    before any other is read.
    """

    def __init__(self, ocp, checkpoint, settings):
        from etils import epath

        directory = epath.Path(checkpoint)
        use_ocdbt = settings.get("use_ocdbt")
        if use_ocdbt is None:
            use_ocdbt = ocp.type_handlers.is_ocdbt_checkpoint(directory)
        self._ocp = ocp
        self._checkpoint = checkpoint
        self._directory = directory
        self._use_ocdbt = bool(use_ocdbt)
        self._use_zarr3 = bool(settings.get("use_zarr3", False))
        # Orbax's rule: chunks equal to the fill value were left unwritten
        # unless this was set when saving.
        self._raise_if_missing = bool(
            settings.get("store_array_data_equal_to_fill_value", False)
        )
        self._context = ocp.type_handlers.get_ts_context(use_ocdbt=self._use_ocdbt)
        self._latest = None

    def _spec(self, name):
        info = self._ocp.type_handlers.ParamInfo(
            name=name,
            parent_dir=self._directory,
            is_ocdbt_checkpoint=self._use_ocdbt,
            use_zarr3=self._use_zarr3,
            raise_array_data_missing_error=self._raise_if_missing,
        )
        return self._ocp.type_handlers.get_json_tspec_read(
            info,
            use_ocdbt=self._use_ocdbt,
            raise_array_data_missing_error=self._raise_if_missing,
        )

    def read(self, keys, name):
        if self._latest is not None and self._latest[0] == keys:
            return self._latest[1]
        self._latest = None
        try:
            array = _read_array(self._spec(name), self._context)
        except MemoryError:
            raise
        except Exception as e:
            raise _unreadable(self._checkpoint, e, "/".join(keys)) from e
        self._latest = (keys, array)
        return array


def lazy_orbax_params(path):
    """The parameter tree of an Orbax checkpoint, read from its metadata only.

    Every leaf is a `LazyTensor` with the saved shape and dtype; reading it
    reads that one array. `backbone_from_orbax` checks every name and shape
    on this tree, then reads one array at a time. Checkpoints without tree
    metadata (the msgpack `checkpoint` of older saves) hold the whole tree
    in one file: they are restored at once, as `read_orbax_params` does.

    Args:
        path: str or path-like. The checkpoint folder, or a folder holding
            exactly one (see `find_orbax_checkpoint`).

    Returns:
        Nested dicts of `LazyTensor`s (or numpy arrays, see above), with the
        structure `read_orbax_params` returns.

    Raises:
        ImportError: if `orbax-checkpoint` is not installed.
        ValueError: as `read_orbax_params`; a damaged array is only found
            when it is read, with the same message naming the tensor.
    """
    checkpoint = _checkpoint_folder(path)
    ocp = _import_orbax()
    tree = _metadata_tree(ocp.PyTreeCheckpointer(), checkpoint)
    try:
        settings = read_json_object(os.path.join(checkpoint, "_METADATA"))
    except ValueError:
        tree = None
    if tree is None:
        return read_orbax_params(checkpoint)
    reader = _ArrayReader(ocp, checkpoint, settings)

    def lazy(keys, leaf):
        return LazyTensor(leaf.shape, leaf.dtype, lambda: reader.read(keys, leaf.name))

    return _map_leaves(tree, lazy)


def _map_leaves(tree, fn, keys=()):
    return {
        key: (
            _map_leaves(value, fn, keys + (key,))
            if isinstance(value, Mapping)
            else fn(keys + (key,), value)
        )
        for key, value in tree.items()
    }


def _to_numpy_tree(tree):
    return {
        key: _to_numpy_tree(value) if isinstance(value, Mapping) else to_numpy(value)
        for key, value in tree.items()
    }


def backbone_from_orbax(path, dtype=None, **config_overrides):
    """Builds a `RecurrentGemmaBackbone` from an official Orbax checkpoint.

    Args:
        path: str or path-like. The checkpoint folder (e.g. `2b/` of the
            Kaggle Flax download), or the download folder holding it.
        dtype: string or `keras.DTypePolicy` for the backbone. `None` uses
            Keras' default (float32).
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values (see `backbone_from_official`);
            `attention_window_size` is 2048 unless given.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ImportError: if `orbax-checkpoint` is not installed.
        ValueError: if the checkpoint cannot be read (naming the folder) or
            does not hold a Griffin tree (naming the tensor).
    """
    params = lazy_orbax_params(path)
    where = f"Orbax checkpoint {find_orbax_checkpoint(path)}"
    return build_backbone(params, dtype, config_overrides, where)
