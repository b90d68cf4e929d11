"""Named presets: the official RecurrentGemma checkpoints and our shipped model.

This folder installs as `keras_recurrentgemma.presets`. Each entry of
`PRESETS` has:

- `metadata`: what `RecurrentGemmaCausalLM.presets` shows — a description,
  the parameter count, whether the model is instruction-tuned, and the
  official `GriffinConfig` values as `RecurrentGemmaBackbone` arguments.
- `handle`: where `from_preset(name)` loads it from. For the official models
  that is the Hugging Face repository: its safetensors read on every backend
  without JAX or Orbax. `kaggle_handle` and `kaggle_torch_handle` name the
  same weights on Kaggle (Flax/Orbax and PyTorch `.pt`); pass them to
  `from_preset` to use Kaggle instead.
- For the shipped model, `directory`: a Keras preset folder next to this file.

All official checkpoints are gated: accept the Gemma licence on the model's
Hugging Face or Kaggle page and log in (`hf auth login`, or Kaggle
credentials) before the first download.
"""

import os

# The small Griffin trained by `tools/train_small_model.py`, shipped in this
# folder: what `from_preset` and the command line use when given no name.
DEFAULT_PRESET = "griffin_tiny_pydocs_en"


def _official_config(hidden_dim, num_layers, num_heads):
    # Griffin's released models repeat (recurrent, recurrent, attention).
    pattern = ("recurrent", "recurrent", "attention")
    return {
        "vocabulary_size": 256_000,
        "hidden_dim": hidden_dim,
        "intermediate_dim": 3 * hidden_dim,
        "num_heads": num_heads,
        "block_types": [pattern[i % 3] for i in range(num_layers)],
        "lru_width": hidden_dim,
        "attention_window_size": 2048,
        "conv1d_temporal_width": 4,
        "logits_soft_cap": 30.0,
        "embeddings_scale_by_sqrt_dim": True,
        "layer_norm_epsilon": 1e-6,
        "rope_max_wavelength": 10_000.0,
    }


def _official(size, instruction_tuned, params, hidden_dim, num_layers, num_heads):
    suffix = "-it" if instruction_tuned else ""
    kind = "instruction-tuned" if instruction_tuned else "base (pretrained)"
    return {
        "metadata": {
            "description": (
                f"RecurrentGemma {size.upper()} {kind}, Google DeepMind's "
                f"released Griffin model: {num_layers} layers, width {hidden_dim}, "
                "RG-LRU recurrences with local attention over 2048 tokens, "
                "256k-token Gemma vocabulary. Gemma licence."
            ),
            "params": params,
            "path": "recurrentgemma",
            "official": True,
            "instruction_tuned": instruction_tuned,
            "config": _official_config(hidden_dim, num_layers, num_heads),
        },
        "handle": f"hf://google/recurrentgemma-{size}{suffix}",
        "kaggle_handle": f"kaggle://google/recurrentgemma/flax/{size}{suffix}",
        "kaggle_torch_handle": f"kaggle://google/recurrentgemma/pyTorch/{size}{suffix}",
    }


# Parameter counts follow from the configs (`tests/test_presets.py` checks
# them against the backbone's own `count_params()` formula).
PRESETS = {
    "recurrentgemma_2b_en": _official("2b", False, 2_682_862_080, 2560, 26, 10),
    "recurrentgemma_instruct_2b_en": _official("2b", True, 2_682_862_080, 2560, 26, 10),
    "recurrentgemma_9b_en": _official("9b", False, 8_579_977_216, 4096, 38, 16),
    "recurrentgemma_instruct_9b_en": _official("9b", True, 8_579_977_216, 4096, 38, 16),
    DEFAULT_PRESET: {
        "metadata": {
            "description": (
                "A small Griffin trained from scratch by this project on the "
                "Python 3.11 documentation (PSF licence), with its own "
                "SentencePiece vocabulary; writes technical English. For trying "
                "the API offline, not for real use. See its README.md."
            ),
            "params": 3_496_896,
            "path": "griffin",
            "official": False,
            "instruction_tuned": False,
        },
        "directory": DEFAULT_PRESET,
    },
}


def preset_directory(name):
    """The folder of a preset shipped with the package, or `None`."""
    entry = PRESETS.get(name, {})
    if "directory" not in entry:
        return None
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), entry["directory"])
