"""The numbers of the RG-LRU gate arithmetic, defined once for every path.

    log a_t = -C · r_t · softplus(Λ),   1 − a_t² = −expm1(2 log a_t)

The `keras.ops` gates (`ops.rg_lru`), the Pallas kernel (`ops.pallas_rg_lru`)
and the Triton kernel (`ops.triton_rg_lru`) all read these, so the three
cannot drift apart.
"""

# The constant `c` of the paper: log a_t = -c · r_t · softplus(Λ).
C = 8.0
# sqrt'(x) is capped at this value, as in the official model ...
MAX_SQRT_GRADIENT = 1000.0
# ... i.e. sqrt' is taken at max(x, SQRT_FLOOR) = max(x, 1 / (4 · 1000²)).
SQRT_FLOOR = 1.0 / (4.0 * MAX_SQRT_GRADIENT**2)
# Above this `z`, `1 − exp(z)` is taken from `minus_expm1_series(z)`.
SERIES_RANGE = -0.25


def minus_expm1_series(z):
    """`1 − exp(z) = −expm1(z)` for `SERIES_RANGE < z ≤ 0`, by its Taylor series.

        1 − e^z = −z (1 + z/2 (1 + z/3 (1 + z/4 (1 + z/5 (1 + z/6 (1 + z/7))))))

    The kernels need it because neither Mosaic nor Triton's interpreter has
    expm1, and `1 − exp(z)` keeps no correct digit once `exp(z)` is within
    float32's epsilon of 1. On `z > −0.25` the first omitted term, z⁸/8!,
    is below 1e-8 of the value.

    Pure arithmetic on purpose: the same function runs on `jax.numpy` arrays
    in the Pallas kernel, in Triton's interpreter, and decorated with
    `triton.jit` in a compiled Triton kernel.
    """
    return -z * (1.0 + z / 2.0 * (1.0 + z / 3.0 * (1.0 + z / 4.0 * (
        1.0 + z / 5.0 * (1.0 + z / 6.0 * (1.0 + z / 7.0))))))  # fmt: skip
