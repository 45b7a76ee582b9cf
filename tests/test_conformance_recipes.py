"""The recipe knobs behind the conformance presets: validation, the grammar, defaults that
keep the seed presets as they were, and training steps under every conformance preset."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import mixprec
from mixprec import ScalingConfig, get_recipe
from mixprec.conformance import CONFORMANCE, CONFORMANCE_PRESETS
from mixprec.scaling import quantize_axiswise

SEEDS = ("fp32", "fp16-mixed", "bf16-mixed", "fp16-pure", "fp8-e5m2", "fp8-hybrid",
         "mxfp8", "mxfp6", "mxfp4")


def test_every_conformance_preset_is_registered_and_documented():
    names = [r.name for r in CONFORMANCE_PRESETS]
    assert names == [e.preset for e in CONFORMANCE]
    assert set(names) <= set(mixprec.list_presets())


@pytest.mark.parametrize("name", SEEDS)
def test_seed_presets_keep_their_gradient_and_scale_semantics(name):
    r = get_recipe(name)
    assert r.bias_grad == "rounded"
    assert (r.scaling.amax_eps, r.scaling.pow2_scale) == (0.0, "none")
    assert r.scaling.mx_scale_rule == "ocp"


@pytest.mark.parametrize("text,match", [
    ("fp8-hybrid:bias_grad=fp32", "bias_grad 'fp32'.*rounded, hp"),
    ("fp8-hybrid:scaling.pow2_scale=round", "pow2_scale 'round'.*none, floor, log2"),
    ("fp8-hybrid:scaling.amax_eps=-1", "amax_eps must be a finite float >= 0"),
    ("mxfp8:scaling.mx_scale_rule=up", "mx_scale_rule 'up'.*ocp, ceil, ceil-log2, dither"),
    ("fp8-hybrid:activation.scaling=rowwise", "scaling 'rowwise'.*axiswise"),
])
def test_bad_values_name_the_valid_choices(text, match):
    with pytest.raises(ValueError, match=match):
        get_recipe(text)


@pytest.mark.parametrize("text", [
    "fp8-hybrid:activation.scaling=axiswise,scaling.amax_eps=1e-12,bias_grad=hp",
    "fp8-hybrid:scaling.pow2_scale=floor",
    "torchao-float8-rowwise:scaling.pow2_scale=none,bias_grad=rounded",
    "torchao-mxfp8:scaling.mx_scale_rule=ceil",
])
def test_grammar_round_trips(text):
    r = get_recipe(text)
    assert get_recipe(str(r)) == r
    assert str(r) == text


def test_axiswise_rows_are_scaled_by_hand():
    # row 0: amax 3.5 -> scale 128: 0.3 * 128 = 38.4 -> 40 -> 0.3125
    # row 1: amax 0.875 -> scale 512: 0.3 * 512 = 153.6 -> 160 (step 16) -> 0.3125;
    #        0.1 * 512 = 51.2 -> 52 (step 4) -> 0.1015625
    x = torch.tensor([[3.5, 0.3], [0.875, 0.1]])
    deq, scales = quantize_axiswise(x, "e4m3", axis=-1)
    assert torch.equal(scales, torch.tensor([[128.0], [512.0]]))
    assert torch.equal(deq, torch.tensor([[3.5, 0.3125], [0.875, 0.1015625]]))
    # along axis 0: columns [3.5, 0.875] (scale 128) and [0.3, 0.1] (448 / 0.3)
    _, col = quantize_axiswise(x, "e4m3", axis=0)
    assert torch.equal(col, torch.tensor([[128.0, 448.0 / torch.tensor(0.3).item()]]).float())


def test_amax_eps_keeps_a_zero_tensor_scaled():
    cfg = ScalingConfig(amax_eps=1e-12)
    assert mixprec.amax_to_scale(torch.tensor(0.0), "e4m3", eps=cfg.amax_eps).item() == \
        torch.tensor(448e12, dtype=torch.float32).item()
    assert mixprec.amax_to_scale(torch.tensor(0.0), "e4m3").item() == 1.0


@pytest.mark.parametrize("name", [r.name for r in CONFORMANCE_PRESETS])
def test_training_steps_under_each_preset(name):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 32, 3), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(32 * 6 * 6, 64), torch.nn.ReLU(),
                                torch.nn.Linear(64, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mp = mixprec.prepare(model, opt, recipe=name)
    x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(4):
        with mp.autocast():
            loss = F.cross_entropy(model(x), y)
        mp.backward(loss)
        assert mp.step()
        mp.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_delayed_scaling_keeps_eps_and_pow2_through_a_checkpoint():
    a = mixprec.DelayedScaling(4, "max", 0, "e4m3", eps=1e-12, pow2="floor")
    a.update(torch.tensor(3.0))               # 448 / 3 = 149.3 -> 128
    assert a.scale.item() == 128.0
    b = mixprec.DelayedScaling(4, "max", 0, "e4m3")
    b.load_state_dict(a.state_dict())
    b.update(torch.tensor(0.0))               # history max stays 3 -> 128 again
    assert (b.eps, b.pow2, b.scale.item()) == (1e-12, "floor", 128.0)
