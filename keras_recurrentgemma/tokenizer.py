"""SentencePiece tokenizer for RecurrentGemma (the Gemma-1 vocabulary)."""

import keras
import numpy as np
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.preset_mixin import AssetPresetMixin

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaTokenizer(AssetPresetMixin, SentencePieceTokenizer):
    """RecurrentGemma's SentencePiece tokenizer.

    The official vocabulary (256,000 pieces) has `<pad>` = 0, `<eos>` = 1,
    `<bos>` = 2 and `<unk>` = 3; the ids are read from the proto, not
    assumed. `<start_of_turn>` and `<end_of_turn>`, which frame the turns of
    the instruction-tuned models, are looked up too: `start_of_turn_id` and
    `end_of_turn_id` are `None` if the vocabulary lacks them.

    The tokenizer does not add `<bos>`: the preprocessor does.

    Any text is accepted: text that is not valid Unicode is tokenized with
    each bad part replaced by U+FFFD, the replacement character, as Python's
    `errors="replace"` does. That covers lone surrogates in a `str` (two
    that form a pair, U+D83D U+DE00, are first joined into their character,
    U+1F600) and `bytes` that are not UTF-8. Control characters are ordinary
    text (byte fallback spells them). `detokenize` refuses ids outside
    `[0, vocabulary_size())` with a `ValueError` naming the id.

    Args:
        proto: bytes or str. A serialized SentencePiece model, or the path
            of a `tokenizer.model` file.

    Example:
    ```python
    tokenizer = keras_recurrentgemma.RecurrentGemmaTokenizer("tokenizer.model")
    ids = tokenizer("The quick brown fox.")
    tokenizer.detokenize(ids)
    ```
    """

    backbone_cls = RecurrentGemmaBackbone
    _load_preset = staticmethod(preset_loader.load_tokenizer)
    _preset_config_file = "tokenizer.json"

    def __init__(self, proto, **kwargs):
        self._add_special_token("<bos>", "start_token")
        self._add_special_token("<eos>", "end_token")
        self._add_special_token("<pad>", "pad_token")
        super().__init__(proto=proto, **kwargs)

    def set_proto(self, proto):
        try:
            super().set_proto(proto)
        except (ValueError, ImportError, FileNotFoundError):
            raise  # already clear: bad argument type, safe mode, missing file
        except Exception as error:
            # sentencepiece ("ParseFromArray failed") and tensorflow-text
            # (an InternalError) do not say which file was at fault.
            where = proto if isinstance(proto, str) and len(proto) < 2048 else "`proto`"
            raise ValueError(
                f"{where} is not a SentencePiece model ({error}). Pass the "
                "`tokenizer.model` file shipped with the checkpoint."
            ) from error
        self.start_of_turn_id = self._optional_id(START_OF_TURN)
        self.end_of_turn_id = self._optional_id(END_OF_TURN)

    def tokenize(self, inputs):
        # The TensorFlow path (tf.data) gets string tensors, bytes already.
        if self.proto is not None and not self._use_tf_workflow():
            inputs = _valid_text(inputs)
        return super().tokenize(inputs)

    def detokenize(self, inputs):
        if self.proto is not None and not self._use_tf_workflow():
            _check_ids(inputs, self.vocabulary_size())
        return super().detokenize(inputs)

    def _optional_id(self, piece):
        if self.proto is None or piece not in self._token_to_id_map:
            return None
        return self._token_to_id_map[piece]

    @property
    def unk_token_id(self):
        return None if self.proto is None else self._unk_token_id


def _valid_string(text):
    """`text` as a `str` SentencePiece can encode, bad parts as U+FFFD."""
    if isinstance(text, bytes):
        return text.decode("utf-8", errors="replace")
    if not isinstance(text, str):
        return text  # KerasHub's tokenizer refuses it, saying what it got
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        # Through UTF-16, a surrogate pair becomes its character and only a
        # lone surrogate is replaced.
        return text.encode("utf-16-le", "surrogatepass").decode(
            "utf-16-le", errors="replace"
        )
    return text


def _valid_text(inputs):
    """`_valid_string` on a string, or on each string of a batch."""
    if hasattr(inputs, "numpy") and not isinstance(inputs, np.ndarray):
        if getattr(inputs.dtype, "name", None) == "string":  # tf.Tensor
            inputs = inputs.numpy()
    if isinstance(inputs, np.ndarray) and inputs.dtype.kind in "OSU":
        if inputs.ndim == 0:
            return _valid_string(inputs.item())
        if inputs.ndim == 1:
            return [_valid_string(x) for x in inputs.tolist()]
        return inputs
    if isinstance(inputs, (list, tuple)):
        return [_valid_string(x) for x in inputs]
    return _valid_string(inputs)


def _flat_ids(inputs):
    """Every id in a `detokenize` input (int, lists, array, tensor)."""
    if hasattr(inputs, "to_list"):  # tf.RaggedTensor
        inputs = inputs.to_list()
    elif not isinstance(inputs, (list, tuple, int, np.ndarray)):
        inputs = keras.ops.convert_to_numpy(inputs)
    if isinstance(inputs, np.ndarray):
        return inputs.ravel()
    if isinstance(inputs, (list, tuple)):
        if not any(isinstance(x, (list, tuple, np.ndarray)) for x in inputs):
            return np.asarray(inputs).ravel()
        # An empty row is a float array to numpy; it holds no id to check.
        rows = [row for row in map(_flat_ids, inputs) if row.size]
        return np.concatenate(rows) if rows else np.zeros((0,), "int32")
    return np.asarray([inputs])


def _check_ids(inputs, vocabulary_size):
    """Refuses what SentencePiece would fail on deep inside (`IndexError`)."""
    ids = _flat_ids(inputs)
    if ids.size == 0:
        return
    if ids.dtype.kind not in "iu":
        raise TypeError(
            f"`detokenize` takes integer token ids; got {ids.dtype} values."
        )
    bad = ids[(ids < 0) | (ids >= vocabulary_size)]
    if bad.size:
        raise ValueError(
            f"`detokenize` got token id {int(bad[0])}, outside [0, "
            f"vocabulary_size={vocabulary_size})."
        )
