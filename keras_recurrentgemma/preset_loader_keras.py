"""Loading a Keras preset, as `save_to_preset` writes it: `KerasFormatLoader`.

KerasHub's own loader, with every JSON file checked and deserialized in
Keras's safe mode, errors that name the file at fault, and `quantize=`
applied while the weights load. `preset_loader.get_preset_loader` picks it
for a directory whose `config.json` has a `registered_name`.
"""

import contextlib
import os

import keras

# Keras exports no way to force safe mode over a user's
# `enable_unsafe_deserialization()`; its `SafeModeScope` does.
from keras.src.saving import serialization_lib

from keras_recurrentgemma.layers.initialization import skip_random_initialization
from keras_recurrentgemma.preset_common import check_serialized_backbone
from keras_recurrentgemma.preset_common import preset_utils
from keras_recurrentgemma.preset_common import read_serialized_object
from keras_recurrentgemma.preset_common import split_backbone_kwargs


def _initialization(load_weights):
    """No random initial values for a model whose weights are loaded next."""
    return skip_random_initialization() if load_weights else contextlib.nullcontext()


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

                with quantize_on_load.loading_float_weights(backbone):
                    super()._load_backbone_weights(backbone)
            else:
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
