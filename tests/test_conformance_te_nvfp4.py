"""te-nvfp4 against TransformerEngine's NVFP4 reference, in cases computed by hand
(TransformerEngine needs CUDA and is not installed here).

The semantics, from TE's reference implementation of its NVFP4BlockScaling recipe
(``transformer_engine/pytorch/custom_recipes/quantization_nvfp4.py``: NVFP4QuantizerRef,
its ``qgemm``, and ``custom_recipes/gemm.py``, which picks the operands of each GEMM):

* quantize (each step one float32 operation), per copy of a tensor:
  g_enc = min(2688 / amax, FLT_MAX) (1 if 0), g_dec = 1 / g_enc,
  X = e4m3(clamp(block_amax * (g_enc * fl(1/6)), 448)) (torch's RNE cast),
  e = min(1 / (X * g_dec), FLT_MAX), elements = E2M1(clamp(x * e, -6, 6)) with TE's
  thresholds (ties 0.25 -> 0, 0.75 -> 1, 1.25 -> 1, 1.75 -> 2, 2.5 -> 2, 3.5 -> 4, 5 -> 4);
* copies: fprop takes x (1x16 blocks along in) and W (16x16 tiles); dgrad takes dy (1x16
  along out) and W's columnwise copy (the same tiles of W^T); wgrad takes the columnwise
  copies of dy and x: the transposes (tokens last) times the 16-point RHT
  diag(S) H16 / 4, S = [1,1,1,-1,1,-1,-1,-1,-1,-1,-1,1,-1,1,-1,-1], in groups of 16 tokens,
  each with the amax of its own transformed values;
* GEMM C = A B^T: acc = 0; for each 16-block t: acc += fl(s_a * s_b) * (a_t . b_t); then
  C = fl(amax_A * amax_B / (6^2 * 448^2)) * acc (fprop and dgrad: the rowwise amaxes,
  wgrad: the columnwise ones). dW leaves the wgrad GEMM unrounded; the bias gradient
  sums dy as it arrived. TE's reference GEMM takes no bias: it is added in FP32 after.
* TE rounds dy stochastically; its reference quantizer rounds to nearest, so the
  bit-identity cases run ``te-nvfp4:grad_output.rounding=nearest``, and the stochastic
  rounding is checked for its neighbours and probabilities.

Every expected number below was worked out from those rules, with the working in the
comments; fl(.) is float32 rounding. A second test holds a random layer to a line-by-line
transcription of the same reference code.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import BlockQuantized, block_scaled_mm, get_recipe, get_scheme
from mixprec.emulate import qlinear
from mixprec.policy import LayerPolicy
from mixprec.qfunc import OpContext
from test_quant_stochastic import assert_sr_frequency

T = torch.tensor
NEAREST = "te-nvfp4:grad_output.rounding=nearest"


def _run(recipe: str, x, w, b, g):
    w = w.clone().requires_grad_()
    b = b.clone().requires_grad_()
    xx = x.clone().requires_grad_()
    y = qlinear(xx, w, b, LayerPolicy.from_recipe(recipe))
    y.backward(g)
    return y.detach(), xx.grad, w.grad, b.grad


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.equal(a.view(torch.int32), b.view(torch.int32))


# --------------------------------------------------------------------------------------
# The hand case: 32 tokens x 32 in -> 32 out; tokens 0 and 1 carry values, the rest (and
# so most blocks) are zero: a zero block has amax 0 -> X = 0, e = min(1/0, FLT_MAX),
# elements 0.
# --------------------------------------------------------------------------------------
# x (rowwise copy, fprop): amax 10.5 -> g_enc = 2688 / 10.5 = 256, g_dec = 2^-8,
#   multiplier fl(256 * fl(1/6)) = 42.66666793823242
# token 0, in 0-15:  amax 10.5: 10.5 * 42.666668 = 448.0000133 -> fl 448 -> E4M3 448;
#   e = fl(1 / 1.75) = 0.5714285969734192:  10.5 -> 6.0000005 -> clip 6;  1.75 -> 1.0 -> 1;
#   -3.5 -> -2.0 -> -2
# token 0, in 16-31: amax 6: 256.0000076 -> fl 256 -> E4M3 256; e = 1: the E2M1 ties
#   6 -> 6, 0.75 -> 1, 2.5 -> 2, 5 -> 4, 3.5 -> 4, -1.25 -> -1, 0.25 -> 0
# token 1, in 0-15:  amax 6.25: 266.67 -> E4M3 256 (256 < 266.67 < 272, the midpoint to
#   288); e = 1: 6.25 -> clip 6;  5.5 -> 6;  -2.75 -> -3
# token 1, in 16-31: amax 6.375: 6.375 * 42.666668 = 272.0000081 -> fl 272.0 exactly, an
#   E4M3 tie between 256 and 288 -> even 256; e = 1: 6.375 -> clip 6;  4.5 -> 4;
#   -1.6875 -> -1.5
X = torch.zeros(32, 32)
X[0, :3] = T([10.5, 1.75, -3.5])
X[0, 16:23] = T([6.0, 0.75, 2.5, 5.0, 3.5, -1.25, 0.25])
X[1, :3] = T([6.25, 5.5, -2.75])
X[1, 16:19] = T([6.375, 4.5, -1.6875])
# W (16x16 tiles; the dgrad copy W^T has the same tiles): amax 7 -> g_enc = 2688 / 7 = 384,
#   g_dec = fl(1/384), multiplier fl(384 * fl(1/6)) = fl(64.0000019) = 64
# tile (0, 0): amax 7: 448 -> E4M3 448; e = fl(1 / fl(448 * g_dec)) = 0.8571428060531616:
#   7 -> 5.9999995 -> 6;  1.75 -> 1.4999999 -> 1.5;  -2.625 -> -2.2499998 -> -2;
#   3.5 -> 2.9999998 -> 3
# tile (0, 1): amax 1.75: 112 -> E4M3 112; e = 3.4285712242126465:
#   1.75 -> 6;  0.4375 -> 1.5;  0.25 -> 0.857 -> 1;  -0.875 -> -3
# tiles (1, *): zero
W = torch.zeros(32, 32)
W[0, :3] = T([7.0, 0.0, 1.75])
W[1, :3] = T([-2.625, 3.5, 0.0])
W[0, 16:19] = T([1.75, 0.0, 0.4375])
W[1, 16:18] = T([0.25, -0.875])
B = torch.zeros(32)
B[0], B[1], B[20] = 0.5, -0.25, 1.0
# elements          x row 0: [6, 1, -2 | 6, 1, 2, 4, 4, -1, 0]  scales 448 | 256
#                   x row 1: [6, 6, -3 | 6, 4, -1.5]             scales 256 | 256
#                   W row 0: [6, 0, 1.5 | 6, 0, 1.5]             scales 448 | 112
#                   W row 1: [-2, 3, 0 | 1, -3, 0]               scales 448 | 112
# y = alpha * (fl(s_x s_w) * dot_0 + fl(s_x s_w) * dot_1) + b,
#   alpha = fl(10.5 * 7 / 7225344) = fl(1/98304) (its rounding error stays below half an
#   ulp of every y here)
# y[0,0] = (448*448 * (36 - 3) + 256*112 * (36 + 3)) / 98304 + 0.5
#        = (6623232 + 1118208) / 98304 + 0.5 = 78.75 + 0.5 = 79.25
# y[0,1] = (200704 * (-12 + 3) + 28672 * (6 - 3)) / 98304 - 0.25 = -17.5 - 0.25 = -17.75
# y[1,0] = (256*448 * (36 - 4.5) + 256*112 * (36 - 2.25)) / 98304 + 0.5
#        = (3612672 + 967680) / 98304 + 0.5 = 46.59375 + 0.5 = 47.09375
# y[1,1] = (114688 * (-12 + 18) + 28672 * (6 - 12)) / 98304 - 0.25 = 5.25 - 0.25 = 5
# every other y is its bias (rows of zero elements: acc = 0)
Y = B.repeat(32, 1)
Y[:2, :2] = T([[79.25, -17.75], [47.09375, 5.0]])

# dy (rowwise copy, dgrad): amax 0.65625 -> g_enc = 4096, g_dec = 2^-12,
#   multiplier fl(4096 * fl(1/6)) = 682.6666870117188
# token 0, out 0-15: amax 0.65625: 448.00001 -> 448; e = fl(64/7) = 9.142857551574707:
#   0.65625 -> 6.0000005 -> 6;  -0.21875 -> -2.0 -> -2
# token 1, out 0-15: amax 0.125: 85.33 -> E4M3 88 (step 8 in [64, 128));
#   e = fl(1 / (88/4096)) = 46.54545593261719:  0.125 -> 5.82 -> 6;  0.0625 -> 2.91 -> 3
G = torch.zeros(32, 32)
G[0, :2] = T([0.65625, -0.21875])
G[1, :2] = T([0.125, 0.0625])
# dX[i, c] = alpha_d * fl(s_dy[i] * s_W(c)) * (e_dy[i,0] * e_W[0,c] + e_dy[i,1] * e_W[1,c]),
#   s_W(c) = 448 for c < 16, 112 above; one block of dy (out 0-15) is non-zero;
#   alpha_d = fl(fl(0.65625 * 7) / 7225344) = fl(4.59375 / 7225344) = 6.35782896551973e-07
#   (exactly 6.357828776e-07: its rounding shows in dX[0,0] and dX[0,16])
# row 0 (s_dy 448, e_dy 6, -2):
#   c=0:  200704 * (36 + 4)    =  8028160 -> 5.1041669845581055   (245/48 = 5.1041666...)
#   c=1:  200704 * (0 - 6)     = -1204224 -> -0.765625
#   c=2:  200704 * (9 + 0)     =  1806336 -> 1.1484375
#   c=16: 50176 * (36 - 2)     =  1705984 -> 1.0846354961395264  (1.0846354166...)
#   c=17: 50176 * (0 + 6)      =   301056 -> 0.19140625
#   c=18: 50176 * (9 + 0)      =   451584 -> 0.287109375
# row 1 (s_dy 88, e_dy 6, 3):
#   c=0:  39424 * (36 - 6)     =  1182720 -> 0.751953125
#   c=1:  39424 * (0 + 9)      =   354816 -> 0.2255859375
#   c=2:  39424 * (9 + 0)      =   354816 -> 0.2255859375
#   c=16: 9856 * (36 + 3)      =   384384 -> 0.244384765625
#   c=17: 9856 * (0 - 9)       =   -88704 -> -0.056396484375
#   c=18: 9856 * (9 + 0)       =    88704 -> 0.056396484375
DX = torch.zeros(32, 32)
DX[0, [0, 1, 2, 16, 17, 18]] = T([5.1041669845581055, -0.765625, 1.1484375,
                                  1.0846354961395264, 0.19140625, 0.287109375])
DX[1, [0, 1, 2, 16, 17, 18]] = T([0.751953125, 0.2255859375, 0.2255859375,
                                  0.244384765625, -0.056396484375, 0.056396484375])

# wgrad: the columnwise copies x^T (in x tokens) and dy^T (out x tokens) pass through the
# RHT in groups of 16 tokens. Only tokens 0 and 1 are non-zero and S[0] = S[1] = 1, so
# token j of the first group becomes (v0 + (-1)^j v1) / 4 (H16's rows 0 and 1); the
# second group stays zero. The sums are exact.
# dy^T rows: out 0: (0.65625 +- 0.125) / 4 = 0.1953125, 0.1328125 (alternating);
#            out 1: (-0.21875 +- 0.0625) / 4 = -0.0390625, -0.0703125
#   amax after the RHT 0.1953125 (not 0.65625): g_enc = fl(2688 / 0.1953125) =
#   13762.5595703125, g_dec = 7.26608996046707e-05, multiplier 2293.760009765625
#   out 0: 448.0 -> 448, e = 30.720001220703125: 6.0 -> 6; 4.08 -> 4
#   out 1: 161.28 -> E4M3 160 (step 16), e = 86.01599884033203: -3.36 -> -3; -6.05 -> -6
# x^T rows (even, odd token):                 amax * 106.98507690429688 -> X, elements
#   in 0:  (10.5 +- 6.25)/4  = 4.1875, 1.0625     448.0  -> 448   6, 1.52 -> 1.5
#   in 1:  (1.75 +- 5.5)/4   = 1.8125, -0.9375    193.91 -> 192   6.06 -> 6, -3.13 -> -3
#   in 2:  (-3.5 -+ 2.75)/4  = -1.5625, -0.1875   167.16 -> 160   -6.27 -> -6, -0.752 -> -1
#   in 16: (6 +- 6.375)/4    = 3.09375, -0.09375  330.99 -> 320   6.21 -> 6, -0.19 -> -0
#   in 17: (0.75 +- 4.5)/4   = 1.3125, -0.9375    140.42 -> 144   5.85 -> 6, -4.18 -> -4
#   in 18: (2.5 -+ 1.6875)/4 = 0.203125, 1.046875 112.0 -> 112    1.16 -> 1, 6.0 -> 6
#   in 19: 5/4 = 1.25 (both)                      133.73 -> 128   6.27 -> 6
#   in 20: 3.5/4 = 0.875                          93.61 -> 96     5.85 -> 6
#   in 21: -1.25/4 = -0.3125                      33.43 -> 32     -6.27 -> -6
#   in 22: 0.25/4 = 0.0625                        6.687 -> 6.5    6.17 -> 6
#   with g_enc = fl(2688 / 4.1875) = 641.9104614257812 (the x^T amax 4.1875)
# dW[o, c] = alpha_w * fl(X_o * X_c) * 8 * (e_o,even * e_c,even + e_o,odd * e_c,odd),
#   alpha_w = fl(fl(0.1953125 * 4.1875) / 7225344) = fl(0.81787109375 / 7225344)
#           = 1.1319475845539273e-07
# out 0 (X 448; 6, 4):           fl(X_o X_c)  dot    dW
#   in 0:  8 * (36 + 6)       -> 200704 * 336  -> 7.633463382720947
#   in 1:  8 * (36 - 12)      ->  86016 * 192  -> 1.8694195747375488
#   in 2:  8 * (-36 - 4)      ->  71680 * -320 -> -2.5964159965515137
#   in 16: 8 * (36 + 0)       -> 143360 * 288  -> 4.673549175262451
#   in 17: 8 * (36 - 16)      ->  64512 * 160  -> 1.1683872938156128
#   in 18: 8 * (6 + 24)       ->  50176 * 240  -> 1.3631184101104736
#   in 19: 8 * (36 + 24)      ->  57344 * 480  -> 3.115699291229248
#   in 20: 8 * 60             ->  43008 * 480  -> 2.3367745876312256
#   in 21: 8 * -60            ->  14336 * -480 -> -0.778924822807312
#   in 22: 8 * 60             ->   2912 * 480  -> 0.1582190990447998
# out 1 (X 160; -3, -6):
#   in 0:  8 * (-18 - 9)      ->  71680 * -216 -> -1.7525808811187744
#   in 1:  8 * (-18 + 18)     ->  30720 * 0    -> 0
#   in 2:  8 * (18 + 6)       ->  25600 * 192  -> 0.5563748478889465
#   in 16: 8 * (-18 + 0)      ->  51200 * -144 -> -0.8345623016357422
#   in 17: 8 * (-18 + 24)     ->  23040 * 48   -> 0.1251843422651291
#   in 18: 8 * (-3 - 36)      ->  17920 * -312 -> -0.6328763961791992
#   in 19: 8 * (-18 - 36)     ->  20480 * -432 -> -1.0014747381210327
#   in 20: 8 * -54            ->  15360 * -432 -> -0.7511060833930969
#   in 21: 8 * 54             ->   5120 * 432  -> 0.2503686845302582
#   in 22: 8 * -54            ->   1040 * -432 -> -0.05085613951086998
DW = torch.zeros(32, 32)
_IN = [0, 1, 2, 16, 17, 18, 19, 20, 21, 22]
DW[0, _IN] = T([7.633463382720947, 1.8694195747375488, -2.5964159965515137, 4.673549175262451,
                1.1683872938156128, 1.3631184101104736, 3.115699291229248, 2.3367745876312256,
                -0.778924822807312, 0.1582190990447998])
DW[1, _IN] = T([-1.7525808811187744, 0.0, 0.5563748478889465, -0.8345623016357422,
                0.1251843422651291, -0.6328763961791992, -1.0014747381210327,
                -0.7511060833930969, 0.2503686845302582, -0.05085613951086998])
# the bias gradient: dy summed over tokens as it arrived, in FP32
DB = torch.zeros(32)
DB[:2] = T([0.65625 + 0.125, -0.21875 + 0.0625])


def test_hand_case_operands_are_what_the_working_says():
    # the elements and scales of the working above, read through the preset's own copies
    c = OpContext(LayerPolicy.from_recipe(NEAREST), None, None, 0)
    qx = c.block_operand(X, "activation", -1, "fprop")[0]
    assert qx.block_scales[:2].tolist() == [[448.0, 256.0], [256.0, 256.0]]
    assert qx.elements[0, [0, 1, 2, 16, 17, 18, 19, 20, 21, 22]].tolist() == \
        [6, 1, -2, 6, 1, 2, 4, 4, -1, 0]
    assert qx.elements[1, [0, 1, 2, 16, 17, 18]].tolist() == [6, 6, -3, 6, 4, -1.5]
    qw = c.block_operand(W, "weight", -1, "fprop")[0]
    assert qw.block_scales.tolist() == [[448.0, 112.0], [0.0, 0.0]]
    qxt = c.block_operand(X, "activation", 0, "wgrad")[0]
    assert qxt.amax.item() == 4.1875
    assert qxt.block_scales[0, _IN].tolist() == [448, 192, 160, 320, 144, 112, 128, 96, 32, 6.5]


def test_te_nvfp4_hand_case():
    y, dx, dw, db = _run(NEAREST, X, W, B, G)
    assert _same(y, Y)
    assert _same(dx, DX)
    assert _same(dw, DW)
    assert _same(db, DB)


def test_the_dequantized_order_is_not_te():
    # the same quantized operands multiplied as elements * (X * g_dec) in one FP32 GEMM:
    # y[0,0] = 79.25000762939453 (g_dec = fl(1/384) instead of the amaxes' alpha)
    y, dx, dw, _ = _run(NEAREST + ",scaling.block_gemm=dequantized", X, W, B, G)
    assert not _same(y, Y) and not _same(dx, DX) and not _same(dw, DW)


def test_a_zero_input_takes_the_flt_max_global_scale():
    # amax 0: g_enc = min(2688 / 0, FLT_MAX) = FLT_MAX (not 1, which only a 0 encode scale
    # becomes), X = 0, elements 0, alpha = 0 * 7 / 7225344 = 0: y is the bias and dW is 0,
    # with no NaN from 0 * inf; dX does not depend on x
    y, dx, dw, db = _run(NEAREST, torch.zeros(32, 32), W, B, G)
    assert _same(y, B.repeat(32, 1))
    assert _same(dw, torch.zeros(32, 32))
    assert _same(dx, DX) and _same(db, DB)


def test_rht_only_on_the_wgrad_copies_with_te_signs():
    # dy with one value 0.5 at token 3: its wgrad copy (tokens last) becomes
    # 0.5 * S[3] * H16[3] / 4 = -0.125 * [1, -1, -1, 1, ...] (S[3] = -1), amax 0.125:
    # the block scale 448 (0.125 * fl(21504 * fl(1/6)) = 448.0) and elements -6 * H16[3]
    g = torch.zeros(32, 16)
    g[3, 5] = 0.5
    c = OpContext(LayerPolicy.from_recipe(NEAREST), None, None, 0)
    col = c.block_operand(g, "grad_output", 0, "wgrad")[0]
    h3 = T([1.0, -1.0, -1.0, 1.0] * 4)
    assert torch.equal(col.elements[:16, 5], -6 * h3)
    assert col.amax.item() == 0.125 and col.block_scales[0, 5].item() == 448.0
    # the dgrad copy (and x's fprop copy) are not transformed: 0.5 stays where it was
    row = c.block_operand(g, "grad_output", -1, "dgrad")[0]
    assert row.elements[3, 5].item() == 6.0 and row.elements.count_nonzero().item() == 1
    fwd = c.block_operand(g, "activation", -1, "fprop")[0]
    assert fwd.elements.count_nonzero().item() == 1


def test_alpha_comes_from_the_amaxes_not_the_decode_scales():
    # x[0,0] = 3 (amax 3: g_enc = 896), W[0,0] = 7 (g_enc = 384): both blocks get X = 448
    # (3 * fl(896 * fl(1/6)) and 7 * 64 round to 448) and the element 6, so
    # acc = fl(448 * 448) * 36 = 7225344 and
    #   alpha = fl(fl(3 * 7) / 7225344) = fl(1/344064) = 2.9064360660413513e-06,
    #   y = fl(alpha * 7225344) = 21.0.
    # The product of the decode scales fl(fl(1/896) * fl(1/384)) = 2.9064362934150267e-06
    # is one ulp larger and would give 21.000001907348633.
    x, w = torch.zeros(32, 32), torch.zeros(32, 32)
    x[0, 0], w[0, 0] = 3.0, 7.0
    y = qlinear(x, w, None, LayerPolicy.from_recipe(NEAREST))
    assert y[0, 0].item() == 21.0 and y.count_nonzero().item() == 1


def test_blocks_are_summed_in_order_from_zero():
    # three 16-blocks whose products are 2^24, 1, 1 (alpha = 2688 * 2688 / 7225344 = 1):
    # (0 + 2^24) + 1 = 2^24 (the tie goes to even), + 1 = 2^24 again; summing the last
    # two first would give 2^24 + 2
    elems = torch.zeros(1, 48)
    elems[0, :16], elems[0, 16], elems[0, 32] = 4.0, 1.0, 1.0
    nv = get_scheme("nvfp4")
    a = BlockQuantized.from_parts(elems, T([[256.0, 1.0, 1.0]]), T(1.0), nv, amax=T(2688.0))
    b = BlockQuantized.from_parts(elems, T([[256.0, 1.0, 1.0]]), T(1.0), nv, amax=T(2688.0))
    assert block_scaled_mm(a, b).item() == 2.0 ** 24


# --------------------------------------------------------------------------------------
# A random layer against a transcription of TE's reference code (the functions below
# follow NVFP4QuantizerRef._quantize_blockwise_reference, _apply_rht, cast_to_fp4x2 and
# qgemm line by line; E4M3 by torch's own cast)
# --------------------------------------------------------------------------------------
_F32_MAX = torch.finfo(torch.float32).max
_TE_SIGNS = [1.0, 1.0, 1.0, -1.0, 1.0, -1.0, -1.0, -1.0, -1.0, -1.0, -1.0, 1.0, -1.0, 1.0,
             -1.0, -1.0]


def _te_fp4(v: torch.Tensor) -> torch.Tensor:
    """cast_to_fp4x2 then cast_from_fp4x2: TE's E2M1 thresholds, as values."""
    a, mag = v.abs(), torch.zeros_like(v)
    for bound, value, closed in ((0.25, 0.5, False), (0.75, 1.0, True), (1.25, 1.5, False),
                                 (1.75, 2.0, True), (2.5, 3.0, False), (3.5, 4.0, True),
                                 (5.0, 6.0, False)):
        mag = torch.where(a >= bound if closed else a > bound, value, mag)
    return torch.where(v < 0, -mag, mag)


def _te_quantize(x: torch.Tensor, tile: tuple):
    m, n = x.shape
    if tile == (16, 16):
        tiles = x.unfold(0, 16, 16).unfold(1, 16, 16)
        vec_max = tiles.abs().amax(dim=(-1, -2)).repeat_interleave(16, dim=0).unsqueeze(-1)
    else:
        vec_max = x.view(m, n // 16, 16).abs().amax(-1, keepdim=True)
    amax = x.abs().max().view(1)
    six, e4 = T(6.0), T(448.0)
    g_enc = torch.min(torch.div(e4 * six, amax), T(_F32_MAX))
    if g_enc == 0:
        g_enc = T(1.0)
    g_dec = torch.div(1.0, g_enc)
    dec = torch.min(vec_max * (g_enc * torch.reciprocal(six)), T(_F32_MAX))
    dec = dec.clamp(-448.0, 448.0).to(torch.float8_e4m3fn).float()
    enc = torch.min(torch.div(1.0, dec * g_dec), T(_F32_MAX))
    clipped = torch.clamp(x.view(m, n // 16, 16) * enc, -6.0, 6.0).reshape(m, n)
    return _te_fp4(clipped), dec.squeeze(-1), amax


def _te_rht(xt: torch.Tensor) -> torch.Tensor:
    h = torch.ones(1, 1)
    while h.shape[0] < 16:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    h = (T(_TE_SIGNS) * torch.eye(16)) @ h
    return (xt.contiguous().view(-1, 16) @ (h * (1.0 / 16 ** 0.5))).view(xt.shape)


def _te_qgemm(a, b):
    (qa, sa, amax_a), (qb, sb, amax_b) = a, b
    y = torch.zeros(qa.shape[0], qb.shape[0])
    for t in range(qa.shape[1] // 16):
        cols = slice(16 * t, 16 * t + 16)
        y += torch.outer(sa[:, t], sb[:, t]) * (qa[:, cols] @ qb[:, cols].t())
    return torch.div(amax_a * amax_b, 6.0 * 6.0 * 448.0 * 448.0).squeeze(-1) * y


def _te_linear(x, w, b, g):
    xr, wr, gr = _te_quantize(x, (1, 16)), _te_quantize(w, (16, 16)), _te_quantize(g, (1, 16))
    y = _te_qgemm(xr, wr) + b
    dx = _te_qgemm(gr, _te_quantize(w.t().contiguous(), (16, 16)))
    dw = _te_qgemm(_te_quantize(_te_rht(g.t().contiguous()), (1, 16)),
                   _te_quantize(_te_rht(x.t().contiguous()), (1, 16)))
    return y, dx, dw, g.sum(0)


@pytest.mark.parametrize("seed", [0, 1])
def test_layer_matches_the_te_reference_transcription(seed):
    # TE's reference asks for reduction lengths that are multiples of 32 (and N of 8)
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(64, 96, generator=gen) * torch.logspace(-2, 1, 96)
    w = torch.randn(32, 96, generator=gen)
    w[16:, 32:64] *= 1e-3                          # a tile with its own, small scale
    b = torch.randn(32, generator=gen)
    g = torch.randn(64, 32, generator=gen) / (1 + torch.arange(64.0)[:, None])
    ours = _run(NEAREST, x, w, b, g)
    theirs = _te_linear(x, w, b, g)
    for name, a, t in zip(("y", "dX", "dW", "dbias"), ours, theirs):
        assert torch.equal(a, t), name
    # the default recipes' order (dequantized operands) differs from TE's
    nvfp4 = _run("nvfp4:grad_output.rounding=nearest,high_precision=fp32", x, w, b, g)
    assert not torch.equal(nvfp4[0], theirs[0]) and not torch.equal(nvfp4[2], theirs[2])


# --------------------------------------------------------------------------------------
# Stochastic rounding of the gradients
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("value,lo,hi", [(2.625, 2.0, 3.0), (-0.625, -0.5, -1.0),
                                         (4.5, 4.0, 6.0)])
def test_gradients_round_stochastically_to_the_two_neighbours(value, lo, hi):
    # The preset's own grad_output copies (dgrad: rowwise; wgrad would add the RHT).
    # amax 10.5 (row 0) makes g_dec = 2^-8; rows of amax 6 get X = 256 and e = 1, so the
    # elements are SR of ``value`` itself: lo or hi with P(hi) = (value - lo) / (hi - lo)
    # (5/8, 1/4, 1/4), checked at 6 standard deviations over 15 * 2^14 draws.
    policy = LayerPolicy.from_recipe("te-nvfp4")
    assert policy.grad_output.rounding.value == "stochastic"
    g = torch.full((1 << 14, 16), value)
    g[:, 0] = 6.0
    g[0] = torch.zeros(16)
    g[0, 0] = 10.5
    c = OpContext(policy, None, torch.Generator().manual_seed(11), 0)
    q = c.block_operand(g, "grad_output", -1, "dgrad")[0]
    assert torch.equal(q.block_scales[1:], torch.full((g.shape[0] - 1, 1), 256.0))
    assert_sr_frequency(q.elements[1:, 1:], lo, value, hi)


# --------------------------------------------------------------------------------------
# The preset and its knob
# --------------------------------------------------------------------------------------
def test_te_nvfp4_settings():
    r = get_recipe("te-nvfp4")
    assert (r.weight.scheme, r.activation.scheme, r.grad_output.scheme) == \
        ("nvfp4-2d", "nvfp4", "nvfp4")
    assert r.grad_output.rounding.value == "stochastic"
    assert (r.hadamard.signs, r.hadamard.fprop, r.hadamard.dgrad, r.hadamard.wgrad) == \
        ("te", 0, 0, 16)
    assert (r.scaling.block_gemm, r.attention, r.bias_grad) == ("scaled", "high_precision", "hp")
    assert r.weight_grad.is_identity
    # the seed preset keeps its order
    assert get_recipe("nvfp4").scaling.block_gemm == "dequantized"


@pytest.mark.parametrize("text,match", [
    ("te-nvfp4:scaling.block_gemm=fused", "block_gemm 'fused'.*dequantized, scaled"),
    ("te-nvfp4:activation.scheme=mxfp4", "activation to be a block scheme with a tensor scale"),
    ("te-nvfp4:grad_output.scheme=none", "grad_output to be a block scheme"),
    ("te-nvfp4:accumulation.format=fp16", "accumulation must be fp32"),
    ("fp8-hybrid:scaling.block_gemm=scaled", "weight to be a block scheme"),
])
def test_bad_block_gemm_settings_name_the_fix(text, match):
    with pytest.raises(ValueError, match=match):
        LayerPolicy.from_recipe(text)


def test_kept_layers_and_grammar():
    r = get_recipe("nvfp4:scaling.block_gemm=scaled")
    assert get_recipe(str(r)) == r and str(r) == "nvfp4:scaling.block_gemm=scaled"
    assert not LayerPolicy.from_recipe(r, high_precision=True).scaled_block_gemm


class _MatmulLayer(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(16, 16))

    def forward(self, x):
        return x.flatten(1) @ self.weight.t()


@pytest.mark.parametrize("make,op", [(lambda: torch.nn.Conv2d(16, 16, 1), "convolution"),
                                     (_MatmulLayer, "matmul")])
def test_other_gemm_ops_warn_that_they_keep_the_dequantized_order(make, op):
    model = make()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe="te-nvfp4")
    x = torch.randn(2, 16, 1, 1)
    with pytest.warns(UserWarning, match=f"{op} computes with dequantized"):
        with mp.autocast():
            F.relu(model(x)).sum()
