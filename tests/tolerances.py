"""Every numerical tolerance the tests use, in one table per dtype.

`relative_error(a, b) = max|a - b| / max|b|`: one number per comparison, so a
logit that happens to sit near zero cannot hide or inflate an error.
"""

import numpy as np

# Parity of our logits with an oracle implementation on the same weights.
# float32: the bound. bfloat16: the official sampler test's rtol/atol
# for bf16 logits (`recurrentgemma/jax/sampler_test.py`).
PARITY = {
    "float32": {"relative": 1e-5},
    "bfloat16": {"rtol": 1e-1, "atol": 1e-1},
}

# Our own code against itself computed another way (e.g. scan vs a numpy loop).
SELF_CONSISTENCY = {"float32": {"rtol": 1e-5, "atol": 1e-6}}

# The RG-LRU kernels (tests/test_scan*.py, tests/test_rg_lru_*.py) against the
# float64 answer for the same inputs, or the `keras.ops` reference. They
# accumulate in float32, so float32 results are float32 round-off away. With
# 16-bit inputs the only 16-bit steps are roundings on store, each at most
# the bfloat16 unit roundoff u = 2^-8 of the value:
# - "bfloat16": a result rounded once (`y` stored in bfloat16, a gradient
#   computed from float32 states): one ulp, 2u = 2^-7, is allowed;
# - "bfloat16_stored_state": a gradient that also reads a state that was
#   stored in bfloat16 (the Pallas scan's `da = g ⊙ h_{t-1}` with a bfloat16
#   `y`): two roundings, 2u, with as much again of margin, 2^-6;
# - "bfloat16_relative": `relative_error` (against the largest element) of a
#   fused kernel's 16-bit gradient, rounded once: 2^-7.
# atol covers float32 noise on values near zero. (The Pallas and Triton scan
# tests once had 2^-6 and 2^-7 for "bfloat16": the 2^-6 was the
# stored-state case.)
KERNEL = {
    "float32": SELF_CONSISTENCY["float32"],
    "float32_gradient": {"rtol": 1e-5, "atol": 1e-5},
    "bfloat16": {"rtol": 2**-7, "atol": 1e-6},
    "bfloat16_stored_state": {"rtol": 2**-6, "atol": 1e-6},
    "bfloat16_relative": 2**-7,
}


# int8 `quantize` against the float model (tests/test_quantize.py).
# relative: logit `relative_error` on test_quantize's inputs, measured
# on jax, tensorflow and torch alike: 0.72e-2 to 1.11e-2 over the four
# TINY_CONFIGS × seeds 0-7, weights as in `float_model`; 1.37e-2 for the
# trained griffin_tiny_pydocs_en (tools/benchmark_quantize.py). A lost scale
# or a skipped soft cap moves logits by O(1), so ~2.7× the worst run still
# catches it.
# greedy_agreement: each new token of the int8 greedy run is compared with
# the float model's greedy choice after the same prefix (all agree exactly
# when the two greedy runs are identical). Measured: 1.0 for every seed tried
# (torch 0-7, tensorflow 0-3, jax 0-1), and the two runs were identical too,
# though these runs mostly repeat the prompt's last token. 0.9 lets five of
# the 54 new tokens fall the other way of a near-tie.
QUANTIZED = {"int8": {"relative": 3e-2, "greedy_agreement": 0.9}}


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))


# Reduced-precision policies against float32 on the same weights, by compute
# dtype (tests/test_numerics.py). relative: logit `relative_error` measured
# on jax and torch over the four TINY_CONFIGS × seeds 0-2, weights at scale
# 0.1: ≤ 0.92e-3 for float16 (about one float16 ulp of the largest logit)
# and ≤ 7.8e-3 for bfloat16 (one bfloat16 ulp), mixed policies alike; about
# 3× that is allowed. A recurrence or softmax left in 16 bits, or an
# overflow, moves logits by far more. argmax_agreement: the next-token choice
# at each position against float32's; measured ≥ 0.979 (bfloat16) and 1.0
# (float16). tools/benchmark_numerics.py gives the same errors on the shipped
# preset (float16 1.1e-3, bfloat16 8.9e-3).
REDUCED_PRECISION = {
    "float16": {"relative": 3e-3, "argmax_agreement": 0.9},
    "bfloat16": {"relative": 2.5e-2, "argmax_agreement": 0.9},
}

# `keras.distribution` across two JAX processes (tests/test_multiprocess.py):
# the loss and every weight after the same two-step LoRA `fit`, run under
# DataParallel and ModelParallel on 2 processes × 2 CPU devices, against one
# process on one device; `relative_error`. Sharded sums add in another order.
# Measured: ≤ 9.5e-8 for the weights and 9.3e-8 for the loss; the frozen
# weights come out bit-equal.
MULTIPROCESS = {"float32": {"relative": 1e-6}}

# The chunked training loss against the full-logits loss on the same weights
# (tests/test_chunked_loss.py): the same operations per token, summed in
# another order, so only round-off differs. relative: `relative_error` of each
# trainable weight's gradient or SGD update, and the relative difference of
# the loss and accuracy. float32, measured over chunk sizes 1-100, with and
# without LoRA and block remat: ≤ 2.8e-6 (jax, torch) and 3.7e-6
# (tensorflow). float16 (pure float16 weights, float32 LoRA factors, loss
# scaling): 0 on tensorflow and torch, 1.2e-3 on jax, whose compiled step
# fuses the float16 products differently (one float16 ulp is 9.8e-4). A
# dropped or doubled chunk, a wrong divisor or a gradient lost through the
# tied embedding is off by O(1 / number of chunks), i.e. 10% or more here.
CHUNKED_LOSS = {"float32": {"relative": 1e-5}, "float16": {"relative": 5e-3}}

# --- Moved from inline literals (values unchanged) -------------------------

# `convert.reference.reference_logits` (the released code run on a checkpoint)
# against the official code's own logits for the same float32 checkpoint
# (tests/test_convert_official_formats.py): one implementation reached two
# ways, so only float32 op-order noise differs; an absolute bound, logits
# being O(10).
REFERENCE_RUNNER = {"float32": {"rtol": 0, "atol": 1e-6}}

# float16 logits under a soft cap of 30 against the exact float64
# `tanh(h · e / 30) · 30` (tests/test_numerics.py). float16's spacing is
# 2^-6 ≈ 0.016 between 16 and 32, so 0.05 is about three ulps; a product that
# overflowed before the cap gives inf, NaN or ±30 instead.
SOFT_CAP = {"float16": {"atol": 0.05}}

# A LoRA model (which applies its factors unmerged, `x @ k + (x @ a) @ b`)
# against the same weights merged into one kernel, `x @ (k + a b)`, as a
# whole-model save or a weights file's merged entry holds them
# (tests/test_presets.py, test_resume_lora.py, test_examples.py): float32 sums in
# another order through the whole model.
LORA_MERGED = {"float32": {"rtol": 1e-4, "atol": 1e-4}}

# The int8 model with a soft cap of 1 against `tanh` of the uncapped int8
# logits recovered as `30 atanh(l / 30)` (tests/test_quantize.py): float32
# round-off of atanh and tanh only; a cap applied twice or not at all is
# off by O(1).
QUANTIZED_SOFT_CAP = {"float32": {"rtol": 1e-5, "atol": 1e-6}}

# A float32 sum of 2^20 standard normals read through the `.pt` file's
# memory map against the float64 sum of the same array
# (tests/test_streaming_official.py); pytest.approx's default, made explicit.
# Wrong or missing pages change the sum by far more.
FLOAT32_SUM = {"relative": 1e-6}

# For the owners of these files to switch to (the literals are still inline
# there):
# `score(..., scoring_mode="loss")` against numpy's log-softmax of the
# forward logits (tests/test_causal_lm.py, test_score_is_log_softmax_...).
SCORE_LOSS = {"float32": {"rtol": 1e-5, "atol": 1e-5}}
# The packed `fit` loss against numpy's per-document cross entropy averaged
# over real tokens (tests/test_fit.py).
PACKED_LOSS = {"float32": {"rtol": 1e-5}}
# One training step with block remat against one without (tests/test_fit.py):
# loss: the same forward pass, float32 round-off; update: `relative_error`
# of each weight's update, 3.1e-5 measured on TensorFlow, which re-runs and
# re-fuses the block inside `recompute_grad`; a missing or doubled gradient
# term is O(1).
REMAT = {"float32": {"loss_rtol": 1e-6, "update_relative": 1e-4}}
# The least `relative_error` random LoRA factors must move the logits by for
# a test to show that the factors matter (tests/test_export_transformers.py).
LORA_EFFECT = {"float32": {"relative_min": 1e-2}}

# The shipped model's int8 ONNX artifact against its float logits
# (tests/test_export_generation.py): onnxruntime's dynamic quantization
# rounds each weight matrix to int8 with one scale per tensor and the
# activations per call. Measured 1.8% (largest logit difference over the
# largest logit, 169 teacher-forced positions, tools/benchmark_onnx_int8.py);
# a missing scale or transposed weight is off by O(1).
ONNX_INT8 = 0.05

# Weight gradients of a small model with each backend's fast scan against
# the reference scan (tests/test_fast_paths.py): each sums over every token,
# in another order on each side. The logits keep `PARITY`'s 1e-5; on an AMD
# EPYC CPU the gradient of one kernel differed by 1.22e-5 (torch, the Triton
# interpreter's numpy scan against torch's; under 1e-5 on an Intel Xeon).
# A missing or doubled gradient term is O(1).
FAST_PATH_GRADIENTS = {"float32": {"relative": 3e-5}}
# The local attention block against its numpy loop (tests/test_layers.py):
# four float32 products and a softmax, summed in another order. On an AMD
# EPYC CPU one output of 320 was 1.44e-6 off (torch), just over
# `SELF_CONSISTENCY`'s atol of 1e-6 (under it on an Intel Xeon).
LOCAL_ATTENTION_NUMPY = {"float32": {"rtol": 1e-5, "atol": 3e-6}}
