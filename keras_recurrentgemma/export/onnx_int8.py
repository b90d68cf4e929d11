"""int8 weights for an exported ONNX artifact: onnxruntime's dynamic quantization.

`export_for_generation(..., format="onnx", quantize="int8")` rewrites each
endpoint file after it is written: the weight matrices become int8 with a
float scale (`MatMul` into `DynamicQuantizeLinear` + `MatMulInteger`, as
`onnxruntime.quantization.quantize_dynamic` does), activations and the
state stay float32. The files shrink about 3.5x; `tools/benchmark_serving.py
--int8` measures the logits against the float artifact's.
"""

import os


def quantize_files(directory, names):
    """Replaces each ONNX file `directory/name` by its int8-weight version."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic

    for name in names:
        path = os.path.join(directory, name)
        floats = path + ".float.onnx"
        model = onnx.load(path)
        _constants_to_initializers(model.graph)
        onnx.save(model, floats)
        del model
        quantize_dynamic(floats, path, weight_type=QuantType.QInt8)
        os.remove(floats)


def _constants_to_initializers(graph):
    """Moves the float matrices held in `Constant` nodes into the graph's
    initializers (scalars, shapes and indices stay where they are).

    The exporters write the weights as `Constant` nodes, which
    `quantize_dynamic` does not look at: it quantizes a `MatMul` only when
    its weight is an initializer. Matrices that feed no `MatMul` (the
    Conv1D, the RG-LRU's block-diagonal gates) stay float, as Keras's
    `quantize` leaves them.
    """
    import onnx

    keep = []
    for node in graph.node:
        value = node.attribute[0] if len(node.attribute) == 1 else None
        if (
            node.op_type == "Constant"
            and value is not None
            and value.name == "value"
            and len(value.t.dims) == 2
            and value.t.data_type == onnx.TensorProto.FLOAT
        ):
            value.t.name = node.output[0]
            graph.initializer.append(value.t)
            continue
        keep.append(node)
    del graph.node[:]
    graph.node.extend(keep)
