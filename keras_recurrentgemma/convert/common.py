"""What every converter shares: tracked source tensors and an all-or-nothing load.

A converter reads tensors from a `TensorSource` (which remembers what was
read) and produces `{keras_variable_path: (source_key, array)}`, where an
array may be a `LazyTensor`: a shape and a way to read it, not its data.
`assign_backbone_weights` checks every shape before touching the model, so a
bad checkpoint is an error naming the tensor, never a partial load; then it
reads, converts and assigns one tensor at a time, so a released model loads
in about its own size of host memory.
"""

import contextlib
import contextvars
import json
import os

import keras
import numpy as np
from numpy.lib.stride_tricks import as_strided

from keras_recurrentgemma.convert import backend_arrays
from keras_recurrentgemma.convert.backend_arrays import backend_tensor
from keras_recurrentgemma.convert.backend_arrays import host_copy
from keras_recurrentgemma.convert.backend_arrays import release_placeholder
from keras_recurrentgemma.convert.backend_arrays import transposes_while_copying
from keras_recurrentgemma.convert.quantize_on_load import quantize_tensor
from keras_recurrentgemma.convert.quantize_on_load import quantized_targets
from keras_recurrentgemma.utils import host_arrays

# Set by `show_progress()`: converters then report each tensor they load.
_SHOW_PROGRESS = contextvars.ContextVar("show_progress", default=False)


@contextlib.contextmanager
def show_progress():
    """Shows a progress bar (tqdm, on stderr) while weights are assigned.

    The released models have hundreds of tensors and take minutes to load;
    `tools/convert_checkpoint.py` turns this on.
    """
    token = _SHOW_PROGRESS.set(True)
    try:
        yield
    finally:
        _SHOW_PROGRESS.reset(token)


def progress_enabled():
    """Whether a caller asked for progress bars (`show_progress()`)."""
    return _SHOW_PROGRESS.get()


class LazyTensor:
    """A checkpoint tensor that is read only when it is assigned.

    Converters transpose, index and reshape it as they would an array; each
    operation is recorded and applied to the data when `read()` runs, so a
    converter can check every shape of a 9B checkpoint from the file
    headers alone and hold one tensor at a time.

    Args:
        shape: tuple of ints.
        dtype: numpy dtype of the data `read()` returns.
        read: callable returning the tensor as a numpy array.
        read_rows: optional callable `(start, stop)` returning rows
            `start:stop` of the first axis without reading the rest; then
            `tensor[start:stop]` reads only those rows.
        mapped: optional callable returning the tensor as a writable,
            copy-on-write view of its file's memory map (nothing is read
            until the view is used); not kept by transforms.
    """

    def __init__(self, shape, dtype, read, read_rows=None, mapped=None):
        self.shape = tuple(int(n) for n in shape)
        self.dtype = np.dtype(dtype)
        self._read = read
        self._read_rows = read_rows
        self.mapped = mapped

    @property
    def ndim(self):
        return len(self.shape)

    @property
    def reads_rows(self):
        """Whether `tensor[start:stop]` reads only those rows."""
        return self._read_rows is not None

    @property
    def size(self):
        return int(np.prod(self.shape, dtype=np.int64))

    def _then(self, fn):
        # The new shape is what `fn` gives on a zero-stride stand-in of this
        # shape: no memory, and exactly numpy's indexing and transpose rules.
        shape = fn(as_strided(np.zeros((), self.dtype), self.shape, (0,) * self.ndim))
        return LazyTensor(shape.shape, self.dtype, lambda: fn(self._read()))

    @property
    def T(self):
        return self._then(np.transpose)

    def __getitem__(self, index):
        if (
            self._read_rows is not None
            and isinstance(index, slice)
            and index.step in (None, 1)
        ):
            start, stop, _ = index.indices(self.shape[0])
            stop = max(start, stop)
            return LazyTensor(
                (stop - start,) + self.shape[1:],
                self.dtype,
                lambda: self._read_rows(start, stop),
            )
        return self._then(lambda a: a[index])

    def reshape(self, *shape):
        return self._then(lambda a: a.reshape(*shape))

    def read(self):
        """The tensor's data, as a numpy array."""
        return np.asarray(self._read())

    def __array__(self, dtype=None, copy=None):
        array = self.read()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyTensor(shape={self.shape}, dtype={self.dtype})"


class TensorSource:
    """A mapping of named checkpoint tensors that records which were used.

    Args:
        tensors: mapping from key to array-like (numpy, torch, jax, ...).
        source: str. Where the tensors came from, for error messages.
    """

    def __init__(self, tensors, source):
        self.tensors = dict(tensors)
        self.source = source
        self.used = set()

    def __contains__(self, key):
        return key in self.tensors

    def keys(self):
        return self.tensors.keys()

    def take(self, key):
        """Returns tensor `key`: a numpy array, or a `LazyTensor` left unread.

        Raises:
            ValueError: naming the key and the checkpoint, if it is absent.
        """
        if key not in self.tensors:
            raise ValueError(
                f"{self.source}: missing tensor `{key}`. "
                f"It has {len(self.tensors)} tensors, e.g. "
                f"{sorted(self.tensors)[:5]}."
            )
        self.used.add(key)
        return to_numpy(self.tensors[key])

    def check_all_used(self, ignore=()):
        """Raises if the checkpoint holds tensors the converter did not read."""
        unused = sorted(
            k for k in self.tensors if k not in self.used and k not in ignore
        )
        if unused:
            raise ValueError(
                f"{self.source}: unexpected tensors {unused[:10]}"
                f"{' ...' if len(unused) > 10 else ''} ({len(unused)} in all); "
                "the checkpoint does not match the model configuration."
            )


def to_numpy(x):
    """Converts a tensor from any framework to numpy, keeping bfloat16.

    A `LazyTensor` stays unread (`assign_backbone_weights` reads it).
    """
    if isinstance(x, LazyTensor):
        return x
    if hasattr(x, "detach"):  # torch
        import torch

        x = x.detach().cpu()
        if x.dtype == torch.bfloat16:
            import ml_dtypes

            return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return x.numpy()
    return np.asarray(x)


def assign_backbone_weights(backbone, tensors, source):
    """Loads converted tensors into `backbone`, all or nothing.

    Every name and shape is checked first (from the file headers, for lazy
    tensors); then each tensor is read, cast to its variable's dtype,
    assigned and dropped before the next is read, so the peak host memory
    is the model plus its largest tensor (twice, while cast).

    Args:
        backbone: a built `RecurrentGemmaBackbone`.
        tensors: dict `{variable.path: (source_key, array or LazyTensor)}`.
            It is emptied as the tensors are assigned, so that nothing
            keeps an assigned array alive.
        source: str, for error messages.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped tensor.
    """
    # A backbone built by `quantize_on_load.QuantizedPlan` gets each
    # quantized layer's integer values and scales from its float tensor.
    targets = quantized_targets(backbone)
    all_variables = {v.path: v for v in backbone.weights}
    made = {p for t in targets.values() for p in _variable_paths(t)} - set(targets)
    variables = {p: v for p, v in all_variables.items() if p not in made}
    missing = sorted(set(variables) - set(tensors))
    if missing:
        raise ValueError(
            f"{source}: no tensor for model variables {missing[:10]} "
            f"({len(missing)} in all)."
        )
    unexpected = sorted(set(tensors) - set(variables))
    if unexpected:
        raise ValueError(
            f"{source}: tensors {[tensors[p][0] for p in unexpected][:10]} map to "
            "no variable of this model."
        )
    for path, (key, array) in tensors.items():
        want = (
            targets[path].float_shape
            if path in targets
            else tuple(variables[path].shape)
        )
        if tuple(array.shape) != want:
            raise ValueError(
                f"{source}: tensor `{key}` has shape {tuple(array.shape)}, but "
                f"model variable `{path}` needs {want}."
            )
    paths = list(tensors)
    if progress_enabled():
        from tqdm.auto import tqdm

        paths = tqdm(paths, desc="Loading weights", unit="tensor")
    # Where JAX copies each array into memory of its own (not on a CPU, see
    # `backend_arrays.adopt`), one read buffer serves every tensor.
    reused = keras.config.backend() == "jax" and not backend_arrays.jax_on_cpu()
    with host_arrays.reused_buffer() if reused else contextlib.nullcontext():
        for path in paths:
            _, array = tensors.pop(path)
            if path in targets:
                _assign_quantized(targets[path], array, all_variables)
            else:
                _assign(variables[path], array, reused)
            del array


def _assign_quantized(target, array, all_variables):
    # Lazy as it is: an embedding is read a slice of rows at a time, each
    # into a new array (the quantizer may hold several).
    with host_arrays.no_reused_buffer():
        values = quantize_tensor(target, array)
    for name, value in values.items():
        release_placeholder(all_variables[name])
        all_variables[name].assign(backend_tensor(value))


def _assign(variable, array, reused):
    """Assigns one converted tensor; `reused`: a `LazyTensor` reads into
    `host_arrays.reused_buffer()`, which the next read overwrites."""
    # A lazy tensor reads into memory no one else holds; an array given
    # in memory is the caller's, and the variable must not alias it.
    ours = isinstance(array, LazyTensor)
    if ours:
        mapped = backend_arrays.mapped_view(array, variable)
        array = array.read() if mapped is None else mapped
    release_placeholder(variable)
    if not transposes_while_copying(array, variable.dtype):
        copy = host_copy(array, variable.dtype)
        if copy is array and not ours and keras.config.backend() == "tensorflow":
            # TensorFlow's variable would keep the caller's array as its
            # memory (`backend_tensor`), and training would change it.
            copy = host_arrays.copy_into(
                host_arrays.aligned_empty(array.shape, array.dtype), array
            )
        ours = ours or copy is not array
        array = copy
    if not (ours and backend_arrays.adopt(variable, array)):
        variable.assign(backend_tensor(array))
    del array
    if reused:
        # `device_put` may still be copying when it returns.
        variable.value.block_until_ready()


def _variable_paths(target):
    return [f"{target.layer.path}/{name}" for name in target.variables]


def read_json_object(path):
    """Reads a JSON file that must hold an object (a dict).

    Raises:
        ValueError: naming the file, if it cannot be read or parsed, or holds
            something other than an object.
    """
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e}).") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object.")
    return value


def locate_checkpoint(path, find, missing):
    """`find(path)` for a str or path-like `path`, or, if it finds nothing, a
    ValueError `"{path}: {missing}"`."""
    path = os.fspath(path)
    found = find(path)
    if found is None:
        raise ValueError(f"{path}: {missing}")
    return found


def checkpoint_in(directory, is_checkpoint, kind):
    """The one path directly inside `directory` that `is_checkpoint` accepts,
    or `None` if there is none or `directory` is not a folder.

    Raises:
        ValueError: if there are several `kind` checkpoints (they are listed).
    """
    if not os.path.isdir(directory):
        return None
    paths = (os.path.join(directory, name) for name in os.listdir(directory))
    found = sorted(path for path in paths if is_checkpoint(path))
    if len(found) > 1:
        raise ValueError(
            f"{directory}: several {kind} checkpoints {found}; pass the one to load."
        )
    return found[0] if found else None
