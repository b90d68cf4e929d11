"""Checkpoint conversion into `RecurrentGemmaBackbone`.

- `backbone_from_official(params)`: the official Flax parameter tree.
- `backbone_from_huggingface(path)`: a `transformers` checkpoint directory
  (also reached through `RecurrentGemmaBackbone.from_preset(path)`).
"""

from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from keras_recurrentgemma.convert.official import backbone_from_official
