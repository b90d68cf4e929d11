"""The compiled torch decode step, and `generate`'s output on every backend.

On every backend: greedy `generate` on a ragged batch equals a step-by-step
greedy loop through the public cache API (`prefill`, `next_token_logits`,
`call_with_cache`), so the decode step's point-mass and feed logic leave the
output as it was.

On torch: the traced `graph` decode mode (see
`keras_recurrentgemma.compiled_decode`) generates eager's tokens with every
sampler tried, and `inductor` (`torch.compile`; a large test, for its
compile time) with greedy; `compile(jit_compile=...)` picks the mode and
`False` turns compilation off; one graph is traced per batch shape and
reused across steps and calls (and Dynamo does not recompile); assigned
weights are seen, new variables (LoRA) trace again; a step that cannot be
traced falls back to eager with one warning.
"""

import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import compiled_decode
from tests.models import randomize
from tests.models import tiny_causal_lm

TORCH = keras.config.backend() == "torch"
torch_only = pytest.mark.skipif(not TORCH, reason="the torch decode step")

# <bos> alone, inside the Conv1D window, and past the attention window (5).
ROWS = ([2], [2, 17, 30], [2, 8, 9, 10, 11, 12, 13, 14, 15, 16])
MAX_LENGTH = 20


def right_padded(rows, length):
    token_ids = np.zeros((len(rows), length), "int32")
    padding_mask = np.zeros((len(rows), length), "int32")
    for i, row in enumerate(rows):
        token_ids[i, : len(row)] = row
        padding_mask[i, : len(row)] = 1
    return {"token_ids": token_ids, "padding_mask": padding_mask}


def generate_ids(lm, rows=ROWS, max_length=MAX_LENGTH):
    generate = lm.make_generate_function()
    outputs = generate(right_padded(rows, max_length), stop_token_ids=None)
    return np.asarray(ops.convert_to_numpy(outputs["token_ids"]))


def step_by_step_greedy(lm, row, max_length):
    cache = lm.prefill(np.asarray([row], "int32"))
    tokens = list(row)
    logits = lm.next_token_logits(cache)
    while len(tokens) < max_length:
        token = int(np.argmax(ops.convert_to_numpy(logits)[0]))
        tokens.append(token)
        logits, _, cache = lm.call_with_cache(np.asarray([[token]], "int32"), cache)
        logits = logits[:, 0]
    return tokens


@pytest.fixture(scope="module")
def lm():
    return tiny_causal_lm("griffin", sequence_length=MAX_LENGTH)


def task(backbone, mode=None, sampler="greedy"):
    """Another causal LM on `backbone`, in torch decode `mode`."""
    other = RecurrentGemmaCausalLM(backbone, preprocessor=None)
    other.compile(sampler=sampler)
    if mode is not None:
        other.torch_decode_mode = mode
    return other


# --- Every backend ----------------------------------------------------------


def test_greedy_generate_equals_step_by_step(lm):
    lm.compile(sampler="greedy")
    tokens = generate_ids(lm)
    for i, row in enumerate(ROWS):
        expected = step_by_step_greedy(lm, row, MAX_LENGTH)
        np.testing.assert_array_equal(tokens[i], expected, err_msg=f"row {i}")


def test_torch_decode_mode_is_none_elsewhere(lm):
    if TORCH:
        pytest.skip("torch has decode modes")
    assert lm.torch_decode_mode is None


# --- torch ------------------------------------------------------------------


@torch_only
def test_modes_follow_jit_compile(lm):
    # The tests run on a CPU, where `jit_compile="auto"` gives `"auto"`.
    other = task(lm.backbone)
    assert other.torch_decode_mode == "auto"
    other.compile(sampler="greedy", jit_compile=True)
    assert other.torch_decode_mode == "inductor"
    other.compile(sampler="greedy", jit_compile=False)
    assert other.torch_decode_mode == "eager"
    with pytest.warns(UserWarning, match="run_eagerly"):  # Keras's own.
        other.compile(sampler="greedy", jit_compile=True, run_eagerly=True)
    assert other.torch_decode_mode == "eager"
    other.torch_decode_mode = "graph"
    assert other.torch_decode_mode == "graph"
    with pytest.raises(ValueError, match="torch_decode_mode"):
        other.torch_decode_mode = "fast"


@torch_only
def test_auto_traces_only_for_a_long_enough_call(lm, monkeypatch):
    eager = generate_ids(task(lm.backbone, "eager"))
    other = task(lm.backbone)
    assert other.torch_decode_mode == "auto"
    # ROWS's shortest prompt leaves MAX_LENGTH - 1 = 19 steps: too few.
    np.testing.assert_array_equal(generate_ids(other), eager)
    assert other._torch_decode.num_traces == 0
    monkeypatch.setattr(compiled_decode, "AUTO_MIN_STEPS", MAX_LENGTH - 1)
    np.testing.assert_array_equal(generate_ids(other), eager)
    assert other._torch_decode.num_traces == 1
    # Once traced, a short call of the same batch size replays the graph.
    monkeypatch.setattr(compiled_decode, "AUTO_MIN_STEPS", 10**6)
    np.testing.assert_array_equal(generate_ids(other), eager)
    assert other._torch_decode.num_traces == 1


@torch_only
def test_auto_traces_once_short_calls_add_up(lm, monkeypatch):
    eager = generate_ids(task(lm.backbone, "eager"))
    other = task(lm.backbone)
    # Each call plans 19 steps, fewer than the 30 that pay for a trace: the
    # first runs all 19 eagerly; the second traces at its 12th step, when
    # the signature has run 30 eagerly, and decodes the rest in the graph.
    monkeypatch.setattr(compiled_decode, "AUTO_MIN_STEPS", 30)
    np.testing.assert_array_equal(generate_ids(other), eager)
    assert other._torch_decode.num_traces == 0
    np.testing.assert_array_equal(generate_ids(other), eager)
    assert other._torch_decode.num_traces == 1
    # Another batch size is another signature, with its own count.
    rows = ROWS[:2]
    generate_ids(other, rows=rows)
    assert other._torch_decode.num_traces == 1


@torch_only
def test_streaming_tells_auto_how_many_steps_it_plans(lm, monkeypatch):
    from keras_recurrentgemma.streaming import stream_token_ids

    other = task(lm.backbone)
    monkeypatch.setattr(compiled_decode, "AUTO_MIN_STEPS", MAX_LENGTH - 3)
    # 3 prompt tokens: MAX_LENGTH - 3 steps planned, enough.
    tokens = list(stream_token_ids(other, [2, 17, 30], MAX_LENGTH, stop_token_ids=None))
    decode = other.generation_functions().decode
    assert decode.mode == "auto" and decode.num_traces == 1
    expected = generate_ids(task(lm.backbone, "eager"), rows=([2, 17, 30],))[0]
    np.testing.assert_array_equal(tokens, expected[3:])


@torch_only
def test_jit_compile_false_decodes_eagerly(lm):
    other = task(lm.backbone)
    other.compile(sampler="greedy", jit_compile=True)
    other.compile(sampler="greedy", jit_compile=False)
    generate_ids(other)
    assert other._torch_decode.mode == "eager"
    assert other._torch_decode.num_traces == 0


@torch_only
@pytest.mark.parametrize("sampler", ["greedy", "beam", "top_k", "contrastive"])
def test_graph_mode_generates_what_eager_does(lm, sampler):
    # Seeded top_k: the sampler's draws happen outside the step, so the same
    # seed gives the same text only if the logits agree exactly.
    def make(mode):
        s = keras_hub_sampler(sampler)
        return task(lm.backbone, mode, sampler=s)

    np.testing.assert_array_equal(
        generate_ids(make("graph")), generate_ids(make("eager"))
    )


def keras_hub_sampler(name):
    from keras_hub.samplers import TopKSampler

    return TopKSampler(k=5, seed=3) if name == "top_k" else name


@torch_only
def test_one_trace_per_batch_shape(lm):
    other = task(lm.backbone, "graph")
    first = generate_ids(other)
    # Another `max_length` and the same batch: the step's shapes are the same.
    generate_ids(other, max_length=MAX_LENGTH + 7)
    assert other._torch_decode.num_traces == 1
    np.testing.assert_array_equal(generate_ids(other), first)
    assert other._torch_decode.num_traces == 1
    generate_ids(other, rows=ROWS[:2])
    assert other._torch_decode.num_traces == 2


@torch_only
@pytest.mark.large  # Inductor's C++ compile: ~35 s from a cold cache here.
def test_inductor_generates_what_eager_does_without_recompiling(lm):
    import torch

    other = task(lm.backbone, "inductor")
    torch._dynamo.reset()
    before = dict(torch._dynamo.utils.counters["stats"])
    tokens = generate_ids(other, rows=ROWS[1:])
    generate_ids(other, rows=ROWS[1:], max_length=MAX_LENGTH + 3)
    after = torch._dynamo.utils.counters["stats"]
    assert after["unique_graphs"] - before.get("unique_graphs", 0) == 1
    assert other._torch_decode.num_traces == 1
    eager = generate_ids(task(lm.backbone, "eager"), rows=ROWS[1:])
    np.testing.assert_array_equal(tokens, eager)


@torch_only
def test_assigned_weights_and_new_variables_are_seen():
    lm = tiny_causal_lm("hawk", sequence_length=MAX_LENGTH)
    graph, eager = task(lm.backbone, "graph"), task(lm.backbone, "eager")
    before = generate_ids(graph)
    randomize(lm.backbone, seed=1)  # In place: the traced graph reads it.
    after = generate_ids(graph)
    assert not np.array_equal(after, before)
    np.testing.assert_array_equal(after, generate_ids(eager))
    assert graph._torch_decode.num_traces == 1
    # LoRA adds variables, and the layers' code path: a new trace.
    lm.backbone.enable_lora(2)
    randomize(lm.backbone, seed=2)
    np.testing.assert_array_equal(generate_ids(graph), generate_ids(eager))
    assert graph._torch_decode.num_traces == 2


@torch_only
def test_untraceable_step_falls_back_to_eager_with_one_warning(monkeypatch):
    import torch

    monkeypatch.setattr(compiled_decode, "_warned", set())

    def step(x):
        # `.item()` steers Python by a value: tracing refuses it.
        return x * 2 if x.sum().item() > 0 else x

    decode = compiled_decode.TorchDecodeStep(step, "graph")
    x = torch.ones(3)
    with pytest.warns(UserWarning, match="decoding eagerly"):
        np.testing.assert_array_equal(decode(x).numpy(), [2, 2, 2])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(decode(-x).numpy(), [-1, -1, -1])
        # A new signature tries again, and fails quietly.
        np.testing.assert_array_equal(decode(torch.ones(2)).numpy(), [2, 2])
    assert decode.num_traces == 0


@torch_only
def test_constants_are_folded_once_and_variables_are_read_at_each_step():
    import torch

    weight = torch.nn.Parameter(torch.ones(3), requires_grad=False)

    def step(x):
        # RoPE-like frequencies depend on nothing: computed once at tracing.
        frequencies = 1.0 / torch.pow(10.0, torch.arange(3) / 3.0)
        return x * frequencies + (weight + 1.0)

    decode = compiled_decode.TorchDecodeStep(step, "graph")
    x = torch.ones(3)
    np.testing.assert_allclose(decode(x).numpy(), step(x).numpy(), rtol=1e-6)
    (graph,) = decode._graphs.values()
    # Run by TorchScript's interpreter, from the folded fx graph.
    assert isinstance(graph.fn, torch.jit.ScriptModule)
    ops_left = sorted(
        str(n.target) for n in graph.traced.graph.nodes if n.op == "call_function"
    )
    # What reads `x` or the weight stays: x·f, w + 1 and their sum.
    assert ops_left == ["aten.add.Tensor"] * 2 + ["aten.mul.Tensor"], ops_left
    with torch.no_grad():
        weight.copy_(torch.full((3,), 5.0))
    np.testing.assert_allclose(decode(x).numpy(), step(x).numpy(), rtol=1e-6)
