"""Real models through every preset: tiny random-init GPT-2, Llama and a ResNet with
BatchNorm (Hugging Face transformers, built from configs, nothing downloaded).

Each run takes 3 AdamW steps and asserts: it runs; the loss is finite; a probe layer's
output under the recipe differs from the FP32 recomputation of the same call (same
stored weights, same input) -- and equals it under fp32 --; every normalisation's stored
weights moved.
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.experiments.hf import tiny_batch, tiny_model

PRESETS = mixprec.list_presets()
STEPS = 3
LR = 1e-2      # 3 AdamW steps move a weight by about 3e-2, above half a bf16 ulp at 1.0

# Probe: a projection in the middle of each model (kept by no preset's rule).
PROBES = {
    "gpt2": "transformer.h.1.mlp.c_fc",
    "llama": "model.layers.1.self_attn.o_proj",
    "resnet": "resnet.encoder.stages.1.layers.0.layer.0.convolution",
}


def _norm_modules(model: nn.Module) -> dict:
    """Normalisations by structure: torch's norm classes and any module whose class name
    ends in Norm with a 1-d weight (LlamaRMSNorm)."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.LayerNorm, nn.modules.batchnorm._BatchNorm))
            or (type(m).__name__.endswith("Norm")
                and getattr(m, "weight", None) is not None and m.weight.dim() == 1)}


def _is_projection(m: nn.Module) -> bool:
    """Linear, Conv2d and transformers' Conv1D (a weight it passes to addmm)."""
    return (isinstance(m, (nn.Linear, nn.Conv2d))
            or (type(m).__name__ == "Conv1D" and getattr(m, "weight", None) is not None))


def _fp32_recompute(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The probe's call in FP32 from its stored parameters (exactly widened from a 16-bit
    dtype, as under bf16-mixed's native backend), outside any mixprec mode."""
    w = module.weight.float()
    b = None if module.bias is None else module.bias.float()
    x = x.float()
    if isinstance(module, nn.Linear):
        return F.linear(x, w, b)
    if isinstance(module, nn.Conv2d):
        return F.conv2d(x, w, b, module.stride, module.padding, module.dilation, module.groups)
    # transformers' Conv1D: y = x @ W + b with W of shape (in, out)
    return torch.addmm(b, x.reshape(-1, x.shape[-1]), w).reshape(*x.shape[:-1], -1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("name", list(PROBES))
def test_real_model_trains_under_preset(name, preset):
    torch.manual_seed(0)
    model = tiny_model(name).train()
    norms = _norm_modules(model)
    assert norms, "every model here has normalisations"
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    mp = mixprec.prepare(model, optimizer, preset, seed=0)
    stored = {n: m.weight.detach().clone() for n, m in norms.items()}   # after rounding
    probe = dict(model.named_modules())[PROBES[name]]
    seen: list = []
    handle = probe.register_forward_hook(
        lambda m, args, out: seen.append((args[0].detach().clone(), out.detach().clone())))
    gen = torch.Generator().manual_seed(0)
    losses, probes = [], []
    for _ in range(STEPS):
        batch = tiny_batch(name, gen)
        with mp.autocast():
            loss = model(**batch).loss
        x, y = seen[-1]        # the forward that trained (a keep-rule trace may precede it)
        seen.clear()
        with torch.no_grad():      # outside the mode, before the step changes the weights
            probes.append((y.float(), _fp32_recompute(probe, x)))
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
        losses.append(float(loss.detach()))
    handle.remove()
    assert all(math.isfinite(v) for v in losses), losses
    assert mp.skipped_steps == 0
    # the probe: emulated calls differ from their FP32 recomputation; fp32 equals it
    for y, ref in probes:
        if preset == "fp32":
            assert torch.equal(y, ref)
        else:
            assert not torch.equal(y, ref), f"{PROBES[name]} ran in FP32 under {preset}"
    # coverage: every projection (and embedding) emulated in the recipe's formats,
    # except the modules a keep rule names; nothing unrecognised
    if mp.backend != "native":           # the native backend leaves precision to autocast
        cov = mp.coverage()
        projections = {n for n, m in model.named_modules() if _is_projection(m)}
        assert projections <= set(cov.gemm_layers()), projections - set(cov.gemm_layers())
        recipe = mixprec.get_recipe(preset)
        for row in cov.rows:
            if not row.has_weight:
                continue
            if preset == "fp32":
                assert row.status == "fp32", row
            elif row.module in mp.keep:
                assert row.status == "kept", row
            else:
                assert row.status == "emulated", row
                for role, fmt in row.formats:         # e.g. ("weight", "e4m3/current")
                    assert fmt.split("/")[0] == getattr(recipe, role).format, row
        assert cov.unrecognised == 0, str(cov)
    # every normalisation's stored weights moved
    frozen = [n for n, m in norms.items() if torch.equal(m.weight.detach(), stored[n])]
    assert not frozen, f"norm weights did not move under {preset}: {frozen}"

