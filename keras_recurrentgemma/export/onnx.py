"""ONNX files for `prefill` and `decode_step`, from each backend.

torch traces the endpoints with `torch.onnx.export` (the TorchScript
exporter: the dynamo one specialises the batch axis and takes minutes);
TensorFlow converts them from a `tf.function` with `tf2onnx`. The batch axis
is dynamic; the prefill chunk length is fixed (the runtime feeds a prompt
chunk by chunk).

Not from JAX: jax2tf's native serialization leaves an `XlaCallModule` op
that `tf2onnx` cannot read, and `jax2onnx` (0.17) cannot lower the jitted
reference scan nor `rem` on a symbolic batch.
"""

import warnings

import keras
import numpy as np

from keras_recurrentgemma.export.endpoints import make_endpoints

OPSET = 18


def input_specs(layout, chunk, with_mask=True):
    """`[(name, shape, dtype)]` of an endpoint's inputs; `None` is batch."""
    specs = [("token_ids", [None, chunk], "int32")]
    if with_mask:
        specs.append(("padding_mask", [None, chunk], "int32"))
    for entry in layout:
        specs.append((entry["name"], [None, *entry["shape"][1:]], entry["dtype"]))
    return specs


def output_names(layout):
    return ["logits"] + ["new_" + entry["name"] for entry in layout]


def _examples(specs, batch=2):
    """Concrete example inputs; empty state (positions -1), token 0."""
    arrays = []
    for name, shape, dtype in specs:
        fill = -1 if name.endswith("_positions") else 0
        arrays.append(np.full([batch, *shape[1:]], fill, dtype))
    return arrays


def export_onnx(backbone, directory, layout, chunk, progress):
    """Writes `prefill.onnx` and `decode_step.onnx` into `directory`."""
    backend = keras.config.backend()
    prefill, decode_step = make_endpoints(backbone)
    writers = {"torch": _torch, "tensorflow": _tensorflow}
    for name, fn, specs in (
        ("prefill", prefill, input_specs(layout, chunk)),
        ("decode_step", decode_step, input_specs(layout, 1, with_mask=False)),
    ):
        writers[backend](
            backbone, fn, specs, output_names(layout), f"{directory}/{name}.onnx"
        )
        progress(f"{name}.onnx")


def _torch(backbone, fn, specs, outputs, path):
    import torch

    class Endpoint(torch.nn.Module):
        def forward(self, *args):
            return fn(*args)

    examples = tuple(torch.from_numpy(a) for a in _examples(specs))
    names = [name for name, _, _ in specs]
    dynamic = {name: {0: "batch"} for name in names + outputs}
    # The weights enter the graph as constants, which the tracer takes only
    # from tensors that do not require grad.
    values = [v.value for v in backbone.variables]
    grads = [v.requires_grad for v in values]
    for v in values:
        v.requires_grad_(False)
    try:
        _torch_trace(fn, specs, outputs, path, Endpoint, examples, names, dynamic)
    finally:
        for v, g in zip(values, grads, strict=True):
            v.requires_grad_(g)


def _take_along_dim(g, x, indices, dim):
    # Our gathers index with tensors shaped like `x` except on `dim`, so
    # torch's broadcasting is never needed and GatherElements is exact.
    from torch.onnx import symbolic_helper

    axis = symbolic_helper._get_const(dim, "i", "dim")
    return g.op("GatherElements", x, indices, axis_i=axis)


def _expm1(g, x):
    # Kahan's `(u - 1) · x / log(u)` with `u = exp(x)`: a few ulps, where
    # `exp(x) - 1` keeps no digit for tiny x (the RG-LRU's 1 - a² is that).
    one = g.op("Constant", value_t=torch_scalar(1.0))
    zero = g.op("Constant", value_t=torch_scalar(0.0))
    u = g.op("Exp", x)
    ratio = g.op("Div", g.op("Mul", g.op("Sub", u, one), x), g.op("Log", u))
    minus_one = g.op("Neg", one)
    ratio = g.op("Where", g.op("Equal", u, zero), minus_one, ratio)
    return g.op("Where", g.op("Equal", u, one), x, ratio)


def torch_scalar(value):
    import torch

    return torch.tensor(value, dtype=torch.float32)


def _torch_trace(fn, specs, outputs, path, Endpoint, examples, names, dynamic):
    import torch

    # The TorchScript exporter has no rule for `take_along_dim`; the dynamo
    # exporter does, but specialises the batch axis and takes minutes.
    torch.onnx.register_custom_op_symbolic(
        "aten::take_along_dim", _take_along_dim, OPSET
    )
    torch.onnx.register_custom_op_symbolic("aten::expm1", _expm1, OPSET)

    with torch.no_grad(), warnings.catch_warnings():
        # The tracer warns about every Python int read from a shape; the
        # dynamic batch axis is checked by the runtime test instead.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            Endpoint().eval(),
            examples,
            path,
            input_names=names,
            output_names=outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,
        )


def _tensorflow(backbone, fn, specs, outputs, path):
    import tensorflow as tf
    import tf2onnx

    signature = [tf.TensorSpec(shape, dtype, name=name) for name, shape, dtype in specs]

    # A tuple, not a dict: TensorFlow would order a dict's outputs by key.
    @tf.function(input_signature=signature, autograph=False)
    def endpoint(*args):
        return tuple(tf.identity(t) for t in fn(*args))

    _patch_tf2onnx()
    tf2onnx.convert.from_function(
        endpoint,
        input_signature=signature,
        opset=OPSET,
        output_path=path,
        custom_op_handlers={"Expm1": (_tf2onnx_expm1, ())},
    )
    _rename_outputs(path, outputs)


def _rename_outputs(path, names):
    """Gives the graph's outputs, in order, our names (tf2onnx keeps
    TensorFlow's `Identity:0`-style ones)."""
    import onnx

    model = onnx.load(path)
    for output, name in zip(model.graph.output, names, strict=True):
        old = output.name
        for node in model.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        output.name = name
    onnx.save(model, path)


def _tf2onnx_expm1(ctx, node, name, args):
    """tf2onnx has no rule for TensorFlow's Expm1; Kahan's form, as `_expm1`."""
    x = node.input[0]
    output = node.output[0]
    shape, dtype = ctx.get_shape(output), ctx.get_dtype(output)
    ctx.remove_node(node.name)
    one = ctx.make_const(f"{name}_one", np.array(1.0, "float32")).output[0]
    zero = ctx.make_const(f"{name}_zero", np.array(0.0, "float32")).output[0]
    minus_one = ctx.make_const(f"{name}_minus_one", np.array(-1.0, "float32")).output[0]

    def op(kind, *inputs):
        return ctx.make_node(kind, list(inputs)).output[0]

    u = op("Exp", x)
    ratio = op("Div", op("Mul", op("Sub", u, one), x), op("Log", u))
    ratio = op("Where", op("Equal", u, zero), minus_one, ratio)
    ctx.make_node(
        "Where",
        [op("Equal", u, one), x, ratio],
        outputs=[output],
        shapes=[shape],
        dtypes=[dtype],
    )


def _patch_tf2onnx():
    # tf2onnx 1.17 still refers to `np.object`, `np.bool` and `np.cast`,
    # gone in numpy 2; Keras patches the same names for its own ONNX export.
    from keras.src.export.tf2onnx_lib import patch_tf2onnx

    patch_tf2onnx()
