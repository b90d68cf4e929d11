"""Loading a Hugging Face or official checkpoint: `ConvertedPresetLoader`.

The weights are converted as they are read (see `convert/`); the tokenizer is
the `tokenizer.model` shipped with the checkpoint; `load_weights=False`
builds the model from the config alone (read off the tensor shapes for the
official formats). `preset_loader.get_preset_loader` picks it for every
format but a Keras preset.
"""

import os

from keras_recurrentgemma.preset_common import HUGGINGFACE
from keras_recurrentgemma.preset_common import OFFICIAL_TORCH
from keras_recurrentgemma.preset_common import preset_utils
from keras_recurrentgemma.preset_common import split_backbone_kwargs

TOKENIZER_FILE = "tokenizer.model"


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
        return split_backbone_kwargs(ConvertedPresetLoader, self, kwargs)

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
