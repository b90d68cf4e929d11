"""RecurrentGemma (Griffin) for Keras 3 on JAX, TensorFlow and PyTorch.

Names are imported on first use: `import keras_recurrentgemma` does not import
Keras, so `python -m keras_recurrentgemma --backend torch ...` can still choose
the backend (Keras reads `KERAS_BACKEND` once, when it is first imported).

Importing the package also quiets TensorFlow's start-up logs, which KerasHub
would otherwise print on every backend: see `keras_recurrentgemma.utils.quiet`
(`TF_CPP_MIN_LOG_LEVEL=0` shows them).
"""

import importlib

from keras_recurrentgemma.utils.quiet import quiet_tensorflow
from keras_recurrentgemma.version import __version__

# Before anything here imports KerasHub, which imports TensorFlow.
quiet_tensorflow()

_EXPORTS = {
    "RecurrentGemmaBackbone": "keras_recurrentgemma.backbone",
    "RecurrentGemmaCache": "keras_recurrentgemma.causal_lm",
    "RecurrentGemmaCausalLM": "keras_recurrentgemma.causal_lm",
    "RecurrentGemmaCausalLMPreprocessor": "keras_recurrentgemma.causal_lm_preprocessor",
    "RecurrentGemmaTokenizer": "keras_recurrentgemma.tokenizer",
    "format_chat": "keras_recurrentgemma.chat",
}
_SUBMODULES = ("convert", "layers", "ops", "presets")

__all__ = sorted(_EXPORTS) + list(_SUBMODULES) + ["__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"{__name__}.{name}")
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__():
    return __all__
