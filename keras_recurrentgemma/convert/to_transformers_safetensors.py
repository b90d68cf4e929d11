"""Writes safetensors files tensor by tensor (see `to_transformers`).

A file's header is computed from shapes and dtypes alone, then each tensor
is read, written and dropped before the next, so writing a model holds one
tensor in host memory, not the model. Past `max_bytes` the tensors are
split into shards with an index, named as `save_pretrained` names them.
"""

import json
import os
import struct

import numpy as np

from keras_recurrentgemma.convert import common
from keras_recurrentgemma.convert.huggingface import WEIGHTS_FILE
from keras_recurrentgemma.convert.huggingface import WEIGHTS_INDEX_FILE

# safetensors names of the dtypes a variable may have.
SAFETENSORS_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16"}


def _shards(tensors, max_bytes):
    """Splits `tensors` in order into groups of at most `max_bytes` each.

    A tensor larger than `max_bytes` gets a shard of its own.
    """
    shards, current, size = [], [], 0
    for tensor in tensors:
        nbytes = _nbytes(tensor)
        if current and size + nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(tensor)
        size += nbytes
    if current:
        shards.append(current)
    return shards


def _nbytes(tensor):
    _, shape, dtype, _ = tensor
    itemsize = 2 if dtype in ("bfloat16", "float16") else 4
    return int(np.prod(shape, dtype=np.int64)) * itemsize


def write_safetensors(tensors, directory, max_bytes):
    """Writes `model.safetensors`, or shards and their index, in `directory`.

    Each file's header is computed from the shapes first, then the tensors
    are read and written one at a time, so at most one tensor (two while a
    kernel is transposed) is held in host memory.
    """
    shards = _shards(tensors, max_bytes)
    progress = None
    if common.progress_enabled():  # `common.show_progress()`, as loading
        from tqdm.auto import tqdm

        progress = tqdm(total=len(tensors), desc="Writing weights", unit="tensor")
    try:
        if len(shards) == 1:
            _write_one_file(os.path.join(directory, WEIGHTS_FILE), shards[0], progress)
            return
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            _write_one_file(os.path.join(directory, name), shard, progress)
            weight_map.update({key: name for key, *_ in shard})
    finally:
        if progress is not None:
            progress.close()
    index = {
        "metadata": {"total_size": sum(_nbytes(t) for t in tensors)},
        "weight_map": weight_map,
    }
    write_json(os.path.join(directory, WEIGHTS_INDEX_FILE), index)


def _write_one_file(filename, tensors, progress=None):
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, shape, dtype, _ in tensors:
        end = offset + _nbytes((key, shape, dtype, None))
        header[key] = {
            "dtype": SAFETENSORS_DTYPES[dtype],
            "shape": list(shape),
            "data_offsets": [offset, end],
        }
        offset = end
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
    with open(filename, "wb") as f:
        f.write(struct.pack("<Q", len(encoded)))
        f.write(encoded)
        for key, shape, dtype, read in tensors:
            array = read()
            if tuple(array.shape) != tuple(shape) or _dtype_of(array) != dtype:
                raise ValueError(
                    f"Tensor `{key}` came out {_dtype_of(array)} {array.shape}, "
                    f"expected {dtype} {tuple(shape)}."
                )
            f.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))
            del array
            if progress is not None:
                progress.update()


def _dtype_of(array):
    return "bfloat16" if array.dtype.name == "bfloat16" else array.dtype.name


def write_json(filename, content):
    with open(filename, "w", encoding="utf-8") as f:
        json.dump(content, f, indent=2, ensure_ascii=False)
        f.write("\n")
