"""What the preset loaders share: a directory's format, a preset's JSON checked.

`detect_format` tells a Keras preset, a Hugging Face checkpoint and the two
official formats apart; `read_serialized_object` and
`check_serialized_backbone` read a Keras preset's JSON and check it, naming
the file at fault; `split_backbone_kwargs` hands the backbone the arguments
a task's `from_preset` also accepts (`RUNTIME_BACKBONE_ARGS`, `LOAD_ARGS`).
`preset_loader` is the entry point, and re-exports these names.
"""

import os

import keras

# KerasHub's preset loaders (`PresetLoader`, `KerasPresetLoader`) and file
# names have no public home; the other preset modules take `preset_utils`
# from here, so a move in KerasHub breaks one import, not four.
from keras_hub.src.utils import preset_utils

# The formats `detect_format` tells apart.
KERAS = "keras"
HUGGINGFACE = "huggingface"
ORBAX = "orbax"
OFFICIAL_TORCH = "official_torch"


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
    # The converters import the backbone, which imports `preset_loader` and
    # so this module.
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


def split_backbone_kwargs(loader_cls, loader, kwargs):
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
