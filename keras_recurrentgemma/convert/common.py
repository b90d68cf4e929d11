"""What every converter shares: tracked source tensors and an all-or-nothing load.

A converter reads tensors from a `TensorSource` (which remembers what was
read) and produces `{keras_variable_path: (source_key, array)}`.
`assign_backbone_weights` checks every shape before touching the model, so a
bad checkpoint is an error naming the tensor, never a partial load.
"""

import contextlib
import contextvars
import json

import numpy as np

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
        """Returns tensor `key` as a numpy array; a clear error if absent."""
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
    """Converts a tensor from any framework to numpy, keeping bfloat16."""
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

    Args:
        backbone: a built `RecurrentGemmaBackbone`.
        tensors: dict `{variable.path: (source_key, array)}`.
        source: str, for error messages.

    Raises:
        ValueError: naming the missing, unexpected or mis-shaped tensor.
    """
    variables = {v.path: v for v in backbone.weights}
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
        want = tuple(variables[path].shape)
        if tuple(array.shape) != want:
            raise ValueError(
                f"{source}: tensor `{key}` has shape {tuple(array.shape)}, but "
                f"model variable `{path}` needs {want}."
            )
    items = tensors.items()
    if _SHOW_PROGRESS.get():
        from tqdm.auto import tqdm

        items = tqdm(items, desc="Loading weights", unit="tensor", total=len(tensors))
    for path, (_, array) in items:
        variable = variables[path]
        variable.assign(np.asarray(array).astype(variable.dtype))


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
