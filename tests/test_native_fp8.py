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


def _exact_layer(recipe, backend, bias):
    """One linear layer and its y, dX, dW, counted GEMMs, on operands whose FP8
    rounding and products and sums are exact: integers of magnitude <= 7 (3 significant
    bits, so E4M3 and E5M2 hold them), amax 7, hence scales 448/7 = 64 (e4m3) and
    57344/7 = 8192 (e5m2), powers of two."""
    gen = torch.Generator().manual_seed(3)
    layer = nn.Linear(32, 48, bias=bias)
    with torch.no_grad():
        layer.weight.copy_(_ints((48, 32), gen, 7))
        if bias:
            layer.bias.copy_(_ints((48,), gen, 50))
    x = _ints((2, 16, 32), gen, 7).requires_grad_()
    mp = mixprec.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.0), recipe,
                         backend=backend, keep_high_precision=())
    with mp.autocast():
        y = layer(x)
    g = _ints(y.shape, gen, 7).to(y.dtype)
    y.backward(g)
    return y.detach(), x.grad, layer.weight.grad, mp.coverage(), g


@pytest.mark.parametrize("recipe,bias", [("te-current", True), ("fp8-hybrid", False),
                                         ("te-delayed", True)])
def test_native_linear_is_bit_identical_on_exact_operands(recipe, bias):
    y_e, dx_e, dw_e, cov_e, g = _exact_layer(recipe, "emulated", bias)
    y_n, dx_n, dw_n, cov_n, _ = _exact_layer(recipe, "native", bias)
    # the native path ran: all three GEMMs through _scaled_mm, none emulated
    assert (cov_n.native_gemms, cov_n.emulated_gemms) == (3, 0)
    assert cov_e.gemms == ()
    for a, b in ((y_e, y_n), (dx_e, dx_n), (dw_e, dw_n)):
        assert a.dtype == b.dtype and torch.equal(a.view(torch.int16 if a.itemsize == 2
                                                          else torch.int32),
                                                   b.view(torch.int16 if b.itemsize == 2
                                                          else torch.int32))
    # independent oracle: the exact products in float64 (every value is exact there)
    gen = torch.Generator().manual_seed(3)
    w = _ints((48, 32), gen, 7).double()
    b = _ints((48,), gen, 50).double() if bias else 0
    x = _ints((2, 16, 32), gen, 7).double()
    assert torch.equal(y_n, (x @ w.t() + b).to(y_n.dtype))
    assert torch.equal(dx_n, (g.double() @ w).float())
    if get_recipe(recipe).weight_grad.is_identity:
        assert torch.equal(dw_n, (g.double().reshape(-1, 48).t() @ x.reshape(-1, 32)).float())


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


def test_shape_cuda_refuses_falls_back_with_a_warning_and_a_count():
    # Linear(16, 24), 32 tokens, under CUDA's rules: fprop (K=16, N=24) and dgrad
    # (K=24) are refused, wgrad (g^T: 24 x 32, x: 32 x 16) runs natively.
    def run(backend):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(16, 24))
        layer = model[0]
        mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             "fp8-hybrid", backend=backend, keep_high_precision=())
        if backend == "native":
            mp._scaled_mm.rules = "cuda"
        x = torch.randn(32, 16, requires_grad=True)
        outs = []
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(2):
                with mp.autocast():
                    y = model(x)
                y.float().square().sum().backward()
                outs.append((y.detach(), x.grad.clone(), layer.weight.grad.clone()))
                x.grad = None
                layer.zero_grad()
        return outs, mp.coverage(), [w for w in caught
                                     if issubclass(w.category, NativeFallbackWarning)]

    emulated, _, none = run("emulated")
    outs, cov, caught = run("native")
    assert none == []
    # once per (layer, GEMM), naming both and the reason
    assert len(caught) == 2
    texts = sorted(str(w.message) for w in caught)
    assert "the dgrad GEMM of layer '0' runs emulated" in texts[0]
    assert "the fprop GEMM of layer '0' runs emulated" in texts[1]
    assert all("K and N must be multiples of 16 on CUDA" in t for t in texts)
    assert "(M, K, N) = (32, 16, 24)" in texts[1] and "(M, K, N) = (32, 24, 16)" in texts[0]
    assert (cov.native_gemms, cov.emulated_gemms) == (2, 4)
    rows = {(r.module, r.gemm, r.path): r.calls for r in cov.gemms}
    assert rows == {("0", "fprop", "emulated"): 2, ("0", "dgrad", "emulated"): 2,
                    ("0", "wgrad", "native"): 2}
    text = str(cov)
    assert "2 through torch._scaled_mm, 4 emulated" in text
    assert "0 fprop: 2 emulated ((M, K, N) = (32, 16, 24): K and N must be" in text
    assert Coverage.from_dict(cov.to_dict()) == cov
    # the emulated GEMMs are the emulated backend's, bit for bit
    for (y_e, dx_e, _), (y_n, dx_n, _) in zip(emulated, outs):
        assert torch.equal(y_e, y_n) and torch.equal(dx_e, dx_n)


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
