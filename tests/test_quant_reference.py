"""A slow, readable rounding reference, and tests that it agrees with ml_dtypes.

The reference lists every finite non-negative value of a format from the textbook
formula, finds the two neighbours of |x| with bisect, and picks one:

    value(e, m) = m * 2^(1 - bias - M)            e == 0  (subnormal)
                = (2^M + m) * 2^(e - bias - M)     e >= 1  (normal)
    nearest: the closer neighbour; a tie goes to the even code
    toward_zero: the lower neighbour
    the code after max stands for "overflow" (inf, NaN or max by convention)

Other quant tests import it as their oracle for formats ml_dtypes does not have.
All arithmetic is float64, which holds every value, midpoint and difference exactly.
"""
import bisect
import functools
import math

import ml_dtypes
import numpy as np
import pytest

from mixprec.formats import Convention, get_format


def value_of(fmt, e: int, m: int) -> float:
    if fmt.convention is Convention.E8M0:
        return 2.0 ** (e - 127)
    if e == 0:
        return m * 2.0 ** (1 - fmt.bias - fmt.mbits)
    return (2 ** fmt.mbits + m) * 2.0 ** (e - fmt.bias - fmt.mbits)


def is_special(fmt, e: int, m: int) -> bool:
    """Inf/NaN magnitude codes; fnuz's NaN is the negative-zero code, not a magnitude."""
    top_e, top_m = 2 ** fmt.ebits - 1, 2 ** fmt.mbits - 1
    if fmt.convention is Convention.IEEE:
        return e == top_e
    if fmt.convention in (Convention.FN, Convention.E8M0):
        return e == top_e and m == top_m
    return False


@functools.lru_cache(maxsize=None)
def grid(name):
    """(sorted finite non-negative values, the value one code past max)."""
    fmt = get_format(name)
    codes = [(e, m) for e in range(2 ** fmt.ebits) for m in range(2 ** fmt.mbits)]
    finite = [value_of(fmt, e, m) for e, m in codes if not is_special(fmt, e, m)]
    assert finite == sorted(finite)          # code order is value order
    n = len(finite)                          # the next code, read with the same formula
    beyond = value_of(fmt, n >> fmt.mbits, n & (2 ** fmt.mbits - 1))
    return finite, beyond


def overflow_value(fmt, saturate: bool, from_inf: bool) -> float:
    # ONNX Cast: saturate -> max, except fnuz turns inf into NaN
    if saturate:
        return math.nan if (from_inf and fmt.convention is Convention.FNUZ) else fmt_max(fmt)
    if fmt.convention is Convention.IEEE:
        return math.inf
    if fmt.convention is Convention.FINITE:
        return fmt_max(fmt)
    return math.nan


def fmt_max(fmt) -> float:
    return grid(fmt.name)[0][-1]


@functools.lru_cache(maxsize=None)
def extended(name):
    values, beyond = grid(name)
    return values + [beyond]


def neighbours(name, a: float):
    """(i, lo, hi): lo = values[i] <= a < hi (hi may be the 'beyond' value)."""
    ext = extended(name)
    i = bisect.bisect_right(ext, a) - 1
    return i, ext[i], (ext[i + 1] if i + 1 < len(ext) else math.inf)


def ref_e8m0(x: float, mode: str, saturate: bool) -> float:
    """e8m0 by its definition: nearest power of two in [2^-127, 2^127], ties (the binade's
    linear midpoint 1.5 * 2^k) away from zero; nothing below 2^-127 (no zero)."""
    tiny = 2.0 ** -127
    if math.isnan(x) or x <= 0 or math.copysign(1, x) < 0:
        return math.nan
    if math.isinf(x):
        return 2.0 ** 127 if saturate else math.nan
    if x <= tiny:                      # no zero: nothing smaller to go to
        return tiny
    _, lo, hi = neighbours("e8m0", x)
    if mode == "toward_zero" or x == lo:
        r = lo
    else:
        r = hi if x - lo >= hi - x else lo
    if r > 2.0 ** 127:
        return 2.0 ** 127 if saturate else math.nan
    return r


def ref_round(name, x: float, mode: str = "nearest", saturate: bool = False) -> float:
    """Round one float64 value to the named format (nearest or toward_zero)."""
    fmt = get_format(name)
    if fmt.convention is Convention.E8M0:
        return ref_e8m0(x, mode, saturate)
    if math.isnan(x):
        return math.nan
    sign = math.copysign(1.0, x)
    a = abs(x)
    if math.isinf(a):
        r = overflow_value(fmt, saturate, from_inf=True)
    else:
        i, lo, hi = neighbours(name, a)
        if a == lo or mode == "toward_zero":
            r = lo
        elif a - lo != hi - a:
            r = lo if a - lo < hi - a else hi
        else:
            r = lo if i % 2 == 0 else hi     # tie: the even code (index i is code i)
        if r > fmt_max(fmt):
            r = overflow_value(fmt, saturate, from_inf=False)
    if r == 0 and not fmt.has_negative_zero:
        return 0.0
    if math.isnan(r) and fmt.convention is Convention.FNUZ:
        return math.nan
    return math.copysign(r, sign)


def same(a: float, b: float) -> bool:
    """Bitwise equality of float64 values, NaN == NaN."""
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return a == b and math.copysign(1, a) == math.copysign(1, b)


# -- the reference against ml_dtypes --------------------------------------------------
ML = {"e5m2": ml_dtypes.float8_e5m2, "e4m3": ml_dtypes.float8_e4m3fn,
      "e4m3fnuz": ml_dtypes.float8_e4m3fnuz, "e5m2fnuz": ml_dtypes.float8_e5m2fnuz,
      "e3m2": ml_dtypes.float6_e3m2fn, "e2m3": ml_dtypes.float6_e2m3fn,
      "e2m1": ml_dtypes.float4_e2m1fn, "e8m0": ml_dtypes.float8_e8m0fnu,
      "e4m3ieee": ml_dtypes.float8_e4m3, "e3m4": ml_dtypes.float8_e3m4,
      "e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz, "fp16": np.float16,
      "bf16": ml_dtypes.bfloat16}


@pytest.mark.parametrize("name", list(ML))
def test_reference_agrees_with_ml_dtypes(name):
    rng = np.random.default_rng(1)
    fmax = float(ml_dtypes.finfo(ML[name]).max)
    with np.errstate(over="ignore"):   # the top of the range overflows to inf on purpose
        x = (rng.choice([-1.0, 1.0], 600) * fmax * np.exp2(rng.uniform(-40, 1.5, 600))
             ).astype(np.float32)
    x = np.concatenate([x, np.float32([0.0, -0.0, np.inf, -np.inf])])
    with np.errstate(all="ignore"):
        want = x.astype(ML[name]).astype(np.float64)
    for xi, wi in zip(x.astype(np.float64), want):
        assert same(ref_round(name, float(xi)), float(wi)), (name, xi, wi)


def test_reference_grid_sizes():
    # 2^(E+M) magnitudes minus the specials: e5m2 loses 4 (inf + 3 NaN), e4m3 one NaN
    assert len(grid("e5m2")[0]) == 128 - 4
    assert len(grid("e4m3")[0]) == 128 - 1
    assert len(grid("e2m1")[0]) == 8 and grid("e2m1")[1] == 8.0
    assert len(grid("e8m0")[0]) == 255
