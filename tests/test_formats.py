"""The format registry against the table in FACTS.md and against ml_dtypes.finfo.

Every expected figure below is copied from the "Float formats" table of FACTS.md
(OCP FP8 / MX v1.0 specifications, IEEE 754), not computed from mixprec.
"""
import math

import ml_dtypes
import pytest
import torch

from mixprec.formats import Convention, FloatFormat, get_format, list_formats, make_format


# name: (ebits, mbits, bias, max, min_normal, min_subnormal, has_inf, has_nan)
# -- FACTS.md "Float formats"; max written as FACTS gives it (approximate where it
# gives 5 significant digits, exact otherwise); min_subnormal None = "—".
FACTS_TABLE = {
    "fp32": (8, 23, 127, 3.4028e38, 2.0 ** -126, 2.0 ** -149, True, True),
    "tf32": (8, 10, 127, 3.4e38, 2.0 ** -126, 2.0 ** -136, True, True),
    "bf16": (8, 7, 127, 3.3895e38, 2.0 ** -126, 2.0 ** -133, True, True),
    "fp16": (5, 10, 15, 65504.0, 2.0 ** -14, 2.0 ** -24, True, True),
    "e5m2": (5, 2, 15, 57344.0, 2.0 ** -14, 2.0 ** -16, True, True),
    "e4m3": (4, 3, 7, 448.0, 2.0 ** -6, 2.0 ** -9, False, True),
    "e4m3fnuz": (4, 3, 8, 240.0, 2.0 ** -7, 2.0 ** -10, False, True),
    "e5m2fnuz": (5, 2, 16, 57344.0, 2.0 ** -15, 2.0 ** -17, False, True),
    "e3m2": (3, 2, 3, 28.0, 2.0 ** -2, 2.0 ** -4, False, False),
    "e2m3": (2, 3, 1, 7.5, 2.0 ** 0, 2.0 ** -3, False, False),
    "e2m1": (2, 1, 1, 6.0, 2.0 ** 0, 2.0 ** -1, False, False),
    "e8m0": (8, 0, 127, 2.0 ** 127, 2.0 ** -127, None, False, True),
}
# FACTS.md gives 5 significant digits for these maxima ("~3.4e38" for tf32: 2).
APPROX_MAX = {"fp32": 1e-4, "bf16": 1e-4, "tf32": 1e-2}

# FACTS.md NaN column: fnuz has no -0 ("0x80 only, no -0"), IEEE/fn/MX keep it.
NEGATIVE_ZERO = {"e4m3fnuz": False, "e5m2fnuz": False, "e8m0": False}


@pytest.mark.parametrize("name", list(FACTS_TABLE))
def test_facts_table(name):
    e, m, bias, fmax, min_normal, min_sub, has_inf, has_nan = FACTS_TABLE[name]
    f = get_format(name)
    assert (f.ebits, f.mbits, f.bias) == (e, m, bias)
    assert f.max == pytest.approx(fmax, rel=APPROX_MAX.get(name, 0.0))
    assert f.min_normal == min_normal
    assert f.min_subnormal == min_sub
    assert (f.has_inf, f.has_nan) == (has_inf, has_nan)
    assert f.has_negative_zero == NEGATIVE_ZERO.get(name, True)


def test_exact_maxima_from_bit_layout():
    # fp32 max = (2 - 2^-23) * 2^127, bf16 max = (2 - 2^-7) * 2^127 (IEEE 754 layout)
    assert get_format("fp32").max == (2 - 2.0 ** -23) * 2.0 ** 127
    assert get_format("bf16").max == (2 - 2.0 ** -7) * 2.0 ** 127
    assert get_format("tf32").max == (2 - 2.0 ** -10) * 2.0 ** 127


# ml_dtypes.finfo is an independent source for every format ml_dtypes implements.
ML = {"bf16": ml_dtypes.bfloat16, "e5m2": ml_dtypes.float8_e5m2,
      "e4m3": ml_dtypes.float8_e4m3fn, "e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
      "e5m2fnuz": ml_dtypes.float8_e5m2fnuz, "e3m2": ml_dtypes.float6_e3m2fn,
      "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn,
      "e4m3ieee": ml_dtypes.float8_e4m3, "e3m4": ml_dtypes.float8_e3m4,
      "e4m3b11fnuz": ml_dtypes.float8_e4m3b11fnuz}


@pytest.mark.parametrize("name", list(ML))
def test_matches_ml_dtypes_finfo(name):
    f, fi = get_format(name), ml_dtypes.finfo(ML[name])
    assert f.max == float(fi.max)
    assert f.min_normal == float(fi.smallest_normal)
    assert f.min_subnormal == float(fi.smallest_subnormal)
    assert f.mbits == fi.nmant and f.ebits == fi.nexp and f.bits == fi.bits
    assert f.eps == float(fi.eps)


def test_e8m0_against_ml_dtypes_finfo():
    f, fi = get_format("e8m0"), ml_dtypes.finfo(ml_dtypes.float8_e8m0fnu)
    assert f.max == float(fi.max) and f.min_normal == float(fi.smallest_normal)
    assert not f.signed and f.bits == 8 and not f.has_zero


@pytest.mark.parametrize("alias,name", [
    ("float32", "fp32"), ("float", "fp32"), ("bfloat16", "bf16"), ("float16", "fp16"),
    ("half", "fp16"), ("e4m3fn", "e4m3"), ("fp8_e4m3", "e4m3"), ("fp8_e5m2", "e5m2"),
    ("e8m0fnu", "e8m0"), ("fp6_e3m2", "e3m2"), ("fp6_e2m3", "e2m3"), ("fp4_e2m1", "e2m1"),
    ("E4M3", "e4m3"), ("  bf16 ", "bf16"),
])
def test_aliases(alias, name):
    assert get_format(alias) is get_format(name)


@pytest.mark.parametrize("dtype,name", [
    (torch.float16, "fp16"), (torch.bfloat16, "bf16"), (torch.float8_e5m2, "e5m2"),
    (torch.float8_e4m3fn, "e4m3"), (torch.float8_e4m3fnuz, "e4m3fnuz"),
    (torch.float8_e5m2fnuz, "e5m2fnuz"), (torch.float8_e8m0fnu, "e8m0"),
    (torch.float32, "fp32"),
])
def test_torch_dtypes(dtype, name):
    assert get_format(dtype).name == name
    assert get_format(name).torch_dtype == dtype


def test_passthrough_and_listing():
    f = make_format(3, 4)
    assert get_format(f) is f
    assert [f.name for f in list_formats()] == list(FACTS_TABLE)


@pytest.mark.parametrize("name,layout", [
    # (ebits, mbits, bias, convention); default biases: 2^(E-1) - 1, fnuz one more
    ("e3m4", (3, 4, 3, Convention.IEEE)),
    ("e4m3ieee", (4, 3, 7, Convention.IEEE)),
    ("e4m3b11fnuz", (4, 3, 11, Convention.FNUZ)),
    ("e6m9", (6, 9, 31, Convention.IEEE)),
    ("e3m3fin", (3, 3, 3, Convention.FINITE)),
    ("e5m7", (5, 7, 15, Convention.IEEE)),
    ("e4m4fn", (4, 4, 7, Convention.FN)),
    ("e5m2b13", (5, 2, 13, Convention.IEEE)),
])
def test_custom_names(name, layout):
    f = get_format(name)
    assert (f.ebits, f.mbits, f.bias, f.convention) == layout
    assert f.name == name
    assert get_format(f.name) == f            # the printed name parses back


def test_custom_figures_from_layout():
    # e6m9: bias 31, top exponent 62 - 31 = 31: max = (2 - 2^-9) * 2^31, min sub 2^-39
    f = get_format("e6m9")
    assert f.max == (2 - 2.0 ** -9) * 2.0 ** 31
    assert f.min_subnormal == 2.0 ** (1 - 31 - 9)
    # e3m3fin (every code finite): max = (1 + 7/8) * 2^(7 - 3) = 30
    assert get_format("e3m3fin").max == 30.0


@pytest.mark.parametrize("bad", ["e9m2", "fp7", "e4m3xyz", "e4m24", "", "e1m2"])
def test_bad_names_raise(bad):
    with pytest.raises(ValueError, match=rf"{bad!r}.*valid forms"):
        get_format(bad)


@pytest.mark.parametrize("bad", [42, None, torch.int8])
def test_bad_types_raise(bad):
    with pytest.raises(ValueError, match="valid forms"):
        get_format(bad)


def test_make_format_errors():
    with pytest.raises(ValueError, match="unknown convention 'xyz'.*ieee, fn, fnuz, finite"):
        make_format(4, 3, "xyz")
    with pytest.raises(ValueError, match="exponent bits 9"):
        make_format(9, 3)
    with pytest.raises(ValueError, match="mantissa bits 30"):
        make_format(4, 30)
    with pytest.raises(ValueError, match="outside float32's range"):
        make_format(8, 3, bias=90)


def test_format_is_frozen_and_hashable():
    f = get_format("e4m3")
    with pytest.raises(Exception):
        f.bias = 3
    assert len({f, get_format("e4m3fn"), get_format("e5m2")}) == 2
    assert isinstance(f, FloatFormat) and str(f) == "e4m3" and math.isfinite(f.max)
