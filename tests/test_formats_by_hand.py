"""Formats ml_dtypes lacks, against constants written out by hand from their definition.

No expected number here comes from mixprec: each is derived in its comment from the bit
layout and the conventions of formats.py's docstring (and FACTS.md):

    value = (-1)^s * 2^(e - bias) * (1 + m / 2^M)     e >= 1
          = (-1)^s * 2^(1 - bias) * (m / 2^M)         e == 0 (subnormal)
    default bias 2^(E-1) - 1; fnuz: 2^(E-1)
    ieee    all-ones exponent: m = 0 inf, m != 0 NaN; quantize's NaN is the quiet code
            S.1..1.10..0; with M = 0 there is no NaN code at all
    fn      only S.1..1.1..1 is NaN (M = 0: the whole top binade is that code), no inf
    fnuz    the code 1.00..0 is the one NaN, no -0 (a negative zero or underflow is +0),
            no inf
    fin     every code is a number: no inf, no NaN code (encode of NaN raises)
    code  = s << (E + M) | e << M | m, uint8 up to 8 bits, else int32
    nearest rounding: half to even on the code, i.e. on the last mantissa bit, or on the
    exponent's last bit when M = 0; rounding happens before the overflow test
    overflow (rounded > max) and +-inf: saturate -> +-max (fnuz: inf -> NaN);
    otherwise inf (ieee), NaN (fn, fnuz), +-max (fin)

With M = 0 there are no subnormals: the smallest positive value is 2^(1 - bias), which is
also what FloatFormat.min_subnormal reports (2^(emin - M)).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from mixprec.formats import Convention, get_format
from mixprec.quant import decode, encode, has_c_extension, quantize

BACKENDS = ["c", "torch"] if has_c_extension() else ["torch"]
NAN, INF = math.nan, math.inf


@dataclass(frozen=True)
class Hand:
    """One format's figures, written from its definition (see each table entry)."""
    ebits: int
    mbits: int
    bias: int
    convention: Convention
    bits: int                 # total width, sign included
    max: float
    min_normal: float
    min_subnormal: float      # smallest positive value
    codes: tuple              # (value, code): exact values, inf, and NaN (None: no NaN code)
    inf_in: tuple             # quantize(+inf) without / with saturation
    rounding: tuple           # (x, nearest, nearest with saturation)


FORMATS = {
    # e3m1fnuz: bias 2^2 = 4; codes 5 bits, sign bit 16; NaN = 1.000.0 = 16.
    # max: e = 7, m = 1 -> 2^(7-4) * 1.5 = 12 (code 0b0111_1 = 15; -12 = 16 + 15 = 31)
    # min normal 2^(1-4) = 1/8 (code 2), min subnormal 2^(1-4-1) = 1/16 (code 1)
    "e3m1fnuz": Hand(
        3, 1, 4, Convention.FNUZ, 5, 12.0, 1 / 8, 1 / 16,
        codes=((12.0, 15), (-12.0, 31), (1 / 8, 2), (1 / 16, 1), (-1 / 16, 17), (2.0, 10),
               (0.0, 0), (-0.0, 0), (NAN, 16)),
        inf_in=(NAN, NAN),                 # fnuz: inf is NaN even when saturating
        rounding=(
            (14.0, NAN, 12.0),       # tie 12 (m = 1, odd) / 16: up -> 16 > max -> NaN
            (13.5, 12.0, 12.0),      # below the midpoint 14
            (1 / 32, 0.0, 0.0),      # tie 0 / 1/16 (code 1, odd) -> 0
            (-1 / 32, 0.0, 0.0),     # ... and no -0: +0
            (3 / 32, 1 / 8, 1 / 8),  # tie 1/16 (code 1) / 1/8 (code 2, even) -> 1/8
            (5 / 32, 1 / 8, 1 / 8),  # tie 1/8 (code 2, even) / 3/16 (code 3) -> 1/8
            (2.5, 2.0, 2.0),         # tie 2 (e = 5, m = 0) / 3 (m = 1) -> 2
        )),
    # e2m0fin: bias 1, values 0 and 2^(e-1) for e = 1..3: 0, 1, 2, 4; codes 3 bits,
    # sign bit 4. max 4 (code 3; -4 = 7), min normal = smallest positive = 1 (code 1)
    "e2m0fin": Hand(
        2, 0, 1, Convention.FINITE, 3, 4.0, 1.0, 1.0,
        codes=((4.0, 3), (-4.0, 7), (1.0, 1), (2.0, 2), (0.0, 0), (-0.0, 4), (NAN, None)),
        inf_in=(4.0, 4.0),                 # fin: no inf, saturate always
        rounding=(
            (0.5, 0.0, 0.0),         # tie 0 (code 0, even) / 1 (code 1) -> 0
            (-0.25, -0.0, -0.0),     # fin keeps -0
            (0.75, 1.0, 1.0),
            (1.5, 2.0, 2.0),         # tie 1 (e = 1, odd) / 2 (e = 2, even) -> 2
            (3.0, 2.0, 2.0),         # tie 2 (e = 2, even) / 4 (e = 3, odd) -> 2
            (3.01, 4.0, 4.0),
            (6.0, 4.0, 4.0),         # tie 4 / 8 (e = 4, even) -> 8 > max -> fin: max
            (-100.0, -4.0, -4.0),
        )),
    # e3m0fn: bias 3, top binade (e = 7) holds only the NaN code -> max 2^(6-3) = 8
    # (code 6); min normal = smallest positive = 2^(1-3) = 1/4 (code 1); 4 bits, sign 8
    "e3m0fn": Hand(
        3, 0, 3, Convention.FN, 4, 8.0, 1 / 4, 1 / 4,
        codes=((8.0, 6), (-8.0, 14), (1 / 4, 1), (1.0, 3), (0.0, 0), (-0.0, 8), (NAN, 7)),
        inf_in=(NAN, 8.0),                 # fn: no inf -> NaN, saturate -> max
        rounding=(
            (12.0, 8.0, 8.0),        # tie 8 (e = 6, even) / 16 (e = 7) -> 8: no overflow
            (12.5, NAN, 8.0),        # above the tie: 16 > max -> NaN
            (1 / 8, 0.0, 0.0),       # tie 0 / 1/4 (e = 1, odd) -> 0
            (-1 / 8, -0.0, -0.0),
            (3 / 8, 0.5, 0.5),       # tie 1/4 (e = 1) / 1/2 (e = 2, even) -> 1/2
            (3.0, 2.0, 2.0),         # tie 2 (e = 4, even) / 4 (e = 5) -> 2
            (6.0, 8.0, 8.0),         # tie 4 (e = 5) / 8 (e = 6, even) -> 8
        )),
    # e5m0: IEEE, bias 15; e = 31 is inf (M = 0 leaves no NaN code); values 2^(e-15),
    # e = 1..30: max 2^15 = 32768 (code 30), min normal 2^-14 (code 1); 6 bits, sign 32,
    # inf = 31, -inf = 63
    "e5m0": Hand(
        5, 0, 15, Convention.IEEE, 6, 32768.0, 2.0 ** -14, 2.0 ** -14,
        codes=((32768.0, 30), (-32768.0, 62), (2.0 ** -14, 1), (1.0, 15), (INF, 31),
               (-INF, 63), (0.0, 0), (-0.0, 32), (NAN, None)),
        inf_in=(INF, 32768.0),
        rounding=(
            (49152.0, 32768.0, 32768.0),  # tie 2^15 (e = 30, even) / 2^16 -> 2^15
            (49153.0, INF, 32768.0),      # above: 2^16 is the inf code
            (2.0 ** -15, 0.0, 0.0),       # tie 0 / 2^-14 (e = 1) -> 0
            (3 * 2.0 ** -15, 2.0 ** -13, 2.0 ** -13),  # tie 2^-14 (e = 1) / 2^-13 (e = 2)
            (3.0, 2.0, 2.0),              # tie 2 (e = 16, even) / 4 (e = 17) -> 2
        )),
    # e2m5: IEEE, bias 1; e = 3 is inf/NaN, so max = 2^(2-1) * (1 + 31/32) = 3.9375
    # (code 2 << 5 | 31 = 95); min normal 2^0 = 1 (code 32); min subnormal 2^(0-5) = 1/32
    # (code 1); 8 bits, sign 128, inf 3 << 5 = 96, -inf 224, NaN 96 | 16 = 112
    "e2m5": Hand(
        2, 5, 1, Convention.IEEE, 8, 3.9375, 1.0, 1 / 32,
        codes=((3.9375, 95), (-3.9375, 223), (1.0, 32), (1 / 32, 1), (INF, 96), (-INF, 224),
               (0.0, 0), (-0.0, 128), (NAN, 112)),
        inf_in=(INF, 3.9375),
        rounding=(
            (3.96875, INF, 3.9375),       # tie 3.9375 (m = 31, odd) / 4 -> 4 = inf
            (3.953125, 3.9375, 3.9375),   # a quarter ulp above max
            (1 / 64, 0.0, 0.0),           # tie 0 / 1/32 (code 1) -> 0
            (3 / 64, 1 / 16, 1 / 16),     # tie 1/32 (code 1) / 2/32 (code 2) -> 1/16
            (1 + 1 / 64, 1.0, 1.0),       # tie 1 (m = 0) / 1 + 1/32 (m = 1) -> 1
            (63 / 64, 1.0, 1.0),          # tie 31/32 (top subnormal, odd) / 1: up into e = 1
            (61 / 64, 15 / 16, 15 / 16),  # tie 30/32 (even) / 31/32 -> 30/32
        )),
    # e8m3b130: IEEE, bias 130: max 2^(254-130) * (1 + 7/8) = 1.875 * 2^124
    # (code 254 << 3 | 7 = 2039); min normal 2^(1-130) = 2^-129 (code 8), below float32's
    # normals; min subnormal 2^(-129-3) = 2^-132 (code 1); 12 bits -> int32 codes,
    # sign 2048, inf 255 << 3 = 2040, -inf 4088, NaN 2040 | 4 = 2044
    "e8m3b130": Hand(
        8, 3, 130, Convention.IEEE, 12, 1.875 * 2.0 ** 124, 2.0 ** -129, 2.0 ** -132,
        codes=((1.875 * 2.0 ** 124, 2039), (-1.875 * 2.0 ** 124, 4087), (2.0 ** -129, 8),
               (2.0 ** -132, 1), (INF, 2040), (-INF, 4088), (0.0, 0), (-0.0, 2048),
               (NAN, 2044)),
        inf_in=(INF, 1.875 * 2.0 ** 124),
        rounding=(
            (1.9375 * 2.0 ** 124, INF, 1.875 * 2.0 ** 124),   # tie, m = 7 odd: up to inf
            (2.0 ** -133, 0.0, 0.0),                          # tie 0 / 2^-132 -> 0
            (3 * 2.0 ** -133, 2.0 ** -131, 2.0 ** -131),      # tie codes 1 / 2 -> 2
            (2.0 ** -129 * (1 + 1 / 16), 2.0 ** -129, 2.0 ** -129),  # tie m = 0 / 1
            (7.5 * 2.0 ** -132, 2.0 ** -129, 2.0 ** -129),    # top subnormal 7 / min normal 8
        )),
    # e4m3fin: bias 7, every code finite: max 2^(15-7) * (1 + 7/8) = 480 (code 127);
    # min normal 2^-6 (code 8), min subnormal 2^(-6-3) = 2^-9 (code 1); 8 bits, sign 128
    "e4m3fin": Hand(
        4, 3, 7, Convention.FINITE, 8, 480.0, 2.0 ** -6, 2.0 ** -9,
        codes=((480.0, 127), (-480.0, 255), (448.0, 126), (2.0 ** -6, 8), (2.0 ** -9, 1),
               (0.0, 0), (-0.0, 128), (NAN, None)),
        inf_in=(480.0, 480.0),
        rounding=(
            (464.0, 448.0, 448.0),        # tie 448 (m = 6, even) / 480 -> 448
            (472.0, 480.0, 480.0),        # a number here (OCP e4m3fn's NaN code)
            (496.0, 480.0, 480.0),        # tie 480 (m = 7) / 512 -> 512 > max -> max
            (2.0 ** -10, 0.0, 0.0),       # tie 0 / 2^-9 -> 0
            (3 * 2.0 ** -10, 2.0 ** -8, 2.0 ** -8),   # tie codes 1 / 2 -> 2
            (7.5 * 2.0 ** -9, 2.0 ** -6, 2.0 ** -6),  # tie top subnormal (7) / min normal
            (7.25 * 2.0 ** -9, 7 * 2.0 ** -9, 7 * 2.0 ** -9),
        )),
    # e5m7: IEEE, bias 15: max 2^15 * (1 + 127/128) = 65280 (code 30 << 7 | 127 = 3967);
    # min normal 2^-14 (code 128), min subnormal 2^(-14-7) = 2^-21 (code 1); 13 bits ->
    # int32 codes, sign 4096, inf 31 << 7 = 3968, -inf 8064, NaN 3968 | 64 = 4032
    "e5m7": Hand(
        5, 7, 15, Convention.IEEE, 13, 65280.0, 2.0 ** -14, 2.0 ** -21,
        codes=((65280.0, 3967), (-65280.0, 8063), (2.0 ** -14, 128), (2.0 ** -21, 1),
               (INF, 3968), (-INF, 8064), (0.0, 0), (-0.0, 4096), (NAN, 4032)),
        inf_in=(INF, 65280.0),
        rounding=(
            (65408.0, INF, 65280.0),      # tie 65280 (m = 127, odd) / 65536 = inf
            (65407.0, 65280.0, 65280.0),
            (2.0 ** -22, 0.0, 0.0),
            (3 * 2.0 ** -22, 2.0 ** -20, 2.0 ** -20),
            (127.5 * 2.0 ** -21, 2.0 ** -14, 2.0 ** -14),   # top subnormal 127 / min normal
            (1 + 2.0 ** -8, 1.0, 1.0),                     # tie m = 0 / m = 1 -> 0
            (1 + 3 * 2.0 ** -8, 1 + 2.0 ** -6, 1 + 2.0 ** -6),   # tie m = 1 / m = 2 -> 2
        )),
    # e4m4fn: bias 7, only S.1111.1111 is NaN: max 2^8 * (1 + 14/16) = 480 (code 254);
    # min normal 2^-6 (code 16), min subnormal 2^(-6-4) = 2^-10 (code 1); 9 bits ->
    # int32 codes, sign 256, NaN 255
    "e4m4fn": Hand(
        4, 4, 7, Convention.FN, 9, 480.0, 2.0 ** -6, 2.0 ** -10,
        codes=((480.0, 254), (-480.0, 510), (2.0 ** -6, 16), (2.0 ** -10, 1), (0.0, 0),
               (-0.0, 256), (NAN, 255)),
        inf_in=(NAN, 480.0),
        rounding=(
            (488.0, 480.0, 480.0),        # tie 480 (m = 14, even) / 496 (NaN code) -> 480
            (488.5, NAN, 480.0),          # above: 496 is past max
            (2.0 ** -11, 0.0, 0.0),
            (3 * 2.0 ** -11, 2.0 ** -9, 2.0 ** -9),
            (15.5 * 2.0 ** -10, 2.0 ** -6, 2.0 ** -6),   # top subnormal 15 / min normal
        )),
    # e3m3fin: bias 3, every code finite: max 2^(7-3) * (1 + 7/8) = 30 (code 63); min
    # normal 2^-2 (code 8), min subnormal 2^(-2-3) = 2^-5 (code 1); 7 bits, sign 64
    "e3m3fin": Hand(
        3, 3, 3, Convention.FINITE, 7, 30.0, 0.25, 2.0 ** -5,
        codes=((30.0, 63), (-30.0, 127), (0.25, 8), (2.0 ** -5, 1), (0.0, 0), (-0.0, 64),
               (NAN, None)),
        inf_in=(30.0, 30.0),
        rounding=(
            (31.0, 30.0, 30.0),           # tie 30 (m = 7) / 32 -> 32 > max -> max
            (29.0, 28.0, 28.0),           # tie 28 (m = 6, even) / 30 -> 28
            (2.0 ** -6, 0.0, 0.0),
            (3 * 2.0 ** -6, 2.0 ** -4, 2.0 ** -4),
            (7.5 * 2.0 ** -5, 0.25, 0.25),              # top subnormal 7 / min normal
        )),
    # e4m3b9: IEEE, bias 9: e = 15 is inf/NaN, max 2^(14-9) * (1 + 7/8) = 60 (code 119);
    # min normal 2^(1-9) = 2^-8 (code 8), min subnormal 2^(-8-3) = 2^-11 (code 1);
    # 8 bits, sign 128, inf 15 << 3 = 120, -inf 248, NaN 120 | 4 = 124
    "e4m3b9": Hand(
        4, 3, 9, Convention.IEEE, 8, 60.0, 2.0 ** -8, 2.0 ** -11,
        codes=((60.0, 119), (-60.0, 247), (2.0 ** -8, 8), (2.0 ** -11, 1), (INF, 120),
               (-INF, 248), (0.0, 0), (-0.0, 128), (NAN, 124)),
        inf_in=(INF, 60.0),
        rounding=(
            (62.0, INF, 60.0),            # tie 60 (m = 7, odd) / 64 = inf
            (61.9, 60.0, 60.0),
            (2.0 ** -12, 0.0, 0.0),
            (3 * 2.0 ** -12, 2.0 ** -10, 2.0 ** -10),
            (7.5 * 2.0 ** -11, 2.0 ** -8, 2.0 ** -8),   # top subnormal 7 / min normal
            (6.5 * 2.0 ** -11, 6 * 2.0 ** -11, 6 * 2.0 ** -11),   # tie 6 (even) / 7
        )),
}
NAMES = list(FORMATS)


def same(got: float, want: float) -> bool:
    """Equal values, NaN matching NaN, and the sign of zero checked."""
    if math.isnan(want):
        return math.isnan(got)
    return got == want and math.copysign(1.0, got) == math.copysign(1.0, want)


@pytest.mark.parametrize("name", NAMES)
def test_fields_match_the_definition(name):
    h, f = FORMATS[name], get_format(name)
    assert (f.ebits, f.mbits, f.bias, f.convention, f.bits) == (
        h.ebits, h.mbits, h.bias, h.convention, h.bits)
    assert (f.max, f.min_normal, f.min_subnormal) == (h.max, h.min_normal, h.min_subnormal)
    assert f.has_inf == any(math.isinf(v) for v, _ in h.codes)
    assert f.has_nan == any(math.isnan(v) and c is not None for v, c in h.codes)
    assert f.has_negative_zero == (h.convention is not Convention.FNUZ)
    assert f.name == name                        # the printed name parses back


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", NAMES)
def test_limits_are_values_and_neighbours_round_to_them(name, dtype, backend):
    h = FORMATS[name]
    # max, min normal, min subnormal and their negatives are values: quantize keeps them
    keep = [h.max, -h.max, h.min_normal, -h.min_normal, h.min_subnormal, -h.min_subnormal]
    x = torch.tensor(keep, dtype=dtype)
    assert quantize(x, name, backend=backend).tolist() == keep
    # just inside half a step they round back; half the smallest step rounds to zero
    near = torch.tensor([h.max * (1 + 2.0 ** -(h.mbits + 3)), h.min_subnormal * 0.75,
                         h.min_subnormal * 0.5 * (1 - 2.0 ** -10)], dtype=dtype)
    got = quantize(near, name, backend=backend).tolist()
    assert got == [h.max, h.min_subnormal, 0.0]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_codes_encode_and_decode(name, backend):
    h = FORMATS[name]
    known = [(v, c) for v, c in h.codes if c is not None]
    values = torch.tensor([v for v, _ in known], dtype=torch.float32)
    codes = encode(values, name, backend=backend)
    assert codes.dtype == (torch.uint8 if h.bits <= 8 else torch.int32)
    assert codes.tolist() == [c for _, c in known]
    # decode: each code back to its value (fnuz's -0 shares code 0 with +0: listed once)
    first = [(v, c) for i, (v, c) in enumerate(known) if c not in [k for _, k in known[:i]]]
    back = decode(torch.tensor([c for _, c in first], dtype=codes.dtype), name,
                  dtype=torch.float64).tolist()
    assert all(same(g, v) for g, v in zip(back, [v for v, _ in first])), back
    if any(c is None for v, c in h.codes):     # no NaN code: encoding a NaN is an error
        with pytest.raises(ValueError, match="no NaN code"):
            encode(torch.tensor([1.0, NAN]), name, backend=backend)


@pytest.mark.parametrize("name", NAMES)
def test_every_nan_code_decodes_to_nan(name):
    # NaN codes from the definition: ieee (M > 0): exponent all ones, any mantissa but 0;
    # fn: S.1..1.1..1 both signs; fnuz: 1.0..0 only; fin, and ieee with M = 0: none.
    h, width = FORMATS[name], FORMATS[name].ebits + FORMATS[name].mbits
    all_codes = torch.arange(1 << h.bits, dtype=torch.int32 if h.bits > 8 else torch.uint8)
    top = ((1 << h.ebits) - 1) << h.mbits
    mag = all_codes.long() & ((1 << width) - 1)
    if h.convention is Convention.IEEE:
        want = (mag > top)
    elif h.convention is Convention.FN:
        want = mag == (1 << width) - 1
    elif h.convention is Convention.FNUZ:
        want = all_codes.long() == 1 << width
    else:
        want = torch.zeros_like(mag, dtype=torch.bool)
    assert torch.equal(decode(all_codes, name).isnan(), want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_rounding_cases(name, backend):
    h = FORMATS[name]
    xs = [x for x, _, _ in h.rounding]
    for dtype in (torch.float32, torch.float64):
        x = torch.tensor(xs, dtype=dtype)
        for saturate, col in ((False, 1), (True, 2)):
            got = quantize(x, name, saturate=saturate, backend=backend).tolist()
            want = [case[col] for case in h.rounding]
            bad = [(xi, g, w) for xi, g, w in zip(xs, got, want) if not same(g, w)]
            assert not bad, (name, dtype, saturate, bad)
            # the rounding is odd-symmetric except where fnuz drops the -0
            neg = quantize(-x, name, saturate=saturate, backend=backend).tolist()
            for g, w in zip(neg, want):
                w = -w if not (w == 0 and h.convention is Convention.FNUZ) else 0.0
                assert same(g, w), (name, g, w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", NAMES)
def test_inf_nan_and_signed_zero_inputs(name, backend):
    h = FORMATS[name]
    for saturate, want in zip((False, True), h.inf_in):
        got = quantize(torch.tensor([INF, -INF, NAN, -0.0]), name, saturate=saturate,
                       backend=backend).tolist()
        neg = want if math.isnan(want) else -want
        zero = 0.0 if h.convention is Convention.FNUZ else -0.0
        assert same(got[0], want) and same(got[1], neg) and math.isnan(got[2])
        assert same(got[3], zero)
