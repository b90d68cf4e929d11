"""LiteRT (TFLite) files for `prefill` and `decode_step`, from TensorFlow.

The endpoints are first written as a SavedModel (`saved_model.py`), then
each signature is converted with TensorFlow's `TFLiteConverter` into its own
`.tflite` file holding one signature of the same name. Only LiteRT's builtin
ops are used, so the stock interpreter (`ai_edge_litert`) runs them.
"""

import os
import shutil
import tempfile

from keras_recurrentgemma.export.saved_model import export_saved_model


def export_litert(backbone, directory, layout, chunk, progress):
    import tensorflow as tf

    scratch = tempfile.mkdtemp(prefix="saved_model-", dir=directory)
    try:
        export_saved_model(backbone, scratch, layout, chunk)
        for name in ("prefill", "decode_step"):
            converter = tf.lite.TFLiteConverter.from_saved_model(
                scratch, signature_keys=[name]
            )
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
            with open(os.path.join(directory, f"{name}.tflite"), "wb") as f:
                f.write(converter.convert())
            progress(f"{name}.tflite")
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
