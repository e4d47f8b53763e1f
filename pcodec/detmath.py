"""exp, log2, the Gaussian CDF and row sums from IEEE-754 basic operations only.

Everything that decides a probability table or a coding order must come out bit for bit the
same on the encoder's and the decoder's machine. numpy's and scipy's transcendental functions
do not promise that: their SIMD kernels differ between CPUs and releases by an ulp here and
there (np.exp and math.exp disagree on 24 of the 96 prior scales on one machine), and the
streams of format 1, whose tables used them, did not decode on another machine.

Here each function is a fixed sequence of +, -, *, /, floor, frexp and ldexp, which IEEE 754
defines exactly, evaluated one numpy ufunc at a time (no fused multiply-add), and every sum
runs left to right over columns. Accuracy is ~1e-16 relative for exp and log2 and ~1e-7 for
the CDF (Numerical Recipes' erfc): plenty for probability tables, whose rate cost is nil.
"""

from __future__ import annotations

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2^11
_LN2_LO = 1.90821492927058770002e-10
_INV_LN2 = 1.44269504088896338700e00
_EXP_TERMS = 14  # Taylor terms for |r| <= ln(2)/2: the last one is below 1e-17
_LOG2_E = 1.44269504088896338700e00
SQRT_HALF = 0.70710678118654757


def exp(x) -> np.ndarray:
    """e**x for float64 arrays; 0 below -745, inf above 709.78."""
    x = np.asarray(x, dtype=np.float64)
    clipped = np.minimum(np.maximum(x, -745.5), 709.78)
    k = np.floor(clipped * _INV_LN2 + 0.5)
    r = (clipped - k * _LN2_HI) - k * _LN2_LO
    series = np.ones_like(r)
    for n in range(_EXP_TERMS, 0, -1):  # Horner on 1 + r/1 (1 + r/2 (1 + r/3 ...))
        series = series * r / n + 1.0
    with np.errstate(over="ignore"):
        result = np.ldexp(series, k.astype(np.int32))
    return np.where(x > 709.78, np.inf, result)


def log2(x) -> np.ndarray:
    """log2 of positive float64 arrays (x <= 0 gives -inf)."""
    x = np.asarray(x, dtype=np.float64)
    mantissa, exponent = np.frexp(np.where(x > 0, x, 1.0))
    low = mantissa < SQRT_HALF  # bring the mantissa into [sqrt(1/2), sqrt(2))
    mantissa = np.where(low, mantissa * 2.0, mantissa)
    exponent = exponent - low
    s = (mantissa - 1.0) / (mantissa + 1.0)  # ln m = 2 atanh(s), |s| <= 0.1716
    s2 = s * s
    series = np.zeros_like(s)
    for n in range(23, 1, -2):  # 1 + s²/3 + s⁴/5 + ... (s^24 < 1e-18)
        series = (series + 1.0 / n) * s2
    ln_mantissa = 2.0 * s * (series + 1.0)
    return np.where(x > 0, exponent + ln_mantissa * _LOG2_E, -np.inf)


ERFC_COEFFICIENTS = (-1.26551223, 1.00002368, 0.37409196, 0.09678418, -0.18628806,
                      0.27886807, -1.13520398, 1.48851587, -0.82215223, 0.17087277)


def normal_tail(x) -> np.ndarray:
    """Φ(-|x|), the standard normal mass beyond |x|, with relative error ~1e-7 out to
    |x| ≈ 38 (where it underflows): erfc(|x|/√2) / 2 after Numerical Recipes' erfcc."""
    z = np.abs(np.asarray(x, dtype=np.float64)) * SQRT_HALF
    t = 1.0 / (1.0 + 0.5 * z)
    poly = np.zeros_like(t)
    for c in ERFC_COEFFICIENTS[:0:-1]:
        poly = (poly + c) * t
    poly = poly + ERFC_COEFFICIENTS[0]
    return 0.5 * t * exp(-z * z + poly)


def ndtr(x) -> np.ndarray:
    """Standard normal CDF Φ(x)."""
    x = np.asarray(x, dtype=np.float64)
    tail = normal_tail(x)
    return np.where(x < 0, tail, 1.0 - tail)


def row_sum(a: np.ndarray) -> np.ndarray:
    """Sum over the last axis, strictly left to right (numpy's sum may pair terms in a
    CPU- or release-dependent order)."""
    total = a[..., 0].copy()
    for column in range(1, a.shape[-1]):
        total += a[..., column]
    return total
