"""NumericsMonitor: counts agree with real casts; advice, non-finite tracing, update ratios."""
import argparse
import json
import math

import ml_dtypes
import numpy as np
import pytest
import torch
from torch import nn

from mixprec.formats import get_format
from mixprec.inspection import add_inspect_parser, run_inspect
from mixprec.monitor import NumericsMonitor, TensorStats, format_thresholds

FP16_MAX = 65504.0
# Oracle casts from float32: torch for fp16/bf16, ml_dtypes for FP8 (torch saturates e4m3).
CASTS = {
    "fp16": lambda x: x.to(torch.float16).float().numpy(),
    "bf16": lambda x: x.to(torch.bfloat16).float().numpy(),
    "e5m2": lambda x: x.numpy().astype(ml_dtypes.float8_e5m2).astype(np.float32),
    "e4m3": lambda x: x.numpy().astype(ml_dtypes.float8_e4m3fn).astype(np.float32),
}


def oracle_counts(x: torch.Tensor, fmt: str) -> dict:
    """Underflow / subnormal / overflow counts of the nonzero finite x, by casting."""
    src = x.numpy()
    q = CASTS[fmt](x)
    live = np.isfinite(src) & (src != 0)
    min_normal = get_format(fmt).min_normal
    return {"underflow": int(np.sum(live & (q == 0))),
            "subnormal": int(np.sum(live & (q != 0) & (np.abs(q) < min_normal))),
            "overflow": int(np.sum(live & ~np.isfinite(q)))}


def edge_values(fmt: str, scale: float) -> torch.Tensor:
    """Every bound of the format, its float32 neighbours, and specials; divided by scale."""
    th = format_thresholds(fmt)
    vals = []
    for t in (th.zero, th.normal, th.over, get_format(fmt).max, get_format(fmt).min_subnormal):
        t32 = np.float32(t)
        vals += [t32, np.nextafter(t32, np.float32(0)), np.nextafter(t32, np.float32(np.inf))]
    vals = torch.tensor(np.array(vals, np.float32)) / scale
    vals = vals[torch.isfinite(vals)]                        # bf16's max / scale can leave float32
    return torch.cat([vals, -vals, torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan")])])


def log_uniform(n: int, lo: float, hi: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mag = torch.exp2(torch.empty(n).uniform_(lo, hi, generator=g))
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return mag * sign


# -- counts against the casts -------------------------------------------------------------
@pytest.mark.parametrize("n", [200, 20000])          # sorted and dense histogram paths
@pytest.mark.parametrize("scale", [1.0, 2.0 ** 12, 2.0 ** -3])
@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e5m2", "e4m3"])
def test_fractions_agree_with_casts(fmt, scale, n):
    x = torch.cat([log_uniform(n, -40, 20), edge_values(fmt, scale)])
    st = TensorStats("layer", "grad_output")
    st.add(x, [get_format(fmt)], scale)
    want = oracle_counts(x * scale, fmt)                      # exact: power-of-two scale
    assert (st.underflow[fmt], st.subnormal[fmt], st.overflow[fmt]) == (
        want["underflow"], want["subnormal"], want["overflow"])
    assert st.zeros == 2 and st.nonfinite == 3


@pytest.mark.parametrize("n", [3000, 1 << 20])        # sparse and crowded buckets
def test_all_formats_at_once_agree_with_casts(n):
    fmts = ["fp16", "bf16", "e5m2", "e4m3"]
    x = torch.cat([log_uniform(n, -30, 18, seed=7)] + [edge_values(f, 1.0) for f in fmts])
    st = TensorStats("layer", "activation")
    st.add(x, [get_format(f) for f in fmts], 1.0)
    for f in fmts:
        want = oracle_counts(x, f)
        assert (st.underflow[f], st.subnormal[f], st.overflow[f]) == (
            want["underflow"], want["subnormal"], want["overflow"]), f


def test_half_and_strided_inputs_count_like_their_float32_copies():
    x = log_uniform(4096, -30, 10, seed=9).reshape(64, 64)
    fmts = [get_format("fp16"), get_format("e4m3")]
    for view in (x.t(), x[:, ::3], x.to(torch.bfloat16), x.to(torch.float16)):
        a, b = TensorStats("l", "activation"), TensorStats("l", "activation")
        a.add(view, fmts, 1.0)
        b.add(view.float().contiguous(), fmts, 1.0)
        assert (a.underflow, a.subnormal, a.overflow, a.amax) == (b.underflow, b.subnormal, b.overflow, b.amax)
        assert (a.binades == b.binades).all() and (a.powers == b.powers).all()


def test_zero_count_matches_float16_cast():
    x = log_uniform(5000, -30, -20, seed=3)
    st = TensorStats("l", "activation")
    st.add(x, [get_format("fp16")], 1.0)
    assert st.underflow["fp16"] == int((x.to(torch.float16) == 0).sum())


def test_non_power_of_two_scale_is_exact():
    x = torch.cat([log_uniform(3000, -30, 17, seed=5), edge_values("fp16", 3.0)])
    st = TensorStats("l", "grad_output")
    st.add(x, [get_format("fp16")], 3.0)
    scaled = x.double().numpy() * 3.0                        # exact in float64
    with np.errstate(over="ignore"):
        q = scaled.astype(np.float16)                        # one correctly rounded cast
    live = np.isfinite(scaled) & (scaled != 0)
    assert st.underflow["fp16"] == np.sum(live & (q == 0))
    assert st.overflow["fp16"] == np.sum(live & ~np.isfinite(q))


@pytest.mark.parametrize("n", [4000, 40000])          # sorted and dense histogram paths
def test_histogram_matches_frexp_and_sums_to_numel(n):
    powers = torch.exp2(torch.arange(-45.0, 25.0))                  # the bins' closed ends
    x = torch.cat([log_uniform(n, -50, 30, seed=1), powers, -powers, torch.zeros(7),
                   torch.tensor([float("nan"), float("inf")])])
    mon_edges = list(range(-40, 21))
    st = TensorStats("l", "activation")
    st.add(x, [get_format("fp16")], 1.0)
    h = st.hist(mon_edges)
    assert st.zeros + st.nonfinite + h["below"] + sum(h["counts"]) + h["above"] == x.numel()
    v = x.numpy()
    e = np.frexp(np.abs(v[np.isfinite(v) & (v != 0)]))[1] - 1     # floor(log2|x|), exact
    assert h["below"] == np.sum(e < -40) and h["above"] == np.sum(e >= 20)
    assert h["counts"] == [int(np.sum(e == k)) for k in range(-40, 20)]
    a = np.abs(v[np.isfinite(v) & (v != 0)]).astype(np.float64)
    for j in (-126, -41, -25, 0, 19, 24, 128):                        # |x| <= 2^j, ties included
        assert st.count_at_most_pow2(j) == np.sum(a <= 2.0 ** j), j


def test_amax_ignores_nonfinite_and_bits_bound_neighbours():
    st = TensorStats("l", "activation")
    st.add(torch.tensor([1.5, -7.25, float("inf"), float("nan")]), [get_format("fp16")], 1.0)
    assert st.amax == 7.25
    assert format_thresholds("fp16").over == 65520.0 and format_thresholds("fp16").over_inclusive
    assert format_thresholds("e4m3").over == 464.0 and not format_thresholds("e4m3").over_inclusive


# -- hand-built models --------------------------------------------------------------------
def tiny_grad_step(mon, scale_loss=2.0 ** -26, seed=0):
    """Linear without bias; loss = c * sum(out): grad_output = c, weight_grad = c * sum_b x."""
    g = torch.Generator().manual_seed(seed)
    x = torch.empty(4, 16).uniform_(0.05, 0.2, generator=g)
    (mon.model(x).sum() * scale_loss).backward()


def make_linear():
    torch.manual_seed(0)
    return nn.Linear(16, 8, bias=False)


def test_tiny_gradients_underflow_and_advised_scale_lifts_them():
    model = make_linear()
    with NumericsMonitor(model, formats=("fp16",)) as mon:
        tiny_grad_step(mon)
    rep = {(d["layer"], d["role"]): d for d in mon.report()["tensors"]}
    for role in ("grad_output", "weight_grad"):
        assert rep[("(model)", role)]["formats"]["fp16"]["underflow_frac"] == 1.0
    amax = max(float(model.weight.grad.abs().max()), 2.0 ** -26)   # grad_output is c = 2^-26
    adv = mon.advice("fp16")
    s = adv["scale"]
    assert math.log2(s) == int(math.log2(s))                 # a power of two
    assert s * amax < FP16_MAX and 2 * s * amax < FP16_MAX <= 2 * (2 * s) * amax
    assert adv["underflow_at_1"] == 1.0 and adv["underflow_at_scale"] == 0.0 and adv["scaling_needed"]
    assert "2^" in adv["text"] and "needed" in adv["text"]
    # Exact counts at the advised scale, on the same gradients
    model.weight.grad = None
    scaled = NumericsMonitor(model, formats=("fp16",))
    scaled.set_scale(s)
    with scaled:
        tiny_grad_step(scaled)
    for d in scaled.report()["tensors"]:
        if d["role"] in ("grad_output", "weight_grad"):
            assert d["formats"]["fp16"]["underflow"] == 0 and d["formats"]["fp16"]["overflow"] == 0
        if d["role"] == "weight_grad":   # the monitor's scale multiplies the recorded gradients
            cast = (model.weight.grad * s).to(torch.float16)
            assert torch.all(cast != 0) and torch.all(torch.isfinite(cast))


def test_master_weight_advice_without_moving_updates():
    model = make_linear()
    opt = torch.optim.SGD(model.parameters(), lr=1e-30)       # updates vanish even in float32
    mon = NumericsMonitor(model, formats=("fp16",))
    assert "no update was recorded" in mon.advice("fp16")["text"]
    with mon:
        tiny_grad_step(mon, scale_loss=1.0)
        mon.snapshot_weights()
        opt.step()
        mon.record_updates()
    m = mon.advice("fp16")["master_weights"]
    assert m["needed"] is None and m["updates_recorded"] == 128 and m["nonzero_updates"] == 0
    assert "all 128 recorded updates were zero" in mon.advice("fp16")["text"]


def test_scale_applies_to_gradient_roles_only():
    model = make_linear()
    reports = []
    for s in (1.0, 2.0 ** 20):
        mon = NumericsMonitor(model, formats=("fp16",))
        mon.set_scale(s)
        with mon:
            model.weight.grad = None
            tiny_grad_step(mon)
        reports.append({d["role"]: d["formats"]["fp16"] for d in mon.report()["tensors"]})
    assert reports[0]["activation"] == reports[1]["activation"]
    assert reports[0]["weight"] == reports[1]["weight"]
    assert reports[0]["grad_output"]["underflow"] > 0 == reports[1]["grad_output"]["underflow"]


def three_linears():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))


def test_first_nonfinite_names_the_layer_that_overflows():
    model = three_linears()
    with torch.no_grad():
        model[1].weight.fill_(3e38)                          # finite weights, inf products
    with NumericsMonitor(model) as mon:
        model(torch.ones(2, 4)).sum().backward()
    assert mon.first_nonfinite() == ("1", "output")
    assert mon.last_step_nonfinite[:2] == [("1", "output"), ("2", "activation")]
    assert ("0", "activation") not in mon.last_step_nonfinite


def test_first_nonfinite_weight_and_reset_on_clean_step():
    model = three_linears()
    with NumericsMonitor(model) as mon:
        with torch.no_grad():
            model[0].weight[0, 0] = float("nan")
        model(torch.ones(2, 4)).sum().backward()
        assert mon.first_nonfinite() == ("0", "weight")
        with torch.no_grad():
            model[0].weight[0, 0] = 0.5
        for p in model.parameters():
            p.grad = None
        model(torch.ones(2, 4)).sum().backward()             # a new step begins at this forward
        assert mon.first_nonfinite() is None and mon.last_step_nonfinite == []
    assert mon.report()["steps"] == 2


def update_model(dtype):
    torch.manual_seed(1)
    model = nn.Linear(64, 32).to(dtype)
    with torch.no_grad():                                    # weights over several binades
        model.weight.mul_(torch.exp2(torch.empty_like(model.weight).uniform_(-6, 6)))
    return model


def test_update_fraction_below_2_pow_minus_11_matches_float64():
    model = update_model(torch.float64)
    lr = 2.0 ** -12
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    x = torch.randn(8, 64, dtype=torch.float64)
    with NumericsMonitor(model, formats=("fp16", "bf16")) as mon:
        model(x).pow(2).mean().backward()
        w = [p.detach().clone() for p in model.parameters()]
        g = [p.grad.detach().clone() for p in model.parameters()]
        mon.snapshot_weights()
        opt.step()
        mon.record_updates()
    w, g = torch.cat([t.reshape(-1) for t in w]), torch.cat([t.reshape(-1) for t in g])
    u = (lr * g).abs()                                       # the intended update, float64
    moved = u != 0
    upd = mon.report()["updates"]
    for fmt, p in (("fp16", 11), ("bf16", 8)):
        expect = int(((u < 2.0 ** -p * w.abs()) & moved).sum()) / int(moved.sum())
        assert 0.05 < expect < 0.95                          # the test straddles the threshold
        assert upd[fmt]["overall"]["below_rel_frac"] == pytest.approx(expect, abs=1e-12)
    expect_abs = int(((u < 2.0 ** -24) & moved).sum()) / int(moved.sum())
    assert expect_abs > 0
    assert upd["fp16"]["overall"]["below_abs_frac"] == pytest.approx(expect_abs, abs=1e-12)
    adv = mon.advice("fp16", threshold=0.01)
    assert adv["master_weights"]["needed"] is True
    assert adv["master_weights"]["below_rel_frac"] == pytest.approx(upd["fp16"]["overall"]["below_rel_frac"])


def test_float32_sgd_update_fraction_and_observe_update():
    model = update_model(torch.float32)
    lr = 2.0 ** -12
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    mon = NumericsMonitor(model, formats=("fp16",)).attach()
    model(torch.randn(8, 64)).pow(2).mean().backward()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    w = torch.cat([p.detach().double().reshape(-1) for p in model.parameters()])
    g = torch.cat([p.grad.double().reshape(-1) for p in model.parameters()])
    opt.step()
    mon.observe_update(before)
    mon.detach()
    u = lr * g.abs()
    expect = int((u < 2.0 ** -11 * w.abs()).sum()) / int((u != 0).sum())
    # float32 rounds the applied update; only values within an ulp of the bound may differ
    assert mon.report()["updates"]["fp16"]["overall"]["below_rel_frac"] == pytest.approx(expect, abs=2e-3)
    with pytest.raises(ValueError, match="lacks parameter 'bias'"):
        mon.observe_update({"weight": before["weight"]})


# -- lifecycle and configuration --------------------------------------------------------------
def hook_counts(model):
    mods = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
    params = sum(len(p._post_accumulate_grad_hooks or {}) for p in model.parameters())
    return mods, params


def test_detach_removes_all_hooks_and_stops_recording():
    model = three_linears()
    mon = NumericsMonitor(model).attach()
    assert hook_counts(model) == (1 + 2 * 3, 6)
    model(torch.ones(2, 4)).sum().backward()
    mon.detach()
    assert hook_counts(model) == (0, 0)
    before = json.dumps(mon.report())
    model(torch.ones(2, 4)).sum().backward()
    assert json.dumps(mon.report()) == before


def test_every_records_one_step_in_n():
    model = three_linears()
    with NumericsMonitor(model, every=2) as mon:
        for _ in range(5):
            model(torch.ones(2, 4)).sum().backward()
    assert mon.report()["steps"] == 3
    acts = {(d["layer"], d["role"]): d["records"] for d in mon.report()["tensors"]}
    assert acts[("0", "activation")] == 3 and acts[("0", "weight_grad")] == 3


def test_layer_selection_and_bad_configuration():
    model = three_linears()
    assert list(NumericsMonitor(model, layers=["2", "0"]).layers) == ["2", "0"]
    assert list(NumericsMonitor(model, layers=lambda n, m: n == "1").layers) == ["1"]
    with pytest.raises(ValueError, match=r"unknown layer names \['9'\]; valid names"):
        NumericsMonitor(model, layers=["9"])
    with pytest.raises(ValueError, match="'e8m0' has no zero"):
        NumericsMonitor(model, formats=("fp16", "e8m0"))
    with pytest.raises(ValueError, match="bins"):
        NumericsMonitor(model, bins=(3, 1))
    with pytest.raises(ValueError, match="every must be a positive integer"):
        NumericsMonitor(model, every=0)
    mon = NumericsMonitor(model, formats=("fp16",))
    with pytest.raises(ValueError, match="positive finite"):
        mon.set_scale(0.0)
    with pytest.raises(ValueError, match="'bf16' is not monitored; valid choices: fp16"):
        mon.advice("bf16")


def test_report_is_json_and_summary_lists_layers():
    model = three_linears()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with NumericsMonitor(model) as mon:
        model(torch.ones(2, 4)).sum().backward()
        mon.snapshot_weights()
        opt.step()
        mon.record_updates()
    rep = json.loads(json.dumps(mon.report()))
    assert rep["formats"] == ["fp16", "bf16", "e5m2", "e4m3"]
    assert {d["role"] for d in rep["tensors"]} == {"activation", "weight", "grad_output", "weight_grad", "update"}
    assert len(mon.to_records()) == 4 * len(rep["tensors"])
    text = mon.summary()
    for token in ("fp16 under/over", "Closest to overflow", "<2^-11|w|", "grad_output"):
        assert token in text
    json.dumps(mon.advice("e4m3"))


# -- the inspect command ------------------------------------------------------------------------
def parse(argv):
    parser = argparse.ArgumentParser()
    add_inspect_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["inspect"] + argv)


def test_inspect_digits_prints_table_and_advice(capsys, tmp_path):
    path = tmp_path / "r.json"
    assert run_inspect(parse(["--steps", "2", "--json", str(path)])) == 0
    out = capsys.readouterr().out
    assert "fp16 under/over" in out and "Advice for fp16" in out and "Loss scale: S = 2^" in out
    saved = json.loads(path.read_text())
    assert saved["report"]["steps"] == 2 and saved["advice"]["format"] == "fp16"


def test_inspect_user_factories_and_errors(capsys, tmp_path, monkeypatch):
    (tmp_path / "usermod.py").write_text(
        "import torch\n"
        "from mixprec.experiments.data import Dataset\n"
        "def model():\n    return torch.nn.Sequential(torch.nn.Linear(3, 2))\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(20, 3, generator=g), torch.arange(20) % 2\n"
        "    return Dataset('toy', 'classification', x, y, x, y, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    args = parse(["--model", "usermod:model", "--data", "usermod:data", "--steps", "2",
                  "--formats", "bf16,fp16", "--optimizer", "sgd", "--batch-size", "5"])
    assert run_inspect(args) == 0
    out = capsys.readouterr().out
    assert "Advice for bf16" in out and "0      Linear  weight_grad" in out
    with pytest.raises(ValueError, match=r"'no_such_mod:f'.*cannot import.*'package.module:callable'"):
        run_inspect(parse(["--model", "no_such_mod:f", "--steps", "1"]))
    with pytest.raises(ValueError, match=r"bad --model spec 'usermod': expected the form"):
        run_inspect(parse(["--model", "usermod", "--steps", "1"]))
    with pytest.raises(ValueError, match="--advise 'e5m2' is not among --formats"):
        run_inspect(parse(["--formats", "fp16", "--advise", "e5m2", "--steps", "1"]))
    with pytest.raises(ValueError, match="unknown format 'fp17'"):
        run_inspect(parse(["--formats", "fp16,fp17", "--steps", "1"]))


def test_optimizer_state_underflow_matches_the_cast_and_is_advised():
    """Adam's first step stores exp_avg_sq = 0.001 g^2: for g = 2^-8 and 2^-9 that is below
    2^-25 and an FP16 state holds 0 (torch's own cast is the oracle); bf16 holds it."""
    model = nn.Linear(4, 1, bias=False)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    mon = NumericsMonitor(model, formats=("fp16", "bf16"))
    with mon:
        model(torch.ones(1, 4)).sum().backward()
        model.weight.grad = torch.tensor([[2.0 ** -8, 2.0 ** -6, 2.0 ** -9, 1.0]])
        mon.snapshot_weights()
        opt.step()
        mon.record_optimizer_state(opt)
        mon.record_updates()
    moments = [v for k, v in opt.state[model.weight].items() if k != "step"]
    nonzero = sum(int((m != 0).sum()) for m in moments)
    flushed = sum(int(((m != 0) & (m.half() == 0)).sum()) for m in moments)
    assert flushed == 2 and nonzero == 8
    row = next(d for d in mon.report()["tensors"] if d["role"] == "optimizer_state")
    assert row["formats"]["fp16"]["underflow"] == flushed
    assert row["formats"]["bf16"]["underflow"] == 0
    adv = mon.advice("fp16")
    assert adv["optimizer_state"]["underflow_frac"] == flushed / nonzero
    assert "Optimizer state: 25% of the nonzero moment values round to zero in fp16" in adv["text"]
    assert "optimizer_state.format=fp32" in adv["text"]
    assert "bf16 can hold it" in mon.advice("bf16")["text"]
    assert all(w["role"] != "optimizer_state" for w in adv["keep_high_precision"])
