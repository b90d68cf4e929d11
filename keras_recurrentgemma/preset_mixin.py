"""`presets`, `from_preset` and an atomic `save_to_preset`, written once.

Each public class (backbone, causal LM, preprocessor, tokenizer) puts one of
these mixins before its KerasHub base class and names the
`preset_loader.load_*` function that builds it:

```python
class RecurrentGemmaTokenizer(AssetPresetMixin, SentencePieceTokenizer):
    _load_preset = staticmethod(preset_loader.load_tokenizer)
    _preset_config_file = "tokenizer.json"
```

Loading goes through `preset_loader` (named presets, Keras presets, Hugging
Face and official checkpoints, `hf://` and `kaggle://` handles). Saving goes
through KerasHub's own `save_to_preset`, pointed at a staging directory that
`saving.atomic_preset_dir` then swaps in, so an interrupted save leaves the
previous preset as it was and files that are not part of a preset (a README,
a LoRA file) are kept.
"""

import contextlib
import json
import os

from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.saving import atomic_preset_dir


class _PresetBase:
    """The parts every class shares: `presets` and the atomic save."""

    presets = preset_loader.PresetsProperty()
    # `preset_loader.load_backbone`, `load_task`, `load_preprocessor` or
    # `load_tokenizer`, wrapped in `staticmethod`; set by each class.
    _load_preset = None

    def _preset_save_scope(self):
        """The context the preset's files are written in; none by default.

        The backbone merges LoRA here, since a preset is for inference.
        """
        return contextlib.nullcontext()

    def _save_atomically(self, preset_dir, **kwargs):
        with atomic_preset_dir(preset_dir) as staging, self._preset_save_scope():
            # The KerasHub base class after the mixin writes the files.
            super().save_to_preset(staging, **kwargs)
            _name_tasks(staging, getattr(self, "backbone", self))

    def _export_to_transformers(self, path, overwrite, **kwargs):
        # Lazy: the exporter needs safetensors, which loading does not.
        from keras_recurrentgemma.convert.to_transformers import export_to_transformers

        export_to_transformers(self, path, overwrite=overwrite, **kwargs)

    @classmethod
    def _loader(cls):
        if cls._load_preset is None:
            raise NotImplementedError(
                f"{cls.__name__} sets no `_load_preset`; see "
                "`keras_recurrentgemma.preset_mixin`."
            )
        return cls._load_preset


def _task_kinds(backbone_cls):
    """The KerasHub task kinds (`"CausalLM"`) that have a class built on
    `backbone_cls`, as KerasHub lists them for its own models."""
    from keras_hub.models import Task

    def subclasses(cls):
        for sub in cls.__subclasses__():
            yield sub
            yield from subclasses(sub)

    kinds = set()
    for task in subclasses(Task):
        if getattr(task, "backbone_cls", None) is backbone_cls:
            # The nearest KerasHub task class this one derives from.
            kinds.add(
                next(
                    base.__name__
                    for base in task.__mro__[1:]
                    if issubclass(base, Task)
                    and base.__module__.startswith("keras_hub.")
                )
            )
    return sorted(kinds)


def _name_tasks(preset_dir, model):
    """Corrects the `"tasks"` of the `metadata.json` KerasHub just wrote.

    KerasHub names each task by its first base class: for ours that is
    `ModelPresetMixin`, put first so that its methods win, and the file
    said `["ModelPresetMixin"]` where KerasHub's own models say
    `["CausalLM"]`. Only a backbone or task save writes the file.
    """
    path = os.path.join(preset_dir, "metadata.json")
    if not os.path.isfile(path):
        return
    with open(path) as f:
        metadata = json.load(f)
    metadata["tasks"] = _task_kinds(type(model))
    with open(path, "w") as f:
        f.write(json.dumps(metadata, indent=4))


class ModelPresetMixin(_PresetBase):
    """For models with weights: the backbone and the causal LM."""

    @classmethod
    def from_preset(cls, preset, load_weights=True, **kwargs):
        """Builds the model from a preset name, directory or handle.

        Args:
            preset: str. A name from `cls.presets`; a local Keras preset,
                Hugging Face or official (Orbax or `.pt`) checkpoint
                directory; or an `hf://` / `kaggle://` handle. Checkpoints
                that are not Keras presets are converted on load, a causal
                LM's tokenizer coming from their `tokenizer.model`.
            load_weights: bool. If `False`, the weights are randomly
                initialised.
            **kwargs: constructor arguments such as `dtype`; for the causal
                LM also `instruction_tuned`, `prefill_chunk_size` and
                `preprocessor`. Named instruction-tuned presets set
                `instruction_tuned=True`.

        Raises:
            ValueError: for an unknown name (listing the known ones), a
                directory in no known format, a truncated or mismatched
                weights file, or a failed download (saying what to do).

        Example:
        ```python
        causal_lm = RecurrentGemmaCausalLM.from_preset("griffin_tiny_pydocs_en")
        causal_lm.generate("The function", max_length=40)
        ```
        """
        return cls._loader()(cls, preset, load_weights, **kwargs)

    def save_to_preset(self, preset_dir, max_shard_size=10):
        """Saves the model as a Keras preset; see KerasHub's.

        A causal LM saves its backbone, preprocessor and tokenizer. Written
        to a temporary directory that then replaces `preset_dir`, so an
        interrupted save leaves the previous preset as it was. Files that
        are not part of a preset (a README, a LoRA file) are kept.

        Raises:
            ValueError: if `preset_dir` is a file or a non-empty directory
                holding no preset.
        """
        self._save_atomically(preset_dir, max_shard_size=max_shard_size)

    def export_to_transformers(self, path, overwrite=False, max_shard_size=5):
        """Writes a Hugging Face `transformers` directory of this model.

        `transformers.AutoModelForCausalLM.from_pretrained(path)` loads it as
        `RecurrentGemmaForCausalLM`: `config.json` with the released field
        names, safetensors (streamed tensor by tensor, sharded past
        `max_shard_size` GB), LoRA merged, 16-bit weights kept 16-bit. A
        causal LM with a preprocessor also writes its tokenizer and
        `generation_config.json` with the stop ids. Staged and renamed: a
        failed export leaves nothing at `path`.

        Args:
            path: str. The directory to write.
            overwrite: bool. Replace `path` if it holds anything.
            max_shard_size: float. Largest safetensors file, in GB.

        Raises:
            ValueError: before anything is written, for a model
                `transformers` cannot represent (naming what), quantized
                weights, or an existing `path` without `overwrite=True`.
        """
        self._export_to_transformers(path, overwrite, max_shard_size=max_shard_size)


class AssetPresetMixin(_PresetBase):
    """For the weightless parts: the preprocessor and the tokenizer."""

    # The JSON file in a preset that configures the class.
    _preset_config_file = None

    @classmethod
    def from_preset(cls, preset, config_file=None, **kwargs):
        """Builds the object from a preset name, directory or handle.

        Accepts what `RecurrentGemmaBackbone.from_preset` accepts. A
        checkpoint that is not a Keras preset gives a tokenizer (or a
        preprocessor around it) read from its `tokenizer.model`, with
        `kwargs` (e.g. `sequence_length`) applied.

        Args:
            preset: str. A preset name, directory or handle.
            config_file: str. The config to read in a Keras preset.
                Defaults to the class's own (`tokenizer.json`,
                `preprocessor.json`).
            **kwargs: constructor arguments that override the preset's.
        """
        if config_file is None:
            config_file = cls._preset_config_file
        return cls._loader()(cls, preset, config_file, **kwargs)

    def save_to_preset(self, preset_dir):
        """Saves the config and vocabulary (and a preprocessor's tokenizer).

        Written into `preset_dir` atomically, keeping the directory's other
        files, as the models' `save_to_preset` does.
        """
        self._save_atomically(preset_dir)

    def export_to_transformers(self, path, overwrite=False):
        """Writes the tokenizer as `transformers` files (`tokenizer.model`,
        `tokenizer_config.json`, special tokens) that
        `transformers.AutoTokenizer.from_pretrained(path)` loads, giving the
        same ids. Staged and renamed, as the models' export.

        Raises:
            ValueError: for an existing `path` without `overwrite=True`, or
                a vocabulary transformers would tokenize differently.
        """
        self._export_to_transformers(path, overwrite)
