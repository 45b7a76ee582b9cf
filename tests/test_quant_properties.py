"""Properties every rounding must have, stated as invariants and checked with hypothesis.

    idempotence      q(q(x)) == q(x)                      (all modes)
    monotonicity     x <= y  =>  q(x) <= q(y)              (nearest, toward_zero)
    sign symmetry    q(-x) == -q(x)                        (signed formats)
    error bound      |q(x) - x| <= ulp(x) / 2              (nearest, |x| <= max)
                     ulp(x) = 2^(max(floor(log2 |x|), emin) - M)
    truncation       |q(x)| <= |x|, and < ulp away         (toward_zero, |x| <= max)
"""
import math

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mixprec.formats import get_format
from mixprec.quant import has_c_extension, quantize
from test_quant_reference import fmt_max

FORMATS = ["e4m3", "e5m2", "e4m3fnuz", "e2m1", "e3m2", "e2m3", "fp16", "bf16", "e3m4",
           "e6m9", "e3m3fin", "e5m0", "e4m3b11fnuz", "tf32"]
BACKENDS = ["c", "torch"] if has_c_extension() else ["torch"]
SETTINGS = settings(max_examples=60, deadline=None)

finite32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
values = st.lists(finite32, min_size=1, max_size=64)


def q(x, name, **kw):
    return quantize(torch.tensor(x, dtype=torch.float32), name, **kw)


@SETTINGS
@given(values, st.sampled_from(FORMATS), st.sampled_from(["nearest", "toward_zero",
                                                          "stochastic"]),
       st.sampled_from(BACKENDS), st.booleans())
def test_idempotent(x, name, mode, backend, saturate):
    once = q(x, name, rounding=mode, backend=backend, saturate=saturate)
    twice = quantize(once, name, rounding=mode, backend=backend, saturate=saturate)
    same = (once == twice) | (torch.isnan(once) & torch.isnan(twice))
    assert same.all()


@SETTINGS
@given(values, st.sampled_from(FORMATS), st.sampled_from(["nearest", "toward_zero"]),
       st.sampled_from(BACKENDS))
def test_monotone(x, name, mode, backend):
    xs = sorted(x)
    r = q(xs, name, rounding=mode, backend=backend, saturate=True)
    assert (r[1:] >= r[:-1]).all(), (xs, r)


@SETTINGS
@given(values, st.sampled_from(FORMATS), st.sampled_from(["nearest", "toward_zero"]),
       st.sampled_from(BACKENDS))
def test_sign_symmetric(x, name, mode, backend):
    pos = q(x, name, rounding=mode, backend=backend)
    neg = q([-v for v in x], name, rounding=mode, backend=backend)
    same = (neg == -pos) | (torch.isnan(neg) & torch.isnan(pos))
    assert same.all()


def ulp(name: str, a: np.ndarray) -> np.ndarray:
    fmt = get_format(name)
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.abs(a)))
    return np.exp2(np.maximum(e, 1 - fmt.bias) - fmt.mbits)


@SETTINGS
@given(values, st.sampled_from(FORMATS), st.sampled_from(BACKENDS))
def test_nearest_error_at_most_half_ulp(x, name, backend):
    a = np.array(x, np.float64)
    a = a[np.abs(a) <= fmt_max(get_format(name))]
    r = q(a.tolist(), name, backend=backend).double().numpy()
    assert (np.abs(r - a) <= ulp(name, a) / 2).all()


@SETTINGS
@given(values, st.sampled_from(FORMATS), st.sampled_from(BACKENDS))
def test_toward_zero_never_grows(x, name, backend):
    a = np.array(x, np.float64)
    a = a[np.abs(a) <= fmt_max(get_format(name))]
    r = q(a.tolist(), name, rounding="toward_zero", backend=backend).double().numpy()
    assert (np.abs(r) <= np.abs(a)).all()
    assert (np.abs(a) - np.abs(r) < ulp(name, a)).all()
    assert (np.sign(r) * np.sign(a) >= 0).all()


@SETTINGS
@given(st.lists(st.floats(allow_nan=False, allow_infinity=False, width=64), min_size=1,
                max_size=32), st.sampled_from(["e4m3", "e5m2", "fp16", "e6m9"]))
def test_float64_error_bound(x, name):
    a = np.array(x, np.float64)
    a = a[np.abs(a) <= fmt_max(get_format(name))]
    r = quantize(torch.from_numpy(a), name).numpy()
    assert (np.abs(r - a) <= ulp(name, a) / 2).all()
    assert all(math.isfinite(v) for v in r)
