"""The tokenizer files of a Hugging Face export (see `to_transformers`).

`tokenizer.model` always; `tokenizer_config.json` naming the class that
reads it the way SentencePiece does; and for a unigram vocabulary a
`tokenizer.json` built from the proto's own normalizer settings, since
transformers' Gemma class assumes the Gemma vocabulary's (BPE, text kept as
written) and silently gives other ids for anything else.
"""

import json

TOKENIZER_MODEL_FILE = "tokenizer.model"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
TOKENIZER_JSON_FILE = "tokenizer.json"
# SentencePiece `ModelProto.TrainerSpec.ModelType` values.
_UNIGRAM, _BPE = 1, 2


def _proto(tokenizer):
    proto = tokenizer.proto
    if proto is None:
        raise ValueError("The tokenizer has no vocabulary (`proto` is None).")
    if isinstance(proto, str):
        with open(proto, "rb") as f:
            proto = f.read()
    from sentencepiece import sentencepiece_model_pb2

    model = sentencepiece_model_pb2.ModelProto()
    model.ParseFromString(bytes(proto))
    return bytes(proto), model


def _is_gemma_style(model):
    """The Gemma vocabulary's settings, which transformers' Gemma converter
    assumes: BPE, byte fallback, text kept as written."""
    spec = model.normalizer_spec
    return (
        model.trainer_spec.model_type == _BPE
        and model.trainer_spec.byte_fallback
        and not spec.precompiled_charsmap
        and not spec.add_dummy_prefix
        and not spec.remove_extra_whitespaces
    )


def tokenizer_files(tokenizer, add_bos=True):
    """`{file name: bytes or JSON dict}` of the tokenizer files.

    A Gemma-style BPE vocabulary (the released one) is left to
    transformers' own Gemma converter, as in the released checkpoints. A
    unigram vocabulary gets a `tokenizer.json` built from the proto's own
    normalizer settings, so transformers gives SentencePiece's ids.

    Raises:
        ValueError: for a BPE vocabulary with other normalizer settings,
            which transformers would tokenize differently.
    """
    proto, model = _proto(tokenizer)
    config = {
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "pad_token": "<pad>",
        "unk_token": "<unk>",
        "add_bos_token": bool(add_bos),
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "padding_side": "left",
    }
    files = {TOKENIZER_MODEL_FILE: proto}
    if _is_gemma_style(model):
        config["tokenizer_class"] = "GemmaTokenizer"
        config["added_tokens_decoder"] = {
            str(i): {
                "content": piece.piece,
                "special": piece.type == 3,
                "lstrip": False,
                "rstrip": False,
                "single_word": False,
                "normalized": False,
            }
            for i, piece in enumerate(model.pieces)
            if piece.type in (2, 3, 4)  # unknown, control, user defined
        }
    elif model.trainer_spec.model_type == _UNIGRAM:
        # Loaded as written only by the base class; a named class rebuilds
        # its own pipeline around the vocabulary.
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        files[TOKENIZER_JSON_FILE] = _unigram_tokenizer_json(tokenizer, model, add_bos)
    else:
        raise ValueError(
            "The vocabulary is a BPE model whose normalizer settings differ from "
            "Gemma's (identity, no dummy prefix, whitespace kept); transformers "
            "would tokenize it differently, so it cannot be exported."
        )
    files[TOKENIZER_CONFIG_FILE] = config
    return files


def _unigram_tokenizer_json(tokenizer, model, add_bos):
    """SentencePiece's unigram encoding as a `tokenizers` pipeline.

    SentencePiece normalizes the whole text (its character map, then
    whitespace trimming and the dummy prefix if the proto asks, spaces to
    "▁") and runs one Viterbi pass in which user-defined pieces such as
    `<end_of_turn>` are ordinary pieces that always win. So does this:
    user-defined pieces stay in the unigram vocabulary rather than becoming
    added tokens, which `tokenizers` would cut out before normalizing.
    Control pieces (`<bos>`, ...) are special tokens, as transformers wants.
    """
    try:
        from tokenizers import AddedToken
        from tokenizers import Regex
        from tokenizers import Tokenizer
        from tokenizers import decoders
        from tokenizers import normalizers
        from tokenizers.models import Unigram
        from tokenizers.processors import TemplateProcessing
    except ImportError as e:
        raise ImportError(
            "Exporting a unigram vocabulary needs the `tokenizers` package "
            "(installed with transformers)."
        ) from e
    spec = model.normalizer_spec
    backend = Tokenizer(
        Unigram(
            [(p.piece, p.score) for p in model.pieces],
            unk_id=model.trainer_spec.unk_id,
            byte_fallback=model.trainer_spec.byte_fallback,
        )
    )
    steps = []
    if spec.precompiled_charsmap:
        steps.append(normalizers.Precompiled(spec.precompiled_charsmap))
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Strip(), normalizers.Replace(Regex(" {2,}"), " ")]
    if spec.add_dummy_prefix:
        steps.append(normalizers.Prepend(" "))
    steps.append(normalizers.Replace(" ", "▁"))
    backend.normalizer = normalizers.Sequence(steps)
    decode = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_dummy_prefix:
        decode.append(decoders.Strip(" ", 1, 0))
    backend.decoder = decoders.Sequence(decode)
    backend.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in model.pieces
            if p.type == 3
        ]
    )
    if add_bos:
        bos = tokenizer.start_token_id
        backend.post_processor = TemplateProcessing(
            single="<bos>:0 $A:0",
            pair="<bos>:0 $A:0 <bos>:1 $B:1",
            special_tokens=[("<bos>", bos)],
        )
    return json.loads(backend.to_str())
