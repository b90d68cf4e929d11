"""Generation artifacts (`export_for_generation`) run by `serving` alone.

For each format the current backend can write: the artifact's runtime-only
generator, in a subprocess that must not import Keras, KerasHub, JAX or
torch, continues batched prompts of different lengths past the attention
window exactly as `generate` does (greedy, token for token).
"""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from keras_recurrentgemma.export import FORMATS
from keras_recurrentgemma.export import export_for_generation
from keras_recurrentgemma.export import writers
from tests.models import tiny_causal_lm
from tests.tolerances import ONNX_INT8
from tests.tolerances import relative_error

BACKEND = keras.config.backend()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNTIME_MODULES = {
    "onnx": "onnxruntime",
    "tf_saved_model": "tensorflow",
    "litert": "ai_edge_litert",
}
# Prompts of 3, 9 and 6 ids; with a window of 5 and a prefill chunk of 4 the
# prompts span several chunks and generation runs well past the window.
PROMPTS = [[2, 17, 42], [2, 5, 9, 11, 30, 31, 8, 7, 64], [2, 80, 3, 3, 19, 50]]
MAX_LENGTH = 24
PREFILL_LENGTH = 4

# Runs in a fresh interpreter: generates, then lists the frameworks it saw.
RUNTIME_SCRIPT = """
import json, sys
from keras_recurrentgemma.serving import load_exported
generator = load_exported(sys.argv[1])
args = json.loads(sys.argv[2])
prompts, n = args["prompts"], args["max_new_tokens"]
ids = generator.generate_ids(prompts, n, stop_token_ids=None)
streamed = [[] for _ in args["prompts"]]
for step in generator.stream_ids(args["prompts"], 3, stop_token_ids=None):
    for row, token in enumerate(step):
        streamed[row].append(int(token))
loaded = sorted(
    m for m in ("keras", "keras_hub", "jax", "torch")
    if m in sys.modules or any(k.startswith(m + ".") for k in sys.modules)
)
print(json.dumps({"ids": ids, "streamed": streamed, "frameworks": loaded}))
"""


def run_runtime(path, prompts, max_new_tokens):
    """The artifact's greedy continuations, from a framework-free process."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("KERAS_BACKEND", None)
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            RUNTIME_SCRIPT,
            str(path),
            json.dumps({"prompts": prompts, "max_new_tokens": max_new_tokens}),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def padded(prompts, length):
    ids = np.zeros((len(prompts), length), "int32")
    mask = np.zeros((len(prompts), length), "int32")
    for row, prompt in enumerate(prompts):
        ids[row, : len(prompt)] = prompt
        mask[row, : len(prompt)] = 1
    return {"token_ids": ids, "padding_mask": mask}


def supported(format):
    # Including a hand-over to another backend (ONNX from JAX, via torch).
    if BACKEND not in writers(format):
        pytest.skip(f"{format} is exported from {writers(format)}, not {BACKEND}")
    pytest.importorskip(RUNTIME_MODULES[format])


@pytest.mark.parametrize("format", sorted(FORMATS))
def test_runtime_generates_like_generate(format, tmp_path):
    supported(format)
    causal_lm = tiny_causal_lm(prefill_chunk_size=PREFILL_LENGTH)
    path = tmp_path / "artifact"
    steps = []
    export_for_generation(
        causal_lm,
        path,
        format=format,
        prefill_length=PREFILL_LENGTH,
        progress=steps.append,
    )
    meta = json.loads((path / "generation.json").read_text())
    assert meta["format"] == format and meta["attention_window_size"] == 5
    assert (
        path / "tokenizer.model"
    ).read_bytes() == causal_lm.preprocessor.tokenizer.proto
    assert steps and steps[-1] == "generation.json"
    # Nothing but the artifact is left beside it.
    assert os.listdir(tmp_path) == ["artifact"]

    causal_lm.preprocessor = None
    expected = keras.ops.convert_to_numpy(
        causal_lm.generate(padded(PROMPTS, MAX_LENGTH), stop_token_ids=None)[
            "token_ids"
        ]
    )
    shortest = min(len(p) for p in PROMPTS)
    got = run_runtime(path, PROMPTS, MAX_LENGTH - shortest)
    assert got["frameworks"] == []
    for row, prompt in enumerate(PROMPTS):
        want = expected[row, len(prompt) :].tolist()
        assert got["ids"][row][: len(want)] == want, row
        assert got["streamed"][row] == got["ids"][row][:3]


def test_onnx_int8_weights_stay_close_to_float(tmp_path):
    # The shipped (trained) model: a tiny random one has logits too flat for
    # a relative error to mean anything. The int8 pass rewrites the ONNX
    # files whichever backend wrote them, so one backend's export suffices
    # (torch's, the quickest; the others' are tested above).
    if BACKEND != "torch":
        pytest.skip("int8 ONNX is tested on torch's export")
    supported("onnx")
    onnx = pytest.importorskip("onnx")
    from keras_recurrentgemma import RecurrentGemmaCausalLM
    from keras_recurrentgemma.serving import load_exported

    causal_lm = RecurrentGemmaCausalLM.from_preset("griffin_tiny_pydocs_en")
    path = tmp_path / "int8"
    causal_lm.export_for_generation(path, format="onnx", quantize="int8")
    assert json.loads((path / "generation.json").read_text())["weights"] == "int8"
    # Every matrix product with a weight went int8: none is left in float.
    graph = onnx.load(str(path / "decode_step.onnx")).graph
    assert "MatMulInteger" in {node.op_type for node in graph.node}
    floats = {
        t.name
        for t in graph.initializer
        if len(t.dims) == 2 and t.data_type == onnx.TensorProto.FLOAT
    }
    matmuls = [n for n in graph.node if n.op_type == "MatMul"]
    assert not [n for n in matmuls if floats & set(n.input)]

    # Teacher-forced through the runtime (the state carries any error
    # along) against the float model's logits at every position.
    generator = load_exported(str(path))
    (ids,) = generator.tokenize(["def read_file(path):\n    with open(path) as f:"])
    expected = keras.ops.convert_to_numpy(causal_lm.score(np.array([ids], "int32")))[0]
    logits, state = generator.prefill([ids[:1]])
    got = [logits[0]]
    for token in ids[1:]:
        logits, state = generator.decode_step([token], state)
        got.append(logits[0])
    assert relative_error(np.stack(got), expected) < ONNX_INT8
    assert np.mean(np.stack(got).argmax(-1) == expected.argmax(-1)) >= 0.9


def test_quantize_is_for_onnx_only(tmp_path):
    causal_lm = tiny_causal_lm()
    with pytest.raises(ValueError, match="'int8' with format='onnx'"):
        causal_lm.export_for_generation(
            tmp_path / "a", format="tf_saved_model", quantize="int8"
        )
    with pytest.raises(ValueError, match="quantize='int4'"):
        causal_lm.export_for_generation(tmp_path / "a", quantize="int4")
    assert not os.listdir(tmp_path)


def test_unknown_format_and_other_backends(tmp_path):
    causal_lm = tiny_causal_lm()
    # Through the method, as a user calls it.
    with pytest.raises(ValueError, match="Unknown export format 'gguf'"):
        causal_lm.export_for_generation(tmp_path / "a", format="gguf")
    for format in FORMATS:
        backends = writers(format)
        if BACKEND not in backends:
            with pytest.raises(ValueError, match=f"use {' or '.join(backends)}"):
                causal_lm.export_for_generation(tmp_path / "a", format=format)
    assert not os.listdir(tmp_path)


def test_existing_output_needs_overwrite(tmp_path):
    causal_lm = tiny_causal_lm()
    format = next(f for f, backends in FORMATS.items() if BACKEND in backends)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(ValueError, match="already exists; pass overwrite=True"):
        export_for_generation(causal_lm, out, format=format)
    assert os.listdir(out) == ["keep.txt"]


def test_failed_export_leaves_nothing(tmp_path, monkeypatch):
    from keras_recurrentgemma import export

    def fail(*args, **kwargs):
        raise RuntimeError("converter crashed")

    monkeypatch.setattr(export, "_write_format", fail)
    causal_lm = tiny_causal_lm()
    format = next(f for f, backends in FORMATS.items() if BACKEND in backends)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("previous")
    with pytest.raises(RuntimeError, match="converter crashed"):
        export_for_generation(causal_lm, out, format=format, overwrite=True)
    # The previous artifact is untouched and no staging directory remains.
    assert sorted(os.listdir(tmp_path)) == ["out"]
    assert (out / "keep.txt").read_text() == "previous"


def test_bad_model_and_arguments(tmp_path):
    format = next(f for f, backends in FORMATS.items() if BACKEND in backends)
    causal_lm = tiny_causal_lm()
    with pytest.raises(ValueError, match="prefill_length"):
        export_for_generation(
            causal_lm, tmp_path / "a", format=format, prefill_length=0
        )
    causal_lm.preprocessor = None
    with pytest.raises(ValueError, match="SentencePiece proto"):
        export_for_generation(causal_lm, tmp_path / "a", format=format)
    with pytest.raises(ValueError, match="float32 weights"):
        export_for_generation(
            tiny_causal_lm(dtype="bfloat16"), tmp_path / "a", format=format
        )
    assert not os.listdir(tmp_path)
