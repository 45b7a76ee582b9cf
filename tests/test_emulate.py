"""Emulated layers, PrecisionMode, attach and the FP32-op policy.

Oracles: inputs rounded by torch's own casts and ml_dtypes, an MX reference written
block by block in numpy, products summed in float64. A float32 accumulation of K exactly
formed products differs from the float64 sum by at most about K * 2^-24 * sum |products|
in any summation order (Higham's bound for recursive summation; blocked and pairwise
kernels do better), so that is the tolerance; where the output is stored in a narrow
format, rounding is monotonic, so the stored value must lie between the roundings of
exact - bound and exact + bound.
"""
import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec import quant
from mixprec.accum import matmul_accum
from mixprec.emulate import (PrecisionMode, attach, current_layer, qconv, qembedding, qlinear,
                             qmatmul, qscaled_dot_product_attention)
from mixprec.formats import get_format
from mixprec.policy import LayerPolicy, LayerState
from mixprec.recipe import AccumulationConfig, Recipe, TensorSpec, get_recipe

NP = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "e5m2": ml_dtypes.float8_e5m2,
      "e4m3": ml_dtypes.float8_e4m3fn, "e3m2": ml_dtypes.float6_e3m2fn}
U32 = 2.0 ** -24


# --------------------------------------------------------------------------------------
# Oracles
# --------------------------------------------------------------------------------------
def np64(t):
    return t.detach().double().numpy()


def ref_round(v, fmt):
    """Nearest-even rounding by ml_dtypes / numpy (float64 in and out, via float32)."""
    return np.asarray(v, np.float64).astype(np.float32).astype(NP[fmt]).astype(np.float64)


def ref_current(v, fmt):
    """Per-tensor current scaling with torch's own float8 cast: q(x * s) / s in float32."""
    t = torch.as_tensor(v, dtype=torch.float32)
    scale = torch.tensor(get_format(fmt).max, dtype=torch.float32) / t.abs().max()
    lp = (t * scale).clamp(-get_format(fmt).max, get_format(fmt).max)
    return ((lp.to(get_format(fmt).torch_dtype).float()) / scale).double().numpy()


def ref_mx(v, fmt, axis, block=32):
    """OCP MX: per block X = 2^(floor(log2 amax) - emax), elements saturated, rounded."""
    fmt_ = get_format(fmt)
    v = np.moveaxis(np.asarray(v, np.float64), axis, -1)
    n = v.shape[-1]
    pad = -n % block
    b = np.pad(v, [(0, 0)] * (v.ndim - 1) + [(0, pad)]).reshape(*v.shape[:-1], -1, block)
    amax = np.abs(b).max(-1, keepdims=True)
    _, e = np.frexp(np.where(amax > 0, amax, 1.0))
    x = np.ldexp(1.0, (e - 1) - fmt_.emax)
    elems = ref_round(np.clip(b / x, -fmt_.max, fmt_.max), fmt)
    out = (elems * x).reshape(*v.shape[:-1], -1)[..., :n]
    return np.moveaxis(out, -1, axis)


def ref_quant(v, kind, fmt, axis=-1):
    if kind == "none":
        return ref_round(v, fmt)
    if kind == "current":
        return ref_current(v, fmt)
    return ref_mx(v, fmt, axis)


def sqnr_db(ours, ref):
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return 10 * math.log10((ref ** 2).sum() / max(((ours - ref) ** 2).sum(), 1e-300))


def assert_fp32_accumulated(ours, exact, bound, store_fmt=None):
    """ours = store(fp32 sum) where exact is the float64 sum and bound the FP32 error."""
    ours = np64(ours)
    if store_fmt is None:
        assert np.all(np.abs(ours - exact) <= bound), np.max(np.abs(ours - exact) - bound)
    else:
        lo, hi = ref_round(exact - bound, store_fmt), ref_round(exact + bound, store_fmt)
        assert np.all((ours >= lo) & (ours <= hi))


def representable(t, fmt):
    v = np64(t)
    return np.array_equal(ref_round(v, fmt), v)


def policy(fmt, kind="none", rounding="nearest", **kw):
    spec = TensorSpec(fmt, rounding=rounding, scaling=kind, saturate=kind != "none")
    return LayerPolicy(spec, spec, spec, spec, **kw)


# Dtype an emulated layer returns: unscaled formats are stored in float16 / bfloat16
CONTAINER = {("fp16", "none"): torch.float16, ("bf16", "none"): torch.bfloat16,
             ("e5m2", "none"): torch.float16}


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------------------
# Exact answers: operands on a coarse grid
# --------------------------------------------------------------------------------------
# Where the exact answer is knowable the layers are compared with zero tolerance.  Inputs
# are k/8 * (1 + u * 2^-(M+2)), 1 <= |k| <= 15, |u| <= 0.9, M the format's mantissa bits:
# the jitter is below half an ulp of k/8 in the format, so rounding to fp16, bf16, e5m2 or
# MX e4m3 removes it, and leaves values of magnitude <= 2 that are multiples of 2^-3
# (unscaled: k/8 itself, or for e5m2 a neighbour of it, on a grid of >= 2^-3 above 1) or
# of 2^-6 (MX e4m3: 4 significant bits of values >= 1/8; the E8M0 scale is a power of two).
# Products are then multiples of 2^-12 below 4, and a sum of up to 576 of them (a
# 64-channel 3x3 conv) stays below 2304 < 2^24 * 2^-12: float32 holds every partial sum
# exactly, in any order.  Biases are multiples of 2^-6 below 1 (added unrounded).  So the
# layer's FP32 result equals the float64 one, and the reference is
#     quantize(inputs) -> float64 op -> quantize(output to the output format).
# quantize is held bit for bit to ml_dtypes and torch's casts in test_quant.py; MX uses
# the numpy reference ref_mx above.
def on_grid(*shape, seed, fmt):
    """k/8 (1 + u 2^-(M+2)): values whose rounding to ``fmt`` lands on the coarse grid."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(1, 16, shape, generator=g)
    k = k * (1 - 2 * torch.randint(0, 2, shape, generator=g))
    u = torch.rand(shape, generator=g, dtype=torch.float64) * 1.8 - 0.9
    return (k / 8 * (1 + u * 2.0 ** -(get_format(fmt).mbits + 2))).float()


def bias_grid(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-64, 65, (n,), generator=g).float() * 2.0 ** -6


def q64(t, fmt, kind="none", axis=-1):
    """The operand as the layer rounds it, in float64."""
    if kind == "mx":
        return torch.from_numpy(ref_mx(np64(t), fmt, axis))
    return quant.quantize(t.detach().double(), fmt)


def store64(y, fmt, kind):
    """The output as the layer stores it: rounded to an unscaled format, else FP32 (exact)."""
    return y.detach() if kind == "mx" else quant.quantize(y.detach(), fmt)


def assert_exact(got, want):
    got, want = got.detach().double(), want.detach().double()
    assert got.shape == want.shape, (got.shape, want.shape)
    diff = got != want
    assert not bool(diff.any()), (int(diff.sum()), got[diff][:4], want[diff][:4])


EXACT = [("fp16", "none"), ("bf16", "none"), ("e5m2", "none"), ("e4m3", "mx")]
EXACT_IDS = ["fp16", "bf16", "e5m2", "mxfp8"]
# Per-tensor current scaling multiplies by 448 / amax, not a power of two: q(x s) / s is
# rounded again in float32, so the exact answer is not knowable and those cases keep the
# FP32 accumulation bound and SQNR checks.
CURRENT = [("e4m3", "current", 25)]


# --------------------------------------------------------------------------------------
# LayerPolicy
# --------------------------------------------------------------------------------------
def test_policy_from_recipe():
    r = get_recipe("fp8-e5m2")
    p = LayerPolicy.from_recipe(r)
    assert (p.weight, p.grad_output, p.accumulation) == (r.weight, r.grad_output, r.accumulation)
    hp = LayerPolicy.from_recipe(r, high_precision=True)
    assert {hp.weight.format, hp.weight_grad.format} == {"fp16"} and not hp.is_identity
    assert LayerPolicy.from_recipe("fp16-mixed", high_precision=True).is_identity
    assert LayerPolicy.from_recipe(Recipe()).is_identity
    assert not LayerPolicy(accumulation=AccumulationConfig("fp16")).is_identity
    with pytest.raises(ValueError, match="LayerPolicy.weight must be a TensorSpec"):
        LayerPolicy(weight="fp16")
    with pytest.raises(ValueError, match="unknown layer role 'master'; valid choices"):
        LayerPolicy().spec("master")


# --------------------------------------------------------------------------------------
# Forward against independent references
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kind", EXACT, ids=EXACT_IDS)
def test_qlinear_forward_exact(fmt, kind):
    x, w = on_grid(2, 8, 64, seed=1, fmt=fmt), on_grid(24, 64, seed=2, fmt=fmt)
    b = bias_grid(24, seed=3)
    y = qlinear(x, w, b, policy(fmt, kind))
    assert y.dtype == CONTAINER.get((fmt, kind), torch.float32) and y.shape == (2, 8, 24)
    want = store64(F.linear(q64(x, fmt, kind), q64(w, fmt, kind), b.double()), fmt, kind)
    assert_exact(y, want)
    # the check sees the input rounding: without it the answer differs
    assert not torch.equal(store64(F.linear(x.double(), w.double(), b.double()), fmt, kind),
                           want)


@pytest.mark.parametrize("fmt,kind", EXACT, ids=EXACT_IDS)
def test_qmatmul_forward_broadcast_exact(fmt, kind):
    a, b = on_grid(2, 3, 5, 64, seed=4, fmt=fmt), on_grid(64, 7, seed=5, fmt=fmt)
    y = qmatmul(a, b, policy(fmt, kind))
    assert y.dtype == CONTAINER.get((fmt, kind), torch.float32) and y.shape == (2, 3, 5, 7)
    assert_exact(y, store64(q64(a, fmt, kind, -1) @ q64(b, fmt, kind, -2), fmt, kind))


@pytest.mark.parametrize("fmt,kind,min_db", CURRENT, ids=["e4m3-current"])
def test_qlinear_forward_matches_reference(fmt, kind, min_db):
    x, w, b = randn(2, 8, 64, seed=1), randn(24, 64, seed=2), randn(24, seed=3)
    y = qlinear(x, w, b, policy(fmt, kind))
    assert y.dtype == CONTAINER.get((fmt, kind), torch.float32) and y.shape == (2, 8, 24)
    xr, wr = ref_quant(np64(x), kind, fmt, -1), ref_quant(np64(w), kind, fmt, -1)
    exact = xr @ wr.T + np64(b)
    bound = (64 + 2) * U32 * (np.abs(xr) @ np.abs(wr).T + np.abs(np64(b)))
    assert_fp32_accumulated(y, exact, bound, fmt if kind == "none" else None)
    assert sqnr_db(np64(y), np64(x) @ np64(w).T + np64(b)) > min_db


@pytest.mark.parametrize("fmt,kind,min_db", CURRENT, ids=["e4m3-current"])
def test_qmatmul_forward_broadcast_matches_reference(fmt, kind, min_db):
    a, b = randn(2, 3, 5, 64, seed=4), randn(64, 7, seed=5)
    y = qmatmul(a, b, policy(fmt, kind))
    assert y.dtype == CONTAINER.get((fmt, kind), torch.float32)
    ar, br = ref_quant(np64(a), kind, fmt, -1), ref_quant(np64(b), kind, fmt, -2)
    exact = ar @ br
    bound = (64 + 2) * U32 * (np.abs(ar) @ np.abs(br))
    assert_fp32_accumulated(y, exact, bound, fmt if kind == "none" else None)
    assert sqnr_db(np64(y), np64(a) @ np64(b)) > min_db


@pytest.mark.parametrize("fmt,kind", EXACT, ids=EXACT_IDS)
def test_qconv2d_exact(fmt, kind):
    x = on_grid(2, 64, 6, 6, seed=6, fmt=fmt).requires_grad_()
    w = on_grid(8, 64, 3, 3, seed=7, fmt=fmt).requires_grad_()
    spec = TensorSpec(fmt, scaling=kind, saturate=kind != "none")
    y = qconv(x, w, None, 1, 1, 1, 1, LayerPolicy(spec, spec, spec, TensorSpec()))
    # MX blocks run along input channels (dim 1) of both x and w
    assert_exact(y, store64(F.conv2d(q64(x, fmt, kind, 1), q64(w, fmt, kind, 1), padding=1),
                            fmt, kind))
    # backward: dx from g and w blocked along C_out, dw (kept FP32 here) from g and x
    # blocked along batch; the gradient of a float16 output arrives in float16
    g = on_grid(*y.shape, seed=40, fmt=fmt).to(y.dtype)
    y.backward(g)
    g_row, g_col = q64(g, fmt, kind, 1), q64(g, fmt, kind, 0)
    dx = torch.nn.grad.conv2d_input(x.shape, q64(w, fmt, kind, 0), g_row, padding=1)
    dw = torch.nn.grad.conv2d_weight(q64(x, fmt, kind, 0), w.shape, g_col, padding=1)
    assert_exact(x.grad, dx)
    assert_exact(w.grad, dw)


@pytest.mark.parametrize("fmt,kind,min_db", CURRENT, ids=["e4m3-current"])
def test_qconv2d_matches_reference(fmt, kind, min_db):
    x = randn(2, 64, 6, 6, seed=6).requires_grad_()
    w = randn(8, 64, 3, 3, seed=7).requires_grad_()
    spec = TensorSpec(fmt, scaling=kind, saturate=kind != "none")
    y = qconv(x, w, None, 1, 1, 1, 1, LayerPolicy(spec, spec, spec, TensorSpec()))
    # MX blocks run along input channels (dim 1) of both x and w
    xr, wr = ref_quant(np64(x), kind, fmt, 1), ref_quant(np64(w), kind, fmt, 1)
    exact = F.conv2d(torch.from_numpy(xr), torch.from_numpy(wr), padding=1).numpy()
    absum = F.conv2d(torch.from_numpy(np.abs(xr)), torch.from_numpy(np.abs(wr)), padding=1)
    bound = (64 * 9 + 2) * U32 * absum.numpy()
    assert_fp32_accumulated(y, exact, bound, fmt if kind == "none" else None)
    assert sqnr_db(np64(y), np64(F.conv2d(x.double(), w.double(), padding=1))) > min_db
    # backward: dx from g and w blocked along C_out, dw from g and x blocked along batch;
    # the gradient of a float16 output arrives in float16
    g = randn(*y.shape, seed=40).to(y.dtype)
    y.backward(g)
    g_row, g_col = ref_quant(np64(g), kind, fmt, 1), ref_quant(np64(g), kind, fmt, 0)
    w_col, x_col = ref_quant(np64(w), kind, fmt, 0), ref_quant(np64(x), kind, fmt, 0)
    t = torch.from_numpy
    dx = torch.nn.grad.conv2d_input(x.shape, t(w_col), t(g_row), padding=1)
    dw = torch.nn.grad.conv2d_weight(t(x_col), w.shape, t(g_col), padding=1)
    torch.testing.assert_close(x.grad.double(), dx, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(w.grad.double(), dw, rtol=1e-5, atol=1e-4)


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("fmt", ["fp16", "e5m2"])
@pytest.mark.parametrize("nd,stride,padding,dilation,groups", [
    (2, 2, 1, 1, 1), (2, 1, "same", 2, 2), (2, 1, "same", 1, 1), (2, (2, 1), (0, 2), 1, 4),
    (1, 1, "valid", 1, 1), (1, 2, 3, 2, 2), (1, 1, "same", 1, 1),
])
def test_qconv_geometry_forward_and_backward(nd, stride, padding, dilation, groups, fmt):
    """Forward and all three gradients equal the float64 conv of rounded operands, rounded
    where the layer rounds (output and weight/bias gradients; dx stays FP32)."""
    conv = {1: F.conv1d, 2: F.conv2d}[nd]
    spatial = (9,) * nd
    kernel = (4,) * nd if padding == "same" and dilation == 1 else (3,) * nd
    x = on_grid(2, 8, *spatial, seed=8, fmt=fmt).requires_grad_()
    w = on_grid(8, 8 // groups, *kernel, seed=9, fmt=fmt).requires_grad_()
    b = bias_grid(8, seed=10).requires_grad_()
    y = qconv(x, w, b, stride, padding, dilation, groups, policy(fmt))
    g = on_grid(*y.shape, seed=11, fmt=fmt).half()
    y.backward(g)

    xr, wr = q64(x, fmt).requires_grad_(), q64(w, fmt).requires_grad_()
    br = b.detach().double().requires_grad_()
    ref = conv(xr, wr, br, stride, padding, dilation, groups)
    ref.backward(q64(g, fmt))
    assert y.dtype == torch.float16
    assert_exact(y, quant.quantize(ref.detach(), fmt))
    assert_exact(x.grad, xr.grad)
    assert_exact(w.grad, quant.quantize(wr.grad, fmt))
    assert_exact(b.grad, quant.quantize(br.grad, fmt))


def test_round_output_false_keeps_fp32_sums():
    x, w = randn(4, 64, seed=41), randn(8, 64, seed=42)
    y = qlinear(x, w, None, policy("fp16", round_output=False))
    xr, wr = ref_round(np64(x), "fp16"), ref_round(np64(w), "fp16")
    assert y.dtype == torch.float32 and not representable(y, "fp16")
    assert_fp32_accumulated(y, xr @ wr.T, 66 * U32 * (np.abs(xr) @ np.abs(wr).T))


def test_qconv_rejects_emulated_accumulation():
    with pytest.raises(ValueError, match="implemented for linear and matmul only.*fp32"):
        qconv(randn(1, 2, 4, 4), randn(2, 2, 1, 1), None, 1, 0, 1, 1,
              policy("fp16", accumulation=AccumulationConfig("fp16")))


def test_qlinear_emulated_accumulation_uses_accum():
    x, w = randn(4, 100, seed=12), randn(3, 100, seed=13)
    acc = AccumulationConfig("fp16", chunk=16)
    y = qlinear(x, w, None, policy("fp16", accumulation=acc))
    expected = matmul_accum(x.half().float(), w.half().float().t(), acc).half().float()
    assert torch.equal(y, expected)


# --------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt,kind", EXACT, ids=EXACT_IDS)
def test_qlinear_backward_exact(fmt, kind):
    x = on_grid(40, 64, seed=14, fmt=fmt).requires_grad_()
    w = on_grid(24, 64, seed=15, fmt=fmt).requires_grad_()
    b = bias_grid(24, seed=16).requires_grad_()
    g = on_grid(40, 24, seed=17, fmt=fmt).to(CONTAINER.get((fmt, kind), torch.float32))
    # dx = q(g) @ q(w) kept FP32; dw = q(q(g)^T @ q(x)), db = q(sum q(g)), with MX blocks
    # along each GEMM's reduction: g along out / tokens, w along out, x along tokens, and
    # the weight gradients along in_features
    qlinear(x, w, b, policy(fmt, kind)).backward(g)
    g_row, g_col = q64(g, fmt, kind, -1), q64(g, fmt, kind, 0)
    w_col, x_col = q64(w, fmt, kind, 0), q64(x, fmt, kind, 0)
    assert_exact(x.grad, g_row @ w_col)
    assert_exact(w.grad, q64(g_col.T @ x_col, fmt, kind, -1))
    assert_exact(b.grad, q64(g_col.sum(0), fmt, kind, -1))


@pytest.mark.parametrize("fmt,kind,min_db", CURRENT, ids=["e4m3-current"])
def test_qlinear_backward_rounds_grads(fmt, kind, min_db):
    x = randn(40, 64, seed=14).requires_grad_()
    w = randn(24, 64, seed=15).requires_grad_()
    b = randn(24, seed=16).requires_grad_()
    g = randn(40, 24, seed=17).to(CONTAINER.get((fmt, kind), torch.float32))
    spec = TensorSpec(fmt, scaling=kind, saturate=kind != "none")
    # 1. weight_grad kept in FP32: dx = q(g) @ q(w), dw = q(g)^T @ q(x), FP32 sums, with
    #    MX blocks along each GEMM's reduction: g along out / tokens, w along out, x along
    #    tokens
    qlinear(x, w, b, LayerPolicy(spec, spec, spec, TensorSpec())).backward(g)
    g_row, g_col = ref_quant(np64(g), kind, fmt, -1), ref_quant(np64(g), kind, fmt, 0)
    w_col, x_col = ref_quant(np64(w), kind, fmt, 0), ref_quant(np64(x), kind, fmt, 0)
    assert_fp32_accumulated(x.grad, g_row @ w_col, 26 * U32 * (np.abs(g_row) @ np.abs(w_col)))
    assert_fp32_accumulated(w.grad, g_col.T @ x_col,
                            42 * U32 * (np.abs(g_col).T @ np.abs(x_col)))
    assert_fp32_accumulated(b.grad, g_col.sum(0), 42 * U32 * np.abs(g_col).sum(0))
    dw32, db32 = np64(w.grad), np64(b.grad)
    # 2. the full policy rounds those FP32 weight gradients (MX blocks along in_features)
    x.grad = w.grad = b.grad = None
    qlinear(x, w, b, policy(fmt, kind)).backward(g)
    assert np.array_equal(np64(w.grad), ref_quant(dw32, kind, fmt, -1))
    assert np.array_equal(np64(b.grad), ref_quant(db32, kind, fmt, -1))
    if kind == "none":
        assert representable(w.grad, fmt) and representable(b.grad, fmt)
    assert sqnr_db(np64(x.grad), np64(g) @ np64(w)) > min_db - 3
    assert sqnr_db(np64(w.grad), np64(g).T @ np64(x)) > min_db - 3
    assert sqnr_db(np64(b.grad), np64(g).sum(0)) > min_db - 3


E5M2_VALUES = np.unique([v for v in np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e5m2)
                         .astype(np.float64) if np.isfinite(v)])


def test_stochastic_weight_grad_lands_on_neighbours_with_exact_odds():
    # Operands on the grid: the FP32 weight gradient q(g)^T q(x) is exact (sums of 256
    # products, multiples of 2^-6 below 4), so each element v has known e5m2 neighbours
    # lo <= v <= hi (from ml_dtypes' table), and stochastic rounding must give hi with
    # probability p = (v - lo) / (hi - lo).  Over R seeded calls the number of his is a sum
    # of independent Bernoulli draws: mean R sum p, variance R sum p (1 - p); we allow 6
    # standard deviations, and check that this is tight enough to catch a 1/64 bias.
    x = on_grid(256, 64, seed=18, fmt="e5m2").requires_grad_()
    w = on_grid(64, 64, seed=19, fmt="e5m2").requires_grad_()
    g = on_grid(256, 64, seed=20, fmt="e5m2").half()   # a float16 output's gradient
    near = TensorSpec("e5m2")
    sr = TensorSpec("e5m2", rounding="stochastic")

    def wgrad(seed):
        w.grad = None
        gen = torch.Generator().manual_seed(seed)
        qlinear(x, w, None, LayerPolicy(near, near, near, sr), generator=gen).backward(g)
        return np64(w.grad)

    a, b, c = wgrad(1), wgrad(1), wgrad(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    exact = (q64(g, "e5m2").T @ q64(x, "e5m2")).numpy()
    lo = E5M2_VALUES[np.searchsorted(E5M2_VALUES, exact, side="right") - 1]
    hi = E5M2_VALUES[np.searchsorted(E5M2_VALUES, exact, side="left")]
    p = np.where(hi > lo, (exact - lo) / np.where(hi > lo, hi - lo, 1.0), 0.0)
    rounds = 48
    draws = np.stack([wgrad(100 + r) for r in range(rounds)])
    assert np.all((draws == lo) | (draws == hi))
    ups = int(((draws == hi) & (hi > lo)).sum())
    mean, sd = rounds * p.sum(), math.sqrt(rounds * (p * (1 - p)).sum())
    assert 6 * sd / (rounds * int((hi > lo).sum())) < 1 / 128
    assert abs(ups - mean) <= 6 * sd, (ups, mean, sd)


# --------------------------------------------------------------------------------------
# Saved tensors are stored in low precision
# --------------------------------------------------------------------------------------
def saved_bytes(fn):
    items = []

    def pack(t):
        items.append((t.dtype, t.numel() * t.element_size()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(n for _, n in items), {d for d, _ in items}


@pytest.mark.parametrize("recipe,ratio,dtypes", [
    ("fp16-mixed", 0.5, {torch.float16}), ("bf16-mixed", 0.5, {torch.bfloat16}),
    ("fp8-e5m2", 0.25, {torch.float8_e5m2}),
    ("fp8-hybrid", (1024 + 1536 + 8) / 10240, {torch.float8_e4m3fn, torch.float32}),
    ("mxfp8", (1024 + 1536 + 64 + 64) / 10240, {torch.float8_e4m3fn, torch.float8_e8m0fnu}),
])
def test_saved_tensor_bytes(recipe, ratio, dtypes):
    x = randn(16, 64, seed=21).requires_grad_()
    w = randn(24, 64, seed=22).requires_grad_()
    base, base_dtypes = saved_bytes(lambda: F.linear(x, w))
    assert base == (16 * 64 + 24 * 64) * 4 and base_dtypes == {torch.float32}
    ours, our_dtypes = saved_bytes(lambda: qlinear(x, w, None, LayerPolicy.from_recipe(recipe)))
    assert ours / base == pytest.approx(ratio) and our_dtypes == dtypes


def test_mxfp6_saves_uint8_codes_and_backward_works(monkeypatch):
    if not hasattr(quant, "encode"):   # stand-in until quant's codes exist
        codes = {float(v): i for i, v in enumerate(np.arange(256, dtype=np.uint8)
                                                  .view(ml_dtypes.float6_e3m2fn)[:64]
                                                  .astype(np.float64))}
        monkeypatch.setattr(quant, "encode", lambda v, f: torch.tensor(
            [codes[float(e)] for e in v.flatten()], dtype=torch.uint8).view(v.shape),
            raising=False)
        monkeypatch.setattr(quant, "decode", lambda c, f, dtype=torch.float32: torch.from_numpy(
            c.numpy().view(ml_dtypes.float6_e3m2fn).astype(np.float32)).to(dtype), raising=False)
    x = randn(8, 32, seed=23).requires_grad_()
    w = randn(4, 32, seed=24).requires_grad_()
    p = LayerPolicy.from_recipe("mxfp6")
    total, dtypes = saved_bytes(lambda: qlinear(x, w, None, p))
    assert dtypes == {torch.uint8, torch.float8_e8m0fnu}
    assert total == 8 * 32 + 4 * 32 + 32 + 32
    qlinear(x, w, None, p).backward(torch.ones(8, 4))
    # each dx sums the 4 values of one MX block (one E8M0 scale, e3m2 values: multiples of
    # 2^-4 below 28 times that scale), which float32 holds exactly: zero tolerance
    expected = torch.ones(8, 4).double().numpy() @ ref_mx(np64(w), "e3m2", 0)
    assert np.array_equal(np64(x.grad), expected)


# --------------------------------------------------------------------------------------
# Embedding and attention
# --------------------------------------------------------------------------------------
def test_qembedding_lookup_output_and_weight_grad():
    weight = (randn(10, 6, seed=25) * 3).requires_grad_()
    idx = torch.tensor([[1, 2, 1], [0, 9, 2]])
    y = qembedding(idx, weight, policy("e5m2"), padding_idx=2)
    assert y.dtype == torch.float16
    assert torch.equal(y.float(), weight.detach()[idx].to(torch.float8_e5m2).float())
    g = randn(2, 3, 6, seed=26).half()
    y.backward(g)
    gq = g.to(torch.float8_e5m2).double()
    expected = torch.zeros(10, 6, dtype=torch.float64).index_add_(0, idx.flatten(),
                                                                   gq.reshape(6, 6))
    expected[2] = 0
    assert torch.equal(weight.grad, expected.float().to(torch.float8_e5m2).float())


# Attention: softmax is not exact in general, so the scores are chosen to make it exact.
# Query i is 32 e_a(i), key j is 16 e_b(j) (plus jitter that fp16 rounding removes), so a
# score q.k / sqrt(16) is 128 where a(i) = b(j) and 0 elsewhere.  exp(-128) ~ 2.6e-56 lies
# below float32's smallest subnormal, so FP32 softmax gives 1/m to each of the m matching
# keys and exactly 0 to the rest; a query matching no key (a = 4) scores 0 everywhere and
# gets 1/n on each of its n visible keys.  The groups are chosen so that m and n are 1, 2, 4 or 8,
# with and without the causal mask: every weight is a power of two, and the reference
# float64 softmax rounded to float32 is the layer's FP32 softmax, bit for bit.
ATTN_QUERY = [0, 1, 1, 2, 2, 0, 2, 4]    # a(i)
ATTN_KEY = [0, 1, 1, 2, 2, 2, 2, 3]      # b(j)


def one_hot_rows(groups, size, seed):
    g = torch.Generator().manual_seed(seed)
    t = torch.zeros(2, 3, len(groups), 16)
    for i, a in enumerate(groups):
        t[..., i, a] = size * (1 + (torch.rand(2, 3, generator=g) - 0.5) * 2.0 ** -12)
    return t


def attention_reference(q, k, v, fmt, mask=None):
    """Rounded operands, scores stored in fmt, float32 softmax, attn rounded, output
    stored: float64 math rounded by quantize where the layer rounds."""
    r = lambda t: quant.quantize(t.detach().double(), fmt)   # noqa: E731
    scores = r(r(q) @ r(k).transpose(-1, -2)) / math.sqrt(q.shape[-1])   # sqrt(16): exact
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    attn = quant.quantize(torch.softmax(scores, -1), "fp32")
    assert set(attn.unique().tolist()) <= {0.0, 1 / 8, 1 / 4, 1 / 2, 1.0}
    return r(r(attn) @ r(v))


def test_sdpa_is_decomposed_causal_and_masked():
    q, k = one_hot_rows(ATTN_QUERY, 32, seed=27), one_hot_rows(ATTN_KEY, 16, seed=28)
    v = on_grid(2, 3, 8, 16, seed=29, fmt="fp16")
    p = policy("fp16")
    causal = torch.ones(8, 8, dtype=torch.bool).tril()
    with PrecisionMode(default_policy=p):
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        ym = F.scaled_dot_product_attention(q, k, v, attn_mask=causal)
        yf = F.scaled_dot_product_attention(q, k, v)
    assert y.dtype == torch.float16
    assert_exact(y, attention_reference(q, k, v, "fp16", causal))
    assert_exact(ym, attention_reference(q, k, v, "fp16", causal))
    assert_exact(yf, attention_reference(q, k, v, "fp16"))
    assert not torch.equal(y, yf)
    plain = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert not torch.equal(y.float(), plain)     # v's rounding shows
    torch.manual_seed(0)
    d1 = qscaled_dot_product_attention(q, k, v, p, dropout_p=0.5)
    torch.manual_seed(0)
    d2 = qscaled_dot_product_attention(q, k, v, p, dropout_p=0.5)
    assert torch.equal(d1, d2) and not torch.equal(d1, qscaled_dot_product_attention(q, k, v, p))


class MatmulAttention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        self.layer = current_layer()
        return attn @ v


def test_precision_mode_routes_attention_built_from_matmul():
    torch.manual_seed(0)
    model, x = MatmulAttention(), randn(2, 5, 8, seed=30)
    handle = attach(model, lambda name, m: policy("fp16") if name == "" else None)
    with PrecisionMode():
        y = model(x)
    handle.remove()
    assert model.layer.name == "" and model.layer.policy == policy("fp16")
    assert current_layer() is None
    # Routing, not numerics: the answer is the composition of the emulated functions,
    # whose numerics are checked with zero tolerance above (random weights leave the
    # softmax inexact, so no closed form), with the division in float16 and softmax in
    # FP32 returned in float16
    p = policy("fp16")
    q, k, v = qlinear(x, model.qkv.weight, model.qkv.bias, p).chunk(3, dim=-1)
    scores = qmatmul(q, k.transpose(-1, -2), p) / math.sqrt(8)
    attn = torch.softmax(scores.float(), -1).half()
    assert torch.equal(y, qmatmul(attn, v, p))
    assert representable(y, "fp16")


# --------------------------------------------------------------------------------------
# PrecisionMode and attach
# --------------------------------------------------------------------------------------
def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))


def test_precision_mode_routes_linear_in_sequential():
    model, x = mlp(), randn(4, 16, seed=31)
    with PrecisionMode(default_policy=policy("e5m2")):
        y = model(x)
    h = torch.relu(qlinear(x, model[0].weight, model[0].bias, policy("e5m2")))
    assert torch.equal(y, qlinear(h, model[2].weight, model[2].bias, policy("e5m2")))
    assert representable(y, "e5m2") and not torch.equal(y, model(x))
    a, b = randn(2, 3, 16, seed=43), randn(2, 16, 4, seed=44)
    with PrecisionMode(default_policy=policy("e5m2")):
        calls = [torch.bmm(a, mat2=b), a.bmm(b), a @ b, torch.matmul(a, b), a.matmul(b)]
    assert all(torch.equal(c, qmatmul(a, b, policy("e5m2"))) for c in calls)


def test_attach_gives_layers_their_own_policy_and_exempt_runs_identity():
    model, x = mlp(), randn(4, 16, seed=32)
    outputs = {}
    for i in (0, 2):
        model[i].register_forward_hook(lambda m, a, out, i=i: outputs.__setitem__(i, (a[0], out)))
    exempt = LayerPolicy()
    handle = attach(model, lambda name, m: {"0": policy("e5m2"), "2": exempt}.get(name))
    assert set(handle.states) == {"0", "2"}
    with PrecisionMode(default_policy=policy("fp16")):
        model(x)
    handle.remove()
    assert representable(outputs[0][1], "e5m2") and not representable(outputs[0][1], "e4m3")
    h, y = outputs[2]
    assert h.dtype == torch.float16      # stored by the e5m2 layer, then ReLU
    assert torch.equal(y, F.linear(h.float(), model[2].weight, model[2].bias))   # plain FP32
    with PrecisionMode(default_policy=policy("fp16")):   # hooks removed: default applies
        model(x)
    assert representable(outputs[0][1], "fp16") and representable(outputs[2][1], "fp16")


def test_opaque_composites_warn_and_run_in_the_widest_dtype():
    torch.manual_seed(0)
    emb, mha = nn.Embedding(10, 8), nn.MultiheadAttention(8, 2, batch_first=True)
    idx = torch.tensor([[1, 2, 3], [4, 5, 6]])
    with PrecisionMode(default_policy=policy("fp16")):
        h = emb(idx)
        with pytest.warns(UserWarning, match="multi_head_attention_forward in module .* is not emulated"):
            out, _ = mha(h, h, h)
    assert h.dtype == torch.float16 and out.dtype == torch.float32
    assert torch.equal(out, mha(h.float(), h.float(), h.float())[0])


class Everything(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(12, 8)
        self.conv = nn.Conv1d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, idx):
        h = self.conv(self.emb(idx).transpose(1, 2)).transpose(1, 2)
        h = self.norm(torch.relu(self.fc(h)))
        attn = torch.softmax(h @ h.transpose(1, 2), -1)
        return F.scaled_dot_product_attention(h, h, attn @ h).sum()


def test_identity_policy_is_bit_identical_to_plain_pytorch():
    idx = torch.randint(0, 12, (2, 5), generator=torch.Generator().manual_seed(33))
    results = []
    for run in range(3):
        torch.manual_seed(0)
        model = Everything()
        if run == 0:
            out = model(idx)
        elif run == 1:
            handle = attach(model, lambda n, m: LayerPolicy())
            with PrecisionMode():
                out = model(idx)
            handle.remove()
        else:
            with PrecisionMode(default_policy=LayerPolicy()):
                out = model(idx)
        out.backward()
        results.append([out] + [p.grad for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


class SpyDtypes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if torch.is_tensor(a)]
        self.seen.setdefault(func.overloadpacket.__name__, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


class NormSoftmax(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.norm = nn.Linear(16, 16), nn.LayerNorm(16)

    def forward(self, x):
        h = self.fc(x)
        self.h = h
        return torch.softmax(self.norm(h), dim=-1)


def test_fp32_ops_run_in_fp32_under_cpu_autocast():
    torch.manual_seed(0)
    model = NormSoftmax().to(torch.bfloat16)
    x = randn(8, 16, seed=34).to(torch.bfloat16)
    with torch.autocast("cpu", dtype=torch.bfloat16), SpyDtypes() as plain:
        model(x)
    assert torch.bfloat16 in plain.seen["_softmax"]      # what CPU autocast alone does
    with torch.autocast("cpu", dtype=torch.bfloat16), PrecisionMode(), SpyDtypes() as spy:
        y = model(x)
    assert spy.seen["_softmax"] == {torch.float32}
    assert spy.seen["native_layer_norm"] == {torch.float32}
    assert torch.bfloat16 in spy.seen["addmm"] and y.dtype == torch.bfloat16
    h = model.h
    ln = F.layer_norm(h.float(), (16,), model.norm.weight.float(), model.norm.bias.float())
    assert torch.equal(y, torch.softmax(ln.to(torch.bfloat16).float(), -1).to(torch.bfloat16))


def test_fp32_op_result_dtypes_losses_reductions_and_running_stats():
    x = randn(6, 5, seed=35).to(torch.bfloat16)
    target = torch.tensor([0, 1, 2, 3, 4, 0])
    bn = nn.BatchNorm1d(5).to(torch.bfloat16)
    with PrecisionMode():
        loss = F.cross_entropy(x, target)
        total, rows = x.sum(), x.sum(dim=1)
        square = x ** 2
        normed = bn(x)
    assert loss.dtype == total.dtype == torch.float32
    assert loss == F.cross_entropy(x.float(), target)
    assert total == x.float().sum()
    assert rows.dtype == square.dtype == normed.dtype == torch.bfloat16
    assert torch.equal(rows, x.float().sum(dim=1).to(torch.bfloat16))
    with PrecisionMode():
        assert x.softmax(-1, dtype=torch.float32).dtype == torch.float32   # asked for
    expected_mean = (0.1 * x.float().mean(0)).to(torch.bfloat16)
    assert torch.equal(bn.running_mean, expected_mean)   # in-place update written back


def test_fp32_ops_unknown_name():
    with pytest.raises(ValueError, match="unknown FP32 op 'softmaxx'; valid choices"):
        PrecisionMode(fp32_ops=("softmax", "softmaxx"))


def test_emulation_ignores_autocast():
    x, w = randn(4, 16, seed=36), randn(8, 16, seed=37)
    expected = qlinear(x, w, None, policy("fp16"))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(qlinear(x, w, None, policy("fp16")), expected)


# --------------------------------------------------------------------------------------
# Layer state: delayed scaling and the observer
# --------------------------------------------------------------------------------------
def test_delayed_scalers_exist_before_backward():
    # torch.compile cannot make a scaler inside a traced backward (nor one it can update
    # from a graph): an op makes every scaler it will update, its backward's included,
    # before it runs; without gradients there is no backward and no gradient scaler
    p = policy("e4m3", "delayed")
    model = mlp()
    handle = attach(model, lambda n, m: p if isinstance(m, nn.Linear) else None)
    x = randn(4, 16, seed=39)
    with PrecisionMode():
        out = model(x)
    made = dict(handle.states["0"].scalers)
    assert set(made) == {"activation", "weight", "grad_output", "weight_grad",
                         "weight_grad.bias"}
    assert all(s.fmt.name == "e4m3" for s in made.values())
    assert made["grad_output"].amax_history.numel() == 0        # made, not updated yet
    out.sum().backward()
    assert handle.states["0"].scalers == made                   # the same objects
    assert made["grad_output"].amax_history.numel() == 1
    frozen = mlp()
    frozen.requires_grad_(False)
    handle = attach(frozen, lambda n, m: p if isinstance(m, nn.Linear) else None)
    with PrecisionMode():
        frozen(x)
    assert set(handle.states["0"].scalers) == {"activation", "weight"}


class _TwoMatmuls(nn.Module):
    """x @ W (activation and weight operands) and (x W) (x W)^T (two activations)."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(randn(4, 3, seed=40))

    def forward(self, x):
        h = torch.matmul(x, self.w)
        return torch.matmul(h, h.transpose(-1, -2))


def _op_case(op: str):
    torch.manual_seed(0)
    if op == "linear":
        return nn.Linear(4, 3), (randn(2, 4, seed=41),)
    if op == "conv":
        return nn.Conv2d(2, 3, 3), (randn(1, 2, 5, 5, seed=41),)
    if op == "conv_transpose":
        return nn.ConvTranspose2d(2, 3, 3), (randn(1, 2, 4, 4, seed=41),)
    if op == "matmul":
        return _TwoMatmuls(), (randn(2, 4, seed=41),)
    if op == "bilinear":
        return nn.Bilinear(3, 4, 2), (randn(2, 3, seed=41), randn(2, 4, seed=42))
    if op == "embedding":
        return nn.Embedding(10, 4), (torch.tensor([1, 3, 3]),)
    return nn.EmbeddingBag(10, 4), (torch.tensor([1, 3, 3, 7]), torch.tensor([0, 2]))


@pytest.mark.parametrize("op", ["linear", "conv", "conv_transpose", "matmul", "bilinear",
                                "embedding", "embedding_bag"])
def test_backward_updates_only_scalers_made_before_it(op):
    # every emulated op reserves, before it runs, the scalers its backward updates (the
    # keys its backward asks for: grad_output, weight_grad with their operands); one made
    # in a backward traced by torch.compile could not be updated
    p = policy("e4m3", "delayed")
    model, inputs = _op_case(op)
    inputs = [t.requires_grad_() if t.is_floating_point() else t for t in inputs]
    handle = attach(model, lambda n, m: p if n == "" else None)
    with PrecisionMode():
        out = model(*inputs)
    made = dict(handle.states[""].scalers)
    assert "grad_output" in made and "weight_grad" in made
    out.float().sum().backward()
    assert handle.states[""].scalers == made
    assert all(s.amax_history.numel() >= 1 for s in made.values())     # all of them used


def test_delayed_scaling_state_per_layer_and_checkpoint():
    spec = TensorSpec("e4m3", scaling="delayed", saturate=True)
    p = LayerPolicy(spec, spec, spec, spec)
    model = mlp()
    handle = attach(model, lambda n, m: p if isinstance(m, nn.Linear) else None)
    x = randn(4, 16, seed=38)
    with PrecisionMode():
        model(x).sum().backward()
    state = handle.states["0"]
    assert set(state.scalers) == {"activation", "weight", "grad_output", "weight_grad",
                                  "weight_grad.bias"}
    # the first step quantized with scale 1; the next uses 448 / amax of this step
    assert state.scalers["activation"].scale.item() == pytest.approx(448 / x.abs().max().item())
    saved = handle.state_dict()
    other = attach(mlp(), lambda n, m: p if isinstance(m, nn.Linear) else None)
    other.load_state_dict(saved)
    assert torch.equal(other.states["0"].scalers["weight"].scale, state.scalers["weight"].scale)
    with pytest.raises(ValueError, match="delayed scaling needs a LayerState"):
        qlinear(x, model[0].weight, None, p)
    with pytest.raises(ValueError, match="unknown layers"):
        other.load_state_dict({"9": {}})


def test_observer_sees_every_role():
    model = mlp()
    handle = attach(model, lambda n, m: policy("fp16") if isinstance(m, nn.Linear) else None)
    seen = []
    handle.set_observer(lambda name, role, t: seen.append((name, role, tuple(t.shape))))
    x = randn(4, 16, seed=39).requires_grad_()
    with PrecisionMode():
        y = model(x)
    y.sum().backward()
    assert ("0", "activation", (4, 16)) in seen and ("2", "weight", (8, 32)) in seen
    assert ("2", "grad_output", (4, 8)) in seen and ("0", "weight_grad", (32, 16)) in seen
    assert LayerState().on_tensor is None


@pytest.mark.parametrize("high,dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                        ("fp16", torch.float16)])
def test_scaled_layers_write_the_high_precision_dtype(high, dtype):
    # per-tensor and MX layers have no scale for their output: they write it in the
    # recipe's high precision, rounded to nearest (the FP8 GEMM's 16-bit output)
    x = randn(16, 64, seed=31).requires_grad_()
    w = randn(24, 64, seed=32).requires_grad_()
    for preset in ("fp8-hybrid", "mxfp8"):
        p = LayerPolicy.from_recipe(f"{preset}:high_precision={high}")
        y = qlinear(x, w, None, p)
        # float32 output (the presets write bf16)
        ref = qlinear(x, w, None, LayerPolicy.from_recipe(f"{preset}:high_precision=fp32"))
        assert y.dtype == dtype and torch.equal(y, ref.to(dtype))
        y.float().sum().backward()
        assert x.grad.dtype == torch.float32 and torch.isfinite(x.grad).all()
        x.grad = w.grad = None


def test_scaled_output_rejects_other_dtypes():
    with pytest.raises(ValueError, match="scaled_output 'e4m3' is not one of fp32, fp16, bf16"):
        LayerPolicy(scaled_output="e4m3")


def test_ieee_format_without_mantissa_saves_nan_inputs():
    # e5m0 (IEEE, M = 0) has inf but no NaN code: a NaN activation makes the output NaN,
    # and the saved copy stores 0 there, as for the MX FP6/FP4 elements, instead of failing
    s = TensorSpec("e5m0")
    x = torch.tensor([[1.0, float("nan")]], requires_grad=True)
    y = qlinear(x, torch.ones(3, 2), None, LayerPolicy(s, s, s, s))
    assert y.isnan().all()
