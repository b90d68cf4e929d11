"""A tiny SentencePiece vocabulary, trained once per process for the tests.

It has the ids of the official RecurrentGemma vocabulary's special pieces
(`<pad>` 0, `<eos>` 1, `<bos>` 2, `<unk>` 3), the two turn markers as
user-defined pieces, and byte fallback, as in the Gemma vocabulary, and it
keeps whitespace and newlines unchanged.
"""

import functools
import io

import sentencepiece as spm

TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "A recurrent model keeps a state of fixed size, however long the text.",
    "Local attention looks back over a window of recent tokens.",
    "Keras runs the same model on JAX, TensorFlow and PyTorch.",
    "Rain fell on the quiet town while the river ran to the sea.",
    "She wrote a short letter and walked to the station in the morning.",
    "Numbers like 1, 2, 3 and 42 appear in text too.",
    "Hello world! How are you today? I am fine, thank you.",
]


@functools.lru_cache(maxsize=None)
def tiny_proto(vocab_size=400, turn_markers=True, model_type="unigram"):
    """Serialized SentencePiece bytes: unigram, byte fallback, <= `vocab_size`.

    `turn_markers=False` leaves out `<start_of_turn>` and `<end_of_turn>`;
    `model_type="bpe"` trains the released vocabulary's kind.
    """
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT * 4),
        model_writer=model,
        vocab_size=vocab_size,
        model_type=model_type,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=(
            ["<start_of_turn>", "<end_of_turn>"] if turn_markers else []
        ),
        hard_vocab_limit=False,
        byte_fallback=True,
        # Keep text as written, newlines included, as the Gemma vocabulary
        # does: the chat format puts a newline after every role.
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        minloglevel=2,
    )
    return model.getvalue()
