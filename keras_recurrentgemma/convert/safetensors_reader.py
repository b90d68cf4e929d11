"""Reading safetensors checkpoints lazily: headers now, each tensor on use.

`read_checkpoint_tensors(path)` opens a single-file or sharded checkpoint
(`model.safetensors`, or the shards an index lists) and returns one
`common.LazyTensor` per tensor: every header is checked at once, and each
tensor's bytes are read only when it is assigned (rows alone when sliced),
so a load holds one tensor at a time.
"""

import concurrent.futures
import functools
import json
import mmap
import os
import struct

import numpy as np

from keras_recurrentgemma.convert.common import LazyTensor
from keras_recurrentgemma.utils import host_arrays

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


# One tensor is read by `READ_THREADS` threads at once, in chunks of its
# size divided among them (at least `MIN_CHUNK`, at most `READ_CHUNK`
# bytes). A virtio disk (page cache emptied first) gave one sequential
# reader 0.54 GB/s and two to four concurrent ones 1.1-1.9 GB/s: the 9B's
# 17 GB are most of its load time. Fixed 32 MiB chunks left its 102
# tensors of exactly 32 MiB to one thread each (0.54 GB/s, against 0.71
# for the 96 MiB ones read as three chunks); dividing each tensor among
# all threads read the whole 9B 12% faster (three alternating cold runs
# each), and JAX loaded it 8% faster (18.5 s against 20.1, the mean of
# seven alternating cold pairs; AMD EPYC, 2 cores).
READ_THREADS = 4
READ_CHUNK = 32 << 20
MIN_CHUNK = 1 << 20


def _chunk_size(nbytes):
    """Bytes per chunk, so that a tensor's chunks keep every thread busy."""
    return min(READ_CHUNK, max(MIN_CHUNK, -(-nbytes // READ_THREADS)))


def _read(filename, dtype, offset, shape, uncache=False):
    """One tensor's bytes, read (not mapped) into an aligned array.

    A plain read leaves no file pages counted against the process once the
    array is dropped, and gives an array backends may take without a copy
    (TensorFlow only takes aligned memory as it is). The array is a fresh
    one, or a view of `host_arrays.reused_buffer()`'s buffer inside it.
    `uncache`: the file's pages just read are dropped from the page cache
    (see `_uncache`).
    """
    array = host_arrays.read_buffer(shape, dtype)
    view = memoryview(array.reshape(-1).view(np.uint8))
    fd = os.open(filename, os.O_RDONLY)
    try:
        chunk = _chunk_size(len(view))
        chunks = range(0, len(view), chunk)
        if len(chunks) > 1 and hasattr(os, "preadv"):
            with concurrent.futures.ThreadPoolExecutor(READ_THREADS) as pool:
                done = pool.map(
                    lambda start: _read_into(
                        fd, view[start : start + chunk], offset + start
                    ),
                    chunks,
                )
                ok = all(list(done))
        else:
            ok = _read_into(fd, view, offset)
        if uncache and hasattr(os, "posix_fadvise"):
            os.posix_fadvise(fd, offset, len(view), os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if not ok:
        raise ValueError(f"{filename}: truncated; a tensor ends past the file.")
    return array


def _read_into(fd, view, offset):
    """Fills `view` from `fd` at `offset`; False if the file ends first."""
    done = 0
    while done < len(view):
        if hasattr(os, "preadv"):  # no seek: threads share `fd`
            n = os.preadv(fd, [view[done:]], offset + done)
        else:
            os.lseek(fd, offset + done, os.SEEK_SET)
            n = os.readv(fd, [view[done:]])
        if not n:
            return False
        done += n
    return True


def _uncache(filenames):
    """Whether to drop each tensor's file pages from the page cache once read:
    when the files exceed half the memory available, they cannot stay
    cached beside the model made of them.

    Otherwise the cache fills as the files are read, and from then on every
    page the model's arrays take must first be reclaimed from it: reading
    the 9B (17 GB, on a 24 GB machine) into new arrays ran at 0.5-0.9 GB/s
    so, and at 1.5 without the cache in the way. A checkpoint that does fit
    (the 2B's 5.4 GB) stays cached, and loads again at memory speed.
    """
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        available = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return False
    return 2 * sum(os.path.getsize(f) for f in filenames) > available


def open_safetensors(filename, uncache=False):
    """The tensors of one `.safetensors` file, as unread `LazyTensor`s.

    The header (names, dtypes, shapes, offsets) is read and checked now;
    each tensor's data only when it is assigned, so loading holds one
    tensor at a time. BF16 tensors read as `ml_dtypes.bfloat16` arrays.
    `uncache`: each tensor's pages leave the page cache once read.

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

    @functools.cache
    def file_map():
        # Private: writes to a view (training) are copied, never written
        # back; the map lives as long as a view of it.
        with open(filename, "rb") as f:
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)

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
            return _read(filename, dtype, offset, shape, uncache)

        def read_rows(first, stop, offset=offset, dtype=dtype, row=row, shape=shape):
            skip = offset + first * row * dtype.itemsize
            return _read(filename, dtype, skip, (stop - first,) + shape[1:], uncache)

        def mapped(offset=offset, dtype=dtype, shape=shape, count=count):
            return np.frombuffer(file_map(), dtype, count=count, offset=offset).reshape(
                shape
            )

        tensors[key] = LazyTensor(
            shape, dtype, read, read_rows if shape else None, mapped
        )
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
        return open_safetensors(single, _uncache([single]))
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
    filenames = [os.path.join(path, shard) for shard in shards]
    for shard, filename in zip(shards, filenames, strict=True):
        if not os.path.isfile(filename):
            raise ValueError(f"{index}: shard {shard} does not exist.")
    uncache = _uncache(filenames)
    tensors = {}
    for shard, filename in zip(shards, filenames, strict=True):
        shard_tensors = open_safetensors(filename, uncache)
        expected = {k for k, v in weight_map.items() if v == shard}
        if set(shard_tensors) != expected:
            raise ValueError(
                f"{filename}: holds tensors {sorted(set(shard_tensors) - expected)} "
                f"not listed for it in {WEIGHTS_INDEX_FILE}, and lacks "
                f"{sorted(expected - set(shard_tensors))}."
            )
        tensors.update(shard_tensors)
    return tensors
