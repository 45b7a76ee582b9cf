"""Optimizer state that cannot silently die: moments rounded to zero in their storage
format while their gradients are not zero are counted in the history and warned about;
fp16-pure keeps its optimizer state in FP32 and trains a tiny Llama with AdamW."""
import math
import re
import warnings

import pytest
import torch
from torch import nn

from mixprec.engine import prepare
from mixprec.optim import OptimizerStateUnderflowWarning
from mixprec.recipe import TensorSpec, get_recipe


def test_underflow_fraction_counts_moments_fp16_flushes_to_zero():
    """Adam's first step stores exp_avg_sq = (1 - beta2) * g^2. FP16 rounds |v| <= 2^-25
    to zero (nearest-even, smallest subnormal 2^-24): with beta2 = 0.999, g = 2^-8 gives
    v = 1.5e-8 -> 0 and g = 2^-9 -> 0, g = 2^-6 gives 2.4e-7 -> a subnormal; g = 0 does not
    count. exp_avg = 0.1 * g survives. So 2 of the 3 live elements: 2/3."""
    model = nn.Linear(4, 1, bias=False)
    g = torch.tensor([[2.0 ** -8, 2.0 ** -6, 0.0, 2.0 ** -9]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999))
    mp = prepare(model, opt, "fp16-mixed:optimizer_state=fp16,loss_scale.kind=none")
    with mp.autocast():
        loss = (model.weight * g).sum()          # d loss / d w = g exactly
    mp.backward(loss)
    with pytest.warns(OptimizerStateUnderflowWarning) as record:
        assert mp.step()
    assert mp.history[-1]["state_underflow"] == 2 / 3
    text = str(record[0].message)
    assert "66.7% of exp_avg_sq" in text and "0.0% of exp_avg " in text
    assert "'weight'" in text and "optimizer_state.format=fp32" in text and "eps" in text
    state = opt.state[mp.master_params[0]]["exp_avg_sq"]
    assert state.view(-1).tolist()[0] == 0.0 and state.view(-1).tolist()[1] > 0.0


def test_fp32_state_is_not_counted():
    model = nn.Linear(4, 1, bias=False)
    mp = prepare(model, torch.optim.Adam(model.parameters()), "fp16-mixed")
    with mp.autocast():
        loss = model(torch.ones(2, 4)).sum()
    mp.backward(loss)
    mp.step()
    assert mp.history[-1]["state_underflow"] is None


def test_fp16_pure_keeps_fp32_optimizer_state_and_fp16_weights_without_master():
    r = get_recipe("fp16-pure")
    assert r.optimizer_state == TensorSpec("fp32") and r.master is None
    assert r.weight == TensorSpec("fp16")


def _llama_run(recipe, steps=12):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, vocab_size=128))
    mp = prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), recipe, seed=0)
    start = torch.randint(0, 128, (8, 1), generator=torch.Generator().manual_seed(1))
    ids = (start + 3 * torch.arange(32)) % 128         # a learnable next-token rule
    losses = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(steps):
            with mp.autocast():
                loss = model(input_ids=ids, labels=ids).loss
            mp.backward(loss)
            mp.step()
            mp.zero_grad()
            losses.append(float(loss.detach()))
    state_warnings = [w for w in caught if issubclass(w.category, OptimizerStateUnderflowWarning)]
    return mp, losses, state_warnings


def test_fp16_pure_trains_a_tiny_llama_with_adamw():
    mp, losses, state_warnings = _llama_run("fp16-pure")
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0] - 1.0                 # 4.85 -> about 3.6 in 12 steps
    assert max(losses[6:]) < losses[0] and mp.skipped_steps == 0
    assert not state_warnings
    assert all(h["state_underflow"] is None for h in mp.history)
    _, fp32, _ = _llama_run("fp32")
    assert abs(losses[-1] - fp32[-1]) < 0.05            # as FP32 does


def test_fp16_optimizer_state_underflow_is_warned_once_on_the_tiny_llama():
    """The former fp16-pure: FP16 moments. exp_avg_sq dies, steps overflow and are
    skipped, the loss does not fall; one warning says so."""
    mp, losses, state_warnings = _llama_run("fp16-pure:optimizer_state.format=fp16")
    assert len(state_warnings) == 1
    text = str(state_warnings[0].message)
    assert re.search(r"\d+\.\d% of exp_avg_sq, [\d.]+% of exp_avg elements are 0 where the "
                     r"gradient is not", text), text
    assert "model.layers.0" in text and "optimizer_state.format=fp32" in text
    worst = [h["state_underflow"] for h in mp.history if not h["skipped"]]
    assert worst and min(worst) > 0.5
    assert mp.skipped_steps > 0 and losses[-1] > losses[0] - 0.2
