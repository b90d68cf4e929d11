"""A TensorFlow SavedModel with `prefill` and `decode_step` endpoints.

Written with Keras's `ExportArchive`: on TensorFlow the endpoints are
`tf.function`s over the model's variables; on JAX they are converted with
`jax2tf` (batch polymorphic). Each endpoint returns a dict of named outputs
(`logits`, then `new_<state name>` for each state tensor).
"""

from keras_recurrentgemma.export.endpoints import make_endpoints
from keras_recurrentgemma.export.onnx import input_specs
from keras_recurrentgemma.export.onnx import output_names


def export_saved_model(backbone, path, layout, chunk):
    import keras
    import tensorflow as tf

    prefill, decode_step = make_endpoints(backbone)
    names = output_names(layout)
    archive = keras.export.ExportArchive()
    archive.track(backbone)
    for name, fn, specs in (
        ("prefill", prefill, input_specs(layout, chunk)),
        ("decode_step", decode_step, input_specs(layout, 1, with_mask=False)),
    ):
        signature = [tf.TensorSpec(shape, dtype, name=n) for n, shape, dtype in specs]
        archive.add_endpoint(
            name, _named(fn, names, len(specs)), input_signature=signature
        )
    archive.write_out(path, verbose=False)


def _named(fn, names, count):
    """`fn` with its tuple of outputs as a dict keyed by `names`.

    The wrapper takes exactly `count` positional arguments: `ExportArchive`
    reads the endpoint's signature to match the input specs.
    """
    arguments = ", ".join(f"a{i}" for i in range(count))
    scope = {"fn": fn, "names": names}
    exec(  # noqa: S102 - a fixed-arity wrapper, built from ints only
        f"def endpoint({arguments}):\n"
        f"    return dict(zip(names, fn({arguments}), strict=True))\n",
        scope,
    )
    return scope["endpoint"]
