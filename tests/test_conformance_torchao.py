"""Conformance presets against torchao 0.18 (the locked oracle), bit for bit on CPU.

One linear layer 256 -> 256 with bias, 128 rows, run by torchao and by mixprec under the
preset that names it: forward output, dX, dW and the bias gradient must agree in every
bit (compared as int32 patterns). torchao runs its own emulation:

* ``torchao-float8-tensorwise``: ``convert_to_float8_training`` with
  ``Float8LinearConfig(emulate=True)``;
* ``torchao-float8-rowwise``: ``Float8LinearConfig.from_recipe_name("rowwise")`` with
  ``emulate=True``;
* ``torchao-mxfp8``: ``mx_mm`` (the autograd function of ``MXFP8Linear``) with
  ``KernelPreference.EMULATED``, RCEIL, the torch cast kernels (the CUDA / Triton ones do
  not run on CPU), the bias added after it as ``MXFP8Linear.forward`` does.

Each stack quirk a preset follows has an input built to hit it, and a test that the
preset's knob is what makes it pass (the same recipe without it differs from torchao).
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torchao  # noqa: F401  (the oracle; conftest checks its version against the lock)

from mixprec import get_recipe
from mixprec.emulate import qlinear
from mixprec.policy import LayerPolicy

float8 = pytest.importorskip("torchao.float8")
mxfp8_linear = pytest.importorskip("torchao.prototype.moe_training.mxfp8_linear")
mx_config = pytest.importorskip("torchao.prototype.mx_formats.config")
kernel_pref = pytest.importorskip("torchao.quantization.quantize_.common.kernel_preference")

ROWS, IN, OUT = 128, 256, 256
NAMES = ("y", "dX", "dW", "dbias")


def _layer() -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(IN, OUT)


def _heavy(shape, g: torch.Generator) -> torch.Tensor:
    # a normal over the square root of a uniform: tails ~ |x|^-3
    return torch.randn(shape, generator=g) / torch.sqrt(torch.rand(shape, generator=g) + 1e-3)


def _inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    if kind == "normal":
        return torch.randn(ROWS, IN, generator=g), torch.randn(ROWS, OUT, generator=g)
    if kind == "heavy-tailed":
        return _heavy((ROWS, IN), g), _heavy((ROWS, OUT), g) * 1e-3
    if kind == "batched":          # (batch, sequence, features): the 128 rows as 2 x 64
        return (torch.randn(2, ROWS // 2, IN, generator=g) * 4,
                torch.randn(2, ROWS // 2, OUT, generator=g) / 4)
    raise ValueError(kind)


def torchao_float8(recipe_name: str, x, g, lin):
    """(y, dX, dW, dbias) of torchao's Float8Linear, emulated."""
    cfg = dataclasses.replace(float8.Float8LinearConfig.from_recipe_name(recipe_name),
                              emulate=True)
    model = float8.convert_to_float8_training(torch.nn.Sequential(copy.deepcopy(lin)),
                                              config=cfg)
    xx = x.clone().requires_grad_()
    y = model(xx)
    y.backward(g)
    return y.detach(), xx.grad, model[0].weight.grad, model[0].bias.grad


def torchao_mxfp8(x, g, lin):
    """(y, dX, dW, dbias) of torchao's MXFP8Linear forward, emulated on CPU."""
    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    xx = x.clone().requires_grad_()
    e4m3 = torch.float8_e4m3fn
    y = mxfp8_linear.mx_mm.apply(
        xx, w, e4m3, e4m3, e4m3, 32, kernel_pref.KernelPreference.EMULATED,
        mx_config.MXFP8Dim0CastKernelChoice.TORCH, mx_config.MXFP8Dim1CastKernelChoice.TORCH,
        mx_config.ScaleCalculationMode.RCEIL, False)
    y = y + b.to(y.dtype)           # MXFP8Linear.forward
    y.backward(g)
    return y.detach(), xx.grad, w.grad, b.grad


def mixprec_linear(recipe, x, g, lin):
    """(y, dX, dW, dbias) of mixprec's emulated linear under ``recipe``."""
    w = lin.weight.detach().clone().requires_grad_()
    b = lin.bias.detach().clone().requires_grad_()
    xx = x.clone().requires_grad_()
    y = qlinear(xx, w, b, LayerPolicy.from_recipe(recipe))
    y.backward(g)
    return y.detach(), xx.grad, w.grad, b.grad


def torchao_run(preset: str, x, g, lin):
    if preset == "torchao-mxfp8":
        return torchao_mxfp8(x, g, lin)
    return torchao_float8(preset.removeprefix("torchao-float8-"), x, g, lin)


def differing(ours, theirs) -> list:
    """Names of the tensors whose bit patterns differ."""
    return [n for n, a, b in zip(NAMES, ours, theirs)
            if a.shape != b.shape or not torch.equal(a.view(torch.int32), b.view(torch.int32))]


PRESETS = ("torchao-float8-tensorwise", "torchao-float8-rowwise", "torchao-mxfp8")


@pytest.mark.parametrize("kind", ["normal", "heavy-tailed", "batched"])
@pytest.mark.parametrize("preset", PRESETS)
def test_preset_is_bit_identical_to_torchao(preset, kind):
    lin = _layer()
    x, g = _inputs(kind)
    theirs = torchao_run(preset, x, g, lin)
    assert differing(mixprec_linear(preset, x, g, lin), theirs) == []


# --------------------------------------------------------------------------------------
# Quirks: inputs that hit each one, and the knob that follows it
# --------------------------------------------------------------------------------------
def _next_up(v: float) -> float:
    return torch.nextafter(torch.tensor(v), torch.tensor(float("inf"))).item()


def tiny_input():
    """Activations with amax 1e-13, below torchao's amax clamp 1e-12."""
    x, g = _inputs("normal")
    return x / x.abs().amax() * 1e-13, g


def rowwise_pow2_input():
    """Rows whose amax is the float32 just above 448 * 2^-k (k = 2..7): the scale
    448 / amax is the float32 just below 2^k, and float32 log2 rounds it to k."""
    x, g = _inputs("normal")
    x = x.clamp(-0.5, 0.5)
    for r, k in enumerate(range(2, 8)):
        x[r, r] = _next_up(448.0 * 2.0 ** -k)
    return x, g


def mx_log2_input():
    """Blocks whose amax is the float32 just above 448 * 2^k (k = -9..-4): the quotient
    fl(amax / 448) is the float32 just above 2^k, whose float32 log2 rounds to k, so
    torchao's RCEIL scale is 2^k where the exact ceil gives 2^(k+1). The block's other
    elements are small enough to be E4M3 subnormals under either scale, where the scale
    decides their rounding."""
    x, g = _inputs("normal")
    x = x.clamp(-0.5, 0.5)
    for r, k in enumerate(range(-9, -3)):
        block = slice(32 * r, 32 * r + 32)
        x[r, block] = x[r, block] * 2.0 ** (k - 4)
        x[r, 32 * r + 5] = _next_up(448.0 * 2.0 ** k)
    return x, g


QUIRKS = [
    # (preset, input, override that drops the quirk, tensors the override changes)
    ("torchao-float8-tensorwise", tiny_input, "scaling.amax_eps=0.0", {"dW"}),
    ("torchao-float8-rowwise", tiny_input, "scaling.amax_eps=0.0", {"dW"}),
    ("torchao-float8-rowwise", rowwise_pow2_input, "scaling.pow2_scale=floor", {"y"}),
    ("torchao-mxfp8", mx_log2_input, "scaling.mx_scale_rule=ceil", {"y"}),
]


@pytest.mark.parametrize("preset,make,override,changed", QUIRKS,
                         ids=[f"{p}-{m.__name__}" for p, m, _, _ in QUIRKS])
def test_quirk_followed_bit_for_bit(preset, make, override, changed):
    lin = _layer()
    x, g = make()
    theirs = torchao_run(preset, x, g, lin)
    assert differing(mixprec_linear(preset, x, g, lin), theirs) == []
    without = get_recipe(f"{preset}:{override}")
    assert changed <= set(differing(mixprec_linear(without, x, g, lin), theirs))


@pytest.mark.parametrize("preset", PRESETS)
def test_high_precision_gradients_are_what_matches(preset):
    """The seed presets' gradient handling (dW rounded to the gradient format, the bias
    gradient summed from the rounded grad_output) differs from torchao."""
    lin = _layer()
    x, g = _inputs("normal")
    theirs = torchao_run(preset, x, g, lin)
    grad = get_recipe(preset).grad_output
    rounded_dw = get_recipe(preset, weight_grad__format=grad.format,
                            weight_grad__scaling=grad.scaling.value,
                            weight_grad__saturate=True)
    assert "dW" in differing(mixprec_linear(rounded_dw, x, g, lin), theirs)
    rounded_db = get_recipe(preset, bias_grad="rounded")
    assert differing(mixprec_linear(rounded_db, x, g, lin), theirs) == ["dbias"]


def test_mxfp8_blocks_at_the_smallest_scale_are_a_documented_difference():
    """Blocks with amax <= 448 * 2^-127 get E8M0's smallest scale 2^-127 under both. torchao's
    CPU path then multiplies their elements by 1 instead of 2^127, and they flush to 0;
    mixprec divides by the scale (the OCP definition) and keeps them. Every other block is
    bit-identical."""
    to_mx = pytest.importorskip("torchao.prototype.mx_formats.mx_tensor").to_mx
    from mixprec import quantize_mx
    x, _ = _inputs("normal")
    x[:4] *= 2.0 ** -130                 # 4 rows of blocks far below 448 * 2^-127
    scale_bits, data = to_mx(x, torch.float8_e4m3fn, 32, mx_config.ScaleCalculationMode.RCEIL)
    theirs = data.float() * torch.exp2(scale_bits.view(torch.uint8).float() - 127).view(
        ROWS, -1).repeat_interleave(32, -1)
    ours, scales = quantize_mx(x, "e4m3", scale_rule="ceil-log2")
    assert torch.equal(scales[:4], torch.full_like(scales[:4], 2.0 ** -127))
    assert torch.equal(ours[4:].view(torch.int32), theirs[4:].view(torch.int32))
    assert (theirs[:4] == 0).all() and (ours[:4] != 0).sum() > 100


def test_amax_to_scale_matches_torchao():
    """Per-tensor and rowwise scales: mixprec's amax_to_scale with the presets' settings
    against torchao's own amax_to_scale, on amaxes around the clamp, around powers of two
    and over the float32 range."""
    from torchao.float8.float8_utils import amax_to_scale as ao_amax_to_scale
    from mixprec import amax_to_scale
    g = torch.Generator().manual_seed(2)
    near = torch.tensor([448.0 * 2.0 ** -k for k in range(-20, 40)])
    amax = torch.cat([
        torch.tensor([0.0, 1e-14, 1e-12, 1.5e-12, 3.5, 448.0, 1e30]),
        near, torch.nextafter(near, torch.tensor(float("inf"))),
        torch.nextafter(near, torch.tensor(0.0)),
        torch.exp2(torch.empty(2000).uniform_(-60, 60, generator=g))])
    for fmt, dtype in (("e4m3", torch.float8_e4m3fn), ("e5m2", torch.float8_e5m2)):
        for pow2, rule in ((False, "none"), (True, "log2")):
            theirs = ao_amax_to_scale(amax, dtype, round_scales_to_power_of_2=pow2)
            ours = amax_to_scale(amax, fmt, eps=1e-12, pow2=rule)
            assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), (fmt, rule)
    # "floor" (mantissa zeroed) is the exact power of two below; torchao's log2 rounds up
    # the scales just below a power of two
    exact = amax_to_scale(amax, "e4m3", eps=1e-12, pow2="floor")
    theirs = ao_amax_to_scale(amax, torch.float8_e4m3fn, round_scales_to_power_of_2=True)
    raw = amax_to_scale(amax, "e4m3", eps=1e-12)
    assert (exact <= raw).all() and (raw < 2 * exact).all()
    assert ((theirs == 2 * exact) | (theirs == exact)).all() and (theirs == 2 * exact).any()
