"""Loading a Keras preset, as `save_to_preset` writes it: `KerasFormatLoader`.

KerasHub's own loader, with every JSON file checked and deserialized in
Keras's safe mode, errors that name the file at fault, and `quantize=`
applied while the weights load. `preset_loader.get_preset_loader` picks it
for a directory whose `config.json` has a `registered_name`.
"""

import contextlib
import os

import keras
import numpy as np

# Keras exports no way to force safe mode over a user's
# `enable_unsafe_deserialization()`; its `SafeModeScope` does.
from keras.src.saving import serialization_lib

from keras_recurrentgemma.layers.initialization import skip_random_initialization
from keras_recurrentgemma.lora import layers_with_weights
from keras_recurrentgemma.preset_common import check_serialized_backbone
from keras_recurrentgemma.preset_common import preset_utils
from keras_recurrentgemma.preset_common import read_serialized_object
from keras_recurrentgemma.preset_common import split_backbone_kwargs


def _initialization(load_weights):
    """No random initial values for a model whose weights are loaded next."""
    return skip_random_initialization() if load_weights else contextlib.nullcontext()


class _BackendTensorStore:
    """A layer's entry of a weights file whose arrays reach `assign` as the
    backend's tensors, made with the fewest copies
    (`backend_arrays.backend_tensor`).

    Keras's torch backend converts a bfloat16 NumPy array through a float32
    copy (torch has no NumPy bfloat16): for the 2B's embedding, 2.4 GiB at
    once beside the array and the variable (the `.h5` load peaked at 11.1
    GiB). TensorFlow would copy each array twice more.
    """

    def __init__(self, store):
        self._store = store

    def keys(self):
        return self._store.keys()

    def __len__(self):
        return len(self._store.keys())

    def __contains__(self, key):
        return key in self._store.keys()

    def __getitem__(self, key):
        # Imported here: `convert` imports the backbone, which imports this.
        from keras_recurrentgemma.convert.backend_arrays import backend_tensor

        value = self._store[key]
        return backend_tensor(value) if isinstance(value, np.ndarray) else value


def _backend_tensor_loads(backbone):
    """`{layer: load}`: each layer reads its weights through a
    `_BackendTensorStore`, and on JAX frees its own variables' placeholders
    first (`backend_arrays.release_placeholder`: otherwise each placeholder and its
    weight coexist, 1.2 GiB more for the 2B's embedding on a device). A load
    that fails leaves a model nobody gets."""
    from keras_recurrentgemma.convert.backend_arrays import release_placeholder

    def reading(layer):
        load = layer.load_own_variables
        nested = {id(v) for sub in layers_with_weights(layer) for v in sub.weights}
        own = [v for v in layer.weights if id(v) not in nested]

        def read(store):
            for variable in own:
                release_placeholder(variable)
            load(_BackendTensorStore(store))

        return read

    return {layer: reading(layer) for layer in layers_with_weights(backbone)}


@contextlib.contextmanager
def _loading_with(loads):
    """Keras's `load_weights` calls `loads[layer]` instead of each layer's
    `load_own_variables`: an instance attribute, removed on exit; nothing
    else about the layers changes."""
    for layer, load in loads.items():
        # `object.__setattr__`: Keras's layer tracking has no business here.
        object.__setattr__(layer, "load_own_variables", load)
    try:
        yield
    finally:
        for layer in loads:
            object.__delattr__(layer, "load_own_variables")


class KerasFormatLoader(preset_utils.KerasPresetLoader):
    """KerasHub's loader, with errors that name the file at fault.

    Every JSON file is checked before anything is built from it, and is
    deserialized in Keras's safe mode even if the user turned it off with
    `keras.config.enable_unsafe_deserialization()`: a preset is data, and
    none of this library's classes needs a lambda or arbitrary import to
    load, so a file asking for one is refused, never executed.
    """

    def __init__(self, preset, config):
        super().__init__(preset, config)
        self._reading = preset_utils.CONFIG_FILE

    @contextlib.contextmanager
    def _reading_file(self, filename):
        previous, self._reading = self._reading, filename
        try:
            yield
        finally:
            self._reading = previous

    def get_backbone_kwargs(self, **kwargs):
        return split_backbone_kwargs(KerasFormatLoader, self, kwargs)

    def load_backbone(self, cls, load_weights, **kwargs):
        path = os.path.join(self.preset, preset_utils.CONFIG_FILE)
        check_serialized_backbone(self.config, path)
        quantize = kwargs.pop("quantize", None)
        plan = None
        if quantize is not None:
            plan = self._quantized_plan(cls, quantize, kwargs, path)
            kwargs["dtype"] = plan.dtype()
        elif kwargs.get("dtype") is None:
            # KerasHub always overrides the saved `dtype` with the caller's,
            # `None` included, which builds a quantized preset in float.
            saved = keras.dtype_policies.get(self.config["config"].get("dtype"))
            if isinstance(saved, keras.dtype_policies.DTypePolicyMap):
                kwargs["dtype"] = saved
        self._quantize_on_load = plan is not None
        try:
            with (
                self._reading_file(preset_utils.CONFIG_FILE),
                _initialization(load_weights),
            ):
                backbone = super().load_backbone(cls, load_weights, **kwargs)
        finally:
            self._quantize_on_load = False
        if plan is not None:
            return plan.finish(backbone)
        return backbone

    def _quantized_plan(self, cls, quantize, kwargs, path):
        from keras_recurrentgemma.convert import quantize_on_load

        arguments = self.config["config"]
        dtype = kwargs.get("dtype") or arguments.get("dtype")
        policy = keras.dtype_policies.get(dtype)
        if isinstance(policy, keras.dtype_policies.DTypePolicyMap):
            raise ValueError(
                f"{path}: this preset is already quantized; load it without "
                f"`quantize={quantize!r}`."
            )
        return quantize_on_load.QuantizedPlan(
            cls, {**arguments, **kwargs}, policy, quantize
        )

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        # Without a task.json KerasHub builds the task from config.json and
        # preprocessor.json, which `load_backbone` and `load_preprocessor`
        # check.
        filename = preset_utils.TASK_CONFIG_FILE
        path = os.path.join(self.preset, filename)
        if os.path.isfile(path):
            task = read_serialized_object(self.preset, filename)
            backbone = task["config"].get("backbone")
            if isinstance(backbone, dict) and isinstance(backbone.get("config"), dict):
                check_serialized_backbone(backbone, path)
            check_serialized_backbone(
                self.config, os.path.join(self.preset, preset_utils.CONFIG_FILE)
            )
        with self._reading_file(filename), _initialization(load_weights):
            return super().load_task(cls, load_weights, load_task_weights, **kwargs)

    def load_tokenizer(
        self, cls, config_file=preset_utils.TOKENIZER_CONFIG_FILE, **kwargs
    ):
        return self._load_checked(super().load_tokenizer, cls, config_file, **kwargs)

    def load_preprocessor(
        self, cls, config_file=preset_utils.PREPROCESSOR_CONFIG_FILE, **kwargs
    ):
        return self._load_checked(super().load_preprocessor, cls, config_file, **kwargs)

    def _load_checked(self, load, cls, config_file, **kwargs):
        # A missing file is KerasHub's FileNotFoundError, naming it.
        if os.path.isfile(os.path.join(self.preset, config_file)):
            read_serialized_object(self.preset, config_file)
        with self._reading_file(config_file):
            return load(cls, config_file, **kwargs)

    def _load_serialized_object(self, config, **kwargs):
        path = os.path.join(self.preset, self._reading)
        try:
            with serialization_lib.SafeModeScope(True):
                return super()._load_serialized_object(config, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError, ArithmeticError) as e:
            raise ValueError(
                f"{path}: cannot build `{config.get('class_name')}` from it with "
                f"the given arguments ({type(e).__name__}: {e})"
            ) from e

    def _load_backbone_weights(self, backbone):
        names = (
            preset_utils.MODEL_WEIGHTS_FILE,
            preset_utils.SHARDED_MODEL_WEIGHTS_CONFIG_FILE,
        )
        if not any(os.path.isfile(os.path.join(self.preset, n)) for n in names):
            raise FileNotFoundError(
                f"{self.preset}: no `{names[0]}` (nor sharded `{names[1]}`); the "
                "weights are missing. Pass `load_weights=False` for a model with "
                "random weights."
            )
        try:
            if getattr(self, "_quantize_on_load", False):
                from keras_recurrentgemma.convert import quantize_on_load

                # Reads each float tensor as NumPy and quantizes it there.
                loads = quantize_on_load.float_weight_loads(backbone)
            else:
                loads = _backend_tensor_loads(backbone)
            with _loading_with(loads):
                super()._load_backbone_weights(backbone)
        except FileNotFoundError:
            raise  # a missing shard: KerasHub's message names it
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{self.preset}: cannot load `{preset_utils.MODEL_WEIGHTS_FILE}` "
                f"into the model that `{preset_utils.CONFIG_FILE}` describes: the "
                "file is truncated or corrupt, or its shapes disagree with the "
                f"config. ({type(e).__name__}: {e})"
            ) from e
