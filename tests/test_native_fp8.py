"""backend="native" with per-tensor FP8 recipes: linear GEMMs through torch._scaled_mm.

torch 2.13's _scaled_mm also runs on CPU, so the native path is exercised here; the CUDA
shape and dtype limits are simulated with ``ScaledMMGemms.rules = "cuda"``. The same
tests run on a GPU where one is present (the device follows the model).
"""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec import native
from mixprec.coverage import Coverage
from mixprec.native import NativeFallbackWarning, scaled_mm_shape_problem
from mixprec.recipe import get_recipe

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2


def _ints(shape, gen, amax):
    """Integers in [-amax, amax] with amax itself present (so the per-tensor scale
    fmt.max / amax is the power of two chosen by the caller)."""
    t = torch.randint(-amax, amax + 1, shape, generator=gen).to(torch.float32)
    t.view(-1)[0] = amax
    return t


def _exact_operands(x_shape=(2, 16, 32), out=48, bias=True):
    """Weight, bias (or None), input: integers of magnitude <= 7 (3 significant bits, so
    E4M3 and E5M2 hold them), amax 7, hence scales 448/7 = 64 (e4m3) and 57344/7 = 8192
    (e5m2), powers of two; the bias (amax 50) is added in FP32."""
    gen = torch.Generator().manual_seed(3)
    w = _ints((out, x_shape[-1]), gen, 7)
    b = _ints((out,), gen, 50) if bias else None
    return w, b, _ints(x_shape, gen, 7)


def _exact_layer(recipe, backend, bias, x_shape=(2, 16, 32), out=48, rules=None, steps=1,
                 neg_zero_row=False):
    """One linear layer and its y, dX, dW, db, counted GEMMs, NativeFallbackWarnings and
    grad_output, on operands whose FP8 rounding and products and sums are exact
    (:func:`_exact_operands`). ``rules``: the native GEMMs' shape rules ("cuda" pads);
    ``neg_zero_row``: the input's second row is all -0.0."""
    w, b, x = _exact_operands(x_shape, out, bias)
    if neg_zero_row:
        x.view(-1, x_shape[-1])[1] = -0.0
    layer = nn.Linear(x_shape[-1], out, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(w)
        if bias:
            layer.bias.copy_(b)
    mp = mixprec.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.0), recipe,
                         backend=backend, keep_high_precision=())
    if rules is not None:
        mp._scaled_mm.rules = rules
    gen = torch.Generator().manual_seed(5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            x.grad = None
            layer.zero_grad()
            x.requires_grad_()
            with mp.autocast():
                y = layer(x)
            g = _ints(y.shape, gen, 7).to(y.dtype)
            y.backward(g)
    fallbacks = [m for m in caught if issubclass(m.category, NativeFallbackWarning)]
    db = layer.bias.grad if bias else None
    return y.detach(), x.grad, layer.weight.grad, db, mp.coverage(), fallbacks, g


def _bits(t):
    return t.view(torch.int16 if t.itemsize == 2 else torch.int32)


def _assert_same_bits(a, b):
    assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _assert_exact_products(recipe, y, dx, dw, g, x_shape, out, bias, neg_zero_row=False):
    """Independent oracle: the exact products in float64 (every value is exact there)."""
    w, b, x = (t.double() if t is not None else None
               for t in _exact_operands(x_shape, out, bias))
    if neg_zero_row:
        x.view(-1, x_shape[-1])[1] = -0.0
    y_ref = x @ w.t() + (b if bias else 0)
    _assert_same_bits(y, y_ref.to(y.dtype))
    _assert_same_bits(dx, (g.double() @ w).float())
    if get_recipe(recipe).weight_grad.is_identity:
        k = x_shape[-1]
        _assert_same_bits(dw, (g.double().reshape(-1, out).t() @ x.reshape(-1, k)).float())


@pytest.mark.parametrize("recipe,bias", [("te-current", True), ("fp8-hybrid", False),
                                         ("te-delayed", True)])
def test_native_linear_is_bit_identical_on_exact_operands(recipe, bias):
    y_e, dx_e, dw_e, _, cov_e, _, g = _exact_layer(recipe, "emulated", bias)
    y_n, dx_n, dw_n, _, cov_n, _, _ = _exact_layer(recipe, "native", bias)
    # the native path ran: all three GEMMs through _scaled_mm, none emulated or padded
    assert (cov_n.native_gemms, cov_n.emulated_gemms, cov_n.padded_gemms) == (3, 0, 0)
    assert cov_e.gemms == ()
    for a, b in ((y_e, y_n), (dx_e, dx_n), (dw_e, dw_n)):
        _assert_same_bits(a, b)
    _assert_exact_products(recipe, y_n, dx_n, dw_n, g, (2, 16, 32), 48, bias)


@pytest.mark.parametrize("recipe,bias,x_shape", [
    ("te-current", True, (3, 11, 24)),           # M = 33 tokens
    ("fp8-hybrid", True, (7, 24)),               # the rounded bias gradient
    ("te-delayed", False, (5, 3, 24)),
    ("torchao-float8-tensorwise", True, (3, 24)),
])
def test_cuda_rules_pad_k_and_n_instead_of_falling_back(recipe, bias, x_shape, monkeypatch):
    # Linear(24, 40) under CUDA's rules (K and N multiples of 16): fprop (K 24, N 40),
    # dgrad (K 40, N 24) and wgrad (K = tokens, odd; N 24) all need padding. Every GEMM
    # runs through _scaled_mm on zero-padded codes, with a's codes row-major and b's
    # column-major, and gives the unpadded result bit for bit (one input row all -0.0:
    # the padded sums keep the sign of zero the unpadded ones have).
    seen = []
    scaled_mm = torch._scaled_mm

    def checked(a, b, **kw):
        seen.append((tuple(a.shape), tuple(b.shape)))
        assert a.shape[1] % 16 == 0 and b.shape[1] % 16 == 0
        assert a.is_contiguous() and b.t().is_contiguous()
        return scaled_mm(a, b, **kw)

    run = dict(bias=bias, x_shape=x_shape, out=40, neg_zero_row=True)
    y_e, dx_e, dw_e, db_e, _, _, g = _exact_layer(recipe, "emulated", **run)
    native.scaled_mm_available("cpu")    # its one probing call made before counting
    monkeypatch.setattr(torch, "_scaled_mm", checked)
    y_n, dx_n, dw_n, db_n, cov, fallbacks, _ = _exact_layer(recipe, "native", rules="cuda",
                                                            **run)
    tokens = x_shape[0] * (x_shape[1] if len(x_shape) == 3 else 1)
    assert seen == [((tokens, 32), (32, 48)), ((tokens, 48), (48, 32)),
                    ((40, tokens + -tokens % 16), (tokens + -tokens % 16, 32))]
    assert fallbacks == []
    assert (cov.native_gemms, cov.emulated_gemms, cov.padded_gemms) == (3, 0, 3)
    assert {(r.gemm, r.path, r.reason) for r in cov.gemms} == {
        (gemm, "native", "K and N zero-padded to multiples of 16")
        for gemm in ("fprop", "dgrad", "wgrad")}
    text = str(cov)
    assert "3 through torch._scaled_mm (3 padded), 0 emulated" in text
    assert "(root) wgrad: 1 padded (K and N zero-padded to multiples of 16)" in text
    assert Coverage.from_dict(cov.to_dict()) == cov
    for a, b in ((y_e, y_n), (dx_e, dx_n), (dw_e, dw_n)):
        _assert_same_bits(a, b)
    if bias:
        _assert_same_bits(db_e, db_n)
    _assert_exact_products(recipe, y_n, dx_n, dw_n, g, x_shape, 40, bias, neg_zero_row=True)


def _train(recipe, backend, seed=0, steps=3, rules=None):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 10))
    gen = torch.Generator().manual_seed(seed + 100)
    mp = mixprec.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-2), recipe,
                         backend=backend, seed=0, keep_high_precision=())
    if rules is not None:
        mp._scaled_mm.rules = rules
    losses = []
    for _ in range(steps):
        x, y = torch.randn(64, 32, generator=gen), torch.randint(0, 10, (64,), generator=gen)
        with mp.autocast():
            loss = F.cross_entropy(model(x).float(), y)
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
        losses.append(loss.detach())
    return torch.stack(losses), [p.detach().clone() for p in model.parameters()], mp


@pytest.mark.parametrize("recipe,bound", [("fp8-hybrid", 5e-3), ("te-delayed", 1e-5)])
def test_training_native_close_to_emulated(recipe, bound):
    # Only the GEMMs differ: codes * fl(1/s) instead of codes / s, and the summation
    # order. Measured on this CPU over 6 seeds (AdamW, lr 1e-2, 3 steps): losses within
    # 1.1e-7 relative; parameters within 1.2e-3 of max |p| for fp8-hybrid, where a dW a
    # few ulps off can round to the neighbouring e5m2 value (its weight_grad is e5m2),
    # which Adam turns into a different step of up to lr; within 1.0e-6 for te-delayed
    # (FP32 weight gradients).
    loss_e, params_e, _ = _train(recipe, "emulated")
    loss_n, params_n, mp = _train(recipe, "native")
    assert mp.coverage().native_gemms == 3 * (3 + 3 + 2)   # layer 0 computes no dX
    torch.testing.assert_close(loss_n, loss_e, rtol=1e-5, atol=0)
    for pe, pn in zip(params_e, params_n):
        assert float((pe - pn).abs().max()) <= bound * float(pe.abs().max())


@pytest.mark.parametrize("recipe", ["te-delayed:scaling.pow2_scale=floor",
                                    "fp8-hybrid:scaling.pow2_scale=floor"])
def test_power_of_two_scales_train_bit_identically_on_cpu(recipe):
    # With power-of-two scales codes * (1/s) == codes / s exactly, and CPU _scaled_mm
    # multiplies the dequantized operands with the FP32 GEMM the emulation uses: every
    # loss, parameter and amax history is the same, bit for bit.
    loss_e, params_e, mp_e = _train(recipe, "emulated")
    loss_n, params_n, mp_n = _train(recipe, "native")
    assert mp_n.coverage().native_gemms == 24
    assert torch.equal(loss_e, loss_n)
    assert all(torch.equal(a, b) for a, b in zip(params_e, params_n))
    states_e, states_n = mp_e.state_dict()["layer_states"], mp_n.state_dict()["layer_states"]
    assert repr(states_e) == repr(states_n)
    if "delayed" in recipe:
        assert any("amax_history" in repr(s) for s in states_n.values())


def test_delayed_scaling_state_identical_after_the_first_step():
    # te-delayed with its default (not power-of-two) scales: the first step's amax
    # histories are the same (everything before the GEMMs is); later steps see
    # parameters that differ by the GEMM rounding only.
    _, _, mp_e = _train("te-delayed", "emulated", steps=1)
    _, _, mp_n = _train("te-delayed", "native", steps=1)
    assert repr(mp_e.state_dict()["layer_states"]) == repr(mp_n.state_dict()["layer_states"])


def test_e5m2_x_e5m2_on_cuda_falls_back_with_a_warning_and_a_count():
    # E5M2 weights under CUDA's rules, Linear(16, 24), 32 tokens: dgrad (g e5m2 x w e5m2)
    # has no kernel and runs emulated; fprop (N = 24) runs padded, wgrad as it is.
    recipe = "fp8-hybrid:weight.format=e5m2"
    run = dict(bias=False, x_shape=(32, 16), out=24, steps=2)
    y_e, dx_e, dw_e, _, _, none, g = _exact_layer(recipe, "emulated", **run)
    y_n, dx_n, dw_n, _, cov, caught, _ = _exact_layer(recipe, "native", rules="cuda", **run)
    assert none == []
    # once per (layer, GEMM), naming both and the reason
    assert len(caught) == 1
    assert ("the dgrad GEMM of layer '(root)' runs emulated (FP32 GEMM of the dequantized "
            "FP8 operands): torch._scaled_mm refuses it on cuda: e5m2 x e5m2 has no CUDA "
            "kernel") in str(caught[0].message)
    assert (cov.native_gemms, cov.emulated_gemms, cov.padded_gemms) == (4, 2, 2)
    rows = {(r.module, r.gemm, r.path): r.calls for r in cov.gemms}
    assert rows == {("", "fprop", "native"): 2, ("", "dgrad", "emulated"): 2,
                    ("", "wgrad", "native"): 2}
    text = str(cov)
    assert "4 through torch._scaled_mm (2 padded), 2 emulated" in text
    assert "(root) dgrad: 2 emulated (e5m2 x e5m2 has no CUDA kernel)" in text
    assert "(root) fprop: 2 padded (N zero-padded to multiples of 16)" in text
    assert Coverage.from_dict(cov.to_dict()) == cov
    # the emulated GEMM is the emulated backend's, bit for bit; so are the native ones
    for a, b in ((y_e, y_n), (dx_e, dx_n), (dw_e, dw_n)):
        _assert_same_bits(a, b)
    _assert_exact_products(recipe, y_n, dx_n, dw_n, g, (32, 16), 24, False)


def test_scaled_mm_shape_rules():
    a = torch.zeros(5, 32, dtype=E4M3)
    assert scaled_mm_shape_problem(a, torch.zeros(32, 16, dtype=E4M3), "cuda") == ""
    assert scaled_mm_shape_problem(a, torch.zeros(32, 8, dtype=E4M3), "cpu") == ""
    assert "multiples of 16" in scaled_mm_shape_problem(a, torch.zeros(32, 8, dtype=E4M3),
                                                        "cuda")
    assert "multiples of 16" in scaled_mm_shape_problem(torch.zeros(5, 24, dtype=E4M3),
                                                        torch.zeros(24, 16, dtype=E4M3), "cuda")
    e5 = torch.zeros(16, 16, dtype=E5M2)
    assert scaled_mm_shape_problem(e5, torch.zeros(16, 16, dtype=E4M3), "cuda") == ""
    assert scaled_mm_shape_problem(e5, e5, "cuda") == "e5m2 x e5m2 has no CUDA kernel"
    assert "not float8" in scaled_mm_shape_problem(torch.zeros(16, 16), e5, "cpu")
    with pytest.raises(ValueError, match="unknown scaled_mm rules 'tpu'; valid choices: cuda, cpu"):
        native.ScaledMMGemms(torch.device("cpu"), rules="tpu")


def test_scaled_mm_padded_shape():
    # CUDA: K and N up to the next multiple of 16, M as it is; CPU: unchanged
    assert native.scaled_mm_padded_shape(33, 24, 40, "cuda") == (33, 32, 48)
    assert native.scaled_mm_padded_shape(7, 16, 1, "cuda") == (7, 16, 16)
    assert native.scaled_mm_padded_shape(33, 24, 40, "cpu") == (33, 24, 40)
    with pytest.raises(ValueError, match="unknown scaled_mm rules 'tpu'; valid choices"):
        native.scaled_mm_padded_shape(1, 1, 1, "tpu")


def test_padded_scaled_mm_on_random_codes():
    # Codes drawn from the finite ones, mixed operand dtypes, a non-contiguous b: the padded
    # GEMM (CUDA's rules) against _scaled_mm of the unpadded operands (CPU's rules), bit
    # for bit (the zeros add +0 to sums that run in the same order: K <= 48 stays in one
    # block of the CPU GEMM), and within FP32 summation error of the float64 product.
    gen = torch.Generator().manual_seed(0)
    gemms = native.ScaledMMGemms(torch.device("cpu"), rules="cuda")
    plain = native.ScaledMMGemms(torch.device("cpu"), rules="cpu")
    for (m, k, n), (da, db) in zip(((5, 24, 40), (33, 17, 3), (16, 16, 16)),
                                   ((E4M3, E4M3), (E5M2, E4M3), (E4M3, E5M2))):
        a = torch.randint(0, 256, (m, k), generator=gen, dtype=torch.uint8).view(da)
        b = torch.randint(0, 256, (n, k), generator=gen, dtype=torch.uint8).view(db).t()
        a = torch.where(a.float().isfinite(), a.float(), 0).to(da)
        b = torch.where(b.float().isfinite(), b.float(), 0).to(db)
        sa, sb = torch.tensor(2.0 ** -7), torch.tensor(2.0 ** 3)
        got = gemms.mm(a, sa, b, sb, torch.float32, layer="l", gemm="fprop")
        want = plain.mm(a, sa, b, sb, torch.float32, layer="l", gemm="fprop")
        assert got.shape == (m, n) and got.is_contiguous()
        _assert_same_bits(got, want)
        scale = sa.double() * sb.double()
        exact = (a.double() @ b.double()) / scale
        bound = k * 2.0 ** -23 * (a.double().abs() @ b.double().abs()) / scale
        assert bool(((got.double() - exact).abs() <= bound).all())


@pytest.mark.parametrize("recipe,why", [
    ("mxfp8", "weight uses mx scaling.*valid: backend='emulated'"),
    ("te-blockwise", "weight uses block scaling"),
    ("fp8-e5m2", "weight is unscaled e5m2.*e5m2 x e5m2"),
    ("fp8-hybrid:accumulation.mode=aligned", "emulated only"),
])
def test_recipes_that_cannot_run_native_raise(recipe, why):
    model = nn.Linear(16, 16)
    with pytest.raises(ValueError, match="cannot run on the native backend: autocast: .*"
                                         "torch._scaled_mm: .*" + why):
        mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe,
                        backend="native")


def test_auto_runs_fp8_natively_only_on_cuda_with_scaled_mm(monkeypatch):
    hybrid, cpu, cuda = get_recipe("fp8-hybrid"), torch.device("cpu"), torch.device("cuda")
    assert native.resolve_backend("auto", hybrid, cpu) == "emulated"
    assert native.resolve_backend("native", hybrid, cpu) == "native"
    for available in (False, True):
        monkeypatch.setattr(native, "scaled_mm_available", lambda device, a=available: a)
        assert native.resolve_backend("auto", hybrid, cuda) == ("native" if available
                                                                 else "emulated")
        # MX never runs natively, whatever the device
        assert native.resolve_backend("auto", get_recipe("mxfp8"), cuda) == "emulated"
    assert native.native_kind(hybrid) == "scaled_mm"
    assert native.native_kind(get_recipe("bf16-mixed")) == "autocast"


@pytest.mark.skipif(not torch.cuda.is_available() or not native.scaled_mm_available("cuda"),
                    reason="needs a CUDA device with torch._scaled_mm (compute capability 8.9+)")
def test_cuda_native_fp8_close_to_emulated():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).cuda()
    ref = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 16)).cuda()
    ref.load_state_dict(model.state_dict())
    x = torch.randn(32, 64, device="cuda")
    outs = []
    for m, backend in ((ref, "emulated"), (model, "native")):
        mp = mixprec.prepare(m, torch.optim.SGD(m.parameters(), lr=0.1), "fp8-hybrid",
                             backend=backend, keep_high_precision=())
        with mp.autocast():
            outs.append(m(x).float())
        if backend == "native":
            assert mp.coverage().native_gemms == 2
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("spec", ["e4m3", "e5m2:stochastic"])
def test_codes_without_the_dequantized_copy_are_the_same_bits(spec, dtype):
    # The native fprop asks for the codes only (dequantize=False): the pack saved for
    # backward holds the same codes and scale as when the values are made too (float32
    # and bfloat16 take the C kernel, float16 the tensor ops), the stochastic stream
    # included, and its values decode to the skipped copy's bits.
    from mixprec.qfunc import _round, _unpack
    from mixprec.recipe import ScalingConfig, TensorSpec
    fmt, _, rounding = spec.partition(":")
    ts = TensorSpec(fmt, rounding=rounding or "nearest", scaling="current")
    x = (torch.randn(64, 48, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    x[0, :2] = torch.tensor([0.0, -0.0])
    got = _round(x, ts, ScalingConfig(), None, -1, torch.Generator().manual_seed(7),
                 pack=True, dequantize=False)
    want = _round(x, ts, ScalingConfig(), None, -1, torch.Generator().manual_seed(7),
                  pack=True)
    assert got[0] is None and got[1][0] == want[1][0] == "scaled"
    (codes, scale), (codes_w, scale_w) = got[1][4], want[1][4]
    assert codes.dtype == codes_w.dtype and torch.equal(codes.view(torch.uint8),
                                                        codes_w.view(torch.uint8))
    assert torch.equal(scale, scale_w)
    assert torch.equal(_unpack(got[1]).view(torch.int32), want[0].view(torch.int32))
