"""The small model that ships with the package: `griffin_tiny_pydocs_en`.

It must load by name with no download on every backend, fit the size budget,
agree with its registry entry, write English words, and drive the command
line (run as a subprocess, as the README's first command does).
"""

import json
import os
import re
import subprocess
import sys

import keras
import pytest

from keras_recurrentgemma import RecurrentGemmaCausalLM
from keras_recurrentgemma import presets

NAME = presets.DEFAULT_PRESET
DIRECTORY = presets.preset_directory(NAME)
MAX_BYTES = 20 * 1024 * 1024  # the budget for the shipped files

pytestmark = pytest.mark.skipif(
    not os.path.isdir(DIRECTORY or ""), reason=f"{NAME} is not in this checkout"
)


@pytest.fixture(scope="module")
def causal_lm():
    model = RecurrentGemmaCausalLM.from_preset(NAME)
    model.compile(sampler="greedy")
    return model


def test_size_budget():
    total = sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, names in os.walk(DIRECTORY)
        for name in names
    )
    assert total <= MAX_BYTES


def test_registry_entry_matches_the_files(causal_lm):
    metadata = presets.PRESETS[NAME]["metadata"]
    assert metadata["params"] == causal_lm.backbone.count_params()
    assert causal_lm.instruction_tuned is metadata["instruction_tuned"] is False
    with open(os.path.join(DIRECTORY, "metrics.json")) as f:
        metrics = json.load(f)["metrics"]
    # The model card's claim: it beats a unigram model on held-out text.
    assert metrics["model"]["perplexity"] < metrics["unigram"]["perplexity"]


def test_writes_english_words(causal_lm):
    text = causal_lm.generate("The function", max_length=40)
    assert text.startswith("The function")
    words = re.findall(r"[A-Za-z]+", text[len("The function") :])
    common = {"the", "a", "of", "to", "is", "and", "in", "be", "it", "that", "an"}
    assert len(words) >= 8
    assert common & {w.lower() for w in words}


def test_command_line_on_the_default_preset(causal_lm):
    env = {**os.environ, "KERAS_BACKEND": keras.backend.backend()}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "keras_recurrentgemma",
            "generate",
            "Python is",
            "--max-length",
            "24",
        ],
        capture_output=True,
        env=env,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-2000:]
    # Greedy by default: the same text `generate` gives in this process.
    expected = causal_lm.generate("Python is", max_length=24)
    assert result.stdout.decode().rstrip("\n") == expected
