"""Turns strings into RecurrentGemma training batches and generation prompts."""

import keras
import numpy as np
from keras_hub.models import CausalLMPreprocessor

from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.tokenizer import RecurrentGemmaTokenizer


def _row_lengths(token_ids):
    """Lengths of a tokenizer output: a ragged tensor or a list of lists.

    Returns `None` inside a TensorFlow graph (a `tf.data` map), where the
    lengths are symbolic; `_assert_fits_in_graph` checks those.
    """
    if hasattr(token_ids, "row_lengths"):  # tf.RaggedTensor
        import tensorflow as tf

        if not tf.executing_eagerly():
            return None
        if token_ids.shape.rank == 1:
            return [int(token_ids.shape[0])]
        return [int(n) for n in token_ids.row_lengths().numpy()]
    if hasattr(token_ids, "shape") and len(token_ids.shape) == 2:  # dense
        return [int(token_ids.shape[1])] * int(token_ids.shape[0])
    token_ids = list(token_ids)
    if token_ids and not isinstance(token_ids[0], (list, tuple, np.ndarray)):
        return [len(token_ids)]
    return [len(row) for row in token_ids]


def _assert_fits_in_graph(token_ids, limit):
    import tensorflow as tf

    lengths = (
        token_ids.row_lengths()
        if token_ids.shape.rank == 2
        else tf.shape(token_ids, out_type="int64")
    )
    return tf.debugging.assert_less_equal(
        lengths,
        tf.cast(limit, lengths.dtype),
        message=f"A prompt is longer than max_length={limit} (with <bos> if added).",
    )


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaCausalLMPreprocessor(CausalLMPreprocessor):
    """Tokenizes and packs text for `RecurrentGemmaCausalLM`.

    Called on strings it returns `(x, y, sample_weight)` for `fit`: `x` holds
    `token_ids` and `padding_mask` (`<bos>` first, `<eos>` last, right padded
    with `<pad>` to `sequence_length`), `y` is `token_ids` shifted by one,
    and `sample_weight` masks padding.

    `generate_preprocess` packs prompts (with `<bos>`, without `<eos>`) into
    a right-padded `[batch, max_length]` buffer that generation fills in;
    unlike KerasHub's base class it refuses to truncate a prompt that does
    not fit, since generating from a silently cut prompt is a wrong answer.
    `generate_postprocess` drops padding and special tokens and detokenizes.

    Args:
        tokenizer: `RecurrentGemmaTokenizer`.
        sequence_length: int. Packed length for training, and the default
            `max_length` of `generate`. Defaults to `1024`.
        add_start_token: bool. Prepend `<bos>`. Defaults to `True`.
        add_end_token: bool. Append `<eos>` to training examples. Defaults
            to `True`.

    Example:
    ```python
    preprocessor = RecurrentGemmaCausalLMPreprocessor(tokenizer, sequence_length=8)
    x, y, sample_weight = preprocessor(["The quick brown fox."])
    prompt = preprocessor.generate_preprocess(["The quick"], sequence_length=32)
    ```
    """

    backbone_cls = RecurrentGemmaBackbone
    tokenizer_cls = RecurrentGemmaTokenizer
    presets = preset_loader.PresetsProperty()

    @classmethod
    def from_preset(cls, preset, config_file="preprocessor.json", **kwargs):
        """Builds the preprocessor from a preset name, directory or handle.

        Accepts what `RecurrentGemmaBackbone.from_preset` accepts. A checkpoint
        that is not a Keras preset gives a preprocessor around its
        `tokenizer.model`, with `kwargs` (e.g. `sequence_length`) applied.
        """
        return preset_loader.load_preprocessor(cls, preset, config_file, **kwargs)

    def __init__(self, tokenizer, sequence_length=1024, **kwargs):
        _check_length(sequence_length, "sequence_length")
        super().__init__(tokenizer, sequence_length=sequence_length, **kwargs)

    def generate_preprocess(self, x, sequence_length=None):
        if sequence_length is None:
            sequence_length = self.sequence_length
        _check_length(sequence_length, "max_length")
        if isinstance(x, (list, tuple)) and len(x) == 0:
            raise ValueError("`generate` got an empty list of prompts.")
        if hasattr(x, "shape") and len(x.shape) >= 1 and x.shape[0] == 0:
            raise ValueError("`generate` got an empty batch of prompts.")
        token_ids = self.tokenizer(x)
        lengths = _row_lengths(token_ids)
        extra = 1 if self.add_start_token else 0
        if lengths is None:
            with _graph_check(
                _assert_fits_in_graph(token_ids, sequence_length - extra)
            ):
                return super().generate_preprocess(x, sequence_length=sequence_length)
        for i, n in enumerate(lengths):
            if n + extra > sequence_length:
                raise ValueError(
                    f"Prompt {i} is {n + extra} tokens long"
                    f"{' with <bos>' if extra else ''}, longer than "
                    f"max_length={sequence_length}. Pass a larger `max_length` "
                    "to `generate` (prompt plus new tokens), or shorten the prompt."
                )
            if n + extra == 0:
                raise ValueError(
                    f"Prompt {i} is empty and `add_start_token` is False: "
                    "there is no token to generate from."
                )
        return super().generate_preprocess(x, sequence_length=sequence_length)

    def _generate_preprocess_python(self, x, sequence_length=None):
        # KerasHub's base ignores `add_start_token` here and always adds
        # <bos>, which would push a full-length prompt's last token out.
        if not self.built:
            self.build(None)
        token_ids, padding_mask = self.packer(
            self.tokenizer(x),
            sequence_length=sequence_length,
            add_start_value=self.add_start_token,
            add_end_value=False,
        )
        return {"token_ids": token_ids, "padding_mask": padding_mask}


def _check_length(value, name):
    if value is not None and int(value) <= 0:
        raise ValueError(f"`{name}` must be a positive int; got {value}.")


def _graph_check(assertion):
    import tensorflow as tf

    return tf.control_dependencies([assertion])
