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
bad file is a `ValueError` that names it, never a half-loaded model.
"""

import os

from keras_hub.src.utils import preset_utils

from keras_recurrentgemma import downloads
from keras_recurrentgemma import presets as named_presets

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


def _split_backbone_kwargs(loader_cls, loader, kwargs):
    backbone_kwargs, kwargs = super(loader_cls, loader).get_backbone_kwargs(**kwargs)
    for name in RUNTIME_BACKBONE_ARGS:
        if name in kwargs:
            backbone_kwargs[name] = kwargs.pop(name)
    return backbone_kwargs, kwargs


class KerasFormatLoader(preset_utils.KerasPresetLoader):
    """KerasHub's loader, with errors that name the weights file."""

    def get_backbone_kwargs(self, **kwargs):
        return _split_backbone_kwargs(KerasFormatLoader, self, kwargs)

    def _load_backbone_weights(self, backbone):
        try:
            super()._load_backbone_weights(backbone)
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
            config = huggingface.config_from_huggingface(
                huggingface.read_config(self.directory)
            )
            kwargs.setdefault("dtype", "float32")
            return cls(**{**config, **kwargs})
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
            params = orbax.read_orbax_params(path)
        # The official formats carry no config: it is read off the tensor
        # shapes, so even `load_weights=False` reads the file (but builds the
        # model only once, with random weights).
        dtype = kwargs.pop("dtype", None)
        return cls(**official.config_from_official(params, **kwargs), dtype=dtype)

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
        from keras_recurrentgemma.convert import common

        config_path = os.path.join(directory, preset_utils.CONFIG_FILE)
        config = common.read_json_object(config_path)
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
