"""quantize_blocked: hand-computed cases from each rule's definition, ties, tiles, padding,
specials, and quantize_mx as its MX shorthand (bit for bit as before)."""
from __future__ import annotations

import math

import pytest
import torch

from mixprec import BlockScheme, get_scheme, quantize_blocked
from mixprec.formats import get_format
from mixprec.quant import quantize
from mixprec.scaling import quantize_mx

def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def row(*values, n=16):
    return torch.tensor(list(values) + [0.0] * (n - len(values)), dtype=torch.float32)


# --------------------------------------------------------------------------------------
# NVFP4 as TransformerEngine's reference defines it (written-out numbers)
# --------------------------------------------------------------------------------------
# Tensor amax 42 makes the global scales exact: g_enc = 448 * 6 / 42 = 64, g_dec = 1/64.
# The block multiplier is float32(64 * float32(1/6)) = 10.666666984558105 (float32(1/6) =
# 0.1666666716337204).
#   block amax 42: 42 * 10.666666984558105 = 448.0000133 -> float32 448.0 -> E4M3 448;
#                  encode = 1 / (448 / 64) = float32(1/7) = 0.1428571492433548;
#                  42 * that = 6.0000005 -> clamp 6.
#   block amax 24: 24 * 10.666666984558105 = 256.0000076 -> float32 256.0 -> E4M3 256;
#                  encode = 1 / (256 / 64) = 0.25 exactly, so the elements are x / 4 and
#                  every tie of E2M1 can be hit exactly.
NV_X = torch.stack([row(42.0), row(24.0, 3.0, 10.0, 14.0, 20.0, 1.0, 5.0, 7.0, -10.0, -3.0, 2.0)])
# x / 4:                6,  0.75, 2.5, 3.5, 5, 0.25, 1.25, 1.75, -2.5, -0.75, 0.5
TIES = {
    "nearest-even": [6.0, 1.0, 2.0, 4.0, 4.0, 0.0, 1.0, 2.0, -2.0, -1.0, 0.5],
    "half-up":      [6.0, 1.0, 3.0, 4.0, 6.0, 0.5, 1.5, 2.0, -3.0, -1.0, 0.5],
    "half-down":    [6.0, 0.5, 2.0, 3.0, 4.0, 0.0, 1.0, 1.5, -2.0, -0.5, 0.5],
}


def test_nvfp4_te_reference_hand_case():
    q = quantize_blocked(NV_X, "nvfp4")
    assert q.tensor_scale.item() == 1 / 64
    assert q.block_scales.tolist() == [[448.0], [256.0]]
    assert q.elements[0].tolist() == [6.0] + [0.0] * 15
    assert q.elements[1, :11].tolist() == TIES["nearest-even"]
    # dequantize = elements * (X * g_dec): 6 * 7 = 42; block 1: elements * 4
    deq = q.dequantize()
    assert deq[0, 0].item() == 42.0
    assert deq[1, :11].tolist() == [4.0 * e for e in TIES["nearest-even"]]


@pytest.mark.parametrize("ties", list(TIES))
def test_tie_rules(ties):
    q = quantize_blocked(NV_X, get_scheme("nvfp4").with_(ties=ties))
    assert q.elements[1, :11].tolist() == TIES[ties]


def test_tie_rules_on_e4m3_elements():
    # mxfp8, block amax 1: X = 2^(0 - 8). 0.296875 * 256 = 76 lies halfway between the
    # E4M3 values 72 (1.001b * 2^6) and 80 (1.010b * 2^6); 68 between 64 and 72.
    x = row(1.0, 76 / 256, 68 / 256, -76 / 256, 77 / 256, n=32)
    want = {"nearest-even": [256, 80, 64, -80, 80], "half-up": [256, 80, 72, -80, 80],
            "half-down": [256, 72, 64, -72, 80]}
    for ties, elems in want.items():
        q = quantize_blocked(x, get_scheme("mxfp8").with_(ties=ties))
        assert q.elements[:5].tolist() == elems, ties


def test_nvfp4_block_scale_rounding_and_subnormal_scales():
    # Same tensor scale (amax 42 in block 0); multiplier 10.666666984558105.
    x = torch.stack([
        row(42.0),
        row(1.75),                # 18.67 -> E4M3 18 (spacing 2 in [16, 32))
        row(1.8125),              # 19.33 -> E4M3 20
        row(2.0 ** -12, 2.0 ** -13),   # 0.0026 -> E4M3 subnormal 2^-9 (1.33 * 2^-9)
        row(2.0 ** -17),          # 8.1e-5 < 2^-10 -> E4M3 0
    ])
    q = quantize_blocked(x, "nvfp4")
    assert q.block_scales[:, 0].tolist() == [448.0, 18.0, 20.0, 2.0 ** -9, 0.0]
    # block 1: encode = float32(1 / (18/64)) = 3.5555556; 1.75 * that = 6.22 -> clamp 6
    # block 2: encode = float32(1 / (20/64)) = 3.2000000; 1.8125 * 3.2 = 5.8 -> 6
    # block 3: encode = 1 / (2^-9 / 64) = 2^15: 2^-12 -> 8 -> clamp 6; 2^-13 -> 4
    # block 4: encode = min(1 / 0, FLT_MAX) = FLT_MAX; 2^-17 * FLT_MAX -> clamp 6, and
    #          the dequantized value is 6 * 0 = 0 (TE's reference does the same)
    assert q.elements[1:, :2].tolist() == [[6.0, 0.0], [6.0, 0.0], [6.0, 4.0], [6.0, 0.0]]
    deq = q.dequantize()
    assert deq[1:, :2].tolist() == [[6 * 18 / 64, 0.0], [6 * 20 / 64, 0.0],
                                    [6 * 2.0 ** -15, 4 * 2.0 ** -15], [0.0, 0.0]]


def test_nvfp4_2d_tiles_share_one_scale():
    # 16x16 tiles: tile (0,0) has amax 42 (the tensor amax), tile (1,0) amax 24, the
    # others are zero. With 1x16 blocks row 20 would have its own amax 3 instead.
    x = torch.zeros(32, 32)
    x[0, 0], x[2, 3], x[17, 3], x[20, 15] = 42.0, 10.0, 24.0, 3.0
    q = quantize_blocked(x, "nvfp4-2d")
    assert q.block_scales.tolist() == [[448.0, 0.0], [256.0, 0.0]]
    # 10 * float32(1/7) = 1.43 -> 1.5 (dequantized 1.5 * 7); 3 / 4 = 0.75 -> 1 (tie to even)
    assert q.elements[2, 3].item() == 1.5 and q.elements[20, 15].item() == 1.0
    assert q.dequantize()[2, 3].item() == 10.5 and q.dequantize()[20, 15].item() == 4.0
    q1 = quantize_blocked(x, "nvfp4")
    assert q1.block_scales.shape == (32, 2) and q1.elements[20, 15].item() == 6.0


def test_nvfp4_zero_tensor_follows_te_global_scale():
    # amax 0: 2688 / 0 = inf, clamped to FLT_MAX (TE's reference; only a 0 encode scale
    # becomes 1). Elements and block scales are 0; -0 stays -0.
    x = torch.zeros(2, 16)
    x[1, 3] = -0.0
    q = quantize_blocked(x, "nvfp4")
    # float32(1 / FLT_MAX), a float32 subnormal
    assert q.tensor_scale.item() == 2.938735877055719e-39
    assert q.block_scales.tolist() == [[0.0], [0.0]]
    assert torch.equal(bits(q.dequantize()), bits(x))


@pytest.mark.parametrize("special", [float("inf"), float("-inf"), float("nan")])
def test_nonfinite_block_is_nan_and_others_use_unit_global_scale(special):
    # A block holding inf or NaN is NaN (TE's reference would clamp inf to a finite 6 * X).
    # The tensor amax is not finite, so g_enc = 1 (inf: 2688 / inf = 0 -> 1).
    # Block 1, amax 1.5: 1.5 * float32(1/6) = 0.25 -> E4M3 0.25, encode 4: 1.5 -> 6.
    x = torch.stack([row(1.0, special), row(1.5, 0.75)])
    q = quantize_blocked(x, "nvfp4")
    assert math.isnan(q.block_scales[0, 0].item()) and torch.isnan(q.elements[0]).all()
    assert torch.isnan(q.dequantize()[0]).all()
    if not math.isnan(special):
        assert q.tensor_scale.item() == 1.0
        assert q.block_scales[1, 0].item() == 0.25 and q.elements[1, :2].tolist() == [6.0, 3.0]


def test_ue5m3_scales_reach_beyond_e4m3():
    # No tensor scale: X = RNE(amax * float32(1/6)). amax 6000 -> 1000.0; UE5M3 values in
    # [512, 1024) are 64 apart -> 1024; encode 2^-10: 6000 -> 5.86 -> 6, 3000 -> 2.93 -> 3.
    # E4M3 scales clamp at 448 instead: encode float32(1/448); 6000/448 = 13.4 -> 6.
    x = row(6000.0, 3000.0)
    ue = quantize_blocked(x, BlockScheme("e2m1", (1, 16), "ue5m3", "amax"))
    assert ue.block_scales.tolist() == [1024.0] and ue.tensor_scale.item() == 1.0
    assert ue.dequantize()[:2].tolist() == [6144.0, 3072.0]
    e4 = quantize_blocked(x, BlockScheme("e2m1", (1, 16), "e4m3", "amax"))
    assert e4.block_scales.tolist() == [448.0] and e4.dequantize()[:2].tolist() == [2688.0, 2688.0]


# --------------------------------------------------------------------------------------
# Blockwise FP8 (TE Float8BlockScaling): scale = 448 / amax, power of two by zeroing the
# mantissa; scale_inv = 1 / scale
# --------------------------------------------------------------------------------------
def test_fp8_block128_power_of_two_scales():
    x = torch.zeros(3, 128)
    x[0, :2] = torch.tensor([1.0, 0.3])   # 448 / 1 = 448 = 1.75 * 2^8 -> 2^8; X = 2^-8
    x[1, :2] = torch.tensor([500.0, 7.0])  # 448 / 500 = 0.896 -> 2^-1; X = 2
    q = quantize_blocked(x, "fp8-block128")
    assert q.block_scales[:, 0].tolist() == [2.0 ** -8, 2.0, 1.0]   # zero block: scale 1
    # 0.3 * 256 = 76.8 -> E4M3 80 (spacing 8 in [64, 128)); 500 / 2 = 250 -> 256; 7/2 = 3.5
    assert q.elements[0, :2].tolist() == [256.0, 80.0]
    assert q.elements[1, :2].tolist() == [256.0, 3.5]
    assert q.dequantize()[:2, :2].tolist() == [[1.0, 0.3125], [512.0, 7.0]]
    assert torch.equal(q.elements[2], torch.zeros(128))


def test_fp32_block_scales():
    # fp32 rule: encode = float32(448 / 3) = 149.3333282470703, X = 1 / that =
    # 0.0066964286379516125; 2 * encode = 298.67 -> E4M3 288 (spacing 32 in [256, 512)).
    q = quantize_blocked(row(3.0, 2.0, n=128), BlockScheme("e4m3", (1, 128), "fp32", "amax"))
    assert q.block_scales.tolist() == [0.0066964286379516125]
    assert q.elements[:2].tolist() == [448.0, 288.0]
    x_scale = torch.tensor(0.0066964286379516125)
    assert q.dequantize()[1].item() == (torch.tensor(288.0) * x_scale).item()


def test_fp8_block128x128_tiles():
    x = torch.zeros(130, 129)
    x[5, 100] = 1.0        # tile (0, 0)
    x[129, 128] = 500.0    # tile (1, 1): the padded corner
    q = quantize_blocked(x, "fp8-block128x128")
    assert q.block_scales.tolist() == [[2.0 ** -8, 1.0], [1.0, 2.0]]
    assert q.elements.shape == (130, 129) and q.dequantize()[129, 128].item() == 512.0


# --------------------------------------------------------------------------------------
# MX: quantize_mx is the shorthand; dither
# --------------------------------------------------------------------------------------
def _quantize_mx_before(x, fmt, block_size=32, axis=-1, scale_rule="ocp"):
    """quantize_mx as it was before the general block quantizer (nearest rounding),
    kept verbatim in substance as the regression reference."""
    fmt = get_format(fmt)
    ax = axis % x.dim()
    hp = x.detach().to(torch.float32)
    n = hp.shape[ax]
    nb = -(-n // block_size)
    pad = nb * block_size - n
    if pad:
        hp = torch.nn.functional.pad(hp, (0, 0) * (hp.dim() - 1 - ax) + (0, pad))
    blocks = hp.reshape(*hp.shape[:ax], nb, block_size, *hp.shape[ax + 1:])
    amax = blocks.abs().amax(dim=ax + 1, keepdim=True)
    special = ~torch.isfinite(amax)
    mant, exp = torch.frexp(amax)
    shared = exp.to(torch.int32) - 1 - fmt.emax
    if scale_rule == "ceil":
        shared = shared + (2.0 * mant > fmt.max / 2.0 ** fmt.emax).to(torch.int32)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, -127)).clamp(-127, 127)
    shared = torch.where(special, torch.zeros_like(shared), shared)

    def pow2(e):
        b = (e + 127).to(torch.int32)
        return torch.where(b > 0, b << 23, torch.full_like(b, 1 << 22)).view(torch.float32)

    elems = quantize(blocks * pow2(-shared), fmt, saturate=True)
    scales = torch.where(special, torch.tensor(float("nan")), pow2(shared))
    deq = (elems * scales).reshape(hp.shape).narrow(ax, 0, n).to(x.dtype)
    return deq, scales.squeeze(ax + 1)


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "e3m2", "e2m1"])
@pytest.mark.parametrize("rule", ["ocp", "ceil"])
def test_quantize_mx_same_bits_as_before_and_as_quantize_blocked(fmt, rule):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 70, generator=g) * torch.logspace(-30, 30, 70)
    x[3, 5], x[7, 40], x[9, :] = float("inf"), float("nan"), 0.0
    x[11, 64:] = 2.0 ** -140                          # a block whose scale hits 2^-127
    for axis in (-1, 0):
        deq, scales = quantize_mx(x, fmt, block_size=32, axis=axis, scale_rule=rule)
        ref_deq, ref_scales = _quantize_mx_before(x, fmt, 32, axis, rule)
        assert torch.equal(bits(deq), bits(ref_deq)) and torch.equal(bits(scales), bits(ref_scales))
        scheme = BlockScheme(fmt, (1, 32), "e8m0", "floor" if rule == "ocp" else "ceil", axis=axis)
        q = quantize_blocked(x, scheme)
        assert torch.equal(bits(q.dequantize()), bits(ref_deq))
        assert torch.equal(bits(q.block_scales), bits(ref_scales))


def test_mx_named_schemes_match_quantize_mx_on_bf16():
    x = torch.randn(8, 96).to(torch.bfloat16)
    for name, fmt in [("mxfp8", "e4m3"), ("mxfp6", "e3m2"), ("mxfp4", "e2m1")]:
        q = quantize_blocked(x, name)
        deq, scales = quantize_mx(x, fmt)
        assert q.dequantize().dtype == torch.bfloat16
        assert torch.equal(q.dequantize(), deq) and torch.equal(q.block_scales, scales)


def test_dither_rule_scales_by_three_quarters():
    # mxfp4 floor scale for amax 3: X = 2^(1 - 2) = 0.5. Dither: elements from
    # 3/4 * V / X: 3 -> 4.5 (tie of 4 and 6 -> 4, even mantissa), 1 -> 1.5 (exact),
    # -0.5 -> -0.75 (tie of -0.5, code 001, and -1, code 010 -> -1).
    # Decode scale 4/3 (float32 1.3333334): dequantized = e * float32(X * 4/3).
    s = get_scheme("mxfp4").with_(scale_rule="dither")
    q = quantize_blocked(row(3.0, 1.0, -0.5, n=32), s)
    assert q.block_scales.tolist() == [0.5]
    assert q.tensor_scale.item() == torch.tensor(4 / 3).item()
    assert q.elements[:3].tolist() == [4.0, 1.5, -1.0]
    decode = torch.tensor(0.5) * torch.tensor(4 / 3)
    assert q.dequantize()[:3].tolist() == (torch.tensor([4.0, 1.5, -1.0]) * decode).tolist()
    # Stochastic rounding never clips: every value lands on one of its two neighbours.
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g)
    qs = quantize_blocked(x, s, rounding="stochastic", generator=g)
    assert qs.elements.abs().max() <= 6.0
    v = (x / qs.block_scales.repeat_interleave(32, -1)) * 0.75   # the same two roundings
    table = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])   # E2M1 magnitudes
    hi = table[torch.bucketize(v.abs(), table)]                       # smallest >= |v|
    lo = table[torch.bucketize(v.abs(), table, right=True) - 1]       # largest <= |v|
    e = qs.elements
    assert ((e == torch.copysign(lo, v)) | (e == torch.copysign(hi, v))).all()
    assert (e != quantize(v, "e2m1")).any()                           # not just nearest


def test_stochastic_rounding_is_unbiased_on_nvfp4_elements():
    # Block 1 of NV_X has encode 0.25: 3 / 4 = 0.75 sits between 0.5 and 1 -> P(1) = 1/2.
    g = torch.Generator().manual_seed(5)
    x = NV_X.repeat(2000, 1)
    q = quantize_blocked(x, "nvfp4", rounding="stochastic", generator=g)
    vals = q.elements[1::2, 1]
    assert set(vals.tolist()) == {0.5, 1.0}
    assert abs(vals.mean().item() - 0.75) < 0.02
    # the same generator state gives the same bits
    q2 = quantize_blocked(x, "nvfp4", rounding="stochastic", generator=torch.Generator().manual_seed(5))
    assert torch.equal(q.elements, q2.elements)


# --------------------------------------------------------------------------------------
# Shapes, padding, axes, errors
# --------------------------------------------------------------------------------------
def test_padding_equals_explicit_zero_padding():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(5, 20, generator=g)
    for name in ["nvfp4", "nvfp4-2d", "mxfp4", "fp8-block128"]:
        q = quantize_blocked(x, name)
        k = get_scheme(name).block_size
        padded = torch.zeros(5 if name != "nvfp4-2d" else 16, -(-20 // k) * k)
        padded[:5, :20] = x
        qp = quantize_blocked(padded, name)
        assert torch.equal(q.elements, qp.elements[:5, :20]), name
        assert torch.equal(q.dequantize(), qp.dequantize()[:5, :20]), name
        assert torch.equal(q.block_scales, qp.block_scales[:q.block_scales.shape[0]]), name


def test_axis_zero_equals_transpose():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(48, 7, generator=g)
    s = get_scheme("nvfp4")
    q0 = quantize_blocked(x, s.with_(axis=0))
    q1 = quantize_blocked(x.t().contiguous(), s)
    assert q0.block_scales.shape == (3, 7)
    assert torch.equal(q0.elements, q1.elements.t()) and torch.equal(q0.block_scales, q1.block_scales.t())


def test_bad_input():
    with pytest.raises(ValueError, match="unknown rounding 'up'"):
        quantize_blocked(torch.ones(16), "nvfp4", rounding="up")
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_blocked(torch.tensor(1.0), "nvfp4")
    with pytest.raises(ValueError, match="floating-point"):
        quantize_blocked(torch.ones(16, dtype=torch.int32), "nvfp4")
    with pytest.raises(ValueError, match="16x16 tiles need a tensor with at least two"):
        quantize_blocked(torch.ones(16), "nvfp4-2d")
    with pytest.raises(ValueError, match="axis 3 out of range"):
        quantize_blocked(torch.ones(16), get_scheme("nvfp4").with_(axis=3))
    with pytest.raises(ValueError, match="unknown block scheme"):
        quantize_blocked(torch.ones(16), "fp4")
