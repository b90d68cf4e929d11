"""RecurrentGemma (Griffin) for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_recurrentgemma import convert
from keras_recurrentgemma import layers
from keras_recurrentgemma import ops
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.causal_lm import RecurrentGemmaCache
from keras_recurrentgemma.causal_lm import RecurrentGemmaCausalLM
from keras_recurrentgemma.causal_lm_preprocessor import (
    RecurrentGemmaCausalLMPreprocessor,
)
from keras_recurrentgemma.chat import format_chat
from keras_recurrentgemma.tokenizer import RecurrentGemmaTokenizer
from keras_recurrentgemma.version import __version__
