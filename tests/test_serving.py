"""`keras_recurrentgemma.serving` on a stand-in runtime: samplers, stops,
streaming, bad input. (The real runtimes are in test_export_generation.py.)

The stand-in "model" is numpy: its state counts tokens and keeps the last
one, and its logits favour `last + 1`, then `last + 2`, ... so every sampler
has a known support.
"""

import json
import subprocess
import sys

import numpy as np
import pytest

from keras_recurrentgemma import serving
from tests.vocab import tiny_proto

VOCAB = 40


class CountingRuntime:
    """prefill/decode_step over state `[num_tokens [b], last [b]]`."""

    def __init__(self, path, metadata):
        self.calls = []

    def run(self, endpoint, arrays):
        self.calls.append((endpoint, arrays[0].shape))
        if endpoint == "prefill":
            ids, mask, num_tokens, last = arrays
            lengths = mask.sum(axis=1)
            rows = np.arange(len(ids))
            new_last = np.where(
                lengths > 0, ids[rows, np.maximum(lengths - 1, 0)], last
            )
        else:
            ids, num_tokens, last = arrays
            lengths, new_last = np.ones(len(ids), "int32"), ids[:, 0]
        distance = (np.arange(VOCAB)[None, :] - new_last[:, None] - 1) % VOCAB
        logits = -distance.astype("float32")
        return [logits, num_tokens + lengths, new_last.astype("int32")]


@pytest.fixture
def generator(tmp_path, monkeypatch):
    monkeypatch.setitem(serving._RUNTIMES, "counting", CountingRuntime)
    (tmp_path / "tokenizer.model").write_bytes(tiny_proto())
    layout = [
        {"name": "num_tokens", "shape": ["batch"], "dtype": "int32", "fill": 0},
        {"name": "last", "shape": ["batch"], "dtype": "int32", "fill": 0},
    ]
    meta = {
        "format": "counting",
        "tokenizer": "tokenizer.model",
        "prefill_length": 4,
        "vocabulary_size": VOCAB,
        "start_token_id": 2,
        "add_start_token": True,
        "stop_token_ids": [1],
        "state": layout,
        "inputs": {},
        "outputs": [],
    }
    (tmp_path / "generation.json").write_text(json.dumps(meta))
    return serving.load_exported(str(tmp_path))


def test_greedy_batched_prompts_and_chunked_prefill(generator):
    prompts = [[2, 5], [2, 7, 8, 9, 10, 11, 12]]
    got = generator.generate_ids(prompts, 4, stop_token_ids=None)
    assert got == [[6, 7, 8, 9], [13, 14, 15, 16]]
    # The 7-token prompt takes two prefill chunks of 4, then 3 decode steps.
    calls = [c[0] for c in generator._runtime.calls]
    assert calls == ["prefill", "prefill", "decode_step", "decode_step", "decode_step"]


def test_stop_token_ends_its_row_only(generator):
    # Row 0 reaches id 1 (the artifact's stop id) after 38 → 39 → 0 → 1.
    got = generator.generate_ids([[2, 38], [2, 10]], 5)
    assert got == [[39, 0], [11, 12, 13, 14, 15]]
    assert generator.generate_ids([[2, 38]], 5, stop_token_ids=(39,)) == [[]]


@pytest.mark.parametrize(
    "kwargs, support",
    [({"sampler": "top_k", "k": 3}, 3), ({"sampler": "top_p", "p": 0.999}, None)],
)
def test_samplers_draw_from_their_support(generator, kwargs, support):
    seen = set()
    for seed in range(30):
        (row,) = generator.generate_ids([[2, 5]], 1, seed=seed, **kwargs)
        seen.add(row[0])
    if support is not None:
        assert seen == {6, 7, 8}
    else:
        # Probabilities fall by e per id: p=0.999 keeps the first seven.
        assert seen <= set(range(6, 13)) and len(seen) > 1
    again = [generator.generate_ids([[2, 5]], 3, seed=7, **kwargs) for _ in range(2)]
    assert again[0] == again[1]


def test_stream_text_equals_generate(generator):
    prompts = ["hello", "a b"]
    pieces = ["", ""]
    for step in generator.stream(prompts, 6, stop_token_ids=None):
        pieces = [a + b for a, b in zip(pieces, step, strict=True)]
    assert pieces == generator.generate(prompts, 6, stop_token_ids=None)
    assert isinstance(generator.generate("hello", 2), str)
    ids = generator.tokenize(["hello"])[0]
    assert ids[0] == 2 and ids[1:] == generator.tokenizer.encode("hello")


def test_bad_input(generator, tmp_path):
    with pytest.raises(ValueError, match="not an exported generation artifact"):
        serving.load_exported(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="Unknown sampler 'beam'"):
        generator.generate_ids([[2]], 2, sampler="beam")
    with pytest.raises(ValueError, match="max_new_tokens"):
        generator.generate_ids([[2]], 0)
    with pytest.raises(ValueError, match="outside \\[0, vocabulary_size=40\\)"):
        generator.generate_ids([[2, 40]], 2)
    with pytest.raises(ValueError, match="`prompts` is empty"):
        generator.generate_ids([], 2)
    with pytest.raises(ValueError, match="non-empty list of int token ids"):
        generator.generate_ids([[]], 2)
    with pytest.raises(ValueError, match="`p` must be in"):
        generator.generate_ids([[2]], 2, sampler="top_p", p=0)
    with pytest.raises(ValueError, match="stop_token_ids"):
        generator.generate_ids([[2]], 2, stop_token_ids="eos")


def test_importing_serving_imports_no_framework():
    code = (
        "import sys, keras_recurrentgemma.serving\n"
        "print(sorted(m for m in ('keras', 'keras_hub', 'jax', 'torch', "
        "'tensorflow') if m in sys.modules))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
