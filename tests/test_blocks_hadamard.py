"""Random Hadamard transforms: orthogonality, reconstruction, TE's NVFP4 sign convention,
seeded sign streams, and lower quantization error on heavy-tailed inputs."""
from __future__ import annotations

import pytest
import torch

from mixprec import HadamardSigns, get_scheme, hadamard_matrix, quantize_blocked
from mixprec.blocks import TE_NVFP4_SIGNS, hadamard_transform

SIZES = (16, 32, 64, 128)


@pytest.mark.parametrize("n", SIZES)
def test_orthogonal_exactly_in_float64(n):
    # The +-1 Sylvester matrix: H H^T = n I with zero error (integers in float64).
    h = hadamard_matrix(n, normalized=False)
    assert set(h.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(h @ h.t(), n * torch.eye(n, dtype=torch.float64))
    # With signs and 1/sqrt(n): M = diag(s) H / sqrt(n). For n = 16, 64 the entries are
    # +-2^-2, +-2^-3 and M M^T = I exactly; for 32, 128 1/sqrt(n) is irrational and the
    # product is I to within a few float64 ulps.
    s = torch.where(torch.arange(n) % 3 == 0, -1.0, 1.0)
    m = hadamard_matrix(n, signs=s)
    eye = torch.eye(n, dtype=torch.float64)
    if n in (16, 64):
        assert torch.equal(m @ m.t(), eye) and torch.equal(m.t() @ m, eye)
    else:
        assert (m @ m.t() - eye).abs().max() <= 4 * 2.0 ** -52


def test_te_nvfp4_matrix_is_signs_times_h16_over_4():
    # TE's reference: H = diag(S) @ H16, applied to rows as x @ (H * 1/4): the signs act
    # on the input elements first. Row i of M is S_i * H16[i] / 4.
    assert TE_NVFP4_SIGNS == (1, 1, 1, -1, 1, -1, -1, -1, -1, -1, -1, 1, -1, 1, -1, -1)
    m = hadamard_matrix(16, signs=TE_NVFP4_SIGNS)
    h16 = hadamard_matrix(16, normalized=False)
    for i, s in enumerate(TE_NVFP4_SIGNS):
        assert torch.equal(m[i], s * h16[i] / 4)
    # x = e_3 (a unit vector): y = x M is row 3 = -H16[3] / 4 (S_3 = -1)
    x = torch.zeros(1, 16)
    x[0, 3] = 1.0
    y = hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS)
    assert torch.equal(y[0], (-h16[3] / 4).float())
    # y_0 = sum_i x_i S_i H_i0 / 4 = sum_i x_i S_i / 4 (H16's first column is all ones)
    x = torch.arange(16.0).reshape(1, 16)
    want = sum(i * s for i, s in enumerate(TE_NVFP4_SIGNS)) / 4
    assert hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS)[0, 0].item() == want


@pytest.mark.parametrize("n", SIZES)
def test_reconstruction_within_float32_rounding(n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(64, 2 * n, generator=g) * 10
    s = (torch.randint(0, 2, (n,), generator=g) * 2 - 1).float()
    y = hadamard_transform(x, n, signs=s)
    back = hadamard_transform(y, n, signs=s, inverse=True)
    # two float32 matmuls of length n: error per element <= ~2 n 2^-24 * group norm
    groups = x.view(64, 2, n).norm(dim=-1, keepdim=True).expand(64, 2, n).reshape(64, 2 * n)
    assert ((back - x).abs() <= 2 * n * 2.0 ** -24 * groups).all()
    assert not torch.equal(y, x)
    # the transform preserves each group's norm (orthogonal)
    assert torch.allclose(y.view(64, 2, n).norm(dim=-1), x.view(64, 2, n).norm(dim=-1), rtol=1e-5)


def test_transform_along_axis_zero():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(32, 5, generator=g)
    assert torch.equal(hadamard_transform(x, 16, axis=0),
                       hadamard_transform(x.t().contiguous(), 16).t())


def test_sign_sources_fixed_redraw_and_checkpoint():
    te = HadamardSigns(16, "te")
    assert te.current().tolist() == list(TE_NVFP4_SIGNS) and te.next().tolist() == list(TE_NVFP4_SIGNS)
    fixed = HadamardSigns(64, "fixed", seed=3)
    assert torch.equal(fixed.current(), fixed.next())
    assert torch.equal(fixed.current(), HadamardSigns(64, "fixed", seed=3).current())
    r = HadamardSigns(64, "redraw", seed=7)
    draws = [r.next() for _ in range(3)]
    assert not torch.equal(draws[0], draws[1]) and set(draws[0].unique().tolist()) == {-1.0, 1.0}
    state = r.state_dict()
    after = [r.next() for _ in range(3)]
    resumed = HadamardSigns(64, "redraw", seed=0)
    resumed.load_state_dict(state)
    assert torch.equal(resumed.current(), draws[-1])
    assert all(torch.equal(a, resumed.next()) for a in after)
    with pytest.raises(ValueError, match="unknown sign mode 'sometimes'; valid choices: te, "
                                         "none, fixed, redraw"):
        HadamardSigns(16, "sometimes")
    with pytest.raises(ValueError, match="size must be 16"):
        HadamardSigns(32, "te")
    with pytest.raises(ValueError, match="state is for size 64"):
        HadamardSigns(32, "redraw").load_state_dict(state)


def test_bad_sizes_and_lengths():
    with pytest.raises(ValueError, match="Hadamard size 8 not supported; valid choices: 16, 32, 64, 128"):
        hadamard_matrix(8)
    with pytest.raises(ValueError, match="multiple of 16, got 20"):
        hadamard_transform(torch.ones(3, 20), 16)
    with pytest.raises(ValueError, match="16 values of \\+1 or -1"):
        hadamard_transform(torch.ones(3, 16), 16, signs=torch.ones(8))
    with pytest.raises(ValueError, match="no Hadamard transform"):
        quantize_blocked(torch.ones(16), "nvfp4", signs=torch.ones(16))


# --------------------------------------------------------------------------------------
# RHT inside quantize_blocked
# --------------------------------------------------------------------------------------
def test_scheme_hadamard_quantizes_the_transformed_tensor():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(8, 64, generator=g)
    s = get_scheme("nvfp4").with_(hadamard=16, hadamard_signs="te")
    q = quantize_blocked(x, s)
    plain = quantize_blocked(hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS), "nvfp4")
    # amax (tensor and blocks) is taken after the transform, as in TE
    assert torch.equal(q.elements, plain.elements) and torch.equal(q.block_scales, plain.block_scales)
    assert torch.equal(q.tensor_scale, plain.tensor_scale)
    assert torch.equal(q.dequantize(rotated=True), plain.dequantize())
    back = hadamard_transform(plain.dequantize(), 16, signs=TE_NVFP4_SIGNS, inverse=True)
    assert torch.equal(q.dequantize(), back)
    # a GEMM of two operands transformed alike equals the untransformed GEMM up to rounding
    w = torch.randn(4, 64, generator=g)
    xt, wt = (hadamard_transform(t, 16, signs=TE_NVFP4_SIGNS) for t in (x, w))
    assert torch.allclose(xt @ wt.t(), x @ w.t(), atol=1e-5)


def test_transform_pads_a_short_axis_with_zeros():
    # 20 elements along the axis: zero-padded to 32 before the 16-point transform; the
    # elements keep the padded length, dequantize() returns x's shape
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 20, generator=g)
    s = get_scheme("nvfp4").with_(hadamard=16, hadamard_signs="te")
    q = quantize_blocked(x, s)
    assert q.elements.shape == (3, 32) and q.shape == (3, 20) and q.dequantize().shape == (3, 20)
    padded = torch.zeros(3, 32)
    padded[:, :20] = x
    qp = quantize_blocked(padded, s)
    assert torch.equal(q.elements, qp.elements) and torch.equal(q.block_scales, qp.block_scales)
    assert torch.equal(q.dequantize(), qp.dequantize()[:, :20])
    assert torch.equal(q.dequantize(rotated=True), qp.dequantize(rotated=True))


def test_random_signs_come_from_the_generator():
    x = torch.randn(4, 64)
    s = get_scheme("mxfp4").with_(block=(1, 64), hadamard=64, hadamard_signs="random")
    a = quantize_blocked(x, s, generator=torch.Generator().manual_seed(1))
    b = quantize_blocked(x, s, generator=torch.Generator().manual_seed(1))
    c = quantize_blocked(x, s, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a.signs, b.signs) and torch.equal(a.elements, b.elements)
    assert not torch.equal(a.signs, c.signs)
    explicit = quantize_blocked(x, s, signs=a.signs)
    assert torch.equal(explicit.elements, a.elements)


def _student_t(nu, shape, g):
    z = torch.randn(*shape, generator=g)
    chi2 = torch.randn(*shape, nu, generator=g).pow(2).sum(-1)
    return z / torch.sqrt(chi2 / nu)


def _rel_err(x, scheme, **kw):
    q = quantize_blocked(x, scheme, generator=torch.Generator().manual_seed(1), **kw)
    return (q.dequantize() - x).pow(2).sum().item() / x.pow(2).sum().item()


@pytest.mark.parametrize("n", SIZES)
def test_rht_lowers_mxfp4_error_on_heavy_tailed_inputs(n):
    # Student-t, nu = 2: a few huge values set each block's power-of-two scale and crush
    # their neighbours to zero; the RHT spreads them over the block first. Measured
    # (README): 0.47x, 0.44x, 0.46x, 0.46x of the plain relative squared error for
    # n = 16, 32, 64, 128 (MXFP4, 32-element blocks); 0.98x-1.00x on Gaussian inputs.
    g = torch.Generator().manual_seed(0)
    x = _student_t(2, (512, 256), g)
    base = get_scheme("mxfp4")
    plain = _rel_err(x, base)
    rht = _rel_err(x, base.with_(hadamard=n, hadamard_signs="random"))
    assert rht < 0.6 * plain, (plain, rht)
    # on Gaussian inputs the transform buys little (so the gain above is the tails')
    xg = torch.randn(512, 256, generator=g)
    assert _rel_err(xg, base.with_(hadamard=n, hadamard_signs="random")) > 0.8 * _rel_err(xg, base)


def test_rht_raises_nvfp4_error_on_the_same_inputs():
    # NVFP4's E4M3 block scales already fit an outlier's block closely; spreading the
    # outlier makes every element of the block share its error. Measured (README): the
    # 16-point RHT with TE's signs gives 1.53x the plain relative squared error on
    # Student-t (nu = 2), 0.99x on Gaussian inputs.
    g = torch.Generator().manual_seed(0)
    x = _student_t(2, (512, 256), g)
    base = get_scheme("nvfp4")
    plain = _rel_err(x, base)
    rht = _rel_err(x, base.with_(hadamard=16, hadamard_signs="te"))
    assert rht > 1.2 * plain, (plain, rht)


def test_transform_stays_float32_inside_autocast():
    """Under a caller's torch.autocast (as inside mp.autocast() with a BF16 high-precision
    side) the transform is still the float32 matmul: float32, the same bits as outside,
    and within float32 rounding of a float64 oracle (a bfloat16 matmul is ~2^-8 off)."""
    x = torch.randn(8, 64, generator=torch.Generator().manual_seed(3))
    plain = hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = hadamard_transform(x, 16, signs=TE_NVFP4_SIGNS)
    m = hadamard_matrix(16, signs=TE_NVFP4_SIGNS)
    oracle = (x.double().reshape(-1, 16) @ m).reshape(x.shape)
    assert inside.dtype == torch.float32
    assert torch.equal(inside.view(torch.int32), plain.view(torch.int32))
    norms = x.double().reshape(-1, 16).norm(dim=1, keepdim=True).expand(-1, 16).reshape(x.shape)
    assert ((inside.double() - oracle).abs() <= 16 * 2.0 ** -24 * norms).all()
