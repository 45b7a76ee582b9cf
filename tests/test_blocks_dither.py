"""The 3/4 dither as a recipe option: ``scaling.mx_scale_rule=dither`` for MX roles and
the named schemes ``mxfp{8,6,4}-dither`` for block-scheme roles.

Oracle (numpy and ml_dtypes, from the rule's definition, one float32 rounding per step):

    X        = 2^(floor(log2 amax_block) - emax_elem)        (OCP MX floor scale; e2m1: 2)
    element  = E2M1( fl32( fl32(x / X) * 0.75 ) )           nearest-even (ml_dtypes cast)
    x_hat    = fl32( element * fl32(X * fl32(4/3)) )
"""
from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

import mixprec
from mixprec import get_scheme, quantize_blocked, quantize_mx
from mixprec.emulate import qlinear
from mixprec.policy import LayerPolicy
from mixprec.recipe import ScalingConfig, TensorSpec, format_recipe, parse_recipe
from mixprec.scaling import quantize_spec

E2M1 = ml_dtypes.float4_e2m1fn
# E2M1's non-negative values (OCP MX v1.0): 0, 0.5, 1, 1.5, 2, 3, 4, 6
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0])


def _oracle(x: torch.Tensor, block: int = 32) -> tuple:
    """(elements, dequantized) of the dither rule along the last axis, float32 numpy."""
    v = x.numpy().astype(np.float32)
    rows, n = v.shape
    blocks = v.reshape(rows, n // block, block)
    amax = np.abs(blocks).max(-1, keepdims=True).astype(np.float64)
    scale = np.exp2(np.floor(np.log2(amax)) - 2).astype(np.float32)   # emax(e2m1) = 2
    scaled = (blocks / scale).astype(np.float32) * np.float32(0.75)    # float32 products
    elems = scaled.astype(E2M1).astype(np.float32)
    decode = scale * np.float32(4.0 / 3.0)                             # X * fl32(4/3)
    return elems.reshape(rows, n), (elems * decode).astype(np.float32).reshape(rows, n)


def _data(seed: int, rows: int = 8, n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Student-t-like tails: a normal divided by the root of a chi-square of 3 d.o.f.
    z = torch.randn(rows, n, generator=g)
    chi = torch.randn(rows, n, 3, generator=g).pow(2).sum(-1) / 3
    return z / chi.sqrt()


def _bits(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).view(np.int32)


def test_named_scheme_and_mx_rule_equal_the_oracle():
    x = _data(0)
    want_elems, want = _oracle(x)
    q = quantize_blocked(x, "mxfp4-dither")
    assert np.array_equal(_bits(q.elements.numpy()), _bits(want_elems))
    assert np.array_equal(_bits(q.dequantize().numpy()), _bits(want))
    # the MX shorthand and the recipe's MX role give the same bits
    deq, scales = quantize_mx(x, "e2m1", scale_rule="dither")
    assert np.array_equal(_bits(deq.numpy()), _bits(want))
    spec, cfg = TensorSpec("e2m1", scaling="mx"), ScalingConfig(mx_scale_rule="dither")
    assert np.array_equal(_bits(quantize_spec(x, spec, cfg).numpy()), _bits(want))
    # the 3/4 factor matters: the OCP rule gives other elements
    assert not torch.equal(quantize_blocked(x, "mxfp4").dequantize(), q.dequantize())


def test_hand_written_block():
    # one block of 32: amax 7.5 -> X = 2^(2 - 2) = 1; 7.5 * 0.75 = 5.625 -> 6 (nearest);
    # 1.0 * 0.75 = 0.75 -> 1 (tie to even: 0.5 is 0b01, 1.0 is 0b10); 2.0 -> 1.5;
    # -3.0 -> -2.25 -> -2; decode 4/3 in float32 = 1.33333337
    x = torch.zeros(1, 32)
    x[0, :4] = torch.tensor([7.5, 1.0, 2.0, -3.0])
    q = quantize_blocked(x, "mxfp4-dither")
    assert q.elements[0, :4].tolist() == [6.0, 1.0, 1.5, -2.0]
    assert q.block_scales.tolist() == [[1.0]]
    assert float(q.tensor_scale) == float(np.float32(4.0 / 3.0))
    assert q.dequantize()[0, 0].item() == float(np.float32(6.0) * np.float32(4.0 / 3.0))


def test_stochastic_rounding_never_clips_and_is_unbiased():
    # a block maximum of 7.5 with X = 1: the OCP rule saturates 7.5 to 6 before SR (mean
    # 6); under dither 5.625 rounds to 4 or 6 with mean 5.625, i.e. 7.5 after decoding
    x = torch.zeros(4096, 32)
    x[:, 0] = 7.5
    x[:, 1] = 1.0
    g = torch.Generator().manual_seed(3)
    dither = quantize_blocked(x, "mxfp4-dither", rounding="stochastic", generator=g)
    ocp = quantize_blocked(x, "mxfp4", rounding="stochastic", generator=g)
    first = dither.elements[:, 0]
    assert set(first.unique().tolist()) == {4.0, 6.0}
    assert abs(float(dither.dequantize()[:, 0].double().mean()) - 7.5) < 0.05
    assert set(ocp.elements[:, 0].unique().tolist()) == {6.0}
    # every element is one of the two E2M1 neighbours of fl32(0.75 * x / X)
    xs = _data(1, rows=64)
    q = quantize_blocked(xs, "mxfp4-dither", rounding="stochastic", generator=g)
    target = np.abs(_oracle_scaled(xs))
    lo = np.array([E2M1_VALUES[E2M1_VALUES <= t].max() for t in target.ravel()])
    hi = np.array([E2M1_VALUES[E2M1_VALUES >= t].min() for t in target.ravel()])
    got = np.abs(q.elements.numpy().ravel())
    assert np.all((got == lo) | (got == hi))


def _oracle_scaled(x: torch.Tensor) -> np.ndarray:
    v = x.numpy().astype(np.float32)
    blocks = v.reshape(v.shape[0], -1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True).astype(np.float64)
    scale = np.exp2(np.floor(np.log2(amax)) - 2).astype(np.float32)
    return ((blocks / scale).astype(np.float32) * np.float32(0.75)).reshape(v.shape)


def test_recipe_option_in_an_emulated_linear():
    # y = x_hat @ w_hat^T with both operands dithered along K (the MX role's blocks)
    # dx = g_hat @ w_hat from the weight copy saved for backward (blocks along N): the
    # saved copy keeps the 4/3 decode factor
    x, w, dy = _data(2, rows=16), _data(3, rows=32), _data(4, rows=16, n=32)
    deq = lambda t: torch.from_numpy(_oracle(t)[1])                 # noqa: E731
    policy = LayerPolicy.from_recipe("mxfp4:scaling.mx_scale_rule=dither,high_precision=fp32")
    wr = w.clone().requires_grad_()
    xr = x.clone().requires_grad_()
    y = qlinear(xr, wr, None, policy)
    assert torch.equal(y, deq(x) @ deq(w).t())
    y.backward(dy)
    assert torch.equal(xr.grad, deq(dy) @ deq(w.t().contiguous()).t())
    # a block-scheme role takes the named scheme
    r = parse_recipe("fp32:grad_output.scheme=mxfp4-dither,grad_output.rounding=stochastic")
    assert r.grad_output.format == "e2m1"
    assert get_scheme("mxfp4-dither").scale_rule.value == "dither"
    for text in ("mxfp4:scaling.mx_scale_rule=dither", format_recipe(r)):
        assert parse_recipe(format_recipe(parse_recipe(text))) == parse_recipe(text)


def test_bad_values_name_the_choices():
    with pytest.raises(ValueError, match="mx_scale_rule 'dithered'; valid choices: ocp, ceil, "
                                         "ceil-log2, dither"):
        mixprec.get_recipe("mxfp4:scaling.mx_scale_rule=dithered")
    with pytest.raises(ValueError, match="unknown block scheme 'mxfp4-dithered'.*mxfp4-dither"):
        get_scheme("mxfp4-dithered")
    with pytest.raises(ValueError, match="unknown MX scale_rule 'x'; valid choices: ocp, ceil, "
                                         "ceil-log2, dither"):
        quantize_mx(torch.ones(32), "e2m1", scale_rule="x")
