"""Loss scalers against torch.amp.GradScaler, a DeepSpeed-rule reference, numpy/ml_dtypes."""
import io
import math
import random

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec import loss_scale as lsm
from mixprec.loss_scale import (
    SMALLEST_SCALE, DynamicLossScale, LossScale, NoOpLossScale, StaticLossScale,
    from_config, unscale_grads_,
)

INF = float("inf")


# -- GradScaler walked on CPU with a real parameter ----------------------------------------
class GradScalerWalk:
    """torch.amp.GradScaler driven through step()/update() with a gradient set per step."""

    def __init__(self, **kw):
        self.p = torch.nn.Parameter(torch.zeros(3))
        self.opt = torch.optim.SGD([self.p], lr=0.0)
        self.gs = torch.amp.GradScaler("cpu", **kw)
        self.gs.scale(torch.ones(()))           # GradScaler creates its scale lazily here
        self.grads = {False: torch.ones(3), True: torch.tensor([1.0, INF, 1.0])}

    def update(self, found_inf: bool) -> float:
        self.p.grad = self.grads[found_inf].clone()
        self.gs.step(self.opt)
        self.gs.update()
        return self.gs.get_scale()


def walk_both(seq, **kw):
    ref, ours = GradScalerWalk(**kw), DynamicLossScale(**kw)
    assert ours.scale == ref.gs.get_scale()
    ours.history = [ours.scale]
    for i, f in enumerate(seq):
        expected = ref.update(f)
        ours.update(f)
        assert ours.scale == expected, (i, f, ours.scale, expected)
        ours.history.append(ours.scale)
    return ours, ref


def n_growths(history):
    return sum(b > a for a, b in zip(history, history[1:]))


def bursty(rng, n_segments, max_clean=5000, max_burst=4):
    """Clean runs long enough to cross the default growth interval, then overflow bursts."""
    seq = []
    for _ in range(n_segments):
        seq += [False] * rng.randrange(0, max_clean) + [True] * rng.randrange(1, max_burst + 1)
    return seq


def test_full_growth_period_step_by_step_then_floor():
    ours, ref = walk_both([False] * 2000)                     # defaults: 2^16, x2 / 2000
    assert ours.scale == 2.0 ** 17 and ours.growth_tracker == 0
    walk_both([False] * 4 + [True] + [False] * 9, growth_interval=5)  # overflow restarts it
    # Back off down to the smallest normal float32: equal to GradScaler all the way.
    ours, ref = walk_both([True] * (16 + 126))
    assert ours.scale == SMALLEST_SCALE == 2.0 ** -126 and ours.at_minimum
    # Below it GradScaler enters subnormals (and would reach 0); we stay at 2^-126.
    ours.update(True)
    assert ref.update(True) == 2.0 ** -127 and ours.scale == 2.0 ** -126


@pytest.mark.parametrize("seed", range(2))
def test_defaults_equal_gradscaler_on_random_sequences(seed):
    rng = random.Random(seed)
    seq = bursty(rng, 3) + [rng.random() < 0.2 for _ in range(200)] + bursty(rng, 2)
    ours, _ = walk_both(seq)
    assert ours.steps == len(seq) and ours.skipped_steps == sum(seq)
    assert n_growths(ours.history) >= 2         # the sequence exercised both directions


@pytest.mark.parametrize("kw", [
    dict(init_scale=3.3e4, growth_factor=1.7, backoff_factor=0.3, growth_interval=3),
    dict(init_scale=0.1, growth_factor=1.1, backoff_factor=0.9, growth_interval=2),
])
def test_float32_rounding_of_odd_factors_equals_gradscaler(kw):
    rng = random.Random(7)
    ours, ref = walk_both([rng.random() < 0.2 for _ in range(500)], **kw)
    assert ours.skipped_steps > 50 and n_growths(ours.history) > 20


def test_growth_never_reaches_inf_like_gradscaler():
    ours, ref = walk_both([False] * 8, init_scale=2.0 ** 126, growth_interval=2)
    assert ours.scale == 2.0 ** 127


# -- hysteresis: DeepSpeed's rule written in DeepSpeed's own terms --------------------------
def deepspeed_rule(seq, init, window, delayed_shift, consecutive, min_scale):
    """Iteration counting as DeepSpeed states it: grow when (iter - last_overflow) % window
    == 0; back off when the hysteresis budget is down to one."""
    scale, it, last_overflow, cur_h, out = init, 0, -1, delayed_shift, []
    for overflow in seq:
        if overflow:
            if delayed_shift == 1 or cur_h == 1:
                scale = max(scale / 2.0, min_scale)
            else:
                cur_h -= 1
            last_overflow = it
        else:
            if consecutive:
                cur_h = delayed_shift
            if (it - last_overflow) % window == 0:
                if not consecutive:
                    cur_h = delayed_shift
                scale *= 2.0
        it += 1
        out.append(scale)
    return out


@pytest.mark.parametrize("hysteresis", [1, 2, 3])
@pytest.mark.parametrize("consecutive", [False, True])
def test_hysteresis_equals_deepspeed_rule(hysteresis, consecutive):
    rng = random.Random(hysteresis * 10 + consecutive)
    seq = [rng.random() < 0.35 for _ in range(3000)]
    expected = deepspeed_rule(seq, 2.0 ** 12, 4, hysteresis, consecutive, 1.0)
    ls = DynamicLossScale(init_scale=2.0 ** 12, growth_interval=4, hysteresis=hysteresis,
                          min_scale=1.0, consecutive_hysteresis=consecutive)
    for i, f in enumerate(seq):
        ls.update(f)
        assert ls.scale == expected[i], i


def test_hysteresis_two_absorbs_one_overflow():
    ls = DynamicLossScale(init_scale=1024.0, hysteresis=2, growth_interval=100)
    ls.update(True)
    assert ls.scale == 1024.0 and ls.skipped_steps == 1      # absorbed, still skipped
    ls.update(False)
    ls.update(True)                                          # no growth in between
    assert ls.scale == 512.0
    ls.update(True)                                          # budget spent: at once
    assert ls.scale == 256.0


# -- clamps and the rising floor ------------------------------------------------------------
def test_min_and_max_clamp_with_floor_below_one():
    ls = DynamicLossScale(init_scale=1.0, min_scale=2.0 ** -8, max_scale=4.0,
                          growth_interval=1)
    for _ in range(20):
        ls.update(True)
    assert ls.scale == 2.0 ** -8 and ls.at_minimum
    for _ in range(20):
        ls.update(False)
    assert ls.scale == 4.0


def test_mapping_floor_rises_and_overflows_cannot_go_below():
    floor = {0: 1.0, 10: 16.0, 20: 256.0}
    ls = DynamicLossScale(init_scale=2.0 ** 10, floor=floor)
    prev = ls.scale
    for step in range(1, 40):
        ls.update(True)
        in_force = floor[max(k for k in floor if k <= step)]
        assert ls.scale == max(prev * 0.5, in_force), step
        prev = ls.scale
    assert ls.scale == 256.0 and ls.skipped_steps == 39


def test_floor_before_first_key_and_init_lifted():
    ls = DynamicLossScale(init_scale=1.0, floor={3: 8.0})
    assert ls.floor_at(2) == 0.0 and ls.floor_at(3) == 8.0 and ls.scale == 1.0
    ls.update(True); ls.update(True); ls.update(True)
    assert ls.scale == 8.0                                    # raised when the floor rose
    assert DynamicLossScale(init_scale=1.0, floor={0: 4.0}).scale == 4.0


def test_callable_floor():
    ls = DynamicLossScale(init_scale=2.0 ** 20, floor=lambda s: 2.0 ** (s // 10))
    for step in range(1, 60):
        ls.update(True)
        assert ls.scale >= 2.0 ** (step // 10)
    assert ls.scale == 2.0 ** 5
    with pytest.raises(ValueError, match="floor at step 0"):
        DynamicLossScale(floor=lambda s: -1.0)
    late = DynamicLossScale(floor=lambda s: float("nan") if s == 2 else 0.0)
    late.update(False)
    with pytest.raises(ValueError, match="floor at step 2"):
        late.update(False)


# -- validation ------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, match", [
    (dict(init_scale=0.0), "init_scale"), (dict(init_scale=-1.0), "init_scale"),
    (dict(init_scale=INF), "init_scale"), (dict(init_scale=float("nan")), "init_scale"),
    (dict(init_scale=1e39), "init_scale"), (dict(growth_factor=1.0), "growth_factor"),
    (dict(backoff_factor=1.0), r"backoff_factor must be in \(0, 1\)"),
    (dict(backoff_factor=0.0), "backoff_factor"), (dict(growth_interval=0), "growth_interval"),
    (dict(growth_interval=2.5), "growth_interval"), (dict(hysteresis=0), "hysteresis"),
    (dict(min_scale=8.0, max_scale=4.0), "min_scale must be <= max_scale"),
    (dict(min_scale=0.0), "min_scale"), (dict(init_scale=1.0, min_scale=2.0), "init_scale"),
    (dict(floor=[(0, 1.0)]), "floor must be None, a mapping"),
    (dict(floor={-1: 1.0}), "floor steps"), (dict(floor={0: "x"}), "floor at step 0"),
    (dict(floor={0: 8.0}, max_scale=4.0, init_scale=2.0), "max_scale"),
])
def test_dynamic_validation(kw, match):
    with pytest.raises(ValueError, match=match):
        DynamicLossScale(**kw)


def test_static_validation_and_factory():
    with pytest.raises(ValueError, match="scale must be finite"):
        StaticLossScale(0.0)
    with pytest.raises(ValueError, match=r"unknown loss scale kind 'fp16'.*'none'"):
        from_config("fp16")
    with pytest.raises(ValueError, match="bad options"):
        from_config("none", scale=2.0)
    assert isinstance(from_config("none"), NoOpLossScale)
    assert from_config("static", scale=1024.0).scale == 1024.0
    dyn = from_config("dynamic", growth_interval=5, hysteresis=2, floor={0: 1.0})
    assert isinstance(dyn, DynamicLossScale) and dyn.growth_interval == 5
    assert all(isinstance(from_config(k), LossScale) for k in ("none", "dynamic"))


def test_recipe_configs_build():
    from mixprec.recipe import LossScaleConfig
    ls = LossScaleConfig(kind="dynamic", floor=((0, 1.0), (2000, 16.0))).build()
    assert ls.floor_at(1999) == 1.0 and ls.floor_at(2000) == 16.0
    assert LossScaleConfig(kind="static", init_scale=128.0).build().scale == 128.0
    assert LossScaleConfig().build().scale == 1.0


# -- the common interface ----------------------------------------------------------------------
def test_noop_is_identity_and_counts():
    ls = NoOpLossScale()
    loss = torch.tensor(3.0, requires_grad=True)
    assert ls.scale_loss(loss) is loss and ls.scale == 1.0
    for f in (False, True, True, False, True):
        assert ls.should_skip(f) == f
        ls.update(f)
    assert (ls.steps, ls.skipped_steps, ls.consecutive_skips, ls.scale) == (5, 3, 1, 1.0)
    assert ls.last_step_skipped
    ls.update(torch.tensor(0.0))
    assert ls.consecutive_skips == 0 and not ls.last_step_skipped


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_scale_loss_equals_gradscaler(dtype):
    for loss in (torch.tensor(0.7, dtype=dtype), torch.linspace(-3, 3, 7, dtype=dtype)):
        for s in (1024.0, 3.0e4 + 1, 0.1, 2.0 ** 16):
            ref = torch.amp.GradScaler("cpu", init_scale=s).scale(loss)
            for ls in (StaticLossScale(s), DynamicLossScale(init_scale=s)):
                out = ls.scale_loss(loss)
                assert out.dtype == ref.dtype and torch.equal(out, ref)
    # a 0-d half loss is scaled in float32, as GradScaler does: 2 * 2^16 does not overflow
    assert NoOpLossScale().scale_loss(loss) is loss
    assert StaticLossScale(2.0 ** 16).scale_loss(torch.tensor(2.0, dtype=dtype)) == 2.0 ** 17


def test_static_counts_skips_and_keeps_scale():
    ls = StaticLossScale(512.0)
    for f in (True, True, False):
        ls.update(f)
    assert (ls.scale, ls.steps, ls.skipped_steps, ls.consecutive_skips) == (512.0, 3, 2, 0)


# -- checkpointing ------------------------------------------------------------------------------
def _trace(ls):
    return (ls.scale, ls.steps, ls.skipped_steps, ls.consecutive_skips,
            getattr(ls, "growth_tracker", None), getattr(ls, "hysteresis_left", None))


@pytest.mark.parametrize("make", [
    lambda: NoOpLossScale(), lambda: StaticLossScale(64.0),
    lambda: DynamicLossScale(init_scale=2.0 ** 10, growth_interval=3, hysteresis=2,
                             floor={0: 1.0, 30: 64.0}, min_scale=0.5, max_scale=2.0 ** 14),
])
def test_state_dict_resumes_exactly(make):
    rng = random.Random(3)
    seq = [rng.random() < 0.4 for _ in range(80)]
    a = make()
    for f in seq[:40]:
        a.update(f)
    buf = io.BytesIO()
    torch.save(a.state_dict(), buf)
    buf.seek(0)
    b = type(a)(1.0) if isinstance(a, StaticLossScale) else type(a)()
    b.load_state_dict(torch.load(buf, weights_only=True))
    assert _trace(a) == _trace(b)
    for f in seq[40:]:
        a.update(f); b.update(f)
        assert _trace(a) == _trace(b)


def test_gradscaler_equality_survives_resume():
    seq = [False] * 1500 + [True] + [False] * 2600      # grows at 3501 only
    ref = GradScalerWalk()
    ours = DynamicLossScale()
    for f in seq[:1000]:
        ref.update(f); ours.update(f)
    resumed = DynamicLossScale(init_scale=1.0)
    resumed.load_state_dict(ours.state_dict())
    for f in seq[1000:]:
        assert resumed.update(f) is None and resumed.scale == ref.update(f)
    assert resumed.scale == 2.0 ** 16


def test_callable_floor_kept_on_load_and_bad_state_rejected():
    fn = lambda s: 4.0  # noqa: E731
    a = DynamicLossScale(init_scale=8.0, floor=fn)
    assert "floor" not in a.state_dict()
    b = DynamicLossScale(init_scale=8.0, floor=fn)
    b.load_state_dict(a.state_dict())
    assert b.floor_at(0) == 4.0
    with pytest.raises(ValueError, match="cannot be loaded"):
        StaticLossScale(2.0).load_state_dict(a.state_dict())
    bad = dict(a.state_dict(), growth_tracker=5000)
    with pytest.raises(ValueError, match="growth_tracker"):
        b.load_state_dict(bad)
    assert b.growth_tracker == 0
    with pytest.raises(ValueError, match="lacks keys"):
        b.load_state_dict({"kind": "dynamic"})


# -- unscaling ------------------------------------------------------------------------------------
NP_DTYPE = {torch.float32: np.float32, torch.float16: np.float16,
            torch.bfloat16: ml_dtypes.bfloat16}


def unscale_oracle(g: torch.Tensor, scale: float) -> np.ndarray:
    """float32(g) * float32(1 / float64(scale)), rounded once to g's dtype, in numpy."""
    inv = np.float32(np.float64(1.0) / np.float64(scale))
    x = g.float().numpy() * inv
    with np.errstate(over="ignore"):         # overflow to inf is part of the contract
        return x.astype(NP_DTYPE[g.dtype])


def random_grads(dtype, gen, n=4):
    # log-uniform magnitudes across fp16's range, with subnormal-producing values
    return [(torch.randn(257, generator=gen) *
             torch.exp2(torch.randint(-30, 16, (257,), generator=gen).float())).to(dtype)
            for _ in range(n)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("scale", [2.0 ** 16, 3.0e4 + 7, 0.3, 2.0 ** -8])
@pytest.mark.parametrize("path", ["fused", "foreach"])
def test_unscale_bit_exact_against_numpy(dtype, scale, path, monkeypatch):
    if path == "foreach":
        def unavailable(*a):
            raise NotImplementedError("not on this device")
        monkeypatch.setattr(torch, "_amp_foreach_non_finite_check_and_unscale_", unavailable)
    gen = torch.Generator().manual_seed(0)
    grads = [g / 4 if scale < 1 else g for g in random_grads(dtype, gen)]
    expected = [unscale_oracle(g, scale) for g in grads]
    found = unscale_grads_(grads, scale)
    assert found == any(not np.isfinite(e.astype(np.float32)).all() for e in expected)
    for g, e in zip(grads, expected):
        got = g.float().numpy()
        want = e.astype(np.float32)
        assert np.array_equal(got.view(np.int32), want.view(np.int32))


def test_unscale_equals_gradscaler_unscale_fp32():
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.zeros(257)) for _ in range(3)]
    grads = random_grads(torch.float32, gen, 3)
    gs = torch.amp.GradScaler("cpu", init_scale=3.0e4 + 7)
    gs.scale(torch.ones(()))
    for p, g in zip(params, grads):
        p.grad = g.clone()
    gs.unscale_(torch.optim.SGD(params, lr=0.0))
    assert not unscale_grads_(grads, 3.0e4 + 7)
    for p, g in zip(params, grads):
        assert torch.equal(p.grad.view(torch.int32), g.view(torch.int32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_unscale_finds_inf_and_nan(dtype):
    clean = [torch.ones(5, dtype=dtype), torch.full((3,), 2.0, dtype=dtype)]
    assert unscale_grads_(clean, 4.0) is False
    for bad in (INF, -INF, float("nan")):
        grads = [torch.ones(5, dtype=dtype), torch.tensor([1.0, bad], dtype=dtype), None]
        assert unscale_grads_(grads, 4.0) is True
    mixed = [torch.ones(2), torch.tensor([float("nan")], dtype=torch.float16)]
    assert unscale_grads_(mixed, 2.0) is True and mixed[0][0] == 0.5


def test_unscale_catches_overflow_created_by_scale_below_one():
    g = torch.tensor([60000.0, 1.0], dtype=torch.float16)   # finite before unscaling
    assert unscale_grads_([g], 2.0 ** -8) is True and torch.isinf(g[0])


def test_unscale_edge_inputs():
    assert unscale_grads_([], 2.0) is False and unscale_grads_([None], 2.0) is False
    with pytest.raises(ValueError, match="floating point"):
        unscale_grads_([torch.ones(2, dtype=torch.int32)], 2.0)
    for bad in (0.0, -1.0, INF, 1e-40):
        with pytest.raises(ValueError, match="scale must be positive"):
            unscale_grads_([torch.ones(2)], bad)
    ls = DynamicLossScale(init_scale=8.0)
    g = [torch.full((2,), 8.0)]
    assert ls.unscale_(g) is False and g[0].tolist() == [1.0, 1.0]
    assert NoOpLossScale().unscale_([torch.tensor([INF])]) is True


def test_one_host_sync_per_call(monkeypatch):
    calls = []
    item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda t: calls.append(1) or item(t))
    grads = [torch.ones(4, dtype=d) for d in (torch.float32, torch.float16, torch.bfloat16)]
    unscale_grads_(grads, 0.5)
    assert len(calls) == 1
    assert lsm.LARGEST_SCALE == float(torch.finfo(torch.float32).max)
