"""The aligned (Hopper-class FP8 tensor-core) accumulator model of mixprec.accum.

Oracles: hand-computed cases of the rule, a scalar reimplementation of the rule in exact
rational arithmetic (fractions.Fraction, math.frexp) written from the formula and not
from the vectorised code, numpy float32 loops for the promoted accumulator, and
ml_dtypes for the E4M3 operands.
"""
import math
from fractions import Fraction

import ml_dtypes
import numpy as np
import pytest
import torch

import mixprec
from mixprec.accum import matmul_accum, sum_accum
from mixprec.recipe import AccumulationConfig, format_recipe, parse_recipe


def aligned(**kw) -> AccumulationConfig:
    return AccumulationConfig(mode="aligned", **kw)


def t(*values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Hand-computed cases (mantissa_bits m = 13: 14 significant bits, last place of 1.0 = 2^-13)
# --------------------------------------------------------------------------------------
CASES = [
    # small addend against a large running max: 1.5 * 2^-14 = 0.75 of the last place of 1
    ("truncated against running max", (1.0, 1.5 * 2 ** -14), dict(group=1), 1.0),
    ("rounded against running max", (1.0, 1.5 * 2 ** -14), dict(group=1, align="round"),
     1 + 2 ** -13),
    # exactly half a place: round-half-even keeps 1.0
    ("half a place ties to even", (1.0, 2 ** -14), dict(group=1, align="round"), 1.0),
    # one place is kept exactly
    ("one place survives", (1.0, 2 ** -13), dict(group=1), 1 + 2 ** -13),
    # truncation acts on each addend's magnitude: a negative 0.75 place is cut to 0 too
    ("negative addend cut toward zero", (1.0, -1.5 * 2 ** -14), dict(group=1), 1.0),
    # the carry: 8193 + 8192 places of 2^-13 = 2 + 2^-13 needs 15 bits; normalised to 14
    # bits at exponent 1 (place 2^-12) it is 8192.5 places -> 8192 (truncate and round-even)
    ("carry renormalised", (1 + 2 ** -13, 1.0), dict(group=1), 2.0),
    ("carry renormalised, round", (1 + 2 ** -13, 1.0), dict(group=1, align="round"), 2.0),
    # within one group every addend is aligned to the group's max before the addition:
    # four addends of 0.75 places vanish next to 1.0 (FP32 would give 1 + 3 * 2^-13)
    ("group aligned to its max", (1.0,) + (0.75 * 2 ** -13,) * 4, dict(group=5), 1.0),
    # the same four small products summed first in their own group are exact (3 * 2^-13);
    # then 1.0 arrives with a sum that is a whole number of places
    ("small group first", (0.75 * 2 ** -13,) * 4 + (1.0,), dict(group=4), 1 + 3 * 2 ** -13),
    # promotion: 1 and 16 x 2^-14 in intervals of 8: [1, 7 small] -> 1 (each small cut),
    # [8 small] -> 2^-11 (same exponent, exact), [1 small] -> 2^-14; FP32 adds the three
    ("never promoted", (1.0,) + (2 ** -14,) * 16, dict(group=1, promote=None), 1.0),
    ("promoted every 8", (1.0,) + (2 ** -14,) * 16, dict(group=1, promote=8),
     1 + 2 ** -11 + 2 ** -14),
    ("promoted every product", (1.0,) + (2 ** -14,) * 16, dict(group=1, promote=1), 1 + 2 ** -10),
    # fewer bits: with m = 3 (4 significant bits) 1 + 2^-3 survives, 1 + 2^-4 does not
    ("m=3 keeps 2^-3", (1.0, 2 ** -3), dict(group=1, mantissa_bits=3), 1.125),
    ("m=3 drops 2^-4", (1.0, 2 ** -4), dict(group=1, mantissa_bits=3), 1.0),
    ("all zeros", (0.0, 0.0, 0.0), dict(group=2), 0.0),
]


@pytest.mark.parametrize("name,terms,kw,expected", CASES, ids=[c[0] for c in CASES])
def test_hand_computed(name, terms, kw, expected):
    got = sum_accum(t(*terms), aligned(**kw))
    assert got.item() == expected


def test_promotion_resets_the_error_of_a_long_sum():
    # 1 followed by 4096 terms of 0.75 places: without promotion every one is cut to 0;
    # promoted every 128, each later interval sums its 128 small terms exactly
    x = t(1.0, *([0.75 * 2 ** -13] * 4096))
    never = sum_accum(x, aligned(promote=None)).item()
    every = sum_accum(x, aligned(promote=128)).item()
    exact = 1 + 4096 * 0.75 * 2 ** -13
    assert never == 1.0
    # the first interval (1 and 127 small terms) loses its 127 small terms, nothing else
    assert every == 1 + (4096 - 127) * 0.75 * 2 ** -13
    assert abs(every - exact) < abs(never - exact) / 30


# --------------------------------------------------------------------------------------
# A scalar reimplementation of the rule in exact arithmetic
# --------------------------------------------------------------------------------------
def _exp(v: Fraction) -> int:
    return math.frexp(float(v))[1] - 1     # float(v) is exact: at most 53 bits here


def _cut(v: Fraction, place: Fraction, align: str) -> Fraction:
    q = v / place
    return Fraction(int(q) if align == "truncate" else round(q)) * place   # round(): half-even


def ref_aligned(terms, *, mantissa_bits=13, align="truncate", group=32, promote=128):
    terms = [Fraction(float(v)) for v in terms]
    interval = promote or len(terms)
    acc = None
    for start in range(0, len(terms), interval):
        chunk, s = terms[start:start + interval], Fraction(0)
        for g0 in range(0, len(chunk), group):
            vals = [s] + chunk[g0:g0 + group]
            nonzero = [v for v in vals if v != 0]
            if not nonzero:
                s = Fraction(0)
                continue
            place = Fraction(2) ** (max(_exp(v) for v in nonzero) - mantissa_bits)
            total = sum(_cut(v, place, align) for v in vals)
            s = total if total == 0 else _cut(total, Fraction(2) ** (_exp(total) - mantissa_bits),
                                              align)
        acc = np.float32(float(s)) if acc is None else acc + np.float32(float(s))   # float32 adds
    return acc


def e4m3(rng, *shape, scale=1.0) -> np.ndarray:
    return (rng.standard_normal(shape) * scale).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)


@pytest.mark.parametrize("kw", [dict(), dict(align="round"), dict(group=1, promote=None),
                                dict(group=4, promote=10), dict(mantissa_bits=7, group=3, promote=None),
                                dict(mantissa_bits=20, group=32, promote=16)],
                         ids=["default", "round", "g1-never", "g4-p10", "m7-g3", "m20-p16"])
def test_matmul_matches_exact_scalar_reference(kw):
    rng = np.random.default_rng(7)
    a, b = e4m3(rng, 3, 301, scale=8.0), e4m3(rng, 301, 2)
    got = matmul_accum(torch.from_numpy(a), torch.from_numpy(b), aligned(**kw))
    for i in range(3):
        for j in range(2):
            prods = [float(a[i, p]) * float(b[p, j]) for p in range(301)]   # exact in float64
            assert got[i, j].item() == float(ref_aligned(prods, **kw)), (i, j)


def test_row_blocks_give_the_same_bits():
    # the row blocking that bounds memory must not change any result
    rng = np.random.default_rng(3)
    a, b = torch.from_numpy(e4m3(rng, 70, 512)), torch.from_numpy(e4m3(rng, 512, 300))
    acc = aligned(group=32, promote=None)
    whole = matmul_accum(a, b, acc)
    rows = torch.cat([matmul_accum(a[i:i + 1], b, acc) for i in range(0, 70, 7)])
    assert torch.equal(whole[::7], rows)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_promote_every_product_is_fp32_accumulation_of_exact_products(seed):
    rng = np.random.default_rng(seed)
    a, b = e4m3(rng, 4, 200, scale=4.0), e4m3(rng, 200, 3)
    got = matmul_accum(torch.from_numpy(a), torch.from_numpy(b),
                       aligned(promote=1, mantissa_bits=7, group=32))
    for i in range(4):
        for j in range(3):
            acc = np.float32(np.float64(a[i, 0]) * np.float64(b[0, j]))
            for p in range(1, 200):
                acc = acc + np.float32(np.float64(a[i, p]) * np.float64(b[p, j]))
            assert got[i, j].item() == float(acc)


@pytest.mark.parametrize("align", ["truncate", "round"])
def test_more_mantissa_bits_error_not_larger(align):
    rng = np.random.default_rng(11)
    a, b = torch.from_numpy(e4m3(rng, 8, 1024)), torch.from_numpy(np.abs(e4m3(rng, 1024, 8)))
    ref = a.double() @ b.double()
    errs = [float((matmul_accum(a, b, aligned(mantissa_bits=m, align=align, promote=None))
                   .double() - ref).norm()) for m in range(4, 23, 2)]
    assert all(e1 <= e0 for e0, e1 in zip(errs, errs[1:])), errs
    assert errs[-1] < errs[0] / 1000


def test_products_are_exact_for_float32_operands():
    # 1 + 2^-23 squared needs 47 bits: a float32 product would round it, the model does not
    x = torch.tensor([[1 + 2 ** -23]])
    got = matmul_accum(x, x, aligned(mantissa_bits=23, promote=None))
    assert got.item() == np.float32(1 + 2 ** -22)                 # 23 bits kept, truncated
    assert matmul_accum(x, x, aligned(mantissa_bits=23, align="round")).item() == np.float32(1 + 2 ** -22)


def test_shapes_and_dtype_follow_matmul():
    acc = aligned(group=4, promote=8)
    a, b = torch.randn(2, 3, 5, 10).bfloat16(), torch.randn(10, 4).bfloat16()
    out = matmul_accum(a, b, acc)
    assert out.shape == (2, 3, 5, 4) and out.dtype == torch.bfloat16
    assert torch.equal(out[1, 2], matmul_accum(a[1, 2], b, acc))
    v = torch.randn(10)
    assert matmul_accum(v, v, acc).shape == ()
    assert matmul_accum(v, v, acc).item() == sum_accum(v * v, acc).item()   # exact products


# --------------------------------------------------------------------------------------
# Configuration and the emulated GEMMs
# --------------------------------------------------------------------------------------
def test_recipe_grammar_round_trips():
    text = ("fp8-hybrid:accumulation.mode=aligned,accumulation.mantissa_bits=13,"
            "accumulation.promote=128")
    r = parse_recipe(text)
    assert r.accumulation == aligned(mantissa_bits=13, promote=128)
    assert not r.accumulation.is_fp32
    assert format_recipe(r) == "fp8-hybrid:accumulation.mode=aligned"   # 13 and 128 are defaults
    for text in ("fp8-hybrid:accumulation.mode=aligned,accumulation.promote=none,"
                 "accumulation.align=round,accumulation.group=4,accumulation.mantissa_bits=10",):
        r = parse_recipe(text)
        assert r.accumulation.promote is None and r.accumulation.group == 4
        assert parse_recipe(format_recipe(r)) == r
    assert parse_recipe("fp8-hybrid:accumulation.mode=aligned,accumulation.promote=never") \
        .accumulation.promote is None


@pytest.mark.parametrize("kw,match", [
    (dict(mode="pairwise"), r"mode 'pairwise'.*sequential, aligned"),
    (dict(mode="aligned", align="stochastic"), r"align 'stochastic'.*truncate, round"),
    (dict(mode="aligned", mantissa_bits=24), r"mantissa_bits.*1\.\.23.*24"),
    (dict(mode="aligned", mantissa_bits=0), r"mantissa_bits.*0"),
    (dict(mode="aligned", group=0), r"group.*0"),
    (dict(mode="aligned", promote=0), r"promote.*None.*0"),
    (dict(mode="aligned", format="fp16"), r"format='fp16'.*sequential"),
    (dict(mode="aligned", chunk=64), r"chunk=64.*sequential"),
])
def test_bad_configuration_raises(kw, match):
    with pytest.raises(ValueError, match=match):
        AccumulationConfig(**kw)


def test_emulated_linear_uses_the_aligned_accumulator():
    # a Linear under fp8-hybrid with the aligned accumulator: promote=1 and 23 bits equal
    # an FP32 accumulation up to summation order; 4 bits without promotion visibly differ
    x = torch.randn(8, 256, generator=torch.Generator().manual_seed(0))

    def run(text):
        torch.manual_seed(1)          # the same weights and bias in every run
        model = torch.nn.Sequential(torch.nn.Linear(256, 16))
        mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             recipe=text, keep_high_precision=())
        with mp.autocast():
            return model(x).detach().float()

    fp32_acc = run("fp8-hybrid")
    promoted = run("fp8-hybrid:accumulation.mode=aligned,accumulation.promote=1")
    narrow = run("fp8-hybrid:accumulation.mode=aligned,accumulation.mantissa_bits=4,"
                 "accumulation.promote=none")
    torch.manual_seed(1)
    w = torch.nn.Linear(256, 16).weight.detach()
    # two float32 accumulations of the same exact products differ by at most
    # 2 K u sum|p| (u = 2^-24); E4M3 operands are within 1/16 of x and w
    bound = 2 * 256 * 2.0 ** -24 * (x.abs() @ w.abs().T) * (17 / 16) ** 2
    assert ((promoted - fp32_acc).abs() <= bound).all()
    assert ((narrow - fp32_acc).abs() > 100 * bound).any()


def test_convolution_rejects_the_aligned_mode():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 2, 1))
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         recipe="fp8-hybrid:accumulation.mode=aligned", keep_high_precision=())
    with pytest.raises(ValueError, match="aligned accumulator.*linear and matmul only.*"
                                         "mode=sequential"):
        with mp.autocast():
            model(torch.randn(1, 2, 4, 4))
