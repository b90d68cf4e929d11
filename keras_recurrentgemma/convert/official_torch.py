"""Reading the official PyTorch checkpoints (`.pt`).

Kaggle's `google/recurrentgemma/pyTorch/<variant>` download holds `2b.pt`
next to `tokenizer.model`: the `state_dict()` of `recurrentgemma.torch.Griffin`,
i.e. the official Flax tree joined with `.`, with every `kernel` renamed
`weight` and stored `(out, in)` as `nn.Linear` does. `params_from_torch_state_dict`
undoes that, and `backbone_from_official_torch` converts the result with
`official.build_backbone`. It streams: the file is memory-mapped, every
shape is checked, then each tensor is copied out of the map only when it is
assigned, and the map's pages it used are dropped again.
"""

import ctypes
import functools
import mmap
import os
import re
import sys
import zipfile
from collections.abc import Mapping

import numpy as np

from keras_recurrentgemma.convert.backend_arrays import host_copy
from keras_recurrentgemma.convert.common import LazyTensor
from keras_recurrentgemma.convert.common import checkpoint_in
from keras_recurrentgemma.convert.common import locate_checkpoint
from keras_recurrentgemma.convert.common import to_numpy
from keras_recurrentgemma.convert.official import build_backbone

_TORCH_SUFFIXES = (".pt", ".pth")
# Wrappers a `.pt` might add around `Griffin.state_dict()`: a training script's
# dict, `nn.DataParallel`'s `module.` prefix, or the `params.` prefix of a
# flattened `{"params": tree}` (what `flax_params_to_pytorch_state_dict` makes
# of a restored training state).
_STATE_DICT_KEYS = ("state_dict", "model_state_dict", "model")
_KEY_PREFIXES = ("module.", "params.")


def _import_torch(what):
    try:
        import torch
    except ImportError as e:
        raise ImportError(
            f"{what} needs PyTorch: `pip install torch` (the CPU build is enough)."
        ) from e
    return torch


def find_torch_checkpoint(directory):
    """Finds the official PyTorch checkpoint (`*.pt` or `*.pth`) in a folder.

    Args:
        directory: str or path-like. A folder such as the Kaggle PyTorch
            download (`2b.pt` next to `tokenizer.model`), or the file itself.

    Returns:
        The file as a str, or `None` if there is no such file.

    Raises:
        ValueError: if the folder holds several candidates (they are listed).
    """
    directory = os.fspath(directory)
    if os.path.isfile(directory):
        return directory if _is_torch_file(directory) else None
    return checkpoint_in(directory, _is_torch_file, "PyTorch")


def _is_torch_file(path):
    return path.endswith(_TORCH_SUFFIXES) and os.path.isfile(path)


def _is_tensor_dict(value, torch):
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _strip_key_prefix(state_dict):
    for prefix in _KEY_PREFIXES:
        if state_dict and all(k.startswith(prefix) for k in state_dict):
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items()}
    return state_dict


def read_torch_state_dict(path):
    """Reads an official PyTorch checkpoint, safely and onto the CPU.

    The file is loaded with `torch.load(..., map_location="cpu",
    weights_only=True)`, which unpickles tensors and plain containers only,
    and memory-mapped when it is a zip-format file, so a large checkpoint is
    not read into memory twice.

    Args:
        path: str or path-like. The `.pt` file, or a folder holding exactly
            one (see `find_torch_checkpoint`).

    Returns:
        dict `{name: torch.Tensor}`, the `Griffin.state_dict()`. A dict
        wrapping it under `state_dict`, `model_state_dict` or `model`, and a
        `module.` or `params.` prefix on every key, are removed.

    Raises:
        ImportError: if torch is not installed.
        ValueError: naming the file if there is none, it is truncated or not
            a PyTorch checkpoint, or it holds something else than a state
            dict.
    """
    return _load_state_dict(path)[1]


def _load_state_dict(path):
    """`read_torch_state_dict`, with the file's name and whether it is mapped."""
    filename = locate_checkpoint(
        path,
        find_torch_checkpoint,
        f"no PyTorch checkpoint (a {' or '.join(_TORCH_SUFFIXES)} file).",
    )
    torch = _import_torch("Reading an official PyTorch checkpoint")
    # `mmap` needs the zip format; older `.pt` files are plain pickles.
    mapped = zipfile.is_zipfile(filename)
    try:
        loaded = torch.load(
            filename,
            map_location="cpu",
            weights_only=True,
            mmap=mapped,
        )
    except MemoryError:
        raise
    except Exception as e:
        # torch reports a truncated zip as `OSError: [Errno 22]`, a text file
        # as `KeyError`, an empty one as `EOFError`.
        raise ValueError(
            f"{filename}: not a readable PyTorch checkpoint; the file is "
            f"truncated, corrupt or of another kind ({type(e).__name__}: {e})."
        ) from e
    if not _is_tensor_dict(loaded, torch) and isinstance(loaded, Mapping):
        inner = [k for k in _STATE_DICT_KEYS if _is_tensor_dict(loaded.get(k), torch)]
        if len(inner) == 1:
            loaded = loaded[inner[0]]
    if not _is_tensor_dict(loaded, torch):
        what = (
            f"a dict with keys {sorted(map(str, loaded))[:10]}"
            if isinstance(loaded, Mapping)
            else f"a {type(loaded).__name__}"
        )
        raise ValueError(
            f"{filename}: expected a state dict (names to tensors), as "
            f"`torch.save(model.state_dict())` writes; found {what}."
        )
    return filename, _strip_key_prefix(dict(loaded)), mapped


def _eager_leaf(value, transpose):
    array = to_numpy(value)
    return array.T if transpose else array


def _torch_to_flax(state_dict, where, leaf=_eager_leaf):
    """The Flax tree of a Griffin state dict, and each Flax path's torch key.

    `leaf(value, transpose)` makes each tree leaf: by default a numpy array
    (transposed for `nn.Linear` weights); `_lazy_leaf` reads it later.
    """
    if not isinstance(state_dict, Mapping):
        raise ValueError(
            f"{where}: expected a state dict (names to tensors), got a "
            f"{type(state_dict).__name__}."
        )
    state_dict = _strip_key_prefix(dict(state_dict))
    params, names = {}, {}
    for key, value in state_dict.items():
        parts = str(key).split(".")
        # `blocks` is an `nn.ModuleList`, so its index is part of the key
        # (`blocks.3.…`), while the Flax tree names the block `blocks.3`.
        if parts[0] == "blocks" and len(parts) > 2:
            parts = [f"blocks.{parts[1]}"] + parts[2:]
        if len(parts) < 2 or not all(parts):
            raise ValueError(
                f"{where}: tensor name `{key}` is not a Griffin parameter name."
            )
        # Only `nn.Linear` leaves are called `weight` in the official torch
        # model; they hold the Flax `kernel` transposed.
        transpose = parts[-1] == "weight"
        if transpose:
            if np.ndim(value) != 2:
                raise ValueError(
                    f"{where}: tensor `{key}` has shape {tuple(np.shape(value))}; "
                    "an nn.Linear weight must be 2-D (out, in)."
                )
            parts[-1] = "kernel"
        array = leaf(value, transpose)
        node = params
        for depth, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(
                    f"{where}: tensor `{key}` nests under "
                    f"`{'.'.join(parts[: depth + 1])}`, which is itself a tensor."
                )
        if parts[-1] in node:
            raise ValueError(
                f"{where}: tensor `{key}` clashes with another one at "
                f"`{'/'.join(parts)}`."
            )
        node[parts[-1]] = array
        names["/".join(parts)] = key
    return params, names


def params_from_torch_state_dict(state_dict):
    """Turns an official PyTorch state dict back into the official Flax tree.

    The inverse of `recurrentgemma.conversion.flax_params_to_pytorch_state_dict`:
    `blocks.i.…` keys become `blocks.i` subtrees, every `nn.Linear` `weight`
    `(out, in)` becomes a `kernel` `(in, out)`, and every other tensor keeps
    its name and layout. Shapes are not checked here; `backbone_from_official`
    checks them.

    Args:
        state_dict: mapping from names to torch tensors (or arrays), e.g. the
            result of `read_torch_state_dict`. bfloat16 tensors become
            `ml_dtypes.bfloat16` arrays with the same bits.

    Returns:
        Nested dict of numpy arrays: `embedder`, `blocks.i`, `final_norm`.

    Raises:
        ValueError: if a name cannot be placed in the tree, or a `weight` is
            not 2-D (naming the tensor).
    """
    return _torch_to_flax(state_dict, "official PyTorch state dict")[0]


def _lazy_leaf(tensor, transpose, regions):
    """A `LazyTensor` for one tensor of a loaded state dict.

    Reading it copies the tensor out of the memory-mapped file, then drops
    the file's pages it touched from this process (`_release_pages`), so
    the pages of the whole file do not pile up while the model loads. An
    `nn.Linear` weight is read as stored and transposed lazily: `official`
    transposes the Flax kernel back to our `[out, in]`, and the two cancel
    before any data moves. A row slice (how `official.build_backbone` splits
    `ffw_up`) reads only those rows.
    """
    dtype = to_numpy(tensor.new_empty(0)).dtype
    read_rows = None
    if tensor.ndim:

        def read_rows(start, stop):
            return _read_tensor(tensor, regions, rows=(start, stop))

    lazy = LazyTensor(
        tuple(tensor.shape), dtype, lambda: _read_tensor(tensor, regions), read_rows
    )
    return lazy.T if transpose else lazy


def _read_tensor(tensor, regions, rows=None):
    """A fresh C-contiguous copy of `tensor` (rows `start:stop` of it)."""
    view = to_numpy(tensor)  # shares the mapped file's pages, no copy
    if rows is not None:
        view = view[rows[0] : rows[1]]
    # Read-only, so that `host_copy` copies even a contiguous view: the
    # pages below are dropped, and the model must not alias the file.
    view.flags.writeable = False
    array = host_copy(view, view.dtype)
    _release_pages(view, regions)
    return array


def _mapped_regions(filename):
    """The address ranges where this process maps `filename` (Linux only).

    `torch.load` with `mmap=True` maps the file privately; its clean pages can be
    dropped and are read from the file again if touched. Pages are only
    released inside these ranges, so memory of any other kind is never
    touched.
    """
    if not sys.platform.startswith("linux"):
        return ()
    target = os.path.realpath(filename)
    regions = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.rstrip("\n").split(maxsplit=5)
                if len(fields) == 6 and fields[5] == target:
                    start, end = (int(x, 16) for x in fields[0].split("-"))
                    regions.append((start, end))
    except OSError:
        return ()
    return tuple(regions)


@functools.cache
def _madvise_dontneed():
    advice = getattr(mmap, "MADV_DONTNEED", None)
    if advice is None:
        return None
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    madvise.restype = ctypes.c_int
    return lambda address, length: madvise(address, length, advice)


def _release_pages(view, regions):
    """Drops the mapped-file pages under `view` from this process's memory.

    Best effort (`madvise(MADV_DONTNEED)`): nothing happens unless the view
    is contiguous and lies inside one of `regions`.
    """
    if not regions or view.nbytes == 0:
        return
    if not (view.flags.c_contiguous or view.flags.f_contiguous):
        return
    madvise = _madvise_dontneed()
    if madvise is None:
        return
    start = view.__array_interface__["data"][0]
    end = start + view.nbytes
    start -= start % mmap.PAGESIZE
    end += -end % mmap.PAGESIZE
    for low, high in regions:
        if low <= start and end <= high:
            madvise(start, end - start)
            return


# A tensor path of the official Flax tree, as conversion errors name them.
_FLAX_PATH = re.compile(r"\b(?:embedder|final_norm|blocks\.\d+)(?:/\w+)+")


def _with_torch_names(message, names):
    """Rewrites Flax paths in a conversion error as the file's tensor names.

    Paths of tensors the file holds map back to their key; others (e.g. a
    missing tensor) get the name the official conversion would give them.
    """
    transposed = False

    def rename(match):
        nonlocal transposed
        path = match.group(0)
        if path in names:
            name = names[path]
        else:
            top, *rest = path.split("/")
            if rest[-1] == "kernel":
                rest[-1] = "weight"
            name = ".".join([top] + rest)
        transposed = transposed or path.endswith("/kernel")
        return name

    message = _FLAX_PATH.sub(rename, message)
    if transposed and "shape" in message:
        message += (
            " (Shapes are in the Flax layout: an nn.Linear weight is shown "
            "transposed, as (in, out).)"
        )
    return message


def backbone_from_official_torch(path, dtype=None, **config_overrides):
    """Builds a `RecurrentGemmaBackbone` from an official PyTorch checkpoint.

    Args:
        path: str or path-like. The `.pt` file (e.g. `2b.pt` of the Kaggle
            PyTorch download), or the folder holding it.
        dtype: string or `keras.DTypePolicy` for the backbone. `None` uses
            Keras' default (float32). A bfloat16 checkpoint loaded with
            `dtype="bfloat16"` keeps every weight bit for bit.
        **config_overrides: `RecurrentGemmaBackbone` arguments that replace
            the inferred or default values (see `backbone_from_official`);
            `attention_window_size` is 2048 unless given.

    Returns:
        A `RecurrentGemmaBackbone` holding the checkpoint's weights.

    Raises:
        ImportError: if torch is not installed.
        ValueError: if the file is missing, truncated or not a state dict
            (naming the file), or a tensor is missing, unexpected or
            mis-shaped (naming it as the file does).
    """
    filename, state_dict, mapped = _load_state_dict(path)
    where = f"official PyTorch checkpoint {filename}"
    regions = _mapped_regions(filename) if mapped else ()
    params, names = _torch_to_flax(
        state_dict, where, functools.partial(_lazy_leaf, regions=regions)
    )
    del state_dict
    try:
        return build_backbone(params, dtype, config_overrides, where)
    except ValueError as e:
        raise ValueError(_with_torch_names(str(e), names)) from e
