"""TransformerEngine presets against TE's documented reference semantics, in cases
computed by hand (TransformerEngine needs CUDA and is not installed here).

The semantics, from TE's recipe documentation:

* ``DelayedScaling(fp8_format=HYBRID, amax_history_len=1024, amax_compute_algo="max",
  margin=0)``: E4M3 forward, E5M2 backward; scale = fp8_max / max(amax history) / 2^margin,
  computed after each step for the next one; the initial scale is 1; saturating casts.
* ``Float8CurrentScaling(fp8_format=HYBRID)``: scale = fp8_max / amax of the tensor itself.
* ``MXFP8BlockScaling()``: E4M3 for every operand, 1x32 blocks along the GEMM's reduction
  dimension, E8M0 scale = float_to_e8m0(amax / 448), rounded up.
* GEMMs take FP8 operands and write high precision; dW leaves the wgrad GEMM unrounded;
  the bias gradient is computed from the unquantized grad_output.

Every expected number below was worked out on paper from those rules (the working is in
the comments); the products and sums involved are exact in float32.
"""
from __future__ import annotations

import pytest
import torch

from mixprec import get_recipe
from mixprec.emulate import qlinear
from mixprec.policy import LayerPolicy, LayerState

T = torch.tensor

# x: amax 3.5 -> E4M3 scale 448 / 3.5 = 128
#   0.3 * 128 = 38.4 -> 40 (step 4 in [32, 64)) -> 0.3125;  0.1 * 128 = 12.8 -> 13 -> 0.1015625
X = T([[3.5, 0.3], [-1.0, 0.1]])
XQ = T([[3.5, 0.3125], [-1.0, 0.1015625]])
# W: amax 7 -> scale 64
#   -0.55 * 64 = -35.2 -> -36 -> -0.5625;  0.2 * 64 = 12.8 -> 13 -> 0.203125;
#   1.3 * 64 = 83.2 -> 80 (step 8 in [64, 128)) -> 1.25
W = T([[7.0, -0.55], [0.2, 1.3]])
WQ = T([[7.0, -0.5625], [0.203125, 1.25]])
B = T([0.5, -0.25])
# grad_output: amax 1.75 -> E5M2 scale 57344 / 1.75 = 32768
#   -0.3 * 32768 = -9830.4 -> -10240 (step 2048 in [8192, 16384)) -> -0.3125
#   0.6 * 32768 = 19660.8 -> 20480 (step 4096) -> 0.625
#   0.01 * 32768 = 327.68 -> 320 (step 64 in [256, 512)) -> 0.009765625
G = T([[1.75, -0.3], [0.6, 0.01]])
GQ = T([[1.75, -0.3125], [0.625, 0.009765625]])

# y = XQ @ WQ^T + B
#   [3.5*7 + 0.3125*-0.5625, 3.5*0.203125 + 0.3125*1.25] + B = [24.82421875, 0.8515625]
#   [-7 + 0.1015625*-0.5625, -0.203125 + 0.1015625*1.25] + B = [-6.55712890625, -0.326171875]
Y = T([[24.82421875, 0.8515625], [-6.55712890625, -0.326171875]])
# dX = GQ @ WQ
#   [1.75*7 - 0.3125*0.203125, 1.75*-0.5625 - 0.3125*1.25] = [12.1865234375, -1.375]
#   [0.625*7 + 0.009765625*0.203125, 0.625*-0.5625 + 0.009765625*1.25]
#     = [4.376983642578125, -0.33935546875]
DX = T([[12.1865234375, -1.375], [4.376983642578125, -0.33935546875]])
# dW = GQ^T @ XQ, unrounded
#   [1.75*3.5 - 0.625, 1.75*0.3125 + 0.625*0.1015625] = [5.5, 0.6103515625]
#   [-0.3125*3.5 - 0.009765625, -0.3125*0.3125 + 0.009765625*0.1015625]
#     = [-1.103515625, -0.0966644287109375]
DW = T([[5.5, 0.6103515625], [-1.103515625, -0.0966644287109375]])


def _run(recipe: str, x, w, b, g, state=None):
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    y = qlinear(xx, w, b, LayerPolicy.from_recipe(recipe), state=state)
    y.backward(g)
    return y.detach(), xx.grad, w.grad, b.grad


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_hand_case_is_consistent():
    # the quantized operands above are E4M3 / E5M2 values times a power of two
    for q, scale, fmt in ((XQ, 128, torch.float8_e4m3fn), (WQ, 64, torch.float8_e4m3fn),
                          (GQ, 32768, torch.float8_e5m2)):
        assert torch.equal((q * scale).to(fmt).float(), q * scale)


def test_te_current():
    y, dx, dw, db = _run("te-current", X, W, B, G)
    assert _same(y, Y) and _same(dx, DX) and _same(dw, DW)
    # the bias gradient sums grad_output as it arrived: the float32 sum of G's two rows
    assert _same(db, G[0] + G[1])
    assert not _same(db, GQ.sum(0))


def test_te_delayed_first_step_scale_one_then_history():
    state = LayerState()
    # step 1: scale 1 for every tensor; x / 2 has amax 1.75, so step 2's x scale is 256
    _run("te-delayed", X / 2, W, B, G, state=state)
    y, dx, dw, db = _run("te-delayed", X, W, B, G, state=state)
    # step 2: x scale 256 from step 1, not 128 from its own amax 3.5:
    #   3.5 * 256 = 896 saturates to 448 -> 1.75;  0.3 * 256 = 76.8 -> 80 -> 0.3125;
    #   0.1 * 256 = 25.6 -> 26 -> 0.1015625.  W and grad_output keep their step-1 amaxes.
    #   y[0] = [1.75*7 + 0.3125*-0.5625, 1.75*0.203125 + 0.3125*1.25] + B
    #        = [12.57421875, 0.49609375]
    assert _same(y, T([[12.57421875, 0.49609375], [-6.55712890625, -0.326171875]]))
    assert _same(dx, DX)
    #   dW[:, 0] = [1.75*1.75 - 0.625, -0.3125*1.75 - 0.009765625]
    assert _same(dw, T([[2.4375, 0.6103515625], [-0.556640625, -0.0966644287109375]]))
    assert _same(db, G[0] + G[1])
    # step 3: the history max (3.5) gives scale 128, so x is no longer saturated
    y3 = _run("te-delayed", X, W, B, G, state=state)[0]
    assert _same(y3, Y)


def test_te_delayed_settings():
    r = get_recipe("te-delayed")
    assert (r.scaling.amax_history_len, r.scaling.amax_algo, r.scaling.margin) == (1024, "max", 0)
    assert (r.weight.format, r.activation.format, r.grad_output.format) == ("e4m3", "e4m3", "e5m2")


def test_te_mxfp8_forward_block():
    # one 1x32 block of x: amax 10, 10 / 448 = 0.0223 -> E8M0 2^ceil(-5.48) = 2^-5
    #   10 * 32 = 320 (exact in [256, 512), step 32) -> 10;  3.3 * 32 = 105.6 -> 104 -> 3.25
    #   0.1 * 32 = 3.2 -> 3.25 (step 0.25 in [2, 4)) -> 0.1015625
    # the weight row: amax 2 -> 2 / 448 -> 2^ceil(-7.8) = 2^-7
    #   0.3 * 128 = 38.4 -> 40 -> 0.3125;  1, 2, -0.5 exact
    x = torch.zeros(1, 32)
    x[0, :3] = T([10.0, 0.1, 3.3])
    w = torch.zeros(1, 32)
    w[0, :4] = T([1.0, 2.0, -0.5, 0.3])
    x[0, 3] = 0.0
    g = T([[0.7]])
    y, dx, dw, db = _run("te-mxfp8", x, w, T([0.25]), g)
    # y = 10*1 + 0.1015625*2 + 3.25*-0.5 + 0.25 = 8.828125
    assert _same(y, T([[8.828125]]))
    # dgrad: g's block along out (one element): 0.7 / 448 -> 2^-9, 0.7 * 512 = 358.4 -> 352
    #   -> 0.6875; w's blocks along out are single elements: 0.3 -> 2^-10 scale,
    #   307.2 -> 320 -> 0.3125
    expect_dx = torch.zeros(1, 32)
    expect_dx[0, :4] = T([0.6875, 1.375, -0.34375, 0.21484375])
    assert _same(dx, expect_dx)
    # wgrad: blocks along the single token, so each element alone: x 3.3 -> 3.3/448 ->
    #   2^-7, 422.4 -> 416 -> 3.25; 0.1 -> 2^-12, 409.6 -> 416 -> 0.1015625; unrounded dW
    expect_dw = torch.zeros(1, 32)
    expect_dw[0, :3] = T([0.6875 * 10.0, 0.6875 * 0.1015625, 0.6875 * 3.25])
    assert _same(dw, expect_dw)
    assert _same(db, T([0.7]))


def test_te_blockwise_hand_case():
    # x (1 token x 128): [3, 0.3, 0.5, 0...]; its 1x128 block: amax 3, 448 / 3 = 149.3
    #   -> mantissa zeroed: scale 128.  3 * 128 = 384 exact; 0.3 * 128 = 38.4 -> 40 -> 0.3125;
    #   0.5 exact
    x = torch.zeros(1, 128)
    x[0, :3] = T([3.0, 0.3, 0.5])
    # W (2 x 128), one 128x128 tile: amax 7 (row 1), 448 / 7 = 64 -> scale 64 for both rows:
    #   1, -2.5 (-160), 7 (448) exact; 0.0002 * 64 = 0.0128, an E4M3 subnormal (below
    #   2^-6): 0.0128 / 2^-9 = 6.55 -> 7 -> 7 * 2^-9 / 64 = 7 / 32768
    #   (a 1x128 block of row 0 alone would scale by 128: 0.0256 / 2^-9 = 13.1 -> 13,
    #   13 / 65536)
    w = torch.zeros(2, 128)
    w[0, :3] = T([1.0, -2.5, 0.0002])
    w[1, 0] = 7.0
    b = T([0.25, -0.5])
    g = T([[0.7, -0.2]])
    y, dx, dw, db = _run("te-blockwise", x, w, b, g)
    # y0 = 3 - 0.3125 * 2.5 + 0.5 * 7 / 32768 + 0.25 = 161799 / 65536
    # y1 = 3 * 7 - 0.5 = 20.5
    assert _same(y, T([[2.4688568115234375, 20.5]]))
    # dgrad: g's 1x128 block along out: amax 0.7, 448 / 0.7 = 640 -> 512:
    #   0.7 * 512 = 358.4 -> 352 -> 0.6875;  -0.2 * 512 = -102.4 -> -104 -> -0.203125
    #   dX = 0.6875 * W0 - 0.203125 * W1 = [0.6875 - 1.421875, -1.71875, 77 / 524288]
    expect_dx = torch.zeros(1, 128)
    expect_dx[0, :3] = T([-0.734375, -1.71875, 0.0001468658447265625])
    assert _same(dx, expect_dx)
    # wgrad: blocks along the single token, each element alone:
    #   g: 0.7 -> 0.6875 (scale 512); -0.2 -> 448 / 0.2 = 2240 -> 2048, -409.6 -> -416
    #   -> -0.203125.  x: 3 -> 3; 0.3 -> scale 1024, 307.2 -> 320 -> 0.3125; 0.5 -> 0.5
    expect_dw = torch.zeros(2, 128)
    expect_dw[0, :3] = T([2.0625, 0.21484375, 0.34375])
    expect_dw[1, :3] = T([-0.609375, -0.0634765625, -0.1015625])
    # compared as values: row 1's zeros are -0.203125 * 0, whose sign the GEMM may keep
    assert torch.equal(dw, expect_dw)
    assert _same(db, g[0])


# --------------------------------------------------------------------------------------
# te-blockwise on a full layer: a reference written from TE's Float8BlockScaling formula
# (scale e = 448 / amax per block, power of two by zeroing its mantissa unless FP32
# scales are asked for; elements e4m3(x * e) by torch's own cast; value = element / e)
# --------------------------------------------------------------------------------------
def _ref_blocks(t: torch.Tensor, rows: int, cols: int, pow2: bool) -> torch.Tensor:
    """t quantized in rows x cols tiles (t's dims multiples of them)."""
    r, c = t.shape
    tiles = t.reshape(r // rows, rows, c // cols, cols)
    amax = tiles.abs().amax(dim=(1, 3), keepdim=True)
    # a true float32 division (a Python number over a tensor would multiply by a reciprocal)
    e = torch.where(amax > 0, torch.tensor(448.0) / amax, torch.ones_like(amax))
    if pow2:
        e = torch.exp2(torch.frexp(e)[1].float() - 1)      # mantissa zeroed
    elems = (tiles * e).to(torch.float8_e4m3fn).float()
    return (elems * (1.0 / e)).reshape(r, c)


def _te_blockwise_reference(x, w, b, g, pow2: bool):
    x_fprop = _ref_blocks(x, 1, 128, pow2)
    wq = _ref_blocks(w, 128, 128, pow2)
    y = x_fprop @ wq.t() + b
    g_dgrad = _ref_blocks(g, 1, 128, pow2)
    dx = g_dgrad @ wq
    g_wgrad = _ref_blocks(g.t().contiguous(), 1, 128, pow2).t()   # 128 x 1: along tokens
    x_wgrad = _ref_blocks(x.t().contiguous(), 1, 128, pow2).t()
    return y, dx, g_wgrad.t() @ x_wgrad, g.sum(0)


_FP32_SCALES = ("te-blockwise:weight.scheme=fp8-block128x128-fp32,"
                "activation.scheme=fp8-block128-fp32,grad_output.scheme=fp8-block128-fp32")


@pytest.mark.parametrize("recipe,pow2", [("te-blockwise", True), (_FP32_SCALES, False)],
                         ids=["power-of-two scales", "fp32 scales"])
def test_te_blockwise_layer_matches_the_reference(recipe, pow2):
    g0 = torch.Generator().manual_seed(3)
    x = torch.randn(128, 256, generator=g0) * torch.logspace(-3, 2, 256)
    w = torch.randn(256, 256, generator=g0) * 0.05
    w[:128, :128] *= 1e-3                  # tiles with their own, much smaller amax
    b = torch.randn(256, generator=g0)
    g = torch.randn(128, 256, generator=g0) / (1 + torch.arange(128.0)[:, None])
    ours = _run(recipe, x, w, b, g)
    theirs = _te_blockwise_reference(x, w, b, g, pow2)
    for name, a, t in zip(("y", "dX", "dW", "dbias"), ours, theirs):
        assert _same(a, t), name
