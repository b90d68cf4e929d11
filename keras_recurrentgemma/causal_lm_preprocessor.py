"""Turns strings into RecurrentGemma training batches and generation prompts."""

import numbers

import keras
import numpy as np
from keras_hub.models import CausalLMPreprocessor

from keras_recurrentgemma import preset_loader
from keras_recurrentgemma.backbone import RecurrentGemmaBackbone
from keras_recurrentgemma.preset_mixin import AssetPresetMixin
from keras_recurrentgemma.tokenizer import RecurrentGemmaTokenizer
from keras_recurrentgemma.utils.lists import one_or_more


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
class RecurrentGemmaCausalLMPreprocessor(AssetPresetMixin, CausalLMPreprocessor):
    """Tokenizes and packs text for `RecurrentGemmaCausalLM`.

    Called on strings it returns `(x, y, sample_weight)` for `fit`: `x` holds
    `token_ids` and `padding_mask` (`<bos>` first, `<eos>` last, right padded
    with `<pad>` to `sequence_length`), `y` is `token_ids` shifted by one,
    and `sample_weight` masks padding.

    `pack(documents)` packs several whole documents per row for `fit`, with
    `segment_pos` restarting at each one so the recurrent state, the Conv1D
    window and attention reset there; called on such an already tokenized
    `x` (a dict with `token_ids`), the preprocessor passes it through.

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
    x, y, sample_weight = preprocessor.pack(["A short one.", "And another."])
    prompt = preprocessor.generate_preprocess(["The quick"], sequence_length=32)
    ```
    """

    backbone_cls = RecurrentGemmaBackbone
    tokenizer_cls = RecurrentGemmaTokenizer
    _load_preset = staticmethod(preset_loader.load_preprocessor)
    _preset_config_file = "preprocessor.json"

    def __init__(self, tokenizer, sequence_length=1024, **kwargs):
        _check_length(sequence_length, "sequence_length")
        super().__init__(tokenizer, sequence_length=sequence_length, **kwargs)

    def call(self, x, y=None, sample_weight=None, sequence_length=None):
        if isinstance(x, dict) and "token_ids" in x:
            # Token ids already (e.g. from `pack`): nothing to tokenize, and
            # their labels and weights come with them.
            return keras.utils.pack_x_y_sample_weight(x, y, sample_weight)
        _check_length(sequence_length, "sequence_length")
        # KerasHub would pack an empty batch as one unbatched empty example.
        if _is_empty_batch(x):
            raise ValueError("The preprocessor got an empty batch of strings.")
        return super().call(
            x, y=y, sample_weight=sample_weight, sequence_length=sequence_length
        )

    def pack(self, documents, sequence_length=None):
        """Packs whole documents into `fit` rows, several per row.

        Each document becomes `<bos> tokens <eos>` (as `add_start_token` and
        `add_end_token` say). Documents fill rows of `sequence_length`
        positions in order, a new row starting when the next one does not
        fit. `segment_pos` counts from 0 in each document, so nothing
        crosses a document boundary: not the RG-LRU state, the Conv1D
        window, attention, nor a label (the last position of a document has
        the document's own next token as its label, never the next
        document's first). A document longer than a row is cut into
        row-sized pieces, each starting afresh.

        Args:
            documents: list of str.
            sequence_length: int. Row length; defaults to the
                preprocessor's `sequence_length`.

        Returns:
            `(x, y, sample_weight)` as numpy arrays, `x` a dict of
            `token_ids`, `padding_mask` and `segment_pos`, each
            `[rows, sequence_length]`; pass them to `fit(x, y,
            sample_weight=sample_weight, batch_size=...)`.
        """
        length = self.sequence_length if sequence_length is None else sequence_length
        _check_length(length, "sequence_length")
        documents = one_or_more(documents, "documents", "pass at least one document")
        tokenizer = self.tokenizer
        pieces = []
        for ids in _as_lists(tokenizer(documents)):
            tokens = (
                [tokenizer.start_token_id] * self.add_start_token
                + list(ids)
                + [tokenizer.end_token_id] * self.add_end_token
            )
            # A piece of n tokens fills n - 1 positions: inputs tokens[:-1],
            # labels tokens[1:]; consecutive pieces share one token.
            for start in range(0, len(tokens) - 1, length):
                pieces.append(tokens[start : start + length + 1])
        rows, used = [[]], 0
        for piece in pieces:
            if used + len(piece) - 1 > length:
                rows.append([])
                used = 0
            rows[-1].append(piece)
            used += len(piece) - 1
        if not rows[-1]:
            raise ValueError("`pack`: the documents hold no tokens to train on.")
        shape = (len(rows), length)
        token_ids = np.full(shape, tokenizer.pad_token_id, "int32")
        labels = np.full(shape, tokenizer.pad_token_id, "int32")
        segment_pos = np.zeros(shape, "int32")
        mask = np.zeros(shape, "int32")
        for r, row in enumerate(rows):
            at = 0
            for piece in row:
                n = len(piece) - 1
                token_ids[r, at : at + n] = piece[:-1]
                labels[r, at : at + n] = piece[1:]
                segment_pos[r, at : at + n] = np.arange(n)
                mask[r, at : at + n] = 1
                at += n
        x = {"token_ids": token_ids, "padding_mask": mask, "segment_pos": segment_pos}
        return x, labels, mask.astype("float32")

    def generate_preprocess(self, x, sequence_length=None):
        if sequence_length is None:
            sequence_length = self.sequence_length
        _check_length(sequence_length, "max_length")
        if _is_empty_batch(x):
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


def _as_lists(token_ids):
    """A tokenizer's batch output (ragged, dense or lists) as lists of ints."""
    if hasattr(token_ids, "to_list"):  # tf.RaggedTensor
        return token_ids.to_list()
    if hasattr(token_ids, "numpy"):
        token_ids = token_ids.numpy()
    if isinstance(token_ids, np.ndarray):
        return token_ids.tolist()
    return [list(row) for row in token_ids]


def _check_length(value, name):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"`{name}` must be a positive int; got {value!r} ({type(value).__name__})."
        )
    if value <= 0:
        raise ValueError(f"`{name}` must be a positive int; got {value}.")


def _is_empty_batch(x):
    """True for a batch of no strings: `[]`, or an array of shape `[0]`."""
    if isinstance(x, (list, tuple)):
        return len(x) == 0
    shape = getattr(x, "shape", None)
    return shape is not None and len(shape) >= 1 and shape[0] == 0


def _graph_check(assertion):
    import tensorflow as tf

    return tf.control_dependencies([assertion])
