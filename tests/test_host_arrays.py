"""Host arrays that backends take without a copy, and the load placeholders
built on them (`utils/host_arrays.py`, `layers/initialization.py`)."""

import os

import keras
import ml_dtypes
import numpy as np
import pytest

from keras_recurrentgemma.layers.initialization import LoadPlaceholder
from keras_recurrentgemma.utils import host_arrays

DTYPES = ["float32", "bfloat16", "float16", "int8"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5), (1,), (257, 33), (0, 4)])
def test_aligned_arrays(shape, dtype):
    empty = host_arrays.aligned_empty(shape, dtype)
    zeros = host_arrays.aligned_zeros(shape, dtype)
    for array in (empty, zeros):
        assert array.shape == shape
        assert array.dtype == host_arrays.numpy_dtype(dtype)
        # An empty array has no data to align (numpy may move its pointer).
        assert array.size == 0 or array.ctypes.data % host_arrays.ALIGNMENT == 0
        assert array.flags.c_contiguous and array.flags.writeable
    assert not np.any(zeros)


def vm_flags(address):
    """The `VmFlags` of the mapping holding `address` (Linux's smaps)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(n, 16) for n in head.split("-"))
                inside = low <= address < high
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="Linux's smaps")
@pytest.mark.parametrize("make", ["aligned_empty", "aligned_zeros"])
def test_a_large_array_asks_for_ordinary_pages(make):
    # numpy advises huge pages ("hg") from 4 MiB; ours are advised back.
    array = getattr(host_arrays, make)((3, host_arrays.ORDINARY_PAGES_FROM), "int8")
    array[...] = 1
    middle = array.ctypes.data + array.nbytes // 2
    assert "nh" in vm_flags(middle) and "hg" not in vm_flags(middle)
    assert int(array.sum()) == array.size


def test_copy_into_keeps_bits():
    source = np.array([1.5, -0.0, np.inf, np.nan], ml_dtypes.bfloat16)
    out = host_arrays.copy_into(host_arrays.aligned_empty((4,), "bfloat16"), source)
    np.testing.assert_array_equal(out.view(np.uint16), source.view(np.uint16))
    widened = host_arrays.copy_into(host_arrays.aligned_empty((4,), "float32"), source)
    np.testing.assert_array_equal(widened, source.astype(np.float32))


@pytest.mark.skipif(keras.config.backend() != "tensorflow", reason="TensorFlow")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tensorflow_takes_an_aligned_array_without_a_copy(dtype):
    array = host_arrays.aligned_empty((64, 48), dtype)
    array[...] = np.arange(64 * 48).reshape(64, 48)
    tensor = host_arrays.tensorflow_tensor(array)
    assert keras.backend.standardize_dtype(tensor.dtype) == dtype
    # `np.asarray` of an eager tensor shares its buffer.
    assert np.asarray(tensor).ctypes.data == array.ctypes.data
    # An unaligned or strided array is copied once, with the same values.
    for view in (array.reshape(-1)[1:].reshape(-1, 1), array.T):
        copied = np.asarray(host_arrays.tensorflow_tensor(view))
        assert copied.ctypes.data != view.ctypes.data
        np.testing.assert_array_equal(copied, view)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_load_placeholder_is_zeros(dtype):
    variable = keras.Variable(LoadPlaceholder(), shape=(6, 7), dtype=dtype)
    assert keras.backend.standardize_dtype(variable.dtype) == dtype
    assert not np.any(keras.ops.convert_to_numpy(variable).astype(np.float32))
    variable.assign(np.ones((6, 7), host_arrays.numpy_dtype(dtype)))
    assert np.all(keras.ops.convert_to_numpy(variable).astype(np.float32) == 1)


def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(
    keras.config.backend() == "torch" or not os.path.exists("/proc/self/statm"),
    reason="torch copies each weight into its placeholder; Linux's statm",
)
def test_a_large_placeholder_is_not_resident():
    # TensorFlow and JAX (on a CPU) take `calloc`ed pages that no one
    # writes; XLA's own zeros for 256 MiB would be resident at once.
    before = resident_bytes()
    variable = keras.Variable(LoadPlaceholder(), shape=(2**16, 2**11), dtype="float16")
    assert resident_bytes() - before < 2**26
    assert tuple(variable.shape) == (2**16, 2**11)


@pytest.mark.skipif(keras.config.backend() != "jax", reason="JAX")
@pytest.mark.parametrize("aligned", [True, False])
def test_jax_loaded_weights_are_owned_by_xla(aligned):
    """XLA reuses only a buffer it owns for a donated argument (Keras's JAX
    `fit` donates the frozen weights): a weight aliasing the host array it
    was read into would be copied in every training step. An unaligned
    array (as Keras's `.h5` reader returns them) takes another path."""
    import jax

    from keras_recurrentgemma.convert import backend_arrays

    flat = host_arrays.aligned_empty((256 * 64 + 1,), "bfloat16")
    start = 0 if aligned else 1
    array = flat[start : start + 256 * 64].reshape(256, 64)
    assert (array.ctypes.data % host_arrays.ALIGNMENT == 0) == aligned
    array[...] = 1
    weight = backend_arrays.backend_tensor(array)
    address = np.asarray(weight).ctypes.data
    assert address != array.ctypes.data
    out = jax.jit(lambda x: x * 1, donate_argnums=0)(weight)
    assert np.asarray(out).ctypes.data == address
