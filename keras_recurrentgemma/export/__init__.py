"""Generation artifacts: `prefill` and `decode_step` with an explicit state.

`export_for_generation(causal_lm, path, format=...)` writes a directory that
`keras_recurrentgemma.serving.load_exported(path)` runs with the format's own
runtime (onnxruntime, TensorFlow's `saved_model.load`, the LiteRT
interpreter) plus sentencepiece and numpy:

    prefill(token_ids [b, c], padding_mask [b, c], *state) -> (logits [b, v], *state)
    decode_step(token_ids [b, 1], *state)                  -> (logits [b, v], *state)

The state is a flat list of fixed-size tensors (`endpoints.state_layout`),
so memory does not depend on how many tokens went through it. `c` is the
prefill chunk length; a runtime feeds a longer prompt chunk by chunk.

Files written: the endpoint files of the format, `tokenizer.model` (the
SentencePiece proto) and `generation.json` (shapes, dtypes, stop ids,
window, state layout, input and output names).
"""

import json
import os
import shutil
import tempfile

FORMATS = {
    # format: backends that can write it, and the files it makes.
    # Not from JAX: see `onnx.py`.
    "onnx": ("torch", "tensorflow"),
    "tf_saved_model": ("tensorflow", "jax"),
    "litert": ("tensorflow",),
}
# Formats a backend cannot trace itself: the model is saved as a preset and
# exported by a subprocess on a backend that can. JAX has no ONNX path
# (tf2onnx needs jax2tf's non-native lowering, which JAX removed).
VIA_BACKEND = {"onnx": {"jax": "torch"}}
METADATA_FILE = "generation.json"
TOKENIZER_FILE = "tokenizer.model"
FORMAT_VERSION = 1
DEFAULT_PREFILL_LENGTH = 32


def writers(format):
    """The backends `export_for_generation` writes `format` from: its own
    tracers (`FORMATS`), then those that hand it over (`VIA_BACKEND`)."""
    return FORMATS[format] + tuple(VIA_BACKEND.get(format, ()))


def check_format(format, backend):
    """Raises a `ValueError` naming the backends that can write `format`."""
    if format not in FORMATS:
        raise ValueError(
            f"Unknown export format {format!r}; use one of {sorted(FORMATS)}."
        )
    if backend not in writers(format):
        can = " or ".join(writers(format))
        raise ValueError(
            f"format={format!r} cannot be exported from the {backend!r} "
            f"backend; use {can} (set KERAS_BACKEND before importing Keras)."
        )


def export_for_generation(
    causal_lm,
    path,
    format="onnx",
    overwrite=False,
    prefill_length=DEFAULT_PREFILL_LENGTH,
    progress=None,
    quantize=None,
):
    """Writes a generation artifact of `causal_lm` to the directory `path`.

    Everything is written into a temporary directory beside `path` that is
    renamed into place at the end, so a failed export leaves nothing behind
    (and, with `overwrite=True`, the previous artifact as it was).

    Args:
        causal_lm: `RecurrentGemmaCausalLM` with a preprocessor (for the
            tokenizer), float32 weights.
        path: str. Output directory.
        format: str. `"onnx"` (from torch or tensorflow; from jax through
            a torch subprocess, see `VIA_BACKEND`),
            `"tf_saved_model"` (tensorflow, jax) or `"litert"` (tensorflow).
        overwrite: bool. Replace an existing `path`. Defaults to `False`.
        prefill_length: int. Tokens per `prefill` call (`c`). Defaults to 32.
        progress: optional `fn(str)`, called after each written part.
        quantize: `None`, or `"int8"` for ONNX: weight matrices stored as
            int8 with float scales by onnxruntime's dynamic quantization
            (`export/onnx_int8.py`); activations and the state stay float32.

    Raises:
        ValueError: for an unknown format, one this backend cannot write
            (naming those that can), an existing `path` without
            `overwrite`, a model without a tokenizer or with weights that
            are not float32, or a bad `prefill_length`.
    """
    import keras

    from keras_recurrentgemma.export.endpoints import reference_scan
    from keras_recurrentgemma.export.endpoints import state_layout

    if quantize not in (None, "int8") or (quantize and format != "onnx"):
        raise ValueError(
            f"`quantize` can be None, or 'int8' with format='onnx'; got "
            f"quantize={quantize!r} with format={format!r}."
        )
    check_format(format, keras.config.backend())
    path = os.fspath(path)
    if os.path.lexists(path) and not overwrite:
        raise ValueError(
            f"{path!r} already exists; pass overwrite=True (--overwrite) to replace it."
        )
    if isinstance(prefill_length, bool) or not isinstance(prefill_length, int):
        raise ValueError(
            f"`prefill_length` must be a positive int; got {prefill_length!r}."
        )
    if prefill_length < 1:
        raise ValueError(
            f"`prefill_length` must be a positive int; got {prefill_length}."
        )
    backbone = causal_lm.backbone
    tokenizer = _tokenizer(causal_lm)
    if backbone.compute_dtype != "float32" or backbone.variable_dtype != "float32":
        raise ValueError(
            f"Exported runtimes need float32 weights; this model computes in "
            f"{backbone.compute_dtype!r}. Load it with dtype='float32'."
        )
    progress = progress or (lambda step: None)
    via = VIA_BACKEND.get(format, {}).get(keras.config.backend())
    if via is not None:
        _export_on(via, causal_lm, path, format, overwrite, prefill_length, quantize)
        progress(METADATA_FILE)
        return path
    layout = state_layout(backbone)
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.exporting-", dir=parent
    )
    try:
        with reference_scan(backbone):
            files = _write_format(
                format, backbone, staging, layout, prefill_length, progress
            )
        if quantize == "int8":
            from keras_recurrentgemma.export.onnx_int8 import quantize_files

            quantize_files(staging, sorted(set(files.values())))
            progress("int8 weights")
        with open(os.path.join(staging, TOKENIZER_FILE), "wb") as f:
            f.write(_proto_bytes(tokenizer))
        metadata = _metadata(
            causal_lm, tokenizer, format, files, layout, prefill_length
        )
        metadata["weights"] = quantize or "float32"
        with open(os.path.join(staging, METADATA_FILE), "w") as f:
            json.dump(metadata, f, indent=2)
        progress(METADATA_FILE)
        os.chmod(staging, 0o755)
        _replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def _export_on(backend, causal_lm, path, format, overwrite, prefill_length, quantize):
    """Exports through `python -m keras_recurrentgemma export` on `backend`.

    The model goes over as a float32 preset in a temporary directory (LoRA
    merged, as `save_to_preset` does); the subprocess stages and renames
    `path` itself, so a failure leaves nothing there.
    """
    import subprocess
    import sys

    with tempfile.TemporaryDirectory(prefix="keras_recurrentgemma_export_") as tmp:
        preset = os.path.join(tmp, "preset")
        causal_lm.save_to_preset(preset)
        command = [sys.executable, "-m", "keras_recurrentgemma", "export", preset]
        command += [os.path.abspath(path), "--format", format, "--backend", backend]
        command += ["--prefill-length", str(prefill_length)]
        if overwrite:
            command.append("--overwrite")
        if quantize:
            command += ["--quantize", quantize]
        env = {**os.environ, "KERAS_BACKEND": backend}
        result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        raise RuntimeError(
            f"Exporting {format!r} through the {backend!r} backend (JAX cannot "
            f"trace to {format}) failed: " + "\n".join(lines[-8:])
        )


def _write_format(format, backbone, directory, layout, chunk, progress):
    """Writes the endpoint files; returns `{"prefill": file, "decode_step": file}`."""
    if format == "onnx":
        from keras_recurrentgemma.export.onnx import export_onnx

        export_onnx(backbone, directory, layout, chunk, progress)
        return {"prefill": "prefill.onnx", "decode_step": "decode_step.onnx"}
    from keras_recurrentgemma.export.saved_model import export_saved_model

    if format == "tf_saved_model":
        export_saved_model(
            backbone, os.path.join(directory, "saved_model"), layout, chunk
        )
        progress("saved_model")
        return {"prefill": "saved_model", "decode_step": "saved_model"}
    from keras_recurrentgemma.export.litert import export_litert

    export_litert(backbone, directory, layout, chunk, progress)
    return {"prefill": "prefill.tflite", "decode_step": "decode_step.tflite"}


def _tokenizer(causal_lm):
    preprocessor = getattr(causal_lm, "preprocessor", None)
    tokenizer = getattr(preprocessor, "tokenizer", None)
    if tokenizer is None or getattr(tokenizer, "proto", None) is None:
        raise ValueError(
            "The exported runtime tokenizes text itself: the model needs a "
            "preprocessor whose tokenizer has a SentencePiece proto."
        )
    return tokenizer


def _proto_bytes(tokenizer):
    proto = tokenizer.proto
    if isinstance(proto, str):
        with open(proto, "rb") as f:
            return f.read()
    return bytes(proto)


def _metadata(causal_lm, tokenizer, format, files, layout, chunk):
    import keras

    from keras_recurrentgemma.export.onnx import input_specs
    from keras_recurrentgemma.export.onnx import output_names

    backbone = causal_lm.backbone
    stops = [tokenizer.end_token_id]
    if (
        getattr(causal_lm, "instruction_tuned", False)
        and tokenizer.end_of_turn_id is not None
    ):
        stops.append(tokenizer.end_of_turn_id)
    return {
        "format": format,
        "format_version": FORMAT_VERSION,
        "exported_from_backend": keras.config.backend(),
        "files": files,
        "tokenizer": TOKENIZER_FILE,
        "prefill_length": chunk,
        "vocabulary_size": backbone.vocabulary_size,
        "hidden_dim": backbone.hidden_dim,
        "block_types": list(backbone.block_types),
        "attention_window_size": backbone.attention_window_size,
        "dtype": backbone.compute_dtype,
        "start_token_id": tokenizer.start_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": [int(i) for i in stops],
        "add_start_token": bool(
            getattr(causal_lm.preprocessor, "add_start_token", True)
        ),
        "inputs": {
            "prefill": [name for name, _, _ in input_specs(layout, chunk)],
            "decode_step": [name for name, _, _ in input_specs(layout, 1, False)],
        },
        "outputs": output_names(layout),
        "state": layout,
    }


def _replace(staging, path):
    """Renames `staging` to `path`; an old `path` is removed only after."""
    if not os.path.lexists(path):
        os.rename(staging, path)
        return
    old = tempfile.mkdtemp(
        prefix=f".{os.path.basename(path)}.old-",
        dir=os.path.dirname(os.path.abspath(path)),
    )
    moved = os.path.join(old, "previous")
    os.rename(path, moved)
    try:
        os.rename(staging, path)
    except BaseException:
        os.rename(moved, path)
        raise
    shutil.rmtree(old, ignore_errors=True)
