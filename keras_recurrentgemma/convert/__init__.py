"""Checkpoint conversion into `RecurrentGemmaBackbone`.

- `backbone_from_official(params)`: the official Flax parameter tree.
- `backbone_from_orbax(path)`: an official Orbax (Flax) checkpoint folder,
  e.g. `2b/` of the Kaggle Flax download (`find_orbax_checkpoint`,
  `read_orbax_params`).
- `backbone_from_official_torch(path)`: an official PyTorch `.pt`, e.g.
  `2b.pt` of the Kaggle PyTorch download (`find_torch_checkpoint`,
  `read_torch_state_dict`, `params_from_torch_state_dict`).
- `backbone_from_huggingface(path)`: a `transformers` checkpoint directory
  (also reached through `RecurrentGemmaBackbone.from_preset(path)`).
- `export_to_transformers(obj, path)`: the other way, a causal LM, backbone,
  tokenizer or preprocessor to a `transformers` directory.
- `reference_logits(source_format, path, token_ids)`: the logits the
  checkpoint's own implementation computes, to check a conversion.
"""

from keras_recurrentgemma.convert.huggingface import backbone_from_huggingface
from keras_recurrentgemma.convert.official import backbone_from_official
from keras_recurrentgemma.convert.official import config_from_official
from keras_recurrentgemma.convert.official_torch import backbone_from_official_torch
from keras_recurrentgemma.convert.official_torch import find_torch_checkpoint
from keras_recurrentgemma.convert.official_torch import params_from_torch_state_dict
from keras_recurrentgemma.convert.official_torch import read_torch_state_dict
from keras_recurrentgemma.convert.orbax import backbone_from_orbax
from keras_recurrentgemma.convert.orbax import find_orbax_checkpoint
from keras_recurrentgemma.convert.orbax import is_orbax_checkpoint
from keras_recurrentgemma.convert.orbax import read_orbax_params
from keras_recurrentgemma.convert.reference import reference_logits
from keras_recurrentgemma.convert.to_transformers import export_to_transformers
