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

Keras presets load with KerasHub's own loader (`KerasFormatLoader`, in
`preset_loader_keras.py`); the other formats are converted on load by
`ConvertedPresetLoader` (`preset_loader_converted.py`). `preset_common.py`
tells the formats apart and reads and checks a preset's JSON; its names, and
the loaders, are importable from here too. Loading is all or nothing: a
bad file is a `ValueError` that names it (a missing weights file a
`FileNotFoundError`), never a half-loaded model.

Loading never runs code from a file: configs are JSON deserialized in
Keras's safe mode, weights are HDF5 (`.h5`), safetensors, Orbax, or
PyTorch files read with `torch.load(weights_only=True)`.
"""

import os

from keras_recurrentgemma import downloads
from keras_recurrentgemma import presets as named_presets
from keras_recurrentgemma.preset_common import HUGGINGFACE  # noqa: F401
from keras_recurrentgemma.preset_common import KERAS
from keras_recurrentgemma.preset_common import LOAD_ARGS  # noqa: F401
from keras_recurrentgemma.preset_common import OFFICIAL_TORCH  # noqa: F401
from keras_recurrentgemma.preset_common import ORBAX  # noqa: F401
from keras_recurrentgemma.preset_common import RUNTIME_BACKBONE_ARGS  # noqa: F401
from keras_recurrentgemma.preset_common import check_serialized_backbone  # noqa: F401
from keras_recurrentgemma.preset_common import detect_format

# `noqa`: names defined in those modules that other modules import from here.
from keras_recurrentgemma.preset_common import preset_utils
from keras_recurrentgemma.preset_common import read_serialized_object
from keras_recurrentgemma.preset_loader_converted import TOKENIZER_FILE  # noqa: F401
from keras_recurrentgemma.preset_loader_converted import ConvertedPresetLoader
from keras_recurrentgemma.preset_loader_keras import KerasFormatLoader


def known_presets_message():
    return "Known presets: " + ", ".join(sorted(named_presets.PRESETS)) + "."


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
