"""Matmul-like calls under ``mp.autocast()`` outside every attached module (a functional
call in the training step, outside the model's forward): their delayed scalers live as
long as the engine, are made by ``reserve_scalers`` and are checkpointed with the layers'.

The amax oracle is torch's own ``x.abs().max()`` of each operand as the step passes it,
and of the gradient arriving at the call's output (a tensor hook)."""
import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import _get_current_function_mode_stack

import mixprec
from mixprec import LayerPolicy, PrecisionMode, outside_layer

RECIPE = "te-delayed"      # delayed scaling of weight, activation and grad_output
OUTSIDE = mixprec.coverage.OUTSIDE


class Net(nn.Module):
    """A body whose forward ends in ``F.linear`` on the model's own parameter ``w`` (the
    root module is attached: that call belongs to it), and a ``head`` parameter that
    only the training step uses, outside the forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(8, 16)
        self.w = nn.Parameter(torch.randn(16, 16) * 0.3)
        self.head = nn.Parameter(torch.randn(4, 16) * 0.3)

    def forward(self, x):
        return F.linear(torch.relu(self.body(x)), self.w)


def _batch(step: int):
    g = torch.Generator().manual_seed(10 + step)
    return torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)


def _build(example_inputs: bool = False):
    model = Net()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), RECIPE,
                         example_inputs=_batch(0)[0] if example_inputs else None)
    return model, mp


def _step(model, mp, step: int, seen: dict = None):
    """One training step; the logits come from F.linear(h, model.head) outside the
    model's forward. ``seen`` collects the hand-computed amaxes of that call and the
    PrecisionMode the step ran under."""
    x, y = _batch(step)
    with mp.autocast():
        h = model(x)
        logits = F.linear(h, model.head)
        if seen is not None:
            seen["mode"] = _get_current_function_mode_stack()[-1]
            seen["activation"].append(h.detach().abs().max())
            seen["weight"].append(model.head.detach().abs().max())
            logits.register_hook(lambda g: seen["grad_output"].append(g.abs().max()))
        loss = F.cross_entropy(logits, y)
    mp.backward(loss)
    mp.step()
    mp.zero_grad()
    return loss.detach()


def _scalers(state) -> dict:
    return {k: (s.amax_history, s.scale, int(s._pos), int(s._count))
            for k, s in state.scalers.items()}


def _same_scalers(a: dict, b: dict) -> bool:
    return sorted(a) == sorted(b) and all(
        torch.equal(a[k][0], b[k][0]) and torch.equal(a[k][1], b[k][1]) and a[k][2:] == b[k][2:]
        for k in a)


def test_outside_delayed_scalers_keep_their_history_across_steps():
    model, mp = _build()
    seen = {"activation": [], "weight": [], "grad_output": []}
    for step in range(3):
        _step(model, mp, step, seen)
    # the scalers of the last step's PrecisionMode: each autocast() builds a new mode,
    # the outside state is the engine's
    state = seen["mode"].default.state
    for key in ("activation", "weight", "grad_output"):
        history = state.scalers[key].amax_history
        assert len(history) == 3, (key, history)          # one fresh state per step: 1
        assert torch.equal(history, torch.stack(seen[key])), (key, history, seen[key])
    assert state is mp.outside_state
    cov = mp.coverage()
    assert [r.calls for r in cov.rows if r.module == OUTSIDE] == [3]
    # the forward's own F.linear on model.w belongs to the attached root module (""),
    # whose state always lived as long as the engine
    assert len(mp._attached.states[""].scalers["weight"].amax_history) == 3


def test_precision_mode_takes_an_existing_default_layer():
    policy = LayerPolicy.from_recipe(RECIPE)
    x = torch.randn(4, 8)
    w = torch.randn(3, 8)
    # standalone: each PrecisionMode makes its own outside state, histories start empty
    histories = []
    for _ in range(2):
        with PrecisionMode(default_policy=policy) as mode:
            F.linear(x, w)
        histories.append(len(mode.default.state.scalers["activation"].amax_history))
    assert histories == [1, 1]
    # one default_layer for both: the history goes on
    layer = outside_layer(policy)
    for _ in range(2):
        with PrecisionMode(default_layer=layer) as mode:
            F.linear(x, w)
        assert mode.default is layer and mode.default_policy is policy
    assert torch.equal(layer.state.scalers["activation"].amax_history,
                       torch.stack([x.abs().max(), x.abs().max()]))
    with pytest.raises(ValueError, match="differs from the policy of default_layer"):
        PrecisionMode(default_policy=LayerPolicy.from_recipe("fp8-hybrid"), default_layer=layer)
    with pytest.raises(TypeError, match="default_layer must be a Layer"):
        PrecisionMode(default_layer=policy)


@pytest.mark.filterwarnings("ignore::mixprec.SharedScalerWarning")   # several outside calls
def test_reserve_scalers_makes_the_outside_scalers_and_changes_nothing():
    model, mp = _build(example_inputs=True)
    state = mp.outside_state
    # every key an outside call can round under te-delayed (weight_grad stays FP32)
    assert sorted(state.scalers) == ["activation", "activation.rhs", "grad_output", "weight",
                                     "weight.rhs"]
    assert all(int(s._count) == 0 and float(s.scale) == 1.0 for s in state.scalers.values())
    # outside calls of every operand shape make no scaler of their own
    before = {k: id(s) for k, s in state.scalers.items()}
    x = torch.randn(32, 8)
    with mp.autocast():
        h = model(x)
        out = (h @ h.t()).sum() + (model.w @ model.w).sum()            # act @ act, w @ w
        out = out + torch.addmm(model.w[0], h[:4], model.w).sum()    # a parameter addend
        out = out + F.linear(h, model.head, model.head[:, 0]).sum()
    out.backward()
    assert {k: id(s) for k, s in state.scalers.items()} == before
    assert all(int(s._count) > 0 for s in state.scalers.values())
    # training after prepare(example_inputs=...) is bit-identical to training without
    runs = []
    for example in (False, True):
        model, mp = _build(example_inputs=example)
        losses = torch.stack([_step(model, mp, step) for step in range(2)])
        runs.append((losses, [p.detach().clone() for p in model.parameters()],
                     {k: v for k, v in _scalers(mp.outside_state).items() if v[3] > 0}))
    (l0, p0, s0), (l1, p1, s1) = runs
    assert torch.equal(l0, l1) and all(torch.equal(a, b) for a, b in zip(p0, p1))
    assert sorted(s0) == ["activation", "grad_output", "weight"] and _same_scalers(s0, s1)


def _resume(via: str, tmp_path):
    """Two steps, a checkpoint, a fresh engine that loads it, two more steps."""
    model, mp = _build()
    for step in range(2):
        _step(model, mp, step)
    if via == "state_dict":
        state = copy.deepcopy(mp.state_dict())
        model, mp = _build()
        mp.load_state_dict(state)
    else:
        import torch.distributed.checkpoint as dcp
        from mixprec.distributed.checkpoint import EngineState
        dcp.save({"train": EngineState(mp)}, checkpoint_id=str(tmp_path / "ckpt"))
        model, mp = _build()
        dcp.load({"train": EngineState(mp)}, checkpoint_id=str(tmp_path / "ckpt"))
    losses = [_step(model, mp, step) for step in range(2, 4)]
    return torch.stack(losses), model, mp


# one process: DCP saves and loads without a process group
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
@pytest.mark.parametrize("via", ["state_dict", "dcp"])
def test_resume_restores_the_outside_scalers_bit_identically(via, tmp_path):
    model, mp = _build()
    losses = torch.stack([_step(model, mp, step) for step in range(4)])[2:]
    r_losses, r_model, r_mp = _resume(via, tmp_path)
    expected = _scalers(mp.outside_state)
    assert [len(v[0]) for v in expected.values()] == [4, 4, 4]
    assert _same_scalers(_scalers(r_mp.outside_state), expected)
    assert torch.equal(r_losses, losses)
    for a, b in zip(r_model.parameters(), model.parameters()):
        assert torch.equal(a, b)
    for name, st in mp._attached.states.items():
        assert _same_scalers(_scalers(r_mp._attached.states[name]), _scalers(st)), name


def test_checkpoint_without_outside_scalers_still_loads():
    # a checkpoint written before the outside state was saved: the layers' scalers are
    # restored, the outside ones start empty (as every step's did then)
    model, mp = _build()
    _step(model, mp, 0)
    state = copy.deepcopy(mp.state_dict())
    assert sorted(state["outside_scalers"]) == ["activation", "grad_output", "weight"]
    del state["outside_scalers"]
    model, fresh = _build()
    fresh.load_state_dict(state)
    assert fresh.outside_state.scalers == {}
    assert _same_scalers(_scalers(fresh._attached.states["body"]),
                         _scalers(mp._attached.states["body"]))


def test_several_delayed_outside_calls_in_one_autocast_warn_once():
    # they share one scaler per role: the second call's amax goes into the first one's
    # history and it rounds with the scale the first call left
    model, mp = _build()
    x = torch.randn(32, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("error", mixprec.SharedScalerWarning)
        for step in range(3):                 # one outside call per autocast(): silent
            _step(model, mp, step)
    with pytest.warns(mixprec.SharedScalerWarning, match="share one delayed scaler") as rec:
        with mp.autocast():
            h = model(x)
            out = F.linear(h, model.head).sum() + F.linear(h, model.head * 2).sum()
            out = out + F.linear(h, model.head).sum()
    assert len([w for w in rec if w.category is mixprec.SharedScalerWarning]) == 1
    # current scaling keeps no history: two outside calls are fine
    model = Net()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-hybrid")
    with warnings.catch_warnings():
        warnings.simplefilter("error", mixprec.SharedScalerWarning)
        with mp.autocast():
            h = model(x)
            F.linear(h, model.head).sum() + F.linear(h, model.head).sum()
