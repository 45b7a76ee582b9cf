"""Stochastic rounding: neighbours, unbiasedness, reproducibility, identical kernels.

Neighbours come from the float64 reference (test_quant_reference.py).  The bias test
rounds one value many times: the K results are independent draws of lo or hi with
P(hi) = (x - lo) / (hi - lo), so the mean has standard deviation
sqrt((hi - x)(x - lo) / K), and we allow 6 of them.  Seeds are fixed, so the test is
deterministic; a correct kernel fails it with probability ~2e-9 per seed.
"""
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from mixprec.formats import get_format
from mixprec.quant import has_c_extension, quantize
from test_quant_reference import fmt_max, neighbours

BACKENDS = ["c", "torch"] if has_c_extension() else ["torch"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "e3m2", "e4m3fnuz", "e6m9", "e3m0fn",
                                  "bf16", "fp16", "e8m3b130"])
def test_result_is_one_of_the_two_neighbours(name, backend):
    fmt = get_format(name)
    rng = np.random.default_rng(3)
    lo_e, hi_e = math.log2(fmt.min_subnormal) - 4, math.log2(fmt_max(fmt))
    x = rng.choice([-1.0, 1.0], 3000) * np.exp2(rng.uniform(lo_e, hi_e, 3000))
    x = x.astype(np.float32)
    got = quantize(torch.from_numpy(x), name, rounding="stochastic", generator=gen(0),
                   backend=backend).numpy()
    for xi, gi in zip(x.astype(np.float64), got.astype(np.float64)):
        _, lo, hi = neighbours(name, abs(xi))
        assert abs(gi) in (lo, hi) and (gi == 0 or math.copysign(1, gi) == math.copysign(1, xi)), \
            (xi, gi, lo, hi)
    # that both neighbours occur, with the right odds, is test_frequency_of_the_upper_neighbour's


# (format, x, what): normal range, a tie, the subnormal range, below the smallest
# subnormal, and a value whose up-probability is 2^-10.
BIAS_CASES = [("e4m3", 1.3, "normal"), ("e4m3", 1.0625, "tie"), ("e4m3", 0.0041, "subnormal"),
              ("e4m3", 2.0 ** -9 / 3, "below min subnormal"), ("e5m2", 3.0e-6, "subnormal"),
              ("e5m2", 2.0 ** -16 * 2.0 ** -10, "P(up) = 2^-10"), ("e2m1", 5.1, "top binade"),
              ("e2m1", -0.3, "negative subnormal"), ("fp16", 1.0 + 2.0 ** -13, "fp16"),
              ("e8m0", 3.3, "e8m0"), ("e6m9", 1e-11, "custom subnormal")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,x,what", BIAS_CASES, ids=[c[2] + "-" + c[0] for c in BIAS_CASES])
def test_unbiased(name, x, what, backend):
    k = 1 << 18 if backend == "c" else 1 << 14
    xs = torch.full((k,), x, dtype=torch.float64)
    got = quantize(xs, name, rounding="stochastic", generator=gen(1), backend=backend)
    _, lo, hi = neighbours(name, abs(x))
    lo, hi = math.copysign(lo, x), math.copysign(hi, x)
    assert set(got.unique().tolist()) <= {lo, hi}
    sd = math.sqrt(abs((hi - x) * (x - lo)) / k)
    assert abs(got.mean().item() - x) <= 6 * sd + 1e-300, (got.mean().item(), x, sd)
    assert (got == hi).any() and (got == lo).any()


# -- both neighbours and their exact probabilities ----------------------------------------
# x between two neighbouring values lo < x < hi of the format, written out by hand.  Each
# output must be lo or hi, and the number of hi among N draws is Binomial(N, p) with
# p = (x - lo) / (hi - lo) computed exactly (Fraction).  We allow 6 standard deviations:
# a correct kernel fails with probability ~2e-9 (and the seeds are fixed).  With N = 2^18
# six sigma is at most 6 * sqrt(N / 4) / N = 0.0059, so a rounding whose P(hi) is off by
# 1/64 = 0.0156 lands at least 10 sigma outside the bound: the checker rejects it, as it
# rejects nearest and toward-zero rounding (test_the_frequency_check_rejects_...).
N_DRAWS = 1 << 18
SR_CASES = [
    # (format, lo, x, hi)                           what
    ("fp16", 1.0, 1 + 77 * 2.0 ** -18, 1 + 2.0 ** -10),  # ulp 2^-10 at 1; p = 77/256
    ("fp16", -6 * 2.0 ** -24, -5.6875 * 2.0 ** -24, -5 * 2.0 ** -24),  # subnormal, p = 5/16
    ("bf16", 3.0, 3 + 0.75 * 2.0 ** -6, 3 + 2.0 ** -6),  # ulp 2^-6 in [2, 4); p = 3/4
    ("bf16", 2 * 2.0 ** -133, 2.25 * 2.0 ** -133, 3 * 2.0 ** -133),  # subnormal, p = 1/4
    ("e5m2", -12.0, -10.5, -10.0),                       # ulp 2 in [8, 16); p = 3/4
    ("e5m2", 2 * 2.0 ** -16, 2.625 * 2.0 ** -16, 3 * 2.0 ** -16),  # subnormal, p = 5/8
    ("e4m3", 288.0, 300.0, 320.0),                       # ulp 32 in [256, 448]; p = 3/8
    ("e4m3", -4 * 2.0 ** -9, -3.203125 * 2.0 ** -9, -3 * 2.0 ** -9),  # subnormal, p = 51/64
    ("e4m3", 0.0, 2.0 ** -11, 2.0 ** -9),                # below min subnormal, p = 1/4
    ("e2m1", 4.0, 4.625, 6.0),                           # top binade, ulp 2; p = 5/16
    ("e2m1", -0.5, -0.3125, -0.0),                       # subnormal 0.5 to -0; p = 3/8
]
SR_IDS = [f"{f}-{x:.4g}" for f, _, x, _ in SR_CASES]


def assert_sr_frequency(got: torch.Tensor, lo: float, x: float, hi: float,
                        sigmas: float = 6.0) -> None:
    """Every value of ``got`` is lo or hi, and #hi is within ``sigmas`` sd of N * p."""
    v = got.double().flatten()
    assert bool(((v == lo) | (v == hi)).all()), sorted(set(v.tolist()) - {lo, hi})[:4]
    n, k = v.numel(), int((v == hi).sum())
    p = (Fraction(x) - Fraction(lo)) / (Fraction(hi) - Fraction(lo))
    sd = math.sqrt(n * p * (1 - p))
    assert sigmas * sd / n < 1 / 128, "too few draws to tell a 1/64 bias"
    assert abs(k - n * p) <= sigmas * sd, (k / n, float(p), sd / n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name,lo,x,hi", SR_CASES, ids=SR_IDS)
def test_frequency_of_the_upper_neighbour(name, lo, x, hi, dtype, backend):
    xs = torch.full((N_DRAWS,), x, dtype=dtype)
    assert xs[0].item() == x        # every case is exact in float32
    got = quantize(xs, name, rounding="stochastic", generator=gen(21), backend=backend)
    assert_sr_frequency(got, lo, x, hi)


def _biased(xs, name, lo, hi):
    """Stochastic rounding whose P(hi) is 1/64 too high: it rounds x + (hi - lo) / 64."""
    return quantize(xs.double() + (hi - lo) / 64, name, rounding="stochastic",
                    generator=gen(22))


SUBSTITUTES = {
    "nearest": lambda xs, name, lo, hi: quantize(xs, name),
    "toward_zero": lambda xs, name, lo, hi: quantize(xs, name, rounding="toward_zero"),
    "biased": _biased,
}


@pytest.mark.parametrize("substitute", list(SUBSTITUTES))
@pytest.mark.parametrize("name,lo,x,hi", SR_CASES, ids=SR_IDS)
def test_the_frequency_check_rejects_other_roundings(name, lo, x, hi, substitute):
    xs = torch.full((N_DRAWS,), x)
    got = SUBSTITUTES[substitute](xs, name, lo, hi)
    # each lands on a neighbour: only the odds give it away
    assert set(got.double().unique().tolist()) <= {lo, hi}
    with pytest.raises(AssertionError, match=r"^\("):
        assert_sr_frequency(got, lo, x, hi)


def test_probability_is_exact_far_below_the_smallest_subnormal():
    # x = 2^-16 * 2^-16 in e5m2 rounds up to 2^-16 with probability 2^-16; with 2^22
    # draws the count of ups is ~Poisson(64): P(count outside [24, 112]) < 1e-7
    x = torch.full((1 << 22,), 2.0 ** -32)
    ups = int((quantize(x, "e5m2", rounding="stochastic", generator=gen(2)) > 0).sum())
    assert 24 <= ups <= 112


@pytest.mark.parametrize("backend", BACKENDS)
def test_reproducible_with_a_generator(backend):
    x = torch.randn(5000, generator=gen(0)) * 10
    a = quantize(x, "e5m2", rounding="stochastic", generator=gen(42), backend=backend)
    b = quantize(x, "e5m2", rounding="stochastic", generator=gen(42), backend=backend)
    c = quantize(x, "e5m2", rounding="stochastic", generator=gen(43), backend=backend)
    assert torch.equal(a, b) and not torch.equal(a, c)
    g = gen(7)   # a generator advances: two calls differ
    assert not torch.equal(quantize(x, "e5m2", rounding="stochastic", generator=g),
                           quantize(x, "e5m2", rounding="stochastic", generator=g))


def test_manual_seed_governs_the_default():
    x = torch.randn(5000, generator=gen(0)) * 10
    torch.manual_seed(123)
    a = quantize(x, "e4m3", rounding="stochastic")
    torch.manual_seed(123)
    b = quantize(x, "e4m3", rounding="stochastic")
    torch.manual_seed(124)
    c = quantize(x, "e4m3", rounding="stochastic")
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.skipif(not has_c_extension(), reason="C extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "e3m2", "e5m2fnuz", "e6m9", "bf16",
                                  "fp16", "e3m0fn", "e8m3b130", "tf32"])
def test_c_path_equals_torch_path(dtype, name):
    rng = np.random.default_rng(9)
    x = rng.choice([-1.0, 1.0], 20000) * np.exp2(rng.uniform(-40, 20, 20000))
    x = torch.from_numpy(x).to(dtype)
    for saturate in (False, True):
        c = quantize(x, name, rounding="stochastic", saturate=saturate, generator=gen(5),
                     backend="c")
        t = quantize(x, name, rounding="stochastic", saturate=saturate, generator=gen(5),
                     backend="torch")
        same = (c == t) | (torch.isnan(c) & torch.isnan(t))
        assert same.all(), (x[~same][:4], c[~same][:4], t[~same][:4])


def test_random_bits_follow_the_logical_index_not_the_layout():
    x = torch.randn(96, 64, generator=gen(0)) * 5
    want = quantize(x, "e4m3", rounding="stochastic", generator=gen(8))
    got = quantize(x.t().contiguous().t(), "e4m3", rounding="stochastic", generator=gen(8))
    assert torch.equal(got, want)


def test_float32_and_float64_copies_draw_the_same_decisions():
    # the threshold low * 2^(63 - shift) does not depend on the working precision
    x = torch.randn(20000, generator=gen(0)) * 3
    a = quantize(x, "e5m2", rounding="stochastic", generator=gen(4))
    b = quantize(x.double(), "e5m2", rounding="stochastic", generator=gen(4))
    assert torch.equal(a.double(), b)


def test_overflow_follows_nearest_rules():
    # 470 lies between 448 and the NaN code 480: rounding up overflows like nearest does
    x = torch.full((4000,), 470.0)
    q = quantize(x, "e4m3", rounding="stochastic", generator=gen(6))
    assert set(q[~q.isnan()].unique().tolist()) == {448.0} and q.isnan().any()
    q = quantize(x, "e4m3", rounding="stochastic", saturate=True, generator=gen(6))
    assert set(q.unique().tolist()) == {448.0}


# -- the random bits, from their definition ----------------------------------------------
M64 = (1 << 64) - 1


def splitmix64(state: int, k: int) -> int:
    """Output number k+1 of SplitMix64 (Steele, Lea, Flood 2014) started at state."""
    z = (state + (k + 1) * 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def test_splitmix64_reference_value():
    # the first output of SplitMix64 from state 0 in the reference implementation
    assert splitmix64(0, 0) == 0xE220A8397B1DCDAF


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("in_place", [False, True])
def test_decisions_follow_the_documented_random_bits(backend, in_place):
    # r_i = 0.(A_i: 31 bits)(B_i: 63 bits); up iff r_i < low / 2^shift.  Build float64
    # values in [1, 2) whose top 31 dropped bits equal A_i, so that B_i decides: e5m2
    # keeps 2 of the 52 mantissa bits (shift 50), 19 bits lie below A's 31.
    n, seed = 256, int(torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64,
                                     generator=gen(77))) & M64
    rng = np.random.default_rng(0)
    words = [splitmix64(seed, i // 2) >> (32 * (i % 2)) & 0xFFFFFFFF for i in range(n)]
    x, want = [], []
    for i in range(n):
        kept, a, rem = int(rng.integers(0, 4)), words[i] >> 1, int(rng.integers(0, 1 << 19))
        mant = kept << 50 | a << 19 | rem
        x.append(1.0 + mant / 2.0 ** 52)
        b = splitmix64(seed ^ 0xD1B54A32D192ED03, i) >> 1
        want.append(1.0 + (kept + (b < rem << 44)) / 4)
    xt = torch.tensor(x, dtype=torch.float64)
    got = quantize(xt, "e5m2", rounding="stochastic", generator=gen(77), backend=backend,
                   out=xt if in_place else None)
    assert got.tolist() == want
    # where A alone decides: all 50 dropped bits set, top = 2^31 - 1, up iff A < top
    # (or A == top and B < (2^19 - 1) << 44)
    ones = torch.full((n,), 1.0 + (2.0 ** 50 - 1) / 2.0 ** 52, dtype=torch.float64)
    up = quantize(ones, "e5m2", rounding="stochastic", generator=gen(77), backend=backend)
    top = (1 << 31) - 1
    assert up.tolist() == [
        1.25 if (w >> 1) < top or ((w >> 1) == top and splitmix64(
            seed ^ 0xD1B54A32D192ED03, i) >> 1 < (1 << 19) - 1 << 44) else 1.0
        for i, w in enumerate(words)]


def float32_ties(name: str, seed: int, n: int = 1 << 14):
    """(x, ties, want): float32 values, the indices where A_i ties with the top 31 bits of
    the dropped fraction (B_i decides), and the oracle's result there.

    A tie needs shift > 31: values below the format's smallest subnormal q, which round
    to 0 or q.  With A_i < 2^23 (about one element in 256), sig = A_i << e | rem is a
    24-bit significand for e = 24 - bitlength(A_i), at the binade where shift = 31 + e;
    rem >= 1, so B_i < rem << (63 - e) sends the value up to q.  Elsewhere x is random."""
    fmt = get_format(name)
    te, s0 = 1 - fmt.bias + 127, 23 - fmt.mbits
    q = 2.0 ** (1 - fmt.bias - fmt.mbits)
    rng = np.random.default_rng(1)
    bits = (rng.standard_normal(n).astype(np.float32) * 3).view(np.uint32)
    ties, want = [], []
    for i in range(n):
        a = (splitmix64(seed, i // 2) >> (32 * (i % 2)) & 0xFFFFFFFF) >> 1
        e = 24 - a.bit_length()
        if not 1 <= e or te + s0 - 31 - e < 1:
            continue
        rem = int(rng.integers(1, 1 << e))
        sig = a << e | rem
        negative = bool(rng.integers(0, 2))
        bits[i] = negative << 31 | (te + s0 - 31 - e) << 23 | (sig - (1 << 23))
        up = splitmix64(seed ^ 0xD1B54A32D192ED03, i) >> 1 < rem << (63 - e)
        ties.append(i)
        want.append((-1.0 if negative else 1.0) * (q if up else 0.0))
    return torch.from_numpy(bits.view(np.float32)), ties, want


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["fp16", "e4m3", "e2m1"])
def test_float32_ties_follow_the_documented_random_bits(backend, name):
    # float32 inputs tie only far below q (shift > 31, probability 2^-31 per such value):
    # built here, so that B_i decides as in the float64 test above
    seed = 0x0123456789ABCDEF
    x, ties, want = float32_ties(name, seed)
    got = quantize(x, name, rounding="stochastic", seed=torch.tensor(seed), backend=backend)
    assert len(ties) > 40 and 0 < sum(w != 0 for w in want) < len(want)
    assert got[ties].tolist() == want
