"""RecurrentGemma (Griffin) for Keras 3 on JAX, TensorFlow and PyTorch."""

from keras_recurrentgemma import convert
from keras_recurrentgemma import layers
from keras_recurrentgemma import ops
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.version import __version__
