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


def relative_error(actual, expected):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    return float(np.max(np.abs(actual - expected)) / np.max(np.abs(expected)))
