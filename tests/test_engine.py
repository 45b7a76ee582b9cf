"""The training engine: skipping, diagnosis, accumulation, clipping, master weights,
schedulers, checkpoints, the native path and stage order."""
import copy
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from mixprec.engine import NonFiniteError, Stage, prepare, resolve_keep_high_precision
from mixprec.loss_scale import NoOpLossScale
from mixprec.recipe import get_recipe


def mlp(seed=0, width=16):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, width), nn.ReLU(), nn.Linear(width, 4))


def batch(seed, n=32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


def train_step(mp, model, x, y):
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    applied = mp.step()
    mp.zero_grad()
    return applied


def snapshot(mp, model, opt):
    return (copy.deepcopy(model.state_dict()), [m.detach().clone() for m in mp.master_params],
            copy.deepcopy(opt.state_dict()["state"]))


def assert_same(a, b):
    """Nested dicts/lists of tensors are bit-identical."""
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b)
        for u, v in zip(a, b):
            assert_same(u, v)
    elif torch.is_tensor(a):
        assert torch.equal(a.view(-1).view(torch.int32) if a.dtype == torch.float32 else a,
                           b.view(-1).view(torch.int32) if b.dtype == torch.float32 else b)
    else:
        assert a == b


# -- skipping ---------------------------------------------------------------------------
def test_inf_gradient_skips_step_and_touches_nothing():
    model = mlp()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    mp = prepare(model, opt, "fp16-mixed")
    for s in range(2):                       # populate Adam's moments
        assert train_step(mp, model, *batch(s))
    before, scale = snapshot(mp, model, opt), mp.scale
    x, y = batch(5)
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    model[2].weight.grad[1, 3] = float("inf")
    assert mp.step() is False
    mp.zero_grad()
    assert_same(snapshot(mp, model, opt), before)
    assert mp.scale == scale * 0.5
    assert mp.skipped_steps == 1 and mp.steps == 3
    assert mp.history[-1]["skipped"] and mp.history[-1]["loss_finite"]
    assert not mp.history[0]["skipped"]


def test_bf16_never_skips_silently():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed")
    assert isinstance(mp.loss_scaler, NoOpLossScale)
    before = copy.deepcopy(model.state_dict())
    with mp.autocast():
        loss = F.cross_entropy(model(batch(0)[0]), batch(0)[1])
    mp.backward(loss)
    model[0].bias.grad[0] = float("nan")
    assert mp.step() is False and mp.skipped_steps == 1 and mp.scale == 1.0
    assert_same(model.state_dict(), before)


def test_forward_nan_is_diagnosed_and_leaves_the_scale_alone():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 "fp16-mixed:max_consecutive_skips=3")
    x, y = batch(0)
    x[0, 0] = float("nan")
    scale = mp.scale
    assert not train_step(mp, model, x, y) and not train_step(mp, model, x, y)
    assert mp.scale == scale                         # no back-off for a forward NaN
    assert [h["loss_finite"] for h in mp.history] == [False, False]
    with pytest.raises(NonFiniteError, match=r"forward pass.*loss scaling cannot fix this"
                       r".*'0\.weight' \(module '0', Linear\)"):
        train_step(mp, model, x, y)
    assert mp.consecutive_skips == 3


def test_backward_overflow_is_diagnosed():
    model = mlp()
    # S * |grad| far above 65504: every FP16 gradient overflows, the loss stays finite.
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 "fp16-mixed:loss_scale.kind=static,loss_scale.init_scale=1e30,"
                 "max_consecutive_skips=2")
    assert not train_step(mp, model, *batch(0))
    assert mp.history[0]["loss_finite"] and not mp.history[0]["grads_finite"]
    with pytest.raises(NonFiniteError, match=r"overflowed in backward at loss scale 1e\+30"
                       r".*'0\.weight' \(module '0', Linear\)"):
        train_step(mp, model, *batch(1))
    assert isinstance(NonFiniteError("x"), RuntimeError)


def test_first_nonfinite_parameter_is_named():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 "fp16-mixed:max_consecutive_skips=1")
    with mp.autocast():
        loss = F.cross_entropy(model(batch(0)[0]), batch(0)[1])
    mp.backward(loss)
    model[2].bias.grad[0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"'2\.bias' \(module '2', Linear\)"):
        mp.step()


# -- accumulation, clipping ---------------------------------------------------------------
STATIC_1024 = "fp32:loss_scale.kind=static,loss_scale.init_scale=1024"


def test_gradient_accumulation_unscales_once(monkeypatch):
    import mixprec.optim as optim_mod
    calls = []
    real = optim_mod.unscale_grads_
    monkeypatch.setattr(optim_mod, "unscale_grads_",
                        lambda grads, scale: calls.append(scale) or real(grads, scale))
    x, y = batch(0, n=64)
    ref = mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    F.cross_entropy(ref(x), y).backward()
    ref_opt.step()

    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.5), STATIC_1024)
    for half in (slice(0, 32), slice(32, 64)):
        with mp.autocast():
            loss = F.cross_entropy(model(x[half]), y[half]) / 2
        mp.backward(loss)
    assert mp.step()
    assert calls == [1024.0]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_clip_grad_norm_sees_unscaled_gradients():
    x, y = batch(3)
    ref = mlp()
    F.cross_entropy(ref(x), y).backward()
    ref_norm = nn.utils.clip_grad_norm_(ref.parameters(), 0.1)

    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), STATIC_1024)
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    norm = mp.clip_grad_norm_(0.1)
    assert mp.stage is Stage.UNSCALED
    torch.testing.assert_close(norm, ref_norm, rtol=1e-5, atol=0)
    assert float(ref_norm) > 0.1        # clipping happened
    for m, q in zip(mp.master_params, ref.parameters()):
        torch.testing.assert_close(m.grad, q.grad, rtol=1e-5, atol=1e-7)
    assert mp.step()


def test_clip_grad_norm_on_fp16_mixed_is_close_to_fp32():
    x, y = batch(4)
    ref = mlp()
    F.cross_entropy(ref(x), y).backward()
    ref_norm = float(torch.linalg.vector_norm(torch.cat([p.grad.view(-1) for p in ref.parameters()])))
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 "fp16-mixed:loss_scale.kind=static,loss_scale.init_scale=1024")
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    assert abs(float(mp.clip_grad_norm_(1e9)) - ref_norm) < 2e-2 * ref_norm


# -- master weights -------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["emulated", "native"])
@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp16-pure"])
def test_small_updates_survive_only_with_master_weights(recipe, backend):
    """Weights 1.0, SGD update +2^-13 per step: below half an FP16 ulp of 1 (2^-11).
    Natively the weights are real float16 tensors (no "unscale FP16 gradients" error)."""
    model = nn.Linear(4, 1, bias=False)
    nn.init.ones_(model.weight)
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=1.0), recipe, backend=backend,
                 count_lost_updates=True)
    assert model.weight.dtype == (torch.float16 if backend == "native" else torch.float32)
    x = torch.ones(1, 4)
    for k in range(1, 9):
        with mp.autocast():
            loss = -model(x).float().sum() * 2.0 ** -13   # an FP16 loss's own grad S overflows
        mp.backward(loss)
        assert mp.step()
        mp.zero_grad()
        if recipe == "fp16-mixed":
            expect = float(np.float16(1.0 + k * 2.0 ** -13))     # numpy rounds the master
            assert mp.lost_update_fraction == 0.0
        else:
            expect = 1.0
            assert mp.lost_update_fraction == 1.0
        assert torch.equal(model.weight, torch.full_like(model.weight, expect))
    assert expect == (1.0 + 2.0 ** -10 if recipe == "fp16-mixed" else 1.0)


def test_lr_scheduler_on_the_users_optimizer_changes_the_step():
    model = nn.Linear(4, 1, bias=False)
    nn.init.ones_(model.weight)
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    mp = prepare(model, opt, "fp16-mixed")
    master = mp.master_params[0]
    x = torch.ones(1, 4)
    deltas = []
    for _ in range(3):
        before = master.detach().clone()
        with mp.autocast():
            loss = model(x).sum() / 4       # gradient 1/4 for every weight
        mp.backward(loss)
        assert mp.step()
        mp.zero_grad()
        sched.step()
        deltas.append(float((before - master.detach()).mean()))
    assert deltas == [0.25, 0.125, 0.0625]


# -- checkpoints --------------------------------------------------------------------------
def _run(recipe, steps, start=0, state=None, opt_cls=torch.optim.Adam):
    model = mlp()
    opt = opt_cls(model.parameters(), lr=1e-2)
    mp = prepare(model, opt, recipe, seed=1234)
    if state is not None:
        model.load_state_dict(state["model"])
        mp.load_state_dict(state["engine"])
    for s in range(start, start + steps):
        train_step(mp, model, *batch(s))
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "engine": mp.state_dict()}, buf)
    buf.seek(0)
    return model, mp, torch.load(buf, weights_only=False)


RESUME = ["fp16-mixed:loss_scale.growth_interval=2,loss_scale.init_scale=1e6",
          "fp8-e5m2:loss_scale.growth_interval=2", "fp16-pure:loss_scale.growth_interval=2",
          "fp8-hybrid:weight.scaling=delayed,activation.scaling=delayed,grads.scaling=delayed,"
          "keep_high_precision=none,loss_scale=dynamic,loss_scale.growth_interval=2"]


@pytest.mark.parametrize("recipe", RESUME)
def test_checkpoint_resume_is_bit_identical(recipe):
    full, full_mp, _ = _run(recipe, 6)
    _, _, state = _run(recipe, 3)
    resumed, resumed_mp, _ = _run(recipe, 3, start=3, state=state)
    assert_same(resumed.state_dict(), full.state_dict())
    assert_same([m.detach() for m in resumed_mp.master_params],
                [m.detach() for m in full_mp.master_params])
    assert resumed_mp.scale == full_mp.scale and resumed_mp.history == full_mp.history
    assert_same(resumed_mp.state_dict()["layer_states"], full_mp.state_dict()["layer_states"])
    if "delayed" in recipe:     # amax histories of every layer are part of the checkpoint
        assert set(state["engine"]["layer_states"]) == {"0", "2"}
    assert any(h["scale"] != full_mp.history[0]["scale"] for h in full_mp.history)


def test_resume_without_generator_state_diverges():
    """The stochastic-rounding generator matters: a resume that reseeds it differs."""
    recipe = "fp8-e5m2"
    full, _, _ = _run(recipe, 6)
    _, _, state = _run(recipe, 3)
    state["engine"]["generator"] = torch.Generator().manual_seed(99).get_state()
    resumed, _, _ = _run(recipe, 3, start=3, state=state)
    assert any(not torch.equal(a, b) for a, b in zip(resumed.state_dict().values(),
                                                    full.state_dict().values()))


def test_load_rejects_another_recipe():
    _, mp, state = _run("fp16-mixed", 1)
    model = mlp()
    other = prepare(model, torch.optim.Adam(model.parameters()), "bf16-mixed")
    with pytest.raises(ValueError, match="checkpoint recipe 'fp16-mixed' differs"):
        other.load_state_dict(state["engine"])


# -- native --------------------------------------------------------------------------------
class SpyDtypes(TorchDispatchMode):
    """Records the input dtypes of the aten ops that actually ran."""

    def __init__(self):
        super().__init__()
        self.seen = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        dtypes = [a.dtype for a in args if torch.is_tensor(a)]
        self.seen.setdefault(func.overloadpacket.__name__, set()).update(dtypes)
        return func(*args, **(kwargs or {}))


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.softmax(self.fc1(x), dim=-1))


def test_bf16_mixed_native_on_cpu():
    torch.manual_seed(0)
    model = Attention()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed",
                 backend="native")
    assert mp.backend == "native"
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert all(m.dtype == torch.float32 for m in mp.master_params)
    x, y = batch(0)
    spy = SpyDtypes()
    with mp.autocast(), spy:
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert spy.seen["_softmax"] == {torch.float32}         # FP32 policy, also on CPU
    assert torch.bfloat16 in spy.seen["addmm"]              # GEMMs in bf16
    assert train_step(mp, model, x, y)
    for p, m in zip(model.parameters(), mp.master_params):
        assert torch.equal(p, m.to(torch.bfloat16))         # model = round(master)


def test_native_keeps_requested_modules_in_fp32():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed",
                 backend="native", keep_high_precision=("last",), example_inputs=batch(0)[0])
    assert model[0].weight.dtype == torch.bfloat16 and model[2].weight.dtype == torch.float32
    spy = SpyDtypes()
    with mp.autocast(), spy:
        out = model(batch(0)[0])
    assert out.dtype == torch.float32 and torch.float32 in spy.seen["addmm"]
    assert train_step(mp, model, *batch(1))


def test_native_rejects_recipes_without_native_dtype():
    model = mlp()
    with pytest.raises(ValueError, match="cannot run on the native backend.*e5m2"):
        prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-e5m2",
                backend="native")
    with pytest.raises(ValueError, match="unknown backend 'gpu'; valid choices"):
        prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), backend="gpu")


def test_fp8_linear_native_matches_emulated_e4m3():
    from mixprec.native import fp8_linear_native, scaled_mm_available
    from mixprec.scaling import amax_to_scale, quantize_scaled, tensor_to_amax
    assert scaled_mm_available("cpu")
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(3, 5, 64, generator=g) * 3, torch.randn(32, 64, generator=g) * 0.05
    b = torch.randn(32, generator=g)
    sx, sw = (amax_to_scale(tensor_to_amax(t), "e4m3") for t in (x, w))
    emulated = F.linear(quantize_scaled(x, "e4m3", sx), quantize_scaled(w, "e4m3", sw), b)
    native = fp8_linear_native(x, w, sx, sw, bias=b)
    assert native.shape == (3, 5, 32) and native.dtype == torch.float32
    # same FP8 operands, FP32 accumulation in a different order
    torch.testing.assert_close(native, emulated, rtol=1e-5, atol=1e-5)
    exact = F.linear(x, w, b)
    assert float((native - exact).abs().max()) > 1e-3       # FP8 rounding did happen


# -- identity path, order, filters -----------------------------------------------------------
def test_fp32_recipe_matches_plain_torch():
    ref, model = mlp(), mlp()
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), "fp32")
    assert isinstance(mp.loss_scaler, NoOpLossScale)
    for s in range(3):
        x, y = batch(s)
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
        ref_opt.zero_grad()
        assert train_step(mp, model, x, y)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_recipe_objects_and_strings_are_the_same_path():
    from dataclasses import replace
    from mixprec.recipe import LossScaleConfig, Recipe, TensorSpec
    fp16 = TensorSpec("fp16")
    built = Recipe(name="fp16-mixed", weight=fp16, activation=fp16, grad_output=fp16,
                   weight_grad=fp16, loss_scale=LossScaleConfig(kind="dynamic"))
    assert built == get_recipe("fp16-mixed")
    runs = []
    for recipe in (built, "fp16-mixed", replace(built, master=TensorSpec("bf16"))):
        model = mlp()
        mp = prepare(model, torch.optim.Adam(model.parameters(), lr=1e-2), recipe, seed=0)
        for s in range(3):
            assert train_step(mp, model, *batch(s))
        runs.append(model.state_dict())
    assert_same(runs[0], runs[1])
    assert any(not torch.equal(a, b) for a, b in zip(runs[0].values(), runs[2].values()))


def test_stages_out_of_order_raise():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"step\(\) called out of order.*backward"):
        mp.step()
    with pytest.raises(RuntimeError, match=r"clip_grad_norm_\(\) called out of order"):
        mp.clip_grad_norm_(1.0)
    x, y = batch(0)
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    mp.clip_grad_norm_(1.0)
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    with pytest.raises(RuntimeError, match=r"already unscaled by clip_grad_norm_"):
        mp.backward(loss)
    mp.step()
    with pytest.raises(RuntimeError, match=r"call mp.zero_grad\(\)"):
        mp.backward(loss)
    with pytest.raises(RuntimeError, match=r"step\(\) called out of order"):
        mp.step()
    mp.zero_grad()
    assert mp.stage is Stage.READY


class Net(nn.Module):
    """The head is registered before the convolution it runs after."""
    def __init__(self):
        super().__init__()
        self.head = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 2))
        self.conv = nn.Conv2d(1, 2, 3)
        self.bn = nn.BatchNorm2d(2)

    def forward(self, x):
        return self.head(self.bn(self.conv(x)).flatten(1))


def test_keep_high_precision_filters():
    net = Net()
    x = torch.randn(3, 1, 4, 4)
    running = net.bn.running_mean.clone()

    def keep(model, filters):
        return resolve_keep_high_precision(model, filters, example_inputs=x)
    # execution order, not registration order (which has head.0 first and conv last)
    assert keep(net, ("first",)) == {"conv"}
    assert keep(net, ("last",)) == {"head.2"}
    assert net.training and torch.equal(net.bn.running_mean, running)   # the trace changed nothing
    with pytest.raises(ValueError, match="'first' and 'last' are positions in execution order"):
        resolve_keep_high_precision(net, ("last",))
    assert keep(net, ("norm",)) == {"bn", "head.1"}
    assert keep(net, ("head",)) == {"head", "head.0", "head.1", "head.2"}
    assert keep(net, (lambda n, m: isinstance(m, nn.Linear),)) == {"head.0", "head.2"}
    assert keep(net, None) == frozenset()
    with pytest.raises(ValueError, match="pattern 'encoder.\\*' matches no module"):
        keep(net, ("encoder.*",))
    with pytest.raises(ValueError, match="is not a string or a callable"):
        keep(net, (3,))


def test_keep_override_reaches_the_recipe():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed",
                 keep_high_precision="first", example_inputs=batch(0)[0])
    assert mp.recipe == get_recipe("fp16-mixed:keep_high_precision=first")
    assert mp.keep == {"0"}
    # the kept layer stores FP32 weights, the other FP16 values
    assert not torch.equal(model[0].weight, model[0].weight.half().float())
    assert torch.equal(model[2].weight, model[2].weight.half().float())


def _fp8_run(lazy, monitor=False, steps=3):
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mp = prepare(model, opt, "fp8-e5m2", backend="emulated", seed=3,
                 example_inputs=None if lazy else batch(0)[0])
    if monitor:
        from mixprec.monitor import NumericsMonitor
        mp.attach_monitor(NumericsMonitor(model, formats=("e5m2",)))
    untouched = mp.keep is None and torch.equal(model[0].weight, mlp()[0].weight)
    for s in range(steps):
        assert train_step(mp, model, *batch(s))
    return mp, model, untouched


def test_first_forward_under_autocast_is_traced_and_equals_example_inputs():
    """Without example_inputs nothing is rounded until the first forward under
    autocast(), which is traced with its own inputs; the run is bit-identical to one
    traced at prepare() (stochastic master rounding draws the same numbers)."""
    eager, eager_model, _ = _fp8_run(lazy=False)
    lazy, lazy_model, untouched = _fp8_run(lazy=True)
    assert untouched
    assert eager.keep == lazy.keep == {"0", "2"}
    assert_same(lazy_model.state_dict(), eager_model.state_dict())
    assert_same([m.detach() for m in lazy.master_params], [m.detach() for m in eager.master_params])
    # a monitor attached before the first forward sees that step, and no trace pass
    mon_mp, _, _ = _fp8_run(lazy=True, monitor=True, steps=2)
    assert mon_mp.monitor.steps_recorded == 2


def test_lazy_engine_explains_a_step_without_a_traced_forward():
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-hybrid")
    mp.zero_grad()                                   # allowed before the first forward
    loss = F.cross_entropy(model(batch(0)[0]), batch(0)[1])     # outside autocast
    with pytest.raises(RuntimeError, match="first forward under mp.autocast.*example_inputs"):
        mp.backward(loss)
    with pytest.raises(RuntimeError, match="state_dict"):
        mp.state_dict()


def test_resume_of_a_lazy_engine_takes_the_kept_modules_from_the_checkpoint():
    mp, model, _ = _fp8_run(lazy=True, steps=1)
    state = mp.state_dict()
    assert state["keep"] == ["0", "2"]
    model2 = mlp()
    mp2 = prepare(model2, torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9),
                  "fp8-e5m2", backend="emulated", seed=3)
    model2.load_state_dict(model.state_dict())
    mp2.load_state_dict(state)
    assert mp2.keep == {"0", "2"}
    assert_same([m.detach() for m in mp2.master_params], [m.detach() for m in mp.master_params])
    model3 = mlp()
    other = prepare(model3, torch.optim.SGD(model3.parameters(), lr=0.1), "fp8-e5m2",
                    backend="emulated", keep_high_precision=("first", "last", "norm", "0"),
                    example_inputs=batch(0)[0])
    state["recipe"] = str(other.recipe)
    state["keep"] = ["0"]
    with pytest.raises(ValueError, match=r"checkpoint keeps modules \['0'\]"):
        other.load_state_dict(state)


class TiedLM(nn.Module):
    """An embedding whose table is also the output projection (as in GPT-2)."""
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.wte = nn.Embedding(16, 8)
        self.mid = nn.Linear(8, 8)
        self.mid2 = nn.Linear(8, 8)
        self.lm_head = nn.Linear(8, 16, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, ids):
        return self.lm_head(self.mid2(self.mid(self.wte(ids))))


@pytest.mark.parametrize("backend,recipe", [("emulated", "fp8-e5m2"),
                                            ("native", "bf16-mixed:keep_high_precision=last")])
def test_a_tied_weight_is_stored_in_the_precision_of_its_kept_user(backend, recipe):
    model = TiedLM()
    original = model.wte.weight.detach().clone()
    ids = torch.randint(0, 16, (4, 5))
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe, backend=backend,
                 example_inputs=ids)
    assert "lm_head" in mp.keep and "wte" not in mp.keep and "mid2" not in mp.keep
    assert model.lm_head.weight is model.wte.weight
    w = model.lm_head.weight.detach()
    if backend == "native":
        assert w.dtype == torch.float32 and torch.equal(w, original)   # not through bf16
    else:       # the high format (fp16), not e5m2: lm_head computes with FP16 weights
        assert torch.equal(w, w.half().float())
        assert not torch.equal(w, w.to(torch.float8_e5m2).float())
        assert mp.keep == {"mid", "lm_head"}      # mid is the first GEMM layer
        assert torch.equal(model.mid2.weight, model.mid2.weight.to(torch.float8_e5m2).float())


@pytest.mark.parametrize("has_bf16_dot", [False, True])
def test_auto_backend_per_device_and_cpu(monkeypatch, has_bf16_dot):
    # bf16 runs natively on CPU only where the CPU has bf16 dot products; fp16 and FP8
    # are emulated on CPU; CUDA runs every native-capable recipe natively.
    from mixprec import native
    monkeypatch.setattr(native, "cpu_has_bf16_dot", lambda: has_bf16_dot)
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    bf16, fp16, fp8 = (get_recipe(n) for n in ("bf16-mixed", "fp16-mixed", "fp8-e5m2"))
    assert native.resolve_backend("auto", bf16, cpu) == ("native" if has_bf16_dot else "emulated")
    assert native.resolve_backend("auto", fp16, cpu) == "emulated"
    assert native.resolve_backend("auto", fp8, cpu) == "emulated"
    assert native.resolve_backend("auto", fp16, cuda) == "native"
    assert native.resolve_backend("auto", fp8, cuda) == "emulated"
    assert native.resolve_backend("native", fp16, cpu) == "native"
    with pytest.raises(ValueError, match="valid choices: auto, emulated, native"):
        native.resolve_backend("fast", fp16, cpu)


def test_lost_updates_are_counted_by_default_only_without_master_weights():
    for recipe, counted in [("fp16-pure", True), ("fp16-mixed", False)]:
        model = mlp()
        mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe)
        assert train_step(mp, model, *batch(0))
        assert (mp.history[-1]["lost_updates"] is not None) == counted
        assert (mp.lost_update_fraction is not None) == counted


class _InfGrad(nn.Module):
    """Identity forward; backward turns the gradient into inf (a blown-up backward)."""

    def forward(self, x):
        y = x * 1.0
        if y.requires_grad:
            y.register_hook(lambda g: g * float("inf"))
        return y


def test_monitor_names_the_first_nonfinite_tensor_of_a_skipped_step():
    from mixprec import NumericsMonitor
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), _InfGrad(), nn.Linear(16, 4))
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                 "fp16-mixed:max_consecutive_skips=2")
    mon = mp.attach_monitor(NumericsMonitor(model, formats=("fp16",)))
    x, y = batch(0, n=8)
    x = x[:, :8]
    y = y % 4
    before = [p.detach().clone() for p in model.parameters()]
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    assert not mp.step()
    assert mp.history[-1]["first_nonfinite"] == "0/grad_output"   # fc1's output gradient
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    mp.zero_grad()
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    mp.backward(loss)
    with pytest.raises(NonFiniteError, match="monitor saw the first non-finite tensor.*"
                                             "layer '0', role grad_output"):
        mp.step()
    assert mon.steps_recorded == 2
    mp.attach_monitor(None)
    assert mp.monitor is None and not mon._handles


def test_monitor_records_applied_updates_through_the_engine():
    from mixprec import NumericsMonitor
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed")
    mon = mp.attach_monitor(NumericsMonitor(model, formats=("fp16",)))
    assert train_step(mp, model, *batch(0))
    assert mp.history[-1]["first_nonfinite"] is None
    roles = {role for (_, role) in mon.stats}
    assert {"activation", "weight", "grad_output", "weight_grad", "update"} <= roles
    updates = [st for (_, role), st in mon.stats.items() if role == "update"]
    assert updates and all(st.finite_nonzero > 0 for st in updates)


# -- delayed scaling under torch.compile -------------------------------------------------
def test_example_inputs_make_the_delayed_scalers_and_change_nothing():
    # torch.compile can only update delayed scalers that exist before it traces: with
    # example_inputs, prepare() makes them all (the gradients' too) by one eager forward,
    # then leaves them empty and everything else as it was, so training is bit-identical
    runs = []
    for example in (None, batch(0)[0]):
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        mp = prepare(model, opt, "te-delayed", example_inputs=example, seed=3)
        made = {n: sorted(s.scalers) for n, s in mp._attached.states.items() if s.scalers}
        if example is None:
            assert made == {}
        else:
            assert made == {"0": ["activation", "grad_output", "weight"],
                            "2": ["activation", "grad_output", "weight"]}
            assert all(s.amax_history.numel() == 0 and s.scale.item() == 1.0
                       for st in mp._attached.states.values() for s in st.scalers.values())
            assert model.training and all(p.grad is None for p in model.parameters())
        runs.append([mp.generator.get_state()])
        for step in range(3):
            train_step(mp, model, *batch(step + 1))
        runs[-1] += [snapshot(mp, model, opt), mp.state_dict()["layer_states"]]
    assert_same(runs[0], runs[1])


def test_example_inputs_make_the_delayed_scalers_under_native_fp8_gemms():
    # backend="native" with te-delayed keeps the emulated layers (only their GEMMs go
    # through torch._scaled_mm), so prepare() must make their scalers as on "emulated"
    made = []
    for backend in ("emulated", "native"):
        model = mlp()
        mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "te-delayed",
                     backend=backend, example_inputs=batch(0)[0], seed=3)
        made.append({n: sorted(s.scalers) for n, s in mp._attached.states.items()})
        assert mp._reserve_hook is None
    assert made[0] == made[1] and any(made[1].values())
