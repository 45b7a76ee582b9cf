"""The master-weight optimizer wrapper, checked against torch casts and numpy float16."""
import numpy as np
import pytest
import torch
from torch import nn

from mixprec.optim import MasterOptimizer, round_into_
from mixprec.recipe import TensorSpec

FP32, FP16, BF16 = TensorSpec("fp32"), TensorSpec("fp16"), TensorSpec("bf16")


def wrap(model, opt, *, storage=FP16, master=FP32, native=False, state=FP32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    slots = [MasterOptimizer.make_slot(n, model, "", p, storage=storage, master=master,
                                       native=native, generator=gen)
             for n, p in model.named_parameters()]
    wrapped = MasterOptimizer(opt, slots, optimizer_state=state, generator=gen)
    wrapped.copy_to_model_()
    return wrapped


def as_f16(t):
    """numpy's float16 rounding, back in float32: the oracle for FP16 storage."""
    return torch.from_numpy(t.detach().numpy().astype(np.float16).astype(np.float32))


def test_swap_mutates_the_users_param_list_and_moves_state():
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()                                   # state exists before wrapping
    params_list = opt.param_groups[0]["params"]
    moments = opt.state[model.weight]["exp_avg"]
    w = wrap(model, opt)
    assert opt.param_groups[0]["params"] is params_list
    masters = [s.master for s in w.slots]
    assert all(a is b for a, b in zip(params_list, masters))
    assert not any(m is p for m, p in zip(masters, model.parameters()))
    assert opt.state[masters[0]]["exp_avg"] is moments and model.weight not in opt.state


def test_master_keeps_full_precision_model_gets_fp16():
    torch.manual_seed(1)
    model = nn.Linear(5, 7)
    original = [p.detach().clone() for p in model.parameters()]
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1))
    for s, orig in zip(w.slots, original):
        assert torch.equal(s.master, orig)
        assert torch.equal(s.model, as_f16(orig))


def test_unscale_copies_low_precision_grads_to_fp32():
    torch.manual_seed(2)
    model = nn.Linear(4, 4).to(torch.bfloat16)
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=0.1), storage=BF16, native=True)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    assert w.unscale_(4.0) is False
    for s in w.slots:
        assert s.master.grad.dtype == torch.float32
        assert torch.equal(s.master.grad, s.model.grad.float() / 4)
    model.bias.grad[1] = float("inf")
    assert w.unscale_(1.0) is True
    assert w.first_nonfinite().name == "bias"


def test_lost_update_fraction_without_master():
    model = nn.Linear(4, 1, bias=False)
    nn.init.ones_(model.weight)
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=1.0), master=None)
    assert w.slots[0].shares_storage
    # updates 2^-13, 2^-13 (below half an ulp of 1.0 = 2^-11: lost), 2^-9, 1 (kept)
    model.weight.grad = -torch.tensor([[2.0 ** -13, 2.0 ** -13, 2.0 ** -9, 1.0]])
    w.unscale_(1.0)
    assert w.step() == 0.5
    expected = as_f16(torch.tensor([[1.0, 1.0, 1.0 + 2.0 ** -9, 2.0]]))
    assert torch.equal(model.weight.detach(), expected)


def test_fp16_stochastic_master_lands_on_a_neighbour():
    torch.manual_seed(3)
    model = nn.Linear(64, 64, bias=False)
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=1e-3), storage=TensorSpec("e5m2"),
             master=TensorSpec("fp16", "stochastic"))
    master = w.slots[0].master
    assert torch.equal(master, as_f16(master))
    before = master.detach().clone()
    model.weight.grad = torch.randn_like(master)
    w.unscale_(1.0)
    w.step()
    exact = before.double() - 1e-3 * model.weight.grad.double()
    lo = torch.from_numpy(np.nextafter(exact.numpy().astype(np.float16), np.float16(-np.inf))
                          .astype(np.float64))
    hi = torch.from_numpy(np.nextafter(exact.numpy().astype(np.float16), np.float16(np.inf))
                          .astype(np.float64))
    m = master.detach().double()
    assert torch.equal(master, as_f16(master))          # still FP16 values
    assert bool(((m >= lo) & (m <= hi)).all())          # within one FP16 ulp of the update
    assert 0.15 < float((m != exact.float().half().double()).double().mean()) < 0.35


def test_optimizer_state_rounded_to_fp16():
    torch.manual_seed(4)
    model = nn.Linear(8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    w = wrap(model, opt, state=FP16)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-2
    w.unscale_(1.0)
    w.step()
    w.round_optimizer_state_()
    for s in w.slots:
        st = opt.state[s.master]
        assert torch.equal(st["exp_avg"], as_f16(st["exp_avg"]))
        assert torch.equal(st["exp_avg_sq"], as_f16(st["exp_avg_sq"]))
        assert float(st["step"]) == 1.0


def test_round_into_native_dtype_is_the_cast():
    src = torch.randn(1000) * 100
    dst = torch.empty(1000, dtype=torch.bfloat16)
    round_into_(dst, src, BF16)
    assert torch.equal(dst, src.to(torch.bfloat16))


def test_clip_grad_norm_over_masters():
    model = nn.Linear(3, 1, bias=False)
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=1.0))
    model.weight.grad = torch.tensor([[3.0, 0.0, 4.0]])
    w.unscale_(1.0)
    assert float(w.clip_grad_norm_(1.0)) == 5.0
    torch.testing.assert_close(w.slots[0].master.grad, torch.tensor([[0.6, 0.0, 0.8]]))


def test_load_state_dict_checks_parameter_names():
    model = nn.Linear(3, 1)
    w = wrap(model, torch.optim.SGD(model.parameters(), lr=1.0))
    state = w.state_dict()
    state["names"] = ["weight", "other"]
    with pytest.raises(ValueError, match=r"checkpoint master weights are for parameters"):
        w.load_state_dict(state)


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e5m2"])
def test_round_into_agrees_with_quantize(fmt):
    """The cast shortcut for fp16/bf16 is bit-identical to quant.quantize (specials too)."""
    from mixprec.quant import quantize
    g = torch.Generator().manual_seed(5)
    x = torch.randn(4096, generator=g) * torch.exp2(torch.randint(-30, 20, (4096,), generator=g))
    x[:6] = torch.tensor([float("inf"), -float("inf"), float("nan"), 65520.0, 2.0 ** -25, -0.0])
    got = round_into_(torch.empty_like(x), x, TensorSpec(fmt))
    want = quantize(x, fmt)
    assert torch.equal(got.view(torch.int32)[3:], want.view(torch.int32)[3:])
    assert torch.isnan(got[2]) and torch.isnan(want[2]) and torch.equal(got[:2], want[:2])
