"""The generation engine (`keras_recurrentgemma.generation`) and its callers.

Every way of generating runs the same engine, so with the greedy sampler
they give the very same tokens: `generate`, `stream_generate` and the
command line (streaming and `--no-stream`), over prompts of one and of
several prefill chunks (the last one padded), and on torch in the eager and
the traced `graph` decode modes. The chunk plan trims the buffer after the
longest prompt exactly where it should (torch); stop-token masks keep each
row through its first new stop; the sampler factory refuses what it must;
and the command line leaves the model's own sampler alone.
"""

import io
import sys

import keras
import numpy as np
import pytest
from keras import ops
from keras_hub.samplers import GreedySampler
from keras_hub.samplers import TopKSampler

from keras_recurrentgemma import cli
from keras_recurrentgemma import generation
from keras_recurrentgemma.streaming import prompt_token_ids
from keras_recurrentgemma.streaming import stream_generate
from tests.models import tiny_causal_lm

TORCH = keras.config.backend() == "torch"
MAX_LENGTH = 24
CHUNK = 4
# <bos> plus fewer tokens than a chunk; and several chunks, the last padded.
PROMPTS = ["Hi", "Rain fell on the quiet town while"]
MODES = ["eager", "graph"] if TORCH else [None]


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm(sequence_length=MAX_LENGTH, prefill_chunk_size=CHUNK)


def generate_ids(causal_lm, ids, max_length=MAX_LENGTH):
    """`generate`'s new tokens for one prompt of token ids."""
    token_ids = np.zeros((1, max_length), "int32")
    token_ids[0, : len(ids)] = ids
    mask = np.zeros((1, max_length), "bool")
    mask[0, : len(ids)] = True
    outputs = causal_lm.make_generate_function()(
        {"token_ids": token_ids, "padding_mask": mask}, stop_token_ids=None
    )
    return [int(t) for t in ops.convert_to_numpy(outputs["token_ids"])[0, len(ids) :]]


def run_cli(monkeypatch, causal_lm, *argv):
    """`cli.main` on `causal_lm`; returns what it printed."""
    monkeypatch.setattr(cli, "_load", lambda preset: causal_lm)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli.main(["generate", *map(str, argv)]) == 0
    return sys.stdout.getvalue()


@pytest.mark.parametrize("mode", MODES)
def test_generate_stream_and_cli_give_the_same_tokens(lm, mode, monkeypatch):
    if TORCH:
        lm.torch_decode_mode = mode
    lm.compile(sampler="greedy")
    lengths = [len(prompt_token_ids(lm, p)) for p in PROMPTS]
    assert lengths[0] < CHUNK and lengths[1] > 2 * CHUNK and lengths[1] % CHUNK
    for prompt in PROMPTS:
        ids = prompt_token_ids(lm, prompt)
        expected = generate_ids(lm, ids)
        stream = stream_generate(lm, prompt, MAX_LENGTH, stop_token_ids=None)
        text = stream.read()
        assert stream.token_ids == expected, prompt
        assert text == lm.generate(
            prompt, MAX_LENGTH, stop_token_ids=None, strip_prompt=True
        )
        args = ["--max-length", MAX_LENGTH, "--strip-prompt"]
        # The CLI stops at <eos> ("auto"); the expected text too.
        auto = stream_generate(lm, prompt, MAX_LENGTH).read()
        line = auto if auto.endswith("\n") else auto + "\n"
        assert run_cli(monkeypatch, lm, prompt, *args) == line
        assert run_cli(monkeypatch, lm, prompt, *args, "--no-stream") == line
    if TORCH and mode == "graph":
        assert lm._torch_decode.num_traces >= 1
    if TORCH:
        lm.torch_decode_mode = None


def test_cli_leaves_the_models_sampler_alone(lm, monkeypatch):
    sampler = GreedySampler()
    lm.compile(sampler=sampler)
    prompt = PROMPTS[1]
    args = ["--max-length", MAX_LENGTH, "--strip-prompt"]
    beam = run_cli(monkeypatch, lm, prompt, *args, "--sampler", "beam", "--k", 2)
    assert lm.sampler is sampler
    from keras_hub.samplers import BeamSampler

    lm.compile(sampler=BeamSampler(num_beams=2))
    expected = lm.generate(prompt, MAX_LENGTH, strip_prompt=True)
    assert beam == (expected if expected.endswith("\n") else expected + "\n")
    # `generate(sampler=...)` serves one call and keeps the compiled one.
    assert lm.generate(prompt, MAX_LENGTH, strip_prompt=True, sampler="beam") != ""
    assert isinstance(lm.sampler, BeamSampler)
    lm.compile(sampler="greedy")


def test_chunk_plan():
    plan = generation.chunk_plan(40, 8)
    assert plan == (40, 8, 40) and list(plan.starts(13)) == [0, 8]
    # Trimmed after the longest prompt, shorter than a chunk.
    assert generation.chunk_plan(40, 8, longest=5) == (5, 5, 5)
    assert generation.chunk_plan(40, 8, longest=13) == (13, 8, 16)
    assert generation.chunk_plan(6, 8) == (6, 6, 6)
    assert generation.trims_buffer() is TORCH
    assert not generation.trims_buffer(return_hidden=True)


def test_keep_through_first_stop():
    token_ids = np.array([[5, 1, 7, 1, 9], [5, 6, 7, 8, 9]], "int32")
    prompt = np.array([[1, 1, 0, 0, 0], [1, 0, 0, 0, 0]], bool)
    keep = generation.keep_through_first_stop(token_ids, (1, 8), prompt)
    # Row 0: the 1 inside the prompt does not count; the one at 3 does.
    np.testing.assert_array_equal(
        ops.convert_to_numpy(keep), [[1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    )


def test_get_sampler():
    assert isinstance(generation.get_sampler("top_k", seed=3, k=2), TopKSampler)
    sampler = GreedySampler()
    assert generation.get_sampler(sampler) is sampler
    with pytest.raises(ValueError, match="cannot stream"):
        generation.get_sampler("beam", streaming=True)
    with pytest.raises(ValueError, match="Unknown sampler"):
        generation.get_sampler("nucleus")
    with pytest.raises(ValueError, match="constructor"):
        generation.get_sampler(sampler, seed=1)
