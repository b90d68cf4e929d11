"""Seeded sampling gives the same text again, on the same backend."""

from keras_hub.samplers import RandomSampler

from tests.models import tiny_causal_lm

PROMPTS = ["def add(a, b):", "import"]


def sample(causal_lm, seed):
    # A fresh sampler, as after a restart: its seed generator starts over.
    causal_lm.compile(sampler=RandomSampler(temperature=2.0, seed=seed))
    return causal_lm.generate(PROMPTS, max_length=24, stop_token_ids=None)


def test_the_same_seed_gives_the_same_text():
    causal_lm = tiny_causal_lm("hawk", sequence_length=24)
    first = sample(causal_lm, seed=7)
    # One sampler's successive calls draw on, as Keras seeded ops do. At
    # temperature 2 over 20 tokens, equal texts would mean the draws are
    # not random at all.
    second_call = causal_lm.generate(PROMPTS, max_length=24, stop_token_ids=None)
    assert second_call != first
    assert sample(causal_lm, seed=7) == first
