"""Block schemes in recipes: the grammar (scheme per role, Hadamard per GEMM), the nvfp4
preset, and the emulated linear layer wiring each GEMM's operands as the recipe says."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import get_scheme, quantize_blocked
from mixprec.blocks import TE_NVFP4_SIGNS, fixed_signs, hadamard_transform
from mixprec.emulate import qlinear
from mixprec.policy import LayerPolicy
from mixprec.recipe import (HadamardConfig, ScalingKind, TensorSpec, format_recipe,
                            get_recipe, parse_recipe)


def test_nvfp4_preset_is_te_nvfp4_recipe():
    r = get_recipe("nvfp4")
    assert (r.weight.scheme, r.activation.scheme, r.grad_output.scheme) == \
        ("nvfp4-2d", "nvfp4", "nvfp4")
    assert r.weight.format == "e2m1" and r.weight.scaling is ScalingKind.BLOCK
    assert r.grad_output.rounding.value == "stochastic" and r.activation.rounding.value == "nearest"
    assert r.weight_grad.is_identity                       # dW stays in high precision
    assert r.hadamard == HadamardConfig(signs="te", wgrad=16)
    assert r.high_precision == "bf16" and r.attention == "high_precision"
    assert "nvfp4" in mixprec.list_presets()


@pytest.mark.parametrize("text", [
    "fp32:activation.scheme=nvfp4,weight.scheme=nvfp4-2d,hadamard.wgrad=16",
    "nvfp4:activation.scheme=none",
    "nvfp4:grad_output.scheme=mxfp4,grad_output.rounding=nearest",
    "nvfp4:hadamard.signs=fixed,hadamard.seed=3,hadamard.wgrad=64,hadamard.fprop=32",
    "mxfp8:weight.scheme=fp8-block128x128,activation.scheme=fp8-block128,grads.scheme=fp8-block128",
])
def test_grammar_round_trips(text):
    r = parse_recipe(text)
    assert parse_recipe(format_recipe(r)) == r
    assert parse_recipe(str(r)) == r


def test_scheme_sets_format_and_scaling():
    r = parse_recipe("fp32:activation.scheme=mxfp4")
    assert r.activation == TensorSpec("e2m1", scaling="block", scheme="mxfp4")
    assert format_recipe(r) == "fp32:activation.scheme=mxfp4"
    back = parse_recipe("nvfp4:activation.scheme=none").activation
    assert back == TensorSpec("e2m1") and back.scheme is None


@pytest.mark.parametrize("text, match", [
    ("nvfp4:activation.format=e4m3", "set by activation.scheme=nvfp4"),
    ("nvfp4:weight.scaling=mx", "set by weight.scheme=nvfp4-2d"),
    ("fp32:activation.scheme=nvfp8", "unknown block scheme 'nvfp8'; valid choices"),
    ("fp32:activation.scaling=block", "scaling 'block' needs a scheme"),
    ("fp32:hadamard.wgrad=24", "hadamard.wgrad 24 not supported; valid choices: 0, 16, 32, 64, 128"),
    ("nvfp4:hadamard.wgrad=32", "needs hadamard.signs=fixed, redraw or none"),
    ("fp32:hadamard.signs=random",
     "unknown hadamard.signs 'random'; valid choices: te, fixed, redraw, none"),
])
def test_bad_overrides(text, match):
    with pytest.raises(ValueError, match=match):
        parse_recipe(text)


# --------------------------------------------------------------------------------------
# The emulated linear layer
# --------------------------------------------------------------------------------------
def _deq(x, name, axis, rounding="nearest", generator=None, rht=0, signs=None):
    """Reference: quantize one operand as the recipe says, back in x's domain."""
    s = get_scheme(name)
    s = s.with_(axis=axis) if not s.is_2d else s
    if rht:
        x = hadamard_transform(x, rht, signs=signs, axis=axis)
    q = quantize_blocked(x, s, rounding=rounding, generator=generator).dequantize()
    return hadamard_transform(q, rht, signs=signs, axis=axis, inverse=True) if rht else q


def test_nvfp4_linear_forward_and_backward_wiring():
    # y  = Q(x)_{1x16 along K} @ Q(w)_{16x16}^T
    # dx = Q_sr(g)_{1x16 along N} @ Q(w)_{16x16}
    # dw = [H^T Q_sr(H g)_{1x16 along M}]^T @ [H^T Q(H x)_{1x16 along M}]  (wgrad RHT-16, TE
    #      signs, along the token dimension M), db = sum(g) in FP32 as dW is unquantized
    g0 = torch.Generator().manual_seed(0)
    x = torch.randn(32, 48, generator=g0)
    w = torch.randn(64, 48, generator=g0) * 0.1
    b = torch.randn(64, generator=g0)
    dy = torch.randn(32, 64, generator=g0)
    xr, wr, br = (t.clone().requires_grad_() for t in (x, w, b))
    policy = LayerPolicy.from_recipe("nvfp4:high_precision=fp32")
    gen = torch.Generator().manual_seed(11)
    y = qlinear(xr, wr, br, policy, generator=gen)
    y.backward(dy)

    s = torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
    y_ref = _deq(x, "nvfp4", -1) @ _deq(w, "nvfp4-2d", -1).t() + b
    assert torch.equal(y, y_ref)
    # the backward draws its stochastic rounding from the same generator (the forward
    # rounds to nearest and draws nothing): the dX copy of g first, then the dW copy
    gen_c = torch.Generator().manual_seed(11)
    g_row = _deq(dy, "nvfp4", -1, "stochastic", gen_c)
    g_col = _deq(dy, "nvfp4", 0, "stochastic", gen_c, rht=16, signs=s)
    assert torch.equal(xr.grad, g_row @ _deq(w, "nvfp4-2d", 0))
    assert torch.equal(wr.grad, g_col.t() @ _deq(x, "nvfp4", 0, rht=16, signs=s))
    assert torch.equal(br.grad, g_col.sum(0))


def test_wgrad_transform_with_a_short_batch():
    # 4 tokens: the 16-point wgrad transform pads the token axis with zeros
    g0 = torch.Generator().manual_seed(6)
    x, w, dy = (torch.randn(*s, generator=g0) for s in ((4, 32), (16, 32), (4, 16)))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    policy = LayerPolicy.from_recipe("nvfp4:grad_output.rounding=nearest,high_precision=fp32")
    qlinear(xr, wr, None, policy).backward(dy)
    rht = get_scheme("nvfp4").with_(axis=0, hadamard=16, hadamard_signs="te")
    dq = lambda t: quantize_blocked(t, rht).dequantize()       # noqa: E731
    assert torch.equal(wr.grad, dq(dy).t() @ dq(x))
    assert wr.grad.shape == (16, 32) and not torch.equal(dq(x), x)


def test_hadamard_per_gemm_with_fixed_signs_and_real_storage(monkeypatch):
    # fprop RHT-32 on x and w along K; nothing on dgrad/wgrad; the saved copies are element
    # codes (uint8) and E4M3 block scales.
    g0 = torch.Generator().manual_seed(1)
    x, w = torch.randn(16, 64, generator=g0), torch.randn(32, 64, generator=g0)
    policy = LayerPolicy.from_recipe(
        "fp32:activation.scheme=nvfp4,weight.scheme=nvfp4,hadamard.seed=5,hadamard.fprop=32")
    saved = []
    real = torch.autograd.function.FunctionCtx.save_for_backward
    monkeypatch.setattr(torch.autograd.function.FunctionCtx, "save_for_backward",
                        lambda ctx, *t: (saved.extend(t), real(ctx, *t))[1])
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = qlinear(xr, wr, None, policy)
    s = fixed_signs(32, 5)
    assert torch.equal(y, _deq(x, "nvfp4", -1, rht=32, signs=s) @ _deq(w, "nvfp4", -1, rht=32, signs=s).t())
    assert {t.dtype for t in saved} >= {torch.uint8, torch.float8_e4m3fn}
    y.backward(torch.ones_like(y))
    assert torch.equal(wr.grad, torch.ones(16, 32).t() @ _deq(x, "nvfp4", 0))


def test_two_d_tiles_on_conv_weights_span_the_channels():
    # A conv weight (C_out, C_in, kh, kw) gets 16x16 tiles over (C_out, C_in) at every
    # kernel position (one tensor scale for the whole weight): (kh, kw, C_out, C_in) tiled
    # over its last two dimensions.
    g0 = torch.Generator().manual_seed(4)
    x, w = torch.randn(2, 32, 5, 5, generator=g0), torch.randn(16, 32, 3, 3, generator=g0)
    policy = LayerPolicy.from_recipe("fp32:weight.scheme=nvfp4-2d")
    y = mixprec.emulate.qconv(x, w, None, 1, 0, 1, 1, policy)
    q = quantize_blocked(w.movedim((0, 1), (-2, -1)), "nvfp4-2d")
    assert q.block_scales.shape == (3, 3, 1, 2)
    assert torch.equal(y, F.conv2d(x, q.dequantize().movedim((-2, -1), (0, 1))))
    # tiling the kernel dimensions instead (the plain 4-D rule) gives other values
    assert not torch.equal(y, F.conv2d(x, quantize_blocked(w, "nvfp4-2d").dequantize()))



def test_nvfp4_trains_an_mlp(one_thread):
    # 40 steps of AdamW on a fixed batch: the loss falls as under fp32 (measured: to 0.010x of
    # the start under fp32, 0.014x under nvfp4; both must reach 0.05x)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
    x, y = torch.randn(64, 64), torch.randint(0, 16, (64,))
    losses = {}
    for recipe in ("fp32", "nvfp4"):
        m = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 16))
        m.load_state_dict(model.state_dict())
        mp = mixprec.prepare(m, torch.optim.AdamW(m.parameters(), lr=3e-3), recipe=recipe)
        for _ in range(40):
            with mp.autocast():
                loss = F.cross_entropy(m(x), y)
            mp.backward(loss)
            mp.step()
            mp.zero_grad()
            losses.setdefault(recipe, []).append(loss.item())
    for recipe, curve in losses.items():
        assert curve[-1] < 0.05 * curve[0], (recipe, curve[0], curve[-1])


def test_hadamard_on_mx_roles_and_on_nothing():
    # MX roles take the transform through the MX setting of the block quantizer:
    # dW = [H^T Q(H g)]^T [H^T Q(H x)], blocks of 32 along the token dimension
    g0 = torch.Generator().manual_seed(2)
    x, w, dy = (torch.randn(*s, generator=g0) for s in ((64, 32), (16, 32), (64, 16)))
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    # (FP32 outputs: a BF16 output would round dy to BF16 before the transform)
    policy = LayerPolicy.from_recipe("mxfp4:weight_grad.format=fp32,weight_grad.scaling=none,"
                                     "hadamard.seed=1,hadamard.wgrad=64,high_precision=fp32")
    qlinear(xr, wr, None, policy).backward(dy)
    s = fixed_signs(64, 1)
    mx = lambda t: _deq(t, "mxfp4", 0, rht=64, signs=s)       # noqa: E731
    assert torch.equal(wr.grad, mx(dy).t() @ mx(x))
    # a transform on a GEMM without block-scaled operands would change nothing: refused
    with pytest.raises(ValueError, match="hadamard.wgrad=16 would change nothing"):
        LayerPolicy.from_recipe("nvfp4:activation.scheme=none,grad_output.scheme=none")
    LayerPolicy.from_recipe("nvfp4:activation.scheme=none,grad_output.scheme=none,hadamard.wgrad=0")


def test_nvfp4_preset_equals_the_readme_override_line():
    import dataclasses
    # README: "The nvfp4 preset is the first line with FP32 master weights, BF16 outside the
    # FP4 GEMMs and attention in BF16"
    line = ("fp32:weight.scheme=nvfp4-2d,activation.scheme=nvfp4,grad_output.scheme=nvfp4,"
            "grad_output.rounding=stochastic,hadamard.signs=te,hadamard.wgrad=16")
    spelled = dataclasses.replace(parse_recipe(line), name="nvfp4", high_precision="bf16",
                                  master=TensorSpec(), attention="high_precision")
    assert spelled == get_recipe("nvfp4")


class _Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(32, 96)

    def forward(self, x):
        q, k, v = self.qkv(x).view(2, 16, 3, 2, 16).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).sum()


def test_attention_runs_in_high_precision_under_nvfp4():
    # TE keeps attention out of NVFP4: calls whose operands are all activations run in
    # the recipe's high_precision (BF16); the projection stays NVFP4
    for recipe, sdpa in [("nvfp4", "bf16"), ("nvfp4:attention=quantized", "e2m1/nvfp4")]:
        model = _Attention()
        mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe)
        with mp.autocast():
            loss = model(torch.randn(2, 16, 32))
        mp.backward(loss)
        rows = {r.op: dict(r.formats) for r in mp.coverage().rows}
        assert rows["linear"]["weight"] == "e2m1/nvfp4-2d", rows
        assert rows["scaled_dot_product_attention"]["activation"] == sdpa, rows
    assert format_recipe(parse_recipe("nvfp4:attention=quantized")) == "nvfp4:attention=quantized"
    with pytest.raises(ValueError, match="unknown attention 'bf16'; valid choices: quantized, "
                                         "high_precision"):
        parse_recipe("fp32:attention=bf16")
