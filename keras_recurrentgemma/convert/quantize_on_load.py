"""Quantizing a checkpoint while it loads: `from_preset(..., quantize="int8")`.

The float model is never built. The backbone is built with a
`keras.dtype_policies.DTypePolicyMap` that gives every layer `quantize(mode)`
would quantize its quantized policy, so those layers create their integer
variables directly (as Keras does when it loads a saved quantized model).
Each float tensor read from the checkpoint is then quantized by Keras's own
`quantize` on a throwaway float layer of the same kind, in slices along the
axis Keras's per-channel scales never cross, and the integer values and
scales are assigned. The result is bit for bit the model that loading in
float and calling `quantize(mode)` gives, and the peak host memory is the
quantized model plus one float kernel (the embedding, the largest tensor,
is read a slice of rows at a time where the source allows) plus one
slice's temporaries.
"""

import functools

import keras
import numpy as np

from keras_recurrentgemma.layers import kernel_layout
from keras_recurrentgemma.layers.dense import EQUATION
from keras_recurrentgemma.layers.dense import Dense
from keras_recurrentgemma.layers.dense import no_collect

# Keras quantizes each weight on its own in these modes; float8 only changes
# how a float kernel is used, so there is nothing to save by doing it early.
QUANTIZE_ON_LOAD_MODES = ("int8", "int4")
# Float bytes quantized at a time: each slice's temporaries (abs, scale,
# rounding, in the float dtype) stay well under the 1.5 GiB the load allows.
_SLICE_BYTES = 64 * 2**20


def check_quantize_mode(mode):
    """Raises `ValueError` unless `mode` can be applied while loading."""
    if mode not in QUANTIZE_ON_LOAD_MODES:
        raise ValueError(
            f"from_preset(quantize={mode!r}) is not supported; quantizing while "
            f"loading takes one of {QUANTIZE_ON_LOAD_MODES}. Load in float and "
            "call `quantize(...)` for other modes or a `QuantizationConfig`."
        )


class QuantizedPlan:
    """How `quantize(mode)` would leave a model of a given architecture.

    Which layers it quantizes, the policy each gets (e.g.
    `"int4/128_from_bfloat16"`) and the settings it leaves on them are read
    off a skeleton of the same architecture at a tiny width: layer paths
    depend on the block pattern, never on the sizes, and the skeleton runs
    the real `quantize`, so the two can never disagree.

    Args:
        backbone_cls: the backbone class.
        config: its constructor arguments (a serialized config's `name` and
            `dtype` are ignored).
        dtype: the float dtype or policy of the model.
        mode: `"int8"` or `"int4"`.
    """

    # Set by `quantize` but not by building with a quantized policy; the
    # int4 reverse embedding, for one, quantizes its inputs only without
    # the config `Model.quantize` hands it.
    _SETTINGS = ("quantization_config", "inputs_quantizer")

    def __init__(self, backbone_cls, config, dtype, mode):
        from keras_recurrentgemma.layers.initialization import (
            skip_random_initialization,
        )

        check_quantize_mode(mode)
        heads = config["num_heads"]
        config = {k: v for k, v in config.items() if k not in ("name", "dtype")}
        tiny = dict(
            config,
            vocabulary_size=8,
            hidden_dim=2 * heads,
            lru_width=2 * heads,
            intermediate_dim=2,
        )
        self.default = keras.dtype_policies.get("float32" if dtype is None else dtype)
        with skip_random_initialization():
            skeleton = backbone_cls(**tiny, dtype=self.default)
        with no_collect():
            skeleton.quantize(mode)
        self.layers = {
            layer.path: layer
            for layer in _layers(skeleton)
            if layer.quantization_mode is not None
        }

    def dtype(self):
        """A `DTypePolicyMap` that builds the model already quantized."""
        policies = keras.dtype_policies.DTypePolicyMap(default_policy=self.default)
        for path, layer in self.layers.items():
            policies[path] = layer.dtype_policy
        return policies

    def finish(self, backbone):
        """Gives the built model's quantized layers `quantize`'s settings
        (their policies were resolved by the backbone's constructor)."""
        for layer in _layers(backbone):
            planned = self.layers.get(layer.path)
            if planned is None:
                continue
            for name in self._SETTINGS:
                if hasattr(planned, name):
                    setattr(layer, name, getattr(planned, name))
        return backbone


def _layers(model):
    # Keras has no public recursive layer list; `Model.quantize` and
    # KerasHub's `Backbone.get_config` walk the same private one.
    return model._flatten_layers(include_self=False)


def _policy(layer):
    # A layer built with a `DTypePolicyMap` keeps the map; its own entry is
    # the policy it runs with.
    policy = layer.dtype_policy
    if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
        return policy[layer.path]
    return policy


class QuantizedTarget:
    """A quantized layer and the float tensor that loading gives it.

    Attributes:
        path: the checkpoint tensor's variable path (`.../kernel` or
            `.../embeddings`), which the integer variable keeps.
        float_shape: the float tensor's shape.
        float_dtype: the dtype `layer.quantize` would have read it in.
        variables: `{name: variable}`, every variable `quantize` writes.
    """

    def __init__(self, layer, name, float_shape):
        self.layer = layer
        self.path = f"{layer.path}/{name}"
        self.float_shape = tuple(float_shape)
        self.float_dtype = _policy(layer).variable_dtype
        self.variables = {
            v.path[len(layer.path) + 1 :]: v
            for v in layer.weights
            if v.path != f"{layer.path}/bias"
        }


def quantized_targets(backbone):
    """`{float variable path: QuantizedTarget}` for a backbone built with
    `QuantizedPlan.dtype()`; empty for a float backbone."""
    targets = {}
    for layer in _layers(backbone):
        mode = layer.quantization_mode
        if mode is None:
            continue
        if mode not in QUANTIZE_ON_LOAD_MODES:
            raise ValueError(
                f"layer `{layer.path}` is quantized in mode {mode!r}, which "
                "cannot be loaded from a float checkpoint tensor by tensor."
            )
        if isinstance(layer, keras.layers.Embedding):
            target = QuantizedTarget(
                layer, "embeddings", (layer.input_dim, layer.output_dim)
            )
        elif isinstance(layer, Dense):
            target = QuantizedTarget(layer, "kernel", layer.float_kernel_shape())
        else:
            raise ValueError(
                f"layer `{layer.path}` ({type(layer).__name__}) is quantized, "
                "but only Dense and Embedding layers can be quantized on load."
            )
        targets[target.path] = target
    return targets


def _proxy(target, rows, cols):
    """A float Keras layer of the target's kind holding a `(rows, cols)` slice."""
    dtype = target.float_dtype
    # Zeros: the slice is assigned next, so nothing random is drawn.
    if isinstance(target.layer, keras.layers.Embedding):
        proxy = keras.layers.ReversibleEmbedding(
            rows, cols, embeddings_initializer="zeros", dtype=dtype
        )
        proxy.build()
    else:
        proxy = keras.layers.EinsumDense(
            EQUATION, (None, rows), kernel_initializer="zeros", dtype=dtype
        )
        proxy.build((1, 1, cols))
    return proxy


def quantize_tensor(target, array):
    """Quantizes one float tensor as `target.layer.quantize(mode)` would.

    Slices go along the axis the scales are per-element of, the first of
    both an embedding `[v, d]` and a Dense kernel `[out, in]`, so every slice
    quantizes independently and the pieces are exactly the whole's (an int4
    Dense kernel is quantized whole; see below).

    The rows are read a slice at a time when `array` can read rows alone
    (a `common.LazyTensor` of a safetensors file, an h5py dataset), so the
    whole float table (1.2 GiB for the 2B, 2 GiB for the 9B) or kernel is
    never in memory.

    Args:
        target: a `QuantizedTarget`.
        array: the float tensor, `target.float_shape`, any float dtype
            (each slice is cast to `target.float_dtype`): a numpy array,
            a `LazyTensor` or an h5py dataset.

    Returns:
        `{variable path: numpy array}` for every variable of the layer but
        its bias.
    """
    from keras_recurrentgemma.convert.backend_arrays import host_copy

    layer = target.layer
    mode = layer.quantization_mode
    if not _reads_rows(array):
        array = array.read() if hasattr(array, "read") else np.asarray(array)
    length, other = target.float_shape
    itemsize = max(
        np.dtype(array.dtype).itemsize, np.dtype(target.float_dtype).itemsize
    )
    step = max(2, _SLICE_BYTES // max(1, other * itemsize))
    step -= step % 2  # int4 packs pairs along a Dense kernel's outputs
    if mode == "int4" and isinstance(layer, Dense):
        # Keras's int4 `EinsumDense` groups the kernel `[out, in]` reshaped
        # (not transposed) to `[in, out]`, so its groups cross output rows:
        # only the whole kernel quantizes as `quantize` does.
        step = length
    outputs = {
        name: np.empty(tuple(v.shape), keras.backend.standardize_dtype(v.dtype))
        for name, v in target.variables.items()
    }
    offsets = dict.fromkeys(outputs, 0)
    for start in range(0, length, step):
        rows = slice(start, start + step)
        piece = array[rows]
        if hasattr(piece, "read"):  # a LazyTensor's rows, read now
            piece = piece.read()
        piece = host_copy(piece, target.float_dtype)
        proxy = _proxy(target, *piece.shape)
        next(v for v in proxy.weights).assign(piece)
        with no_collect():
            proxy.quantize(mode)
        if proxy.dtype_policy.name != _policy(layer).name:
            raise ValueError(
                f"layer `{layer.path}` has policy {_policy(layer).name!r}, "
                f"but `quantize({mode!r})` gives {proxy.dtype_policy.name!r}; "
                "only the default quantization of a mode can be done on load."
            )
        values = {v.name: keras.ops.convert_to_numpy(v) for v in proxy.weights}
        for name, full in outputs.items():
            _place(full, values[name], offsets, name, layer.path)
        del proxy, values
    return {f"{layer.path}/{name}": value for name, value in outputs.items()}


def _reads_rows(array):
    """Whether `array[a:b]` reads rows `a:b` only (not a numpy array)."""
    if isinstance(array, np.ndarray):
        return False
    return bool(getattr(array, "reads_rows", True))


def _place(full, part, offsets, name, where):
    """Writes one slice's `part` of a variable into `full`.

    The sliced axis is the one where their shapes differ; a variable whose
    shape does not depend on the slice (e.g. int4's group index) must come
    out the same from every slice.
    """
    differs = [
        i for i, (a, b) in enumerate(zip(full.shape, part.shape, strict=True)) if a != b
    ]
    if not differs:
        if offsets[name] and not np.array_equal(full, part):
            raise ValueError(f"`{where}/{name}` depends on how the tensor is sliced.")
        full[...] = part
        offsets[name] = 1
        return
    (axis,) = differs
    start = offsets[name]
    index = [slice(None)] * full.ndim
    index[axis] = slice(start, start + part.shape[axis])
    full[tuple(index)] = part
    offsets[name] = start + part.shape[axis]


def build_for_load(backbone_cls, config, dtype, quantize=None):
    """Builds the backbone a loader fills: no random draws, and, with
    `quantize`, integer variables in place of the float ones it replaces."""
    from keras_recurrentgemma.layers.initialization import skip_random_initialization

    if quantize is None:
        with skip_random_initialization():
            return backbone_cls(**config, dtype=dtype)
    plan = QuantizedPlan(backbone_cls, config, dtype, quantize)
    with skip_random_initialization():
        return plan.finish(backbone_cls(**config, dtype=plan.dtype()))


def _assign(variables, values):
    for name, value in values.items():
        variables[name].assign(value)


def float_weight_loads(backbone):
    """`{layer: load}`: how each quantized layer of a backbone built by a
    `QuantizedPlan` reads a float `.weights.h5` in Keras's `load_weights`.

    Keras reads each layer's tensors with `layer.load_own_variables(store)`,
    which for a quantized layer expects the integer layout; `load` reads the
    float layout instead, one tensor at a time, and quantizes it as
    `quantize_tensor` does. The Keras preset loader puts these in place of
    the layers' own for the load (`preset_loader_keras`).
    """
    return {
        target.layer: functools.partial(_load_float_variables, target)
        for target in quantized_targets(backbone).values()
    }


def _load_float_variables(target, store):
    layer = target.layer
    if isinstance(layer, Dense):  # a file from before `[out, in]` reads as today's
        store = kernel_layout.current(store, layer.path, quantized=False)
    names = [
        name
        for name in layer.variable_serialization_spec[None]
        if not (name == "bias" and getattr(layer, "bias", None) is None)
    ]
    if len(store.keys()) != len(names):
        raise ValueError(
            f"layer `{layer.path}`: the weights file holds {len(store.keys())} "
            f"tensors for it, but a float layer has {len(names)} ({names})."
        )
    variables = {v.path: v for v in layer.weights}
    for i, name in enumerate(names):
        array = store[str(i)]
        if name == "bias":
            layer.bias.assign(array)
        elif name in ("kernel", "embeddings"):
            if tuple(array.shape) != target.float_shape:
                raise ValueError(
                    f"layer `{layer.path}`: `{name}` has shape "
                    f"{tuple(array.shape)} in the weights file, but the model "
                    f"needs {target.float_shape}."
                )
            _assign(variables, quantize_tensor(target, array))
        else:
            raise ValueError(
                f"layer `{layer.path}`: cannot quantize its `{name}` on load."
            )
        del array
