"""tools/benchmark_real_size.py's pieces, on a tiny checkpoint.

The released sizes are measured by running the tool (see the README); here
its LoRA step runs on every backend, and its decode timing is checked to
leave out each generate length's one-off compile.
"""

import argparse
import math
import sys

import keras
import pytest

from tests.models import write_tiny_hf_checkpoint
from tests.scripts import ROOT
from tests.scripts import load_script

TOOL = ROOT / "tools" / "benchmark_real_size.py"


tool = load_script(TOOL, "benchmark_real_size")


def test_lora_step_reports_time_memory_and_a_finite_loss(tmp_path):
    directory = tmp_path / "hf"
    write_tiny_hf_checkpoint(directory)
    args = argparse.Namespace(dir=str(directory), remat=True, lora_tokens=16)
    report = tool.child_lora(args)
    assert report["backend"] == keras.config.backend()
    assert report["remat"] is True and report["tokens"] == 16
    assert report["first_step_s"] > 0 and report["step_s"] > 0
    assert report["step_peak_gib"] > 0
    assert math.isfinite(report["loss"]) and report["loss"] > 0


def test_decode_time_leaves_out_each_lengths_first_call(monkeypatch):
    # JAX compiles and TensorFlow traces generate once per padded length:
    # both lengths must run once before either is timed; and torch's "auto"
    # traces once a signature has decoded AUTO_MIN_STEPS tokens, so calls
    # of 5 tokens (4 steps) repeat until WARMUP_STEPS steps have run.
    monkeypatch.setattr(tool, "reset_peak", lambda: None)
    calls = []
    clock = iter(range(100))
    monkeypatch.setattr(tool.time, "perf_counter", lambda: next(clock))

    def greedy(n):
        calls.append(n)
        return [0] * n

    report = tool.measure_generate(greedy, argparse.Namespace(new_tokens=5))
    warmup = [5] * math.ceil(tool.WARMUP_STEPS / 4)
    assert calls == [1] + warmup + [1, 5]
    assert report["warmup_calls"] == len(warmup)
    assert report["greedy"] == [0] * 5
    assert report["decode_s_per_token"] == 0  # one tick per timed call


def test_hf_child_times_the_model_classs_own_load(tmp_path, monkeypatch):
    # Its load time must hold `from_pretrained` alone, as ours holds
    # `from_preset`: called on the model's class, imported before the clock
    # starts. Through `AutoModelForCausalLM`, the class's module was
    # imported on the clock (2.6 s of a cold 9B load timed at 5.5).
    transformers = pytest.importorskip("transformers")
    directory = tmp_path / "hf"
    write_tiny_hf_checkpoint(directory)
    model_class = transformers.RecurrentGemmaForCausalLM
    callers = []
    real = model_class.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        callers.append(sys._getframe(1).f_code.co_name)
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(model_class, "from_pretrained", classmethod(from_pretrained))
    args = argparse.Namespace(dir=str(directory), float32=False, generate=False)
    report = tool.child_hf(args)
    # Gradients stay on for this process's later tests, which train.
    assert pytest.importorskip("torch").is_grad_enabled()
    assert callers == ["child_hf"]
    assert report["load_s"] > 0 and report["load_peak_gib"] > 0
