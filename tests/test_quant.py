"""quantize against independent oracles: ml_dtypes casts, torch's own fp16/bf16 casts,
the ONNX saturation table, and the float64 reference in test_quant_reference.py.

Comparisons are bitwise (float32 bit patterns, so -0.0 is checked) with NaN == NaN.
Both kernels run every check: "c" (mixprec/_cquant.c) and "torch" (integer torch ops).
"""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.formats import get_format
from mixprec.quant import Rounding, has_c_extension, quantize
from test_quant_reference import ML, extended, fmt_max, ref_round

BACKENDS = ["c", "torch"] if has_c_extension() else ["torch"]
ML_FORMATS = [n for n in ML if n not in ("fp16", "bf16")]
FINITE = ("e3m2", "e2m3", "e2m1")   # MX elements: no NaN code


def assert_same_bits(got: np.ndarray, want: np.ndarray, x: np.ndarray, what=""):
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    ok = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
    if not ok.all():
        bad = np.flatnonzero(~ok)[:8]
        raise AssertionError(f"{what}: {(~ok).sum()} mismatches; x={x[bad]!r} "
                             f"got={got[bad]!r} want={want[bad]!r}")


def ml_cast(x: np.ndarray, name: str) -> np.ndarray:
    with np.errstate(all="ignore"):
        return x.astype(ML[name]).astype(np.float32)


def spread_values(n: int, seed: int) -> np.ndarray:
    """sign * 2^U(-160, 130) * U[1, 2) in float32 (under/overflow included), plus random
    float32 bit patterns (every NaN payload, subnormal, inf)."""
    rng = np.random.default_rng(seed)
    with np.errstate(over="ignore"):
        spread = (rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(-160, 130, n))
                  * rng.uniform(1, 2, n)).astype(np.float32)
    patterns = rng.integers(0, 2 ** 32, n, dtype=np.uint64).astype(np.uint32)
    return np.concatenate([spread, patterns.view(np.float32)])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ML_FORMATS)
def test_random_values_match_ml_dtypes(name, backend):
    x = spread_values(1 << 15 if backend == "c" else 1 << 12, seed=7)
    got = quantize(torch.from_numpy(x), name, backend=backend).numpy()
    want = ml_cast(x, name)
    if name in FINITE:
        # ml_dtypes turns NaN into +-0 for formats without NaN; quantize keeps NaN so that
        # a NaN never disappears silently.
        assert np.isnan(got[np.isnan(x)]).all()
        keep = ~np.isnan(x)
        x, got, want = x[keep], got[keep], want[keep]
    assert_same_bits(got, want, x, f"{name}/{backend}")


def edge_table(name: str) -> list:
    """Labelled boundary values from ml_dtypes.finfo (not from mixprec)."""
    fi = ml_dtypes.finfo(ML[name])
    fmax, tiny = float(fi.max), float(fi.smallest_normal)
    sub, eps = float(fi.smallest_subnormal), float(fi.eps)     # eps = 2^-M
    top_ulp = fmax - float(np.nextafter(ML[name](fmax), ML[name](0)))
    up, down = (lambda v: float(np.nextafter(np.float32(v), np.float32(np.inf))),
                lambda v: float(np.nextafter(np.float32(v), np.float32(0))))
    rows = [("+0", 0.0), ("-0", -0.0), ("+inf", math.inf), ("-inf", -math.inf),
            ("nan", math.nan), ("max", fmax), ("-max", -fmax), ("just above max", up(fmax)),
            ("overflow tie", fmax + top_ulp / 2), ("below overflow tie", down(fmax + top_ulp / 2)),
            ("above overflow tie", up(fmax + top_ulp / 2)), ("max + ulp", fmax + top_ulp),
            ("2 max", 2 * fmax), ("-2 max", -2 * fmax), ("float32 max", 3.4028234663852886e38),
            ("min normal", tiny), ("below min normal", down(tiny)),
            ("min subnormal", sub), ("half min subnormal (tie to 0)", sub / 2),
            ("above half min subnormal", up(sub / 2)), ("below half min subnormal", down(sub / 2)),
            ("1.5 min subnormal (tie)", 1.5 * sub), ("2.5 min subnormal (tie)", 2.5 * sub),
            ("subnormal-normal tie", tiny - sub / 2), ("float32 tiny", 1e-45),
            ("float32 min normal", 2.0 ** -126)]
    for e in range(int(math.log2(tiny)), int(math.log2(fmax)) + 1):
        for k in (0, 1, 2):   # ties between mantissa codes k and k+1 of binade e
            t = 2.0 ** e * (1 + (k + 0.5) * eps) if eps < 1 else 2.0 ** e * 1.5
            rows += [(f"tie 2^{e} code {k}", t), (f"above tie 2^{e} code {k}", up(t)),
                     (f"below tie 2^{e} code {k}", down(t)), (f"-tie 2^{e} code {k}", -t)]
    return rows


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ML_FORMATS)
def test_edge_cases_match_ml_dtypes(name, backend):
    rows = [(lbl, v) for lbl, v in edge_table(name)
            if not (name in FINITE and math.isnan(v))]
    with np.errstate(over="ignore"):   # "2 max" of e8m0 is inf in float32, on purpose
        x = np.array([v for _, v in rows], dtype=np.float32)
    got = quantize(torch.from_numpy(x), name, backend=backend).numpy()
    want = ml_cast(x, name)
    bad = [(lbl, float(xi), float(g), float(w)) for (lbl, _), xi, g, w in zip(rows, x, got, want)
           if not (np.isnan(g) and np.isnan(w)) and g.view(np.uint32) != w.view(np.uint32)]
    assert not bad, bad


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,dtype", [("fp16", torch.float16), ("bf16", torch.bfloat16)])
def test_half_formats_match_torch_casts(name, dtype, backend):
    with np.errstate(over="ignore"):
        edges = np.array([v for _, v in edge_table(name)], np.float32)
    x = np.concatenate([spread_values(1 << 14, seed=3), edges])
    xt = torch.from_numpy(x)
    got = quantize(xt, name, backend=backend).numpy()
    assert_same_bits(got, xt.to(dtype).float().numpy(), x, name)
    assert_same_bits(got, ml_cast(x, name), x, name + " vs ml_dtypes")


# FACTS.md, "FP16 under nearest-even": label, input, expected
FP16_FACTS = [
    ("2^-25 becomes 0", 2.0 ** -25, 0.0),
    ("-2^-25 becomes -0", -2.0 ** -25, -0.0),
    ("just above 2^-25 rounds up to 2^-24", 2.0 ** -25 * (1 + 2.0 ** -20), 2.0 ** -24),
    ("just below 2^-24 rounds to 2^-24", 2.0 ** -24 * (1 - 2.0 ** -20), 2.0 ** -24),
    ("65520 becomes inf", 65520.0, math.inf),
    ("65519 stays 65504", 65519.0, 65504.0),
    ("1 + 2^-11 stays 1 (tie to even)", 1 + 2.0 ** -11, 1.0),
    ("1 + 1.001 * 2^-11 rounds up", 1 + 1.001 * 2.0 ** -11, 1 + 2.0 ** -10),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("label,x,want", FP16_FACTS, ids=[r[0] for r in FP16_FACTS])
def test_fp16_facts(label, x, want, backend):
    got = quantize(torch.tensor([x]), "fp16", backend=backend)
    assert got.dtype == torch.float32
    assert torch.equal(got.view(torch.int32), torch.tensor([want]).view(torch.int32))


# e8m0 from its definition (powers of two 2^-127..2^127, 0xFF NaN, no zero): nearest in
# linear distance, ties (1.5 * 2^k) away from zero, one rule down to 2^-127 included.
# Written out by hand so that it holds whatever ml_dtypes or torch version is installed.
T = 2.0 ** -127
E8M0_TABLE = [("0 -> NaN", 0.0, math.nan), ("-0 -> NaN", -0.0, math.nan),
              ("-1 -> NaN", -1.0, math.nan), ("1.5 ties up to 2", 1.5, 2.0),
              ("3.0 ties up to 4", 3.0, 4.0), ("1.49 -> 1", 1.49, 1.0), ("0.75 -> 1", 0.75, 1.0),
              ("0.74 -> 0.5", 0.74, 0.5), ("1e-40 -> 2^-127", 1e-40, T),
              ("min subnormal f32 -> 2^-127", 2.0 ** -149, T),
              ("0.75 * 2^-127 -> 2^-127", 0.75 * T, T),
              ("1.25 * 2^-127 -> 2^-127", 1.25 * T, T),
              ("1.4 * 2^-127 -> 2^-127", 1.4 * T, T),
              ("1.5 * 2^-127 ties up to 2^-126", 1.5 * T, 2 * T),
              ("1.75 * 2^-127 -> 2^-126", 1.75 * T, 2 * T),
              ("1.49 * 2^-126 -> 2^-126", 1.49 * 2 * T, 2 * T),
              ("1.5 * 2^-126 ties up to 2^-125", 1.5 * 2 * T, 4 * T),
              ("2^-127 stays", T, T), ("2^127 stays", 2.0 ** 127, 2.0 ** 127),
              ("1.49 * 2^127 -> 2^127", 1.49 * 2.0 ** 127, 2.0 ** 127),
              ("1.5 * 2^127 overflows", 1.5 * 2.0 ** 127, math.nan), ("inf -> NaN", math.inf, math.nan)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_e8m0_table(backend):
    x = np.array([r[1] for r in E8M0_TABLE], np.float32)
    want = np.array([r[2] for r in E8M0_TABLE], np.float32)
    got = quantize(torch.from_numpy(x), "e8m0", backend=backend).numpy()
    assert_same_bits(got, want, x, "e8m0 table")
    assert_same_bits(got, ml_cast(x, "e8m0"), x, "e8m0 vs ml_dtypes")
    sat = quantize(torch.tensor([math.inf, 2.0 ** 128 * 0.9, -1.0]), "e8m0", saturate=True)
    assert sat[:2].tolist() == [2.0 ** 127] * 2 and math.isnan(sat[2])


# ONNX Cast to float8 (opset 19 table): x -> (saturate=1, saturate=0) per format.
# FLT_MAX is the format's max (FACTS.md): e4m3 448, e4m3fnuz 240, e5m2/e5m2fnuz 57344.
INF, NAN = math.inf, math.nan
ONNX = {
    #            0          -0          NaN         +inf         -inf         +1e6         -1e6
    "e4m3": [(0, 0), (-0.0, -0.0), (NAN, NAN), (448, NAN), (-448, NAN), (448, NAN), (-448, NAN)],
    "e4m3fnuz": [(0, 0), (0, 0), (NAN, NAN), (NAN, NAN), (NAN, NAN), (240, NAN), (-240, NAN)],
    "e5m2": [(0, 0), (-0.0, -0.0), (NAN, NAN), (57344, INF), (-57344, -INF), (57344, INF),
             (-57344, -INF)],
    "e5m2fnuz": [(0, 0), (0, 0), (NAN, NAN), (NAN, NAN), (NAN, NAN), (57344, NAN),
                 (-57344, NAN)],
}
ONNX_INPUTS = [0.0, -0.0, NAN, INF, -INF, 1e6, -1e6]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(ONNX))
def test_onnx_saturation_table(name, backend):
    x = torch.tensor(ONNX_INPUTS)
    for column, saturate in ((0, True), (1, False)):
        want = np.array([float(row[column]) for row in ONNX[name]], np.float32)
        got = quantize(x, name, saturate=saturate, backend=backend).numpy()
        assert_same_bits(got, want, x.numpy(), f"{name} saturate={saturate}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_rounding_happens_before_the_overflow_test(backend):
    # FACTS.md: e4m3 values below 464 round to 448; 464 is a tie to the even code 448
    x = torch.tensor([447.0, 460.0, 463.9, 464.0, 464.1, 500.0])
    got = quantize(x, "e4m3", backend=backend)
    assert got[:4].tolist() == [448.0] * 4 and math.isnan(got[4]) and math.isnan(got[5])
    sat = quantize(x, "e4m3", saturate=True, backend=backend)
    assert sat.tolist() == [448.0] * 6
    # MX elements saturate without being asked (no inf, no NaN code)
    assert quantize(torch.tensor([1e9, -INF, 7.0]), "e2m1", backend=backend).tolist() == \
        [6.0, -6.0, 6.0]


# Against the float64 reference: formats ml_dtypes lacks (custom exponent/mantissa
# widths, biases, every convention, mbits = 0, and e8m3b130, which reaches below
# float32's normal range and is rounded in float64), and toward_zero and saturation
# for the builtin formats, which ml_dtypes cannot check.
CUSTOM = ["e6m9", "e3m3fin", "e5m7", "e4m4fn", "e5m2b13", "e3m0fn", "e2m0fin", "e5m0",
          "e3m1fnuz", "e2m5", "e4m3fin", "e8m3b130", "e5m10", "tf32", "e4m3", "e5m2",
          "e4m3fnuz", "e5m2fnuz", "e3m2", "e2m3", "e2m1", "fp16", "bf16", "e8m0"]


def custom_samples(name: str, n: int, seed: int) -> np.ndarray:
    """Values around every binade of the format, its ties, and beyond both ends."""
    fmt = get_format(name)
    fmax = fmt_max(fmt)   # from the reference's grid
    rng = np.random.default_rng(seed)
    lo, hi = math.log2(fmt.min_subnormal or fmt.min_normal) - 3, math.log2(fmax) + 2
    x = rng.choice([-1.0, 1.0], n) * np.exp2(rng.uniform(lo, hi, n))
    ties = np.exp2(np.floor(rng.uniform(lo, hi, n // 4))) * (
        1 + (rng.integers(0, 2 ** fmt.mbits, n // 4) + 0.5) / 2 ** fmt.mbits)
    special = [0.0, -0.0, math.inf, -math.inf, math.nan, fmax, -fmax]
    with np.errstate(over="ignore"):   # beyond float32's range on purpose (bf16, e8m0)
        return np.concatenate([x, ties, special]).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", CUSTOM)
@pytest.mark.parametrize("mode", ["nearest", "toward_zero"])
@pytest.mark.parametrize("saturate", [False, True])
def test_custom_formats_match_reference(name, mode, saturate, backend):
    x = custom_samples(name, 600, seed=len(name))
    if get_format(name).convention.value == "finite":
        x = x[~np.isnan(x)]
    got = quantize(torch.from_numpy(x), name, rounding=mode, saturate=saturate,
                   backend=backend).numpy()
    want = np.array([ref_round(name, float(v), mode, saturate) for v in x], np.float32)
    assert_same_bits(got, want, x, f"{name} {mode} saturate={saturate}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e2m1", "fp16", "e6m9", "bf16", "e8m0"])
def test_float64_inputs_round_once(name, backend):
    # float64 values with bits beyond float32: torch and ml_dtypes go through float32
    # (double rounding); quantize rounds the float64 value itself, like the reference.
    rng = np.random.default_rng(11)
    fmt = get_format(name)
    lo = math.log2(fmt.min_subnormal or fmt.min_normal) - 2
    x = rng.choice([-1.0, 1.0], 1500) * np.exp2(rng.uniform(lo, math.log2(fmt.max) + 1, 1500))
    ties = np.array([1 + 2.0 ** -(fmt.mbits + 1) + 2.0 ** -40, 1 + 2.0 ** -(fmt.mbits + 1)
                     - 2.0 ** -40, 1.5 - 2.0 ** -40])
    x = np.concatenate([x, ties, -ties])
    got = quantize(torch.from_numpy(x), name, backend=backend)
    assert got.dtype == torch.float64
    want = np.array([ref_round(name, float(v)) for v in x])
    same = (got.numpy() == want) | (np.isnan(got.numpy()) & np.isnan(want))
    assert same.all(), x[~same][:5]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", ["e4m3", "e5m2", "e3m2", "e8m0", "bf16", "fp16"])
def test_half_inputs(dtype, name, backend):
    x = torch.from_numpy(spread_values(1 << 11, seed=5)).to(dtype)
    if name in FINITE:
        x = x[~torch.isnan(x)]
    got = quantize(x, name, backend=backend)
    assert got.dtype == dtype and got.shape == x.shape
    want = ml_cast(x.float().numpy(), name)
    assert_same_bits(got.float().numpy(), torch.from_numpy(want).to(dtype).float().numpy(),
                     x.float().numpy(), f"{name} from {dtype}")


def test_half_inputs_keep_values_the_dtype_holds():
    # fp16's max 65504 is not a bfloat16 value: the bf16 result rounds it (to 65536)
    x = torch.tensor([1e6], dtype=torch.bfloat16)
    assert quantize(x, "fp16", saturate=True).item() == 65536.0
    assert quantize(x.float(), "fp16", saturate=True).item() == 65504.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_empty_and_shapes(backend):
    x = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 30
    want = quantize(x.contiguous(), "e4m3", backend=backend)
    assert torch.equal(quantize(x.t(), "e4m3", backend=backend), want.t())
    assert torch.equal(quantize(x[::3, 1::2], "e4m3", backend=backend), want[::3, 1::2])
    for shape in [(0,), (3, 0), (0, 5, 2)]:
        e = torch.empty(shape)
        assert quantize(e, "e5m2", backend=backend).shape == shape
    assert quantize(torch.tensor(3.3), "e2m1", backend=backend).shape == ()
    assert quantize(torch.tensor(3.3), "e2m1", backend=backend).item() == 3.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_out_buffer(dtype, backend):
    x = (torch.randn(1000, generator=torch.Generator().manual_seed(1)) * 100).to(dtype)
    want = quantize(x, "e4m3", backend=backend)
    out = torch.empty_like(x)
    assert quantize(x, "e4m3", out=out, backend=backend) is out
    assert torch.equal(out, want)
    strided = torch.empty(2000, dtype=dtype)[::2]
    quantize(x, "e4m3", out=strided, backend=backend)
    assert torch.equal(strided, want)
    y = x.clone()
    assert quantize(y, "e4m3", out=y, backend=backend) is y     # in place
    assert torch.equal(y, want)


def test_no_autograd_and_input_untouched():
    x = torch.tensor([1.1, 2.3], requires_grad=True)
    y = quantize(x, "e2m1")
    assert not y.requires_grad and x.detach().tolist() == pytest.approx([1.1, 2.3])


def test_errors_name_the_value_and_the_choices():
    x = torch.ones(3)
    with pytest.raises(ValueError, match=r"torch\.int64.*torch\.float32"):
        quantize(torch.ones(3, dtype=torch.int64), "e4m3")
    with pytest.raises(ValueError, match=r"'up'.*'nearest', 'stochastic', 'toward_zero'"):
        quantize(x, "e4m3", rounding="up")
    with pytest.raises(ValueError, match=r"'gpu'.*'auto', 'c', 'torch'"):
        quantize(x, "e4m3", backend="gpu")
    with pytest.raises(ValueError, match=r"'e4m9x'.*valid forms"):
        quantize(x, "e4m9x")
    with pytest.raises(ValueError, match="out must be a tensor of x's shape"):
        quantize(x, "e4m3", out=torch.empty(4))
    with pytest.raises(ValueError, match="out must be a tensor of x's shape, dtype"):
        quantize(x, "e4m3", out=torch.empty(3, dtype=torch.float64))
    with pytest.raises(ValueError, match="must be a torch.Tensor"):
        quantize([1.0], "e4m3")
    assert quantize(x, "e4m3", rounding=Rounding.TOWARD_ZERO).tolist() == [1.0] * 3


def test_recipe_rounding_enum_is_accepted():
    from mixprec.recipe import Rounding as RecipeRounding
    x = torch.tensor([1.3])
    assert torch.equal(quantize(x, "e2m1", rounding=RecipeRounding.TOWARD_ZERO),
                       quantize(x, "e2m1", rounding="toward_zero"))


@pytest.mark.skipif(not has_c_extension(), reason="C extension not built")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("mode", ["nearest", "toward_zero"])
def test_c_path_equals_torch_path(dtype, mode):
    x = torch.from_numpy(spread_values(1 << 12, seed=13)).to(dtype)
    if dtype == torch.float64:   # bits below float32's precision
        x = x * (1 + torch.rand(x.shape, dtype=dtype, generator=torch.Generator().manual_seed(0))
                 * 2.0 ** -30)
    for name in ["e4m3", "e5m2", "e4m3fnuz", "e2m1", "e3m4", "e6m9", "e5m0", "e3m0fn",
                 "tf32", "fp32", "bf16", "e8m3b130", "e4m3b11fnuz"]:
        for saturate in (False, True):
            c = quantize(x, name, rounding=mode, saturate=saturate, backend="c")
            t = quantize(x, name, rounding=mode, saturate=saturate, backend="torch")
            assert torch.equal(c.view(torch.int64 if dtype == torch.float64 else torch.int32),
                               t.view(torch.int64 if dtype == torch.float64 else torch.int32)), \
                (name, saturate)


def test_docstring_examples():
    import doctest

    import mixprec.quant
    assert doctest.testmod(mixprec.quant).failed == 0


@pytest.mark.parametrize("name", CUSTOM)
def test_format_limits_match_the_reference_grid(name):
    # FloatFormat's closed-form limits against the slow reference's enumerated grid
    fmt = get_format(name)
    values = [v for v in extended(name)[:-1] if v > 0]
    assert fmt.max == fmt_max(fmt) == values[-1]
    assert (fmt.min_subnormal or fmt.min_normal) == values[0]
