"""SentencePiece tokenizer for RecurrentGemma (the Gemma-1 vocabulary)."""

import keras
from keras_hub.tokenizers import SentencePieceTokenizer

from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone

START_OF_TURN = "<start_of_turn>"
END_OF_TURN = "<end_of_turn>"


@keras.saving.register_keras_serializable(package="keras_recurrentgemma")
class RecurrentGemmaTokenizer(SentencePieceTokenizer):
    """RecurrentGemma's SentencePiece tokenizer.

    The official vocabulary (256,000 pieces) has `<pad>` = 0, `<eos>` = 1,
    `<bos>` = 2 and `<unk>` = 3; the ids are read from the proto, not
    assumed. `<start_of_turn>` and `<end_of_turn>`, which frame the turns of
    the instruction-tuned models, are looked up too: `start_of_turn_id` and
    `end_of_turn_id` are `None` if the vocabulary lacks them.

    The tokenizer does not add `<bos>`: the preprocessor does.

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
    presets = preset_loader.PresetsProperty()

    @classmethod
    def from_preset(cls, preset, config_file="tokenizer.json", **kwargs):
        """Builds the tokenizer from a preset name, directory or handle.

        Accepts what `RecurrentGemmaBackbone.from_preset` accepts; for a
        checkpoint that is not a Keras preset it reads its `tokenizer.model`.
        """
        return preset_loader.load_tokenizer(cls, preset, config_file, **kwargs)

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

    def _optional_id(self, piece):
        if self.proto is None or piece not in self._token_to_id_map:
            return None
        return self._token_to_id_map[piece]

    @property
    def unk_token_id(self):
        return None if self.proto is None else self._unk_token_id
