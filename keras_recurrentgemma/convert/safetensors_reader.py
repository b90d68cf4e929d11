"""Reading safetensors checkpoints lazily: headers now, each tensor on use.

`read_checkpoint_tensors(path)` opens a single-file or sharded checkpoint
(`model.safetensors`, or the shards an index lists) and returns one
`common.LazyTensor` per tensor: every header is checked at once, and each
tensor's bytes are read only when it is assigned (rows alone when sliced),
so a load holds one tensor at a time.
"""

import json
import os
import struct

import numpy as np

from keras_recurrentgemma.convert.common import LazyTensor
from keras_recurrentgemma.utils.host_arrays import aligned_empty

WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


# safetensors dtype names as numpy dtypes; BF16 is ml_dtypes' bfloat16.
_NUMPY_DTYPES = {"F16": "float16", "F32": "float32", "F64": "float64"}


def _numpy_dtype(name):
    if name == "BF16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_NUMPY_DTYPES[name])


def _read(filename, dtype, offset, shape):
    """One tensor's bytes, read (not mapped) into a fresh aligned array.

    A plain read leaves no file pages counted against the process once the
    array is dropped, and gives an array backends may take without a copy
    (TensorFlow only takes aligned memory as it is).
    """
    array = aligned_empty(shape, dtype)
    view = memoryview(array.reshape(-1).view(np.uint8))
    with open(filename, "rb") as f:
        f.seek(offset)
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise ValueError(f"{filename}: truncated; a tensor ends past the file.")
            done += n
    return array


def open_safetensors(filename):
    """The tensors of one `.safetensors` file, as unread `LazyTensor`s.

    The header (names, dtypes, shapes, offsets) is read and checked now;
    each tensor's data only when it is assigned, so loading holds one
    tensor at a time. BF16 tensors read as `ml_dtypes.bfloat16` arrays.

    Raises:
        ValueError: naming the file if it is truncated or corrupt, or a
            tensor if its dtype is not floating point.
    """
    from safetensors import safe_open

    try:
        # safetensors checks that the header parses and that every tensor's
        # bytes lie inside the file; it reads no tensor data here.
        with safe_open(filename, framework="numpy") as f:
            keys = list(f.keys())
        with open(filename, "rb") as f:
            (header_size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_size))
    except Exception as e:  # SafetensorError is not importable by name.
        raise ValueError(f"{filename}: not a readable safetensors file ({e}).") from e
    dtypes = {key: header[key]["dtype"] for key in keys}
    bad = {k: d for k, d in dtypes.items() if d not in _FLOAT_DTYPES}
    if bad:
        raise ValueError(f"{filename}: tensors with non-float dtypes {bad}.")
    tensors = {}
    for key in keys:
        info = header[key]
        dtype = _numpy_dtype(info["dtype"])
        shape = tuple(info["shape"])
        start, end = info["data_offsets"]
        count = int(np.prod(shape, dtype=np.int64))
        if end - start != count * dtype.itemsize:
            raise ValueError(
                f"{filename}: tensor `{key}` has {end - start} bytes for shape "
                f"{list(shape)} of {info['dtype']}."
            )

        offset = 8 + header_size + start
        row = count // shape[0] if shape and shape[0] else 0

        def read(offset=offset, dtype=dtype, shape=shape):
            return _read(filename, dtype, offset, shape)

        def read_rows(first, stop, offset=offset, dtype=dtype, row=row, shape=shape):
            skip = offset + first * row * dtype.itemsize
            return _read(filename, dtype, skip, (stop - first,) + shape[1:])

        tensors[key] = LazyTensor(shape, dtype, read, read_rows if shape else None)
    return tensors


def read_checkpoint_tensors(path):
    """All tensors of a single-file or sharded safetensors checkpoint, unread.

    Returns:
        dict `{key: LazyTensor}`; every header has been checked.

    Raises:
        ValueError: naming the file if there are no safetensors weights, the
            index is unreadable, a shard is missing or corrupt, or a shard
            does not hold the tensors the index assigns it.
    """
    single = os.path.join(path, WEIGHTS_FILE)
    index = os.path.join(path, WEIGHTS_INDEX_FILE)
    if os.path.isfile(single):
        return open_safetensors(single)
    if not os.path.isfile(index):
        raise ValueError(
            f"{path}: no weights; expected {WEIGHTS_FILE} or {WEIGHTS_INDEX_FILE} "
            "(only safetensors checkpoints are supported)."
        )
    try:
        with open(index, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"{index}: not a valid safetensors index ({e!r}).") from e
    tensors = {}
    for shard in shards:
        filename = os.path.join(path, shard)
        if not os.path.isfile(filename):
            raise ValueError(f"{index}: shard {shard} does not exist.")
        shard_tensors = open_safetensors(filename)
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(shard_tensors) != expected:
            raise ValueError(
                f"{filename}: holds tensors {sorted(set(shard_tensors) - expected)} "
                f"not listed for it in {WEIGHTS_INDEX_FILE}, and lacks "
                f"{sorted(expected - set(shard_tensors))}."
            )
        tensors.update(shard_tensors)
    return tensors
