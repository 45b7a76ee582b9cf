"""NVFP4 against torchao 0.18 (the locked oracle): ``NVFP4Tensor.to_nvfp4`` with the
two-level scale ``per_tensor_scale = amax / (448 * 6)``, on CPU.

Where the semantics agree, block scales and elements are bit-identical. They differ in two
documented ways:

* torchao clamps block scales below at E4M3's smallest normal 2^-6; TransformerEngine's
  reference (and mixprec) keep E4M3 subnormals and 0. Blocks whose torchao scale sits at
  that clamp are excluded from the element comparison and checked to be exactly those
  whose mixprec scale is below 2^-6.
* the unrounded block scale is block_amax * float32(g_enc * float32(1/6)) in TE's
  reference and mixprec, but (block_amax / 6) / (amax / 2688) in torchao. The two differ
  in the last float32 bits, which decides the E4M3 rounding when the exact value
  block_amax * 448 / amax is an E4M3 midpoint (dyadic inputs hit these): there the scales
  are neighbours. Such blocks are excluded from the element comparison. Likewise the
  encode factor (1 / (X * g_dec) against (1 / (amax / 2688)) / X) differs in the last bit,
  which decides elements whose exact value x * 2688 / (amax * X) is an E2M1 midpoint.
* torchao's tensor decode scale is amax / 2688, mixprec's (TE's) 1 / (2688 / amax); the
  two can differ in the last bit, so dequantized values are compared per block scale and
  element, not as products.
"""
from __future__ import annotations

import math
import pytest
import torch
import torchao  # noqa: F401  (the oracle; conftest checks its version against the lock)

from mixprec import quantize_blocked

nvfp4 = pytest.importorskip("torchao.prototype.mx_formats.nvfp4_tensor")
kernels = pytest.importorskip("torchao.prototype.mx_formats.kernels")

E4M3_MIN_NORMAL = 2.0 ** -6


def torchao_nvfp4(x: torch.Tensor):
    """(elements, block scales, per-tensor decode scale) from torchao's NVFP4Tensor."""
    pts = nvfp4.per_tensor_amax_to_scale(x.abs().amax())
    t = nvfp4.NVFP4Tensor.to_nvfp4(x, per_tensor_scale=pts)
    codes = kernels.unpack_uint4(t.qdata.contiguous().view(torch.uint8))
    elements = kernels.f4_unpacked_to_f32(codes).view(x.shape)
    return elements, t.scale.to(torch.float32), pts


def _inputs():
    g = torch.Generator().manual_seed(0)
    normal = torch.randn(128, 256, generator=g)
    # heavy tails: a normal over the square root of a uniform (tail ~ |x|^-3)
    student = torch.randn(128, 256, generator=g) / torch.sqrt(torch.rand(128, 256, generator=g) + 1e-3)
    wide = torch.randn(128, 256, generator=g) * torch.logspace(-5, 3, 256)
    ties = torch.randint(-12, 13, (128, 256), generator=g).float() * 0.25   # many E2M1 ties
    return {"normal": normal, "heavy-tailed": student, "wide-range": wide, "ties": ties,
            "bf16": normal.to(torch.bfloat16)}


@pytest.mark.parametrize("name", list(_inputs()))
def test_nvfp4_matches_torchao_bit_for_bit(name):
    x = _inputs()[name]
    ao_elems, ao_scales, pts = torchao_nvfp4(x)
    q = quantize_blocked(x, "nvfp4")
    scales = q.block_scales
    differ = scales != ao_scales
    # where torchao's lower clamp binds, mixprec's scale is below it (subnormal E4M3 or 0)
    clamped = (ao_scales == E4M3_MIN_NORMAL) & (scales < E4M3_MIN_NORMAL)
    # elsewhere a difference needs an exact E4M3 midpoint: v in [2^k, 2^(k+1)) with
    # v * 2^(4-k) an odd integer (E4M3 keeps 3 mantissa bits)
    amax = x.double().abs().amax().item()
    block_amax = x.double().abs().view(x.shape[0], -1, 16).amax(-1)
    for i, j in (differ & ~clamped).nonzero().tolist():
        v = block_amax[i, j].item() * 448 / amax
        k = math.frexp(v)[1] - 1
        assert (v * 2.0 ** (4 - k)) % 2 == 1, (v, scales[i, j].item(), ao_scales[i, j].item())
    if name in ("normal", "heavy-tailed", "bf16"):
        assert not differ.any()
    elif name == "wide-range":
        assert torch.equal(differ, clamped) and differ.any() and (~differ).sum() > 1000
    else:
        assert 0 < (differ & ~clamped).sum() < 100
    same = (~differ).repeat_interleave(16, dim=-1)
    elem_differ = same & (q.elements != ao_elems)
    exact = (x.double() * 2688 / (amax * scales.double().repeat_interleave(16, -1))).abs()
    midpoints = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0], dtype=torch.float64)
    assert torch.isin(exact[elem_differ], midpoints).all()
    if name != "ties":
        assert not elem_differ.any()
    same &= ~elem_differ
    assert torch.equal(q.elements[same].view(torch.int32), ao_elems[same].view(torch.int32))
    # the tensor decode scales agree to within one float32 ulp
    assert abs(q.tensor_scale.item() - pts.item()) <= 2 ** -23 * pts.item()
