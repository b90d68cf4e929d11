"""Where `from_preset` finds a model, and how it reads each checkpoint format.

Every class's `from_preset` (backbone, causal LM, preprocessor, tokenizer)
goes through `get_preset_loader(preset)`, which accepts:

- a preset name from `keras_recurrentgemma.presets.PRESETS`;
- a local directory: a Keras preset (as `save_to_preset` writes it), a
  Hugging Face checkpoint (`config.json` with `model_type` `recurrent_gemma`
  and safetensors), or an official checkpoint (an Orbax/Flax folder or a
  PyTorch `.pt` file, as on Kaggle), with its `tokenizer.model`;
- `hf://org/name` and `kaggle://owner/model/framework/variation[/version]`
  handles, downloaded with `huggingface_hub` / `kagglehub` (see
  `downloads.py`).

Keras presets load with KerasHub's own loader; the other formats are
converted on load by `ConvertedPresetLoader`. Loading is all or nothing: a
bad file is a `ValueError` that names it (a missing weights file a
`FileNotFoundError`), never a half-loaded model.

Loading never runs code from a file: configs are JSON deserialized in
Keras's safe mode, weights are HDF5 (`.h5`), safetensors, Orbax, or
PyTorch files read with `torch.load(weights_only=True)`.
"""

import contextlib
import os

import keras

# Keras exports no way to force safe mode over a user's
# `enable_unsafe_deserialization()`; its `SafeModeScope` does.
from keras.src.saving import serialization_lib
from keras_hub.src.utils import preset_utils

from keras_recurrentgemma import downloads
from keras_recurrentgemma import presets as named_presets
from keras_recurrentgemma.layers.initialization import skip_random_initialization

TOKENIZER_FILE = "tokenizer.model"

# The formats `detect_format` tells apart.
KERAS = "keras"
HUGGINGFACE = "huggingface"
ORBAX = "orbax"
OFFICIAL_TORCH = "official_torch"


def known_presets_message():
    return "Known presets: " + ", ".join(sorted(named_presets.PRESETS)) + "."


def _describe_directory(directory, limit=12):
    names = sorted(os.listdir(directory))
    shown = ", ".join(names[:limit]) + (" ..." if len(names) > limit else "")
    return f"it holds [{shown}]" if names else "it is empty"


def detect_format(directory):
    """Names the checkpoint format of a local directory.

    Returns:
        One of `"keras"`, `"huggingface"`, `"orbax"`, `"official_torch"`.

    Raises:
        ValueError: if the directory is none of them, saying what it holds
            and what was expected.
    """
    # The converters import the backbone, which imports this module.
    from keras_recurrentgemma.convert import common
    from keras_recurrentgemma.convert import huggingface
    from keras_recurrentgemma.convert import official_torch
    from keras_recurrentgemma.convert import orbax

    config_path = os.path.join(directory, preset_utils.CONFIG_FILE)
    if os.path.isfile(config_path):
        config = common.read_json_object(config_path)
        if "registered_name" in config:
            return KERAS
        if config.get("model_type") == huggingface.MODEL_TYPE:
            return HUGGINGFACE
        if "model_type" in config:
            raise ValueError(
                f"{directory}: a Hugging Face checkpoint of model_type "
                f"{config['model_type']!r}, not {huggingface.MODEL_TYPE!r} "
                "(RecurrentGemma)."
            )
    if official_torch.find_torch_checkpoint(directory) is not None:
        return OFFICIAL_TORCH
    if orbax.find_orbax_checkpoint(directory) is not None:
        return ORBAX
    raise ValueError(
        f"{directory} is not a checkpoint this library can read "
        f"({_describe_directory(directory)}). Expected one of: a Keras preset "
        "(config.json with `registered_name`, model.weights.h5, as written by "
        "`save_to_preset`); a Hugging Face RecurrentGemma checkpoint "
        "(config.json with model_type 'recurrent_gemma' and *.safetensors); "
        "an official PyTorch checkpoint (one *.pt file); or an official "
        "Orbax/Flax checkpoint folder (as downloaded from Kaggle)."
    )


# Backbone arguments that change how the model runs, not what it computes,
# so a task's `from_preset` accepts them too (KerasHub forwards only `dtype`).
RUNTIME_BACKBONE_ARGS = ("remat", "scan_implementation")
# Not a backbone argument: the loaders take it to quantize while loading.
LOAD_ARGS = ("quantize",)


def _split_backbone_kwargs(loader_cls, loader, kwargs):
    backbone_kwargs, kwargs = super(loader_cls, loader).get_backbone_kwargs(**kwargs)
    for name in RUNTIME_BACKBONE_ARGS + LOAD_ARGS:
        if name in kwargs:
            backbone_kwargs[name] = kwargs.pop(name)
    return backbone_kwargs, kwargs


def read_serialized_object(directory, filename):
    """Reads a preset's JSON for one Keras object (`task.json`, ...).

    Raises:
        ValueError: naming the file, if it is not JSON or not the object
            `save_to_preset` writes (`registered_name` and `config`).
    """
    from keras_recurrentgemma.convert import common

    path = os.path.join(directory, filename)
    config = common.read_json_object(path)
    if not isinstance(config.get("registered_name"), str) or not isinstance(
        config.get("config"), dict
    ):
        raise ValueError(
            f"{path}: not a serialized Keras object; it needs a string "
            "`registered_name` and a `config` object, as `save_to_preset` writes."
        )
    return config


def check_serialized_backbone(config, path):
    """`check_backbone_config` on a serialized backbone, naming `path`.

    A dtype given as a policy name is replaced by the serialized policy that
    KerasHub's loader expects.
    """
    from keras_recurrentgemma.utils.checks import check_backbone_config

    arguments = config["config"]
    try:
        check_backbone_config(arguments)
        if isinstance(arguments.get("dtype"), str):
            arguments["dtype"] = keras.dtype_policies.serialize(
                keras.dtype_policies.get(arguments["dtype"])
            )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from e


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
        return _split_backbone_kwargs(KerasFormatLoader, self, kwargs)

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
        if isinstance(backbone.dtype_policy, keras.dtype_policies.DTypePolicyMap):
            from keras_recurrentgemma.convert import quantize_on_load

            # A quantized preset: saving it again needs per-layer policies.
            quantize_on_load.resolve_policies(backbone)
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


class ConvertedPresetLoader(preset_utils.PresetLoader):
    """Loads a Hugging Face or official checkpoint, converting it on load.

    Args:
        preset: str. What the user passed, for messages.
        directory: str. The local checkpoint directory.
        source_format: one of `"huggingface"`, `"orbax"`, `"official_torch"`.
        task_defaults: dict of task arguments a named preset implies, e.g.
            `{"instruction_tuned": True}`.
    """

    def __init__(self, preset, directory, source_format, task_defaults=None):
        super().__init__(preset, config=None)
        self.directory = directory
        self.source_format = source_format
        self.task_defaults = dict(task_defaults or {})

    def get_backbone_kwargs(self, **kwargs):
        return _split_backbone_kwargs(ConvertedPresetLoader, self, kwargs)

    def check_backbone_class(self):
        from keras_recurrentgemma.backbone import RecurrentGemmaBackbone

        return RecurrentGemmaBackbone

    def load_backbone(self, cls, load_weights, **kwargs):
        from keras_recurrentgemma.convert import huggingface
        from keras_recurrentgemma.convert import official
        from keras_recurrentgemma.convert import official_torch
        from keras_recurrentgemma.convert import orbax

        if self.source_format == HUGGINGFACE:
            if load_weights:
                return huggingface.backbone_from_huggingface(self.directory, **kwargs)
            hf_config = huggingface.read_config(self.directory)
            try:
                config = huggingface.config_from_huggingface(hf_config)
            except ValueError as e:
                config_path = os.path.join(self.directory, huggingface.CONFIG_FILE)
                raise ValueError(f"{config_path}: {e}") from e
            dtype = kwargs.pop("dtype", None) or "float32"
            return _build_unloaded(cls, {**config, **kwargs}, dtype)
        if self.source_format == OFFICIAL_TORCH:
            path = official_torch.find_torch_checkpoint(self.directory)
            if load_weights:
                return official_torch.backbone_from_official_torch(path, **kwargs)
            state_dict = official_torch.read_torch_state_dict(path)
            params = official_torch.params_from_torch_state_dict(state_dict)
        else:
            path = orbax.find_orbax_checkpoint(self.directory)
            if load_weights:
                return orbax.backbone_from_orbax(path, **kwargs)
            params = orbax.lazy_orbax_params(path)
        # The official formats carry no config: it is read off the tensor
        # shapes, which come from the metadata (Orbax) or the map (.pt)
        # without reading any tensor's data.
        dtype = kwargs.pop("dtype", None)
        quantize = kwargs.pop("quantize", None)
        config = official.config_from_official(params, **kwargs)
        return _build_unloaded(cls, {**config, "quantize": quantize}, dtype)

    def tokenizer_file(self):
        path = os.path.join(self.directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise ValueError(
                f"{self.directory}: no `{TOKENIZER_FILE}`. A {self.source_format} "
                "checkpoint needs the SentencePiece file shipped with it to build "
                "a tokenizer; copy it into this directory."
            )
        return path

    def load_tokenizer(self, cls, config_file=None, **kwargs):
        return cls(proto=self.tokenizer_file(), **kwargs)

    def load_task(self, cls, load_weights, load_task_weights, **kwargs):
        for key, value in self.task_defaults.items():
            kwargs.setdefault(key, value)
        task = super().load_task(cls, load_weights, load_task_weights, **kwargs)
        if task.preprocessor is not None:
            pieces = task.preprocessor.tokenizer.vocabulary_size()
            rows = task.backbone.vocabulary_size
            if pieces > rows:
                raise ValueError(
                    f"{self.directory}: `{TOKENIZER_FILE}` has {pieces} pieces but "
                    f"the checkpoint's embedding has {rows} rows; they belong to "
                    "different models."
                )
        return task


def _build_unloaded(cls, config, dtype):
    """`from_preset(load_weights=False)`: random weights, quantized if asked."""
    from keras_recurrentgemma.convert import quantize_on_load

    config = dict(config)
    quantize = config.pop("quantize", None)
    if quantize is None:
        return cls(**config, dtype=dtype)
    plan = quantize_on_load.QuantizedPlan(cls, config, dtype, quantize)
    return plan.finish(cls(**config, dtype=plan.dtype()))


def _resolve_named(name):
    entry = named_presets.PRESETS[name]
    directory = named_presets.preset_directory(name)
    if directory is not None:
        if not os.path.isdir(directory):
            raise ValueError(
                f"Preset {name!r} should ship in {directory}, which is missing: "
                "reinstall keras-recurrentgemma."
            )
        return directory, {}
    defaults = {"instruction_tuned": entry["metadata"]["instruction_tuned"]}
    return entry["handle"], defaults


def get_preset_loader(preset):
    """Returns the `PresetLoader` for any `from_preset` argument.

    Raises:
        ValueError: for an unknown name (listing the known ones), a directory
            in no known format, or a download that failed (saying why and
            what to do).
    """
    if isinstance(preset, os.PathLike):
        preset = os.fspath(preset)
    if not isinstance(preset, str):
        raise ValueError(
            f"A preset is a name, a directory or a handle (str); got {preset!r}."
        )
    task_defaults = {}
    if preset in named_presets.PRESETS:
        preset, task_defaults = _resolve_named(preset)

    scheme = preset.split("://", 1)[0].lower() if "://" in preset else None
    if scheme is None:
        if not os.path.isdir(preset):
            if os.path.exists(preset):
                raise ValueError(
                    f"{preset} is a file; pass the checkpoint's directory."
                )
            raise ValueError(
                f"Unknown preset {preset!r}: not a preset name and not a "
                f"directory. {known_presets_message()} Also accepted: a local "
                "directory, 'hf://org/name' or 'kaggle://owner/model/framework/"
                "variation'."
            )
        directory = preset
    elif scheme == "hf":
        directory = downloads.huggingface_download(preset)
    elif scheme == "kaggle":
        directory = downloads.kaggle_download(preset)
    else:
        raise ValueError(
            f"Unsupported handle {preset!r}: use 'hf://', 'kaggle://', a local "
            f"directory or a preset name. {known_presets_message()}"
        )

    source_format = detect_format(directory)
    if source_format == KERAS:
        config = read_serialized_object(directory, preset_utils.CONFIG_FILE)
        return KerasFormatLoader(directory, config)
    return ConvertedPresetLoader(preset, directory, source_format, task_defaults)


class PresetsProperty:
    """`cls.presets`: the named presets, as KerasHub classes expose them."""

    def __get__(self, instance, owner):
        return {
            name: {key: value for key, value in entry.items()}
            for name, entry in named_presets.PRESETS.items()
        }


def load_backbone(cls, preset, load_weights=True, **kwargs):
    loader = get_preset_loader(preset)
    backbone_cls = loader.check_backbone_class()
    if not issubclass(backbone_cls, cls):
        raise ValueError(
            f"{preset} holds a `{backbone_cls.__name__}`, not a `{cls.__name__}`."
        )
    return loader.load_backbone(backbone_cls, load_weights, **kwargs)


def load_task(cls, preset, load_weights=True, **kwargs):
    loader = get_preset_loader(preset)
    return loader.load_task(cls, load_weights, True, **kwargs)


def load_preprocessor(cls, preset, config_file, **kwargs):
    loader = get_preset_loader(preset)
    return loader.load_preprocessor(cls, config_file, **kwargs)


def load_tokenizer(cls, preset, config_file, **kwargs):
    loader = get_preset_loader(preset)
    return loader.load_tokenizer(cls, config_file, **kwargs)
