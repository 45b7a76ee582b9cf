"""`mixprec reproduce`: records, reports and the measured values against independent
oracles (numpy float16 loops, ml_dtypes casts, closed-form distributions)."""
from __future__ import annotations

import argparse
import importlib
import json
import math

import numpy as np
import pytest
import torch

from mixprec.claims import ORDER, RECORD_FIELDS, REGISTRY, VERDICTS, Verdict
from mixprec.claims.base import RunContext, run_claim
from mixprec.claims.render import html_page, markdown, terminal_table
from mixprec.reproduce import add_reproduce_parser, run_reproduce


def _importable(name: str) -> bool:
    try:
        importlib.import_module(f"mixprec.{name}")
        return True
    except ImportError:
        return False


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_reproduce_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["reproduce", *argv])


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    """One quick end-to-end run of every claim, shared by the tests below."""
    out = tmp_path_factory.mktemp("reproduce")
    assert run_reproduce(_parse(["--quick", "--out", str(out)])) == 0
    doc = json.loads((out / "results.json").read_text())
    return out, doc, {r["id"]: r for r in doc["records"]}


def _record(quick_run, cid: str) -> dict:
    rec = quick_run[2][cid]
    for dep in REGISTRY[cid].needs:
        pytest.importorskip(f"mixprec.{dep}")
    assert rec["verdict"] != "not run", rec["reason"]
    return rec


# -- the run as a whole -------------------------------------------------------------------
def test_records_are_complete_and_valid(quick_run):
    _, doc, by_id = quick_run
    assert [r["id"] for r in doc["records"]] == list(ORDER)
    for r in doc["records"]:
        assert set(RECORD_FIELDS) <= set(r), r["id"]
        assert r["verdict"] in VERDICTS
        assert r["reason"] and r["paper_value"] and r["source"] and r["claim"]
        for k, v in r["measured"].items():
            assert isinstance(v, (bool, int, float)), (r["id"], k, v)
            assert math.isfinite(float(v)), (r["id"], k, v)
        deps_present = all(_importable(d) for d in REGISTRY[r["id"]].needs)
        # a claim whose modules are all present must run; "not run" only for missing ones
        assert (r["verdict"] != "not run") == deps_present, (r["id"], r["reason"])


def test_report_files_mention_every_claim(quick_run):
    out, doc, _ = quick_run
    md = (out / "report.md").read_text()
    page = (out / "report.html").read_text()
    for cid in ORDER:
        assert cid in md and cid in page
    for r in doc["records"]:
        assert r["verdict"] in md
    assert "<script" not in page and "http" not in page.split("<body>")[1]   # self-contained
    for plot in (out / "plots").glob("*.png") if (out / "plots").exists() else []:
        assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_out_of_reach_rows_say_why(quick_run):
    for cid in ("resnet50-imagenet", "ssd-detection", "fp8-imagenet-wmt"):
        rec = quick_run[2][cid]
        assert rec["verdict"] == "not reproduced" and rec["measured"] == {}
        assert "needs" in rec["reason"]
    assert "75.92" in quick_run[2]["resnet50-imagenet"]["paper_value"]
    assert "unconfirmed" in quick_run[2]["fp8-imagenet-wmt"]["paper_value"]


def test_only_and_unknown_ids(tmp_path, capsys):
    assert run_reproduce(_parse(["--quick", "--only", "biglstm,deepspeech2",
                                 "--out", str(tmp_path)])) == 0
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["id"] for r in doc["records"]] == ["biglstm", "deepspeech2"]
    assert "deepspeech2" in capsys.readouterr().out
    with pytest.raises(ValueError, match="unknown claim id.*valid ids: fp16-underflow"):
        run_reproduce(_parse(["--only", "nope", "--out", str(tmp_path)]))


def test_threads_restored_and_validated():
    from mixprec.reproduce import reproduce
    before = torch.get_num_threads()
    doc = reproduce(only=["biglstm"], threads=1)
    assert doc["args"]["threads"] == 1 and torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be >= 1"):
        reproduce(only=["biglstm"], threads=0)


def test_list(capsys):
    assert run_reproduce(_parse(["--list"])) == 0
    out = capsys.readouterr().out
    assert all(cid in out for cid in ORDER)


def test_failing_experiment_becomes_not_run_record():
    from mixprec.claims.base import Claim

    def boom(ctx):
        raise RuntimeError("kaput")
    rec = run_claim(Claim("x", "c", "s", "p", boom), RunContext(quick=True))
    assert rec["verdict"] == "not run" and "kaput" in rec["reason"]
    rec = run_claim(Claim("x", "c", "s", "p", boom, needs=("no_such_module",)), RunContext())
    assert rec["verdict"] == "not run" and "mixprec.no_such_module" in rec["reason"]


def test_render_from_records_only():
    rec = {"id": "a|b", "claim": "c", "source": "s", "paper_value": "p <x>", "measured": {"v": 1.5},
           "summary": "m", "verdict": "partly", "reason": "r", "config": {"k": 1}, "seconds": 0.1,
           "plot": {"title": "t", "xlabel": "x", "ylabel": "y", "logy": True, "x": [0, 1, 2],
                    "lines": {"l": [1.0, 0.5, 0.25]}}}
    doc = {"created": "now", "args": {"quick": True, "seed": 0}, "seconds": 1.0,
           "environment": {"torch": "t", "platform": "p"}, "records": [rec]}
    assert "a\\|b" in markdown(doc)                       # pipes escaped in tables
    page = html_page(doc, {"a|b": b"\x89PNG"})
    assert "p &lt;x&gt;" in page and "data:image/png;base64," in page
    table = terminal_table([rec])
    assert "partly" in table and "1 partly" in table


# -- pure numerics against independent oracles -------------------------------------------
def _f16_seq(values) -> float:
    s = np.float16(0)
    for v in values:
        s = np.float16(s + v)
    return float(s)


def test_swamping_matches_numpy_float16_loops(quick_run):
    m = _record(quick_run, "swamping")["measured"]
    x = np.float16(0.1)
    assert m["sum_fp16_sequential"] == _f16_seq([x] * 10_000) == 256.0
    chunks = [np.float16(_f16_seq([x] * min(64, 10_000 - c))) for c in range(0, 10_000, 64)]
    assert m["sum_fp16_chunk64"] == _f16_seq(chunks) == 1011.5
    acc32 = np.float32(0)
    for _ in range(10_000):
        acc32 = np.float32(acc32 + np.float32(x))
    assert m["sum_fp32"] == float(acc32) and abs(m["sum_fp32"] - 999.76) < 0.01
    assert m["matmul_positive_relerr_fp32"] * 100 < m["matmul_positive_relerr_fp16_sequential"]


def test_fp16_underflow_against_numpy(quick_run):
    m = _record(quick_run, "fp16-underflow")["measured"]
    f16 = lambda v: float(np.float16(v))
    assert m["q(2^-25)"] == f16(2.0 ** -25) == 0.0
    assert m["q(1.5*2^-25)"] == f16(1.5 * 2.0 ** -25) == 2.0 ** -24
    assert m["q(1+2^-11)"] == f16(1 + 2.0 ** -11) == 1.0
    assert m["q(1+1.001*2^-11)"] == f16(1 + 1.001 * 2.0 ** -11)
    assert m["q(65519)"] == f16(65519.0) and m["q(65520)_is_inf"]
    # log2|g| ~ N(-25, 2.5): P(|g| <= 2^-25) = 1/2; 100k samples -> sd 0.0016
    assert abs(m["grad_zero_fraction"] - 0.5) < 0.01


def _phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_e5m2_flush_fractions_against_ml_dtypes(quick_run):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = _record(quick_run, "e5m2-underflow")["measured"]
    e5m2 = lambda v: float(np.array(v, np.float32).astype(ml_dtypes.float8_e5m2).astype(np.float32))
    assert m["q(2^-16)"] == e5m2(2.0 ** -16) and m["q(2^-17)"] == e5m2(2.0 ** -17) == 0.0
    assert m["q(2^-17*(1+2^-10))"] == e5m2(2.0 ** -17 * (1 + 2.0 ** -10))
    # closed form: flushed iff |g| <= 2^-17 (scaled: |g| * S <= 2^-17)
    assert abs(m["flushed_e5m2_unscaled"] - _phi((-17 + 25) / 2.5)) < 0.003
    s = math.log2(m["loss_scale_by_rule"])
    assert abs(m["flushed_e5m2_scaled"] - _phi((-17 - s + 25) / 2.5)) < 0.003
    # the kernel flushes exactly what ml_dtypes flushes, on a fresh sample
    g = (np.random.default_rng(1).choice([-1, 1], 20_000)
         * 2.0 ** np.random.default_rng(2).normal(-25, 2.5, 20_000)).astype(np.float32)
    from mixprec.quant import quantize
    ours = quantize(torch.from_numpy(g), "e5m2").numpy()
    assert np.array_equal(ours, g.astype(ml_dtypes.float8_e5m2).astype(np.float32))


def test_bf16_range_against_ml_dtypes(quick_run):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    m = _record(quick_run, "bf16-range")["measured"]
    bf = lambda v: float(np.array(v, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32))
    assert m["bf16_q(2^-27)"] == bf(2.0 ** -27) == 2.0 ** -27
    assert m["bf16_q(2^-133)"] == bf(2.0 ** -133) and m["bf16_q(2^-135)"] == bf(2.0 ** -135)
    assert m["flushed_bf16"] == 0.0 and abs(m["flushed_fp16"] - 0.5) < 0.01


def test_stochastic_rounding_against_float16_loop(quick_run):
    rec = _record(quick_run, "stochastic-rounding")
    m, cases = rec["measured"], rec["config"]["cases"]
    w0, u, n, _ = cases["fp16_master"]
    w = np.float16(w0)
    for _ in range(n):
        w = np.float16(np.float32(w) + np.float32(u))
    assert m["fp16_master_nearest"] == float(w) == 1.0
    assert abs(m["fp16_master_stochastic_mean"] - (w0 + n * u)) < 0.05 * n * u
    assert m["e5m2_weight_nearest"] == 1.0
    assert m["e5m2_small_grad_sum_nearest_relerr"] == 1.0


def test_scale_floor_against_closed_form(quick_run):
    rec = _record(quick_run, "scale-floor")
    m, cfg = rec["measured"], rec["config"]
    overflows = m["steps"] // m["overflow_period"]
    # no 2000-step clean run ever happens, so the plain scale only halves
    start = math.log2(cfg["init_scale"])
    assert m["plain_final_scale_log2"] == max(start - overflows, -126)
    assert m["floored_final_scale_log2"] == math.log2(cfg["floor"][-1][1])
    assert m["floored_steps_below_floor"] == 0


def test_mx_sqnr_against_ml_dtypes(quick_run):
    ml_dtypes = pytest.importorskip("ml_dtypes")
    from mixprec.claims.fp8 import heavy_tailed, sqnr_db
    _record(quick_run, "mx-vs-per-tensor")
    x = heavy_tailed("student_t3", 16, 256, torch.Generator().manual_seed(5))
    xn = x.numpy().astype(np.float32)
    e4m3 = lambda a: np.clip(a, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    # OCP MX: X = 2^(floor(log2 amax) - 8) per 32-block, elements saturated to 448
    blocks = xn.reshape(16, 8, 32)
    scale = 2.0 ** (np.floor(np.log2(np.abs(blocks).max(-1, keepdims=True))) - 8)
    mx_ref = (e4m3(blocks / scale) * scale).reshape(16, 256)
    from mixprec.claims.fp8 import quantize_four_ways
    ours = quantize_four_ways(x, "e4m3")
    assert np.array_equal(ours["mx"].numpy(), mx_ref)
    assert np.array_equal(ours["plain"].numpy(), e4m3(xn))
    assert float(sqnr_db(x, ours["mx"])) == pytest.approx(
        10 * np.log10((xn.astype(np.float64) ** 2).sum() / ((xn - mx_ref).astype(np.float64) ** 2).sum()))


def test_reduction_helpers_against_float16_loops():
    pytest.importorskip("mixprec.quant")
    from mixprec.claims.numerics import batch_stats_lp, softmax_lp
    from mixprec.recipe import AccumulationConfig
    g = np.random.default_rng(3)
    x = (2 * g.standard_normal(300)).astype(np.float16)
    e = np.exp((x - x.max()).astype(np.float16).astype(np.float32)).astype(np.float16)
    s = np.float16(_f16_seq(e))
    p_ref = (e.astype(np.float32) / np.float32(s)).astype(np.float16)
    p = softmax_lp(torch.from_numpy(x.astype(np.float32))[None], "fp16", AccumulationConfig("fp16"))
    assert np.array_equal(p[0].numpy(), p_ref.astype(np.float32))
    v = (4 + g.standard_normal(500)).astype(np.float16)
    mean_ref = np.float16(np.float32(_f16_seq(v)) / np.float32(500))
    mean, var = batch_stats_lp(torch.from_numpy(v.astype(np.float32))[None], "fp16",
                               AccumulationConfig("fp16"))
    assert float(mean[0]) == float(mean_ref)
    dev = ((v - mean_ref).astype(np.float16) ** 2).astype(np.float16)
    assert float(var[0]) == float(np.float16(np.float32(_f16_seq(dev)) / np.float32(500)))


def test_numerics_verdicts(quick_run):
    for cid in ("fp16-underflow", "swamping", "fp32-reductions", "e5m2-underflow",
                "stochastic-rounding", "bf16-range"):
        assert _record(quick_run, cid)["verdict"] == Verdict.REPRODUCED.value, cid


# -- training claims -------------------------------------------------------------------
def test_training_claims_ran(quick_run):
    for cid in ("master-weights", "loss-scaling", "e5m2-training",
                "stochastic-rounding-training", "bf16-training", "activation-memory"):
        rec = _record(quick_run, cid)
        assert rec["summary"] != "-"


def test_loss_multiplier_leaves_fp32_training_unchanged():
    pytest.importorskip("mixprec.emulate")
    from mixprec.claims.digits import TrainConfig, train_digits
    a = train_digits(TrainConfig(steps=30))
    b = train_digits(TrainConfig(steps=30, loss_multiplier=2.0 ** -20))
    # SGD with gradient * m and lr / m is the same run up to float32 rounding
    assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


def test_bf16_training_skips_nothing(quick_run):
    m = _record(quick_run, "bf16-training")["measured"]
    assert m["bf16_skipped_steps"] == 0 and m["tiny_bf16_skipped_steps"] == 0


def test_activation_memory_baseline_is_plain_torch(quick_run):
    rec = _record(quick_run, "activation-memory")
    from mixprec.claims.digits import make_mlp
    model = make_mlp(tuple(rec["config"]["hidden"]), 0)
    x = torch.rand(rec["config"]["batch"], 64)
    sizes: dict = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = (t.untyped_storage().nbytes(),
                                                 isinstance(t, torch.nn.Parameter) or any(
                                                     t.untyped_storage().data_ptr()
                                                     == p.untyped_storage().data_ptr()
                                                     for p in model.parameters()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.nn.functional.cross_entropy(model(x), torch.zeros(len(x), dtype=torch.long))
    plain = sum(n for n, is_param in sizes.values() if not is_param)
    m = rec["measured"]
    assert m["fp32_saved_activations_bytes"] == plain
    # FP16 storage is two bytes an element: half of plain torch's float32 activations
    assert abs(m["fp16_mixed_saved_activations_bytes"] / plain - 0.5) < 0.05


# -- block-scaled recipes of 2024-2025 ------------------------------------------------------
FRONTIER_QUICK_VERDICTS = {
    # the mechanism holds (promotion cuts the error >= 10x), the 2% figure does not
    # carry over to the model on U[0,1) inputs (about 7%)
    "fp8-accumulation-promotion": Verdict.PARTLY,
    # quick mode: the quantization half (the ceil rule's SQNR is higher everywhere)
    "mxfp8-scale-rule": Verdict.PARTLY,
    "rht-sr-mxfp4": Verdict.PARTLY,
    "nvfp4-vs-mxfp4": Verdict.PARTLY,
}


@pytest.mark.parametrize("cid", list(FRONTIER_QUICK_VERDICTS))
def test_frontier_verdicts_in_quick_mode(quick_run, cid):
    rec = _record(quick_run, cid)
    assert rec["verdict"] == FRONTIER_QUICK_VERDICTS[cid].value, rec["reason"]


def test_accumulation_claim_figures(quick_run):
    m = _record(quick_run, "fp8-accumulation-promotion")["measured"]
    for kind, metric in (("uniform", "max_rel"), ("normal", "max_rel_norm")):
        never, every = m[f"{kind}_{metric}_no_promotion"], m[f"{kind}_{metric}_promote128"]
        assert every * 10 <= never
    # a 14-bit accumulator cannot be better than its own last place on positive sums
    assert m["uniform_max_rel_no_promotion"] > 2.0 ** -14
    assert not 0.01 <= m["uniform_max_rel_no_promotion"] <= 0.04   # why the verdict is partly


def test_ocp_clamped_fraction_against_numpy():
    from mixprec.claims.fp8 import heavy_tailed
    from mixprec.claims.frontier import scale_rule_clamped_fraction
    x = heavy_tailed("student_t3", 32, 256, torch.Generator().manual_seed(5))
    amax = np.abs(x.numpy().astype(np.float64)).reshape(-1, 32).max(axis=1)
    mant, _ = np.frexp(amax)                     # amax = mant * 2^e, 0.5 <= mant < 1
    # E4M3: the OCP scale X = 2^(floor(log2 amax) - 8) leaves amax / X = 2 mant * 256,
    # above 448 exactly when 2 mant > 1.75
    assert scale_rule_clamped_fraction(x, "e4m3") == float(np.mean(2 * mant > 1.75))
    # and the OCP quantizer does clamp those blocks: its block maximum is 448 X < amax
    from mixprec.blocks import BlockScheme, quantize_blocked
    q = quantize_blocked(x, BlockScheme("e4m3", (1, 32), "e8m0", "floor"))
    top = q.elements.reshape(-1, 32).abs().amax(dim=1).numpy()
    clamped = 2 * mant > 1.75
    assert clamped.any() and np.all(top[clamped] == 448.0)
