"""Converts an official or Hugging Face RecurrentGemma checkpoint to a Keras preset.

Sources (detected from the directory, or forced with `--format`):

- `huggingface`: `config.json` + safetensors, as on the Hugging Face hub;
- `orbax`: the official Flax checkpoint folder, as on Kaggle
  (`google/recurrentgemma/flax/2b`: a `2b/` folder beside `tokenizer.model`);
- `official_torch`: the official PyTorch `.pt` (Kaggle
  `google/recurrentgemma/pyTorch/2b`: `2b.pt` beside `tokenizer.model`).

`SOURCE` may also be an `hf://` or `kaggle://` handle or a preset name. The
output is a Keras preset directory (`save_to_preset`) with the tokenizer,
loadable with `RecurrentGemmaCausalLM.from_preset(OUTPUT)` on every backend.
`--check` runs the source's own implementation (transformers, or the official
`recurrentgemma` JAX / PyTorch model) on the same tokens and compares logits.

    python tools/convert_checkpoint.py ~/kaggle/recurrentgemma-2b out/rg2b --check
"""

import argparse
import os
import sys

FORMATS = ("auto", "huggingface", "orbax", "official_torch")
# Relative logit error allowed by `--check`. float32: two implementations of
# the same network (the test suite's bound is 1e-5; released models have longer
# sums). bfloat16 weights against a float32 source: rounding of every weight.
CHECK_TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 5e-2}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument("source", help="checkpoint directory, handle or preset name")
    parser.add_argument("output", help="Keras preset directory to write")
    parser.add_argument("--format", choices=FORMATS, default="auto")
    parser.add_argument(
        "--dtype", default=None, help="weights dtype, e.g. bfloat16 (default float32)"
    )
    parser.add_argument(
        "--instruction-tuned",
        action="store_true",
        help="mark the model as instruction-tuned (stop at <end_of_turn>, chat)",
    )
    parser.add_argument(
        "--sequence-length",
        type=int,
        default=1024,
        help="the preprocessor's sequence_length (default 1024)",
    )
    parser.add_argument(
        "--attention-window-size",
        type=int,
        default=None,
        help="official formats only: the window, which the tensors do not "
        "hold (default 2048, the released models')",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare logits with the source implementation (needs it installed)",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="replace an existing OUTPUT"
    )
    return parser.parse_args(argv)


def convert(args):
    """Returns `(causal_lm, loader)` for the source, converted."""
    from keras_recurrentgemma import RecurrentGemmaCausalLM
    from keras_recurrentgemma import preset_loader
    from keras_recurrentgemma.convert.common import show_progress

    loader = preset_loader.get_preset_loader(args.source)
    detected = getattr(loader, "source_format", preset_loader.KERAS)
    if args.format != "auto" and args.format != detected:
        raise ValueError(
            f"{args.source} holds a {detected} checkpoint, not {args.format}."
        )
    kwargs = {"instruction_tuned": args.instruction_tuned}
    if args.dtype:
        kwargs["dtype"] = args.dtype
    if args.attention_window_size is not None:
        if detected not in (preset_loader.ORBAX, preset_loader.OFFICIAL_TORCH):
            raise ValueError(
                "--attention-window-size applies to the official formats only; "
                f"a {detected} checkpoint stores its own."
            )
        kwargs["attention_window_size"] = args.attention_window_size
    backbone_kwargs = {
        k: kwargs.pop(k) for k in ("dtype", "attention_window_size") if k in kwargs
    }
    print(f"Reading {detected} checkpoint {args.source}", file=sys.stderr)
    with show_progress():
        backbone = loader.load_backbone(
            RecurrentGemmaCausalLM.backbone_cls, True, **backbone_kwargs
        )
    preprocessor = loader.load_preprocessor(
        RecurrentGemmaCausalLM.preprocessor_cls, sequence_length=args.sequence_length
    )
    causal_lm = RecurrentGemmaCausalLM(backbone, preprocessor, **kwargs)
    return causal_lm, loader


def check(causal_lm, loader):
    """Compares our logits with the source implementation's; returns the error."""
    import numpy as np
    from keras import ops

    from keras_recurrentgemma import preset_loader
    from keras_recurrentgemma.convert.reference import reference_logits

    fmt = getattr(loader, "source_format", None)
    if fmt is None or fmt == preset_loader.KERAS:
        raise ValueError("--check needs a Hugging Face or official source.")
    config = causal_lm.backbone.get_config()
    # Hugging Face attends without a window past it (SPEC §6): stay inside.
    length = max(2, min(16, config["attention_window_size"] - 1))
    rng = np.random.default_rng(0)
    token_ids = rng.integers(0, config["vocabulary_size"], size=(2, length))
    token_ids[:, 0] = 2  # <bos>
    ours = ops.convert_to_numpy(
        ops.cast(causal_lm.score(token_ids, scoring_mode="logits"), "float32")
    )
    theirs = reference_logits(fmt, loader.directory, token_ids, config=config)
    error = float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))
    print(f"check: max |ours - {fmt}| / max |{fmt}| = {error:.3g} on {length} tokens")
    return error


def save(causal_lm, output, overwrite):
    """Saves the preset; `save_to_preset` never leaves a half-written OUTPUT."""
    output = os.path.abspath(output)
    if os.path.exists(output) and os.listdir(output) and not overwrite:
        raise ValueError(f"{output} exists and is not empty; pass --overwrite.")
    causal_lm.save_to_preset(output)
    print(f"Saved Keras preset to {output}", file=sys.stderr)


def main(argv=None):
    args = parse_args(argv)
    try:
        if (
            os.path.exists(args.output)
            and os.listdir(args.output)
            and not args.overwrite
        ):
            raise ValueError(
                f"{args.output} exists and is not empty; pass --overwrite."
            )
        causal_lm, loader = convert(args)
        if args.check:
            error = check(causal_lm, loader)
            tolerance = CHECK_TOLERANCE.get(args.dtype or "float32", 5e-2)
            if error > tolerance:
                raise ValueError(
                    f"logits differ from the source by {error:.3g} (relative), "
                    f"more than {tolerance}; not saving."
                )
        save(causal_lm, args.output, args.overwrite)
    except (ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
