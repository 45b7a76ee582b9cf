"""Every verdict of ``mixprec compare``, each reached by run records built for it.

The records carry exactly what the verdict reads (status, loss history, metric), so each
expected verdict, departure step and detail follows from the rules in
``CompareConfig``'s docstring: accuracy within 1 point (absolute), perplexity within 2%
(relative), loss curve departs where its moving average (window max(5, n/20)) stays
above 1.1 x fp32's + 0.02 to the end.
"""
from __future__ import annotations

import pytest

from mixprec.experiments.compare import CompareConfig, _compare_to_baseline, _summarize
from mixprec.experiments.schema import load_schema
from mixprec.report import format_table

N = 100          # steps; the moving-average window is max(5, 100 // 20) = 5


def _run(spec: str, losses: list, value, *, metric: str = "accuracy", status: str = "ok",
         steps_run: int = N, error=None) -> dict:
    return {"recipe": {"name": spec.split(":")[0], "spec": spec}, "seed": 0,
            "status": status, "steps_run": steps_run, "error": error,
            "loss_history": losses, "final_loss": losses[-1] if losses else None,
            "metric": {"name": metric, "value": value,
                       "higher_is_better": metric == "accuracy"},
            "skipped_steps": 0, "final_scale": 1.0, "step_time_s": 0.01,
            "saved_activation_bytes": 1000}


def _summary(runs: list, **cfg) -> dict:
    config = CompareConfig(recipes=tuple(r["recipe"]["spec"] for r in runs), **cfg)
    for r in runs:
        _compare_to_baseline(r, runs[0], config)
    results = {"summary": _summarize(runs, config), "runs": runs,
               "config": {"model": "m", "data": {"name": "d"}, "steps": N, "batch_size": 8,
                          "lr": 0.1, "seeds": [0], "recipes": list(config.recipes)}}
    return results, {row["spec"]: row for row in results["summary"]}


FLAT = [1.0] * N


def test_baseline_and_matches():
    _, rows = _summary([_run("fp32", FLAT, 0.95), _run("bf16-mixed", [1.05] * N, 0.941)])
    assert rows["fp32"]["verdict"] == "baseline" and rows["fp32"]["detail"] == ""
    # 0.941 >= 0.95 - 0.01 and 1.05 <= 1.1 * 1.0 + 0.02 at every step
    row = rows["bf16-mixed"]
    assert (row["verdict"], row["departs_at"]) == ("matches fp32", None)


def test_worse_than_fp32_names_metric_and_tolerance():
    _, rows = _summary([_run("fp32", FLAT, 0.95), _run("fp16-pure", FLAT, 0.93)])
    row = rows["fp16-pure"]
    assert (row["verdict"], row["departs_at"]) == ("worse than fp32", None)
    assert row["detail"] == "accuracy 93.00% vs fp32 95.00% (tolerance 1 percentage point)"


def test_loss_higher_with_matching_metric_and_where_it_departs():
    # from step 50 the loss doubles: the 5-step average is 1.2 > 1.12 at step 50 already
    losses = [1.0] * 50 + [2.0] * 50
    results, rows = _summary([_run("fp32", FLAT, 0.95), _run("fp8-e5m2", losses, 0.95)])
    row = rows["fp8-e5m2"]
    assert (row["verdict"], row["departs_at"]) == ("matches fp32 (metric); loss higher", 50)
    assert row["detail"] == "moving-average loss stays above fp32's by >10% + 0.02 from step 50"
    assert "matches fp32 (metric); loss higher, departs at step 50" in format_table(results)


def test_a_loss_that_comes_back_does_not_depart():
    losses = [1.0] * 40 + [2.0] * 20 + [1.0] * 40
    _, rows = _summary([_run("fp32", FLAT, 0.95), _run("fp8-e5m2", losses, 0.95)])
    assert rows["fp8-e5m2"]["verdict"] == "matches fp32"


def test_worse_with_nonfinite_loss_says_where():
    losses = [1.0] * 30 + [None] * 70
    _, rows = _summary([_run("fp32", FLAT, 0.95), _run("fp16-mixed", losses, 0.10)])
    row = rows["fp16-mixed"]
    assert (row["verdict"], row["departs_at"]) == ("worse than fp32", 30)
    assert row["detail"].startswith("non-finite loss first at step 30; moving-average loss "
                                    "stays above fp32's by >10% + 0.02 from step 30; "
                                    "accuracy 10.00% vs fp32 95.00%")


def test_failed_run_is_failed_whatever_else_it_did():
    run = _run("mxfp4", [1.0] * 7, None, status="failed", steps_run=7,
               error="RuntimeError: stopped")
    results, rows = _summary([_run("fp32", FLAT, 0.95), run])
    row = rows["mxfp4"]
    assert (row["verdict"], row["departs_at"]) == ("failed", 7)
    assert row["detail"] == "stopped at step 7: RuntimeError: stopped"
    assert "failed at step 7" in format_table(results)


@pytest.mark.parametrize("ppl, verdict", [(10.2, "matches fp32"), (10.21, "worse than fp32"),
                                          (9.0, "matches fp32")])
def test_perplexity_is_lower_is_better_and_relative(ppl, verdict):
    base = _run("fp32", FLAT, 10.0, metric="perplexity")
    _, rows = _summary([base, _run("mxfp8", FLAT, ppl, metric="perplexity")])
    row = rows["mxfp8"]
    assert (row["metric_name"], row["verdict"]) == ("perplexity", verdict)
    if verdict != "matches fp32":      # 10.21 > 10.0 * 1.02
        assert row["detail"] == "perplexity 10.21 vs fp32 10 (tolerance 2%)"


def test_the_schema_admits_exactly_these_verdicts():
    verdicts = load_schema()["$defs"]["summary_row"]["properties"]["verdict"]["enum"]
    assert set(verdicts) == {"baseline", "matches fp32", "worse than fp32",
                             "matches fp32 (metric); loss higher", "failed"}
