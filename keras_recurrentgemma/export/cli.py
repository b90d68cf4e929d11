"""`python -m keras_recurrentgemma export PRESET OUT --format FORMAT`.

Loads a preset (a name, a directory or a handle, as `from_preset` takes),
writes the artifact into a temporary directory beside OUT and renames it
into place, so a failed export leaves nothing half-written. OUT must not
exist unless `--overwrite` is given.
"""

import argparse
import os
import shutil
import sys
import tempfile

EXPORT_FORMATS = ("onnx", "tf_saved_model", "litert", "transformers")
# The backend used when neither --backend nor KERAS_BACKEND chooses one.
_PREFERRED_BACKEND = {
    "onnx": "torch",
    "tf_saved_model": "tensorflow",
    "litert": "tensorflow",
    "transformers": "torch",
}


def build_parser():
    parser = argparse.ArgumentParser(
        prog="python -m keras_recurrentgemma export",
        description="Export a RecurrentGemma preset for serving or for Hugging Face.",
    )
    parser.add_argument(
        "preset", help="Preset name, directory, hf:// or kaggle:// handle."
    )
    parser.add_argument(
        "out", help="Output directory (must not exist without --overwrite)."
    )
    parser.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    parser.add_argument(
        "--overwrite", action="store_true", help="Replace OUT if it exists."
    )
    parser.add_argument(
        "--backend",
        choices=("jax", "tensorflow", "torch"),
        help="Keras backend to export from (default: KERAS_BACKEND, else one "
        "that can write the format).",
    )
    parser.add_argument(
        "--quantize",
        choices=("int8",),
        help="ONNX only: int8 weight matrices (onnxruntime dynamic quantization).",
    )
    parser.add_argument(
        "--prefill-length",
        type=int,
        default=32,
        help="Tokens per prefill call in the generation artifact (default 32).",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    out = os.fspath(args.out)
    if os.path.lexists(out) and not args.overwrite:
        print(
            f"error: {out!r} already exists; pass --overwrite to replace it.",
            file=sys.stderr,
        )
        return 2
    backend = (
        args.backend
        or os.environ.get("KERAS_BACKEND")
        or _PREFERRED_BACKEND[args.format]
    )
    # Keras reads the backend once, on its first import, which is below.
    os.environ["KERAS_BACKEND"] = backend
    if "keras" in sys.modules and sys.modules["keras"].config.backend() != backend:
        print(
            "error: Keras is already imported with another backend; cannot "
            f"use {backend!r}.",
            file=sys.stderr,
        )
        return 2
    from tqdm.auto import tqdm

    steps = 2 if args.format == "transformers" else 4 + bool(args.quantize)
    with tqdm(total=steps, desc="loading " + args.preset, unit="step") as bar:
        try:
            return _export(args, out, bar)
        except ValueError as error:
            bar.close()
            print(f"error: {error}", file=sys.stderr)
            return 2


def _export(args, out, bar):
    if args.quantize and args.format != "onnx":
        raise ValueError(f"--quantize applies to --format onnx, not {args.format}.")
    if args.format != "transformers":
        # Checked before the (slow) load.
        import keras

        from keras_recurrentgemma.export import check_format

        check_format(args.format, keras.config.backend())
    from keras_recurrentgemma import RecurrentGemmaCausalLM

    dtype = None if args.format == "transformers" else "float32"
    kwargs = {} if dtype is None else {"dtype": dtype}
    model = RecurrentGemmaCausalLM.from_preset(args.preset, **kwargs)
    bar.update(1)

    def progress(step):
        bar.set_description("wrote " + step)
        bar.update(1)

    if args.format == "transformers":
        _export_transformers(model, out, args.overwrite)
        progress("transformers checkpoint")
    else:
        from keras_recurrentgemma.export import export_for_generation

        export_for_generation(
            model,
            out,
            format=args.format,
            overwrite=args.overwrite,
            prefill_length=args.prefill_length,
            progress=progress,
            quantize=args.quantize,
        )
    bar.set_description("exported " + out)
    print(f"Exported {args.preset} as {args.format} to {out}")
    return 0


def _export_transformers(model, out, overwrite):
    try:
        from keras_recurrentgemma.convert.to_transformers import export_to_transformers
    except ImportError as error:
        raise ValueError(
            "--format transformers needs keras_recurrentgemma.convert.to_transformers, "
            f"which could not be imported ({error})."
        ) from error
    from keras_recurrentgemma.export import _replace

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(out)}.exporting-", dir=parent
    )
    try:
        target = os.path.join(staging, "checkpoint")
        export_to_transformers(model, target)
        os.chmod(target, 0o755)
        _replace(target, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
