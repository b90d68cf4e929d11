"""Greedy generation matches the official DeepMind RecurrentGemma sampler.

`recurrentgemma.jax.Sampler` (always JAX) and our `RecurrentGemmaCausalLM`
(on the backend under test) run on the same random fp32 weights, converted
with `backbone_from_official`, and continue the same prompts greedily. The
generated ids must agree token for token, for at least four attention
windows of new tokens, from a prompt shorter than the window and from one
several windows long, each alone and (on our side) batched together with
right padding. So our prefill, our fixed-size cache (ring-buffered attention
keys, Conv1D and RG-LRU state) and our decode loop reproduce the official
prefill-then-decode path, well past the point where the ring buffer wraps.

The official sampler runs one prompt at a time. Batched, it left pads: a row
of at most three real tokens then keeps pad inputs in its Conv1D cache
(SPEC §4), and with `echo=False` it cuts each row's pad count off the front
of that row's *generated* tokens (`tokens[l:]` on a buffer that holds no
prompt). Neither is behaviour to copy.

Run once per backend: `KERAS_BACKEND=jax|tensorflow|torch pytest ...`.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("recurrentgemma")

import recurrentgemma.jax  # noqa: E402
import sentencepiece as spm  # noqa: E402

from keras_recurrentgemma import RecurrentGemmaCausalLM  # noqa: E402
from keras_recurrentgemma import RecurrentGemmaCausalLMPreprocessor  # noqa: E402
from keras_recurrentgemma.convert.official import backbone_from_official  # noqa: E402
from tests.models import tiny_tokenizer  # noqa: E402
from tests.test_official_parity import official_config  # noqa: E402
from tests.test_official_parity import random_official_params  # noqa: E402
from tests.vocab import tiny_proto  # noqa: E402

# Griffin has both block types and lru_width != hidden_dim; Hawk has no
# attention; attention_only has the shortest window (3), so the most wraps.
CONFIG_NAMES = ("griffin", "hawk", "attention_only")
# 3 tokens with <bos>: shorter than every window, and so short that the
# Conv1D state at the first decode step still has a zero slot.
SHORT_PROMPT = "Hi"
# 20 tokens with <bos>: four windows of 5, more than six of 3.
LONG_PROMPT = "Hello world! How are you today?"
PROMPTS = (SHORT_PROMPT, LONG_PROMPT)
# One buffer length for every run, so each backend compiles `generate` once
# per batch size. The long prompt gets `_NEW_TOKENS` new tokens, the short
# one more.
_NEW_TOKENS = 20
MIN_WINDOWS = 4
# At the shared helper's N(0, 0.2²) the input token's own embedding dominates
# the residual stream, and greedy decoding through the tied output head
# repeats one token forever (all three configs did), which a broken cache
# could reproduce too. Every other leaf at N(0, 0.5²), as
# `tests.models.randomize` draws, gives varied continuations.
_BLOCK_SCALE = 2.5
_PREFILL_CHUNK = 2


def len_with_bos(vocab, prompt):
    return 1 + len(vocab.EncodeAsIds(prompt))


def sampler_params(config, seed):
    params = random_official_params(config, seed)

    def scale(path, leaf):
        keys = [p.key for p in path]
        if keys[0] == "embedder" or keys[-1] == "a_param":
            return leaf
        return leaf * np.float32(_BLOCK_SCALE)

    return jax.tree_util.tree_map_with_path(scale, params)


class Pair:
    """One config: random weights, the official sampler, our causal LM."""

    def __init__(self, name):
        self.vocab = spm.SentencePieceProcessor(model_proto=tiny_proto())
        # The sampler decodes with the real vocabulary, so the model's must
        # be its size, not the config's.
        config = official_config(name)._replace(vocab_size=self.vocab.GetPieceSize())
        self.window = config.attention_window_size
        self.max_length = len_with_bos(self.vocab, LONG_PROMPT) + _NEW_TOKENS
        params = sampler_params(config, seed=0)
        model = recurrentgemma.jax.Griffin(
            config,
            gradient_checkpointing=False,
            dtype=jnp.float32,
            param_dtype=jnp.float32,
        )
        self.sampler = recurrentgemma.jax.Sampler(
            model=model, vocab=self.vocab, params=params
        )
        backbone = backbone_from_official(
            params, dtype="float32", attention_window_size=self.window
        )
        # No preprocessor: `generate` then takes and returns ids.
        self.lm = RecurrentGemmaCausalLM(backbone, preprocessor=None)
        self.lm.compile(sampler="greedy")
        # Chunks shorter than every window and not dividing the long prompt,
        # so the attention ring buffer is filled across chunk boundaries.
        self.chunked_lm = RecurrentGemmaCausalLM(
            backbone, preprocessor=None, prefill_chunk_size=_PREFILL_CHUNK
        )
        self.chunked_lm.compile(sampler="greedy")
        self.preprocessor = RecurrentGemmaCausalLMPreprocessor(
            tiny_tokenizer(), sequence_length=self.max_length
        )
        self._official = {}

    def official(self, prompt):
        """Prompt ids and the official greedy continuation filling the buffer."""
        if prompt not in self._official:
            prompt_ids = np.asarray(self.sampler.tokenize(prompt))
            out = self.sampler(
                [prompt],
                total_generation_steps=self.max_length - len(prompt_ids),
                return_logits=True,
                # Compare the whole buffer: stopping at <eos> is a sampler
                # policy, not part of the model's continuation.
                end_sampling_at_eos_token=False,
            )
            self._official[prompt] = (
                prompt_ids,
                np.asarray(out.tokens[0]),
                np.asarray(out.logits[0]),
            )
        return self._official[prompt]

    def inputs(self, prompts):
        """Our right-padded generate inputs, as numpy."""
        x = self.preprocessor.generate_preprocess(
            list(prompts), sequence_length=self.max_length
        )
        return {k: np.asarray(v) for k, v in x.items()}

    def ours(self, prompts, chunked=False):
        lm = self.chunked_lm if chunked else self.lm
        outputs = lm.generate(self.inputs(prompts), stop_token_ids=None)
        return np.asarray(outputs["token_ids"])


@pytest.fixture(scope="module", params=CONFIG_NAMES)
def pair(request):
    return Pair(request.param)


def _check_row(pair, prompt, row):
    prompt_ids, expected, logits = pair.official(prompt)
    n = len(prompt_ids)
    np.testing.assert_array_equal(row[:n], prompt_ids)
    got = row[n:]
    assert len(expected) >= MIN_WINDOWS * pair.window
    assert len(got) == len(expected)
    if not np.array_equal(got, expected):
        step = int(np.argmax(got != expected))
        top2 = np.sort(logits[step])[-2:]
        pytest.fail(
            f"{prompt!r}: first mismatch at new token {step} of {len(expected)}: "
            f"ours {got[step]}, official {expected[step]} (official top-2 "
            f"logit margin {top2[1] - top2[0]:.3g}).\nours     {got.tolist()}"
            f"\nofficial {expected.tolist()}"
        )


def test_prompt_ids_match_official_tokenize(pair):
    x = pair.inputs(PROMPTS)
    for i, prompt in enumerate(PROMPTS):
        prompt_ids = pair.official(prompt)[0]
        n = len(prompt_ids)
        np.testing.assert_array_equal(x["token_ids"][i, :n], prompt_ids)
        np.testing.assert_array_equal(
            x["padding_mask"][i], np.arange(pair.max_length) < n
        )


@pytest.mark.parametrize("prompt", PROMPTS, ids=("short", "long"))
def test_greedy_matches_official_alone(pair, prompt):
    _check_row(pair, prompt, pair.ours([prompt])[0])


def test_greedy_batched_matches_official_alone(pair):
    # Rows of different lengths share one right-padded buffer on our side.
    token_ids = pair.ours(PROMPTS)
    for prompt, row in zip(PROMPTS, token_ids, strict=True):
        _check_row(pair, prompt, row)


def test_chunked_prefill_batched_matches_official_alone(pair):
    token_ids = pair.ours(PROMPTS, chunked=True)
    for prompt, row in zip(PROMPTS, token_ids, strict=True):
        _check_row(pair, prompt, row)


def test_official_output_is_not_degenerate(pair):
    # Guards the comparison's strength: a model stuck on one token would let
    # a broken cache pass.
    for prompt in PROMPTS:
        tokens = pair.official(prompt)[1]
        assert len(set(tokens.tolist())) >= len(tokens) // 3, tokens
