"""The report draws what the records say: a hand-written results document goes in, and
the table, plots and HTML must show exactly its numbers."""
import base64
import re

import pytest

from mixprec.experiments.compare import save_results
from mixprec.experiments.schema import schema_errors
from mixprec.report import (format_table, plot_grad_histograms, plot_loss_scales, render_html,
                            write_report)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(spec, name, *, metric, loss, scale, skipped_at=(), time_s=0.01, saved=1000,
         status="ok", error=None, departs=None):
    steps = 6
    losses = [2.0 - 0.2 * i for i in range(steps)] if loss is None else [loss] * steps
    return {
        "status": status, "error": error, "backend": "emulated",
        "recipe": {"name": name, "preset": spec.split(":")[0], "spec": spec},
        "seed": 0, "steps_run": steps,
        "metric": {"name": "accuracy", "value": metric, "higher_is_better": True},
        "test_loss": 0.5, "final_loss": losses[-1], "loss_history": losses,
        "scale_history": [scale] * steps, "skipped_steps": len(skipped_at),
        "skipped_at": list(skipped_at), "final_scale": scale, "step_time_s": time_s,
        "step_time_ratio": time_s / 0.01, "saved_activation_bytes": saved,
        "saved_bytes_by_dtype": {"float32": saved},
        "saved_activation_ratio": saved / 1000, "coverage": None,
        "grad_histograms": [{"step": 0, "binade_lo": -30, "counts": [1, 0, 3, 4],
                             "zeros": 2, "nonfinite": 0, "total": 10},
                            {"step": 5, "binade_lo": -12, "counts": [5, 5],
                             "zeros": 0, "nonfinite": 0, "total": 10}],
        "wall_time_s": 1.0,
        "config": {"steps": steps, "batch_size": 4, "lr": 0.01, "seed": 0, "optimizer": "AdamW",
                   "torch_version": "x", "model": "m", "data": "d"},
        "departs_at": departs, "matches_fp32": True,
    }


def _row(run, verdict, detail=""):
    return {"recipe": run["recipe"]["name"], "spec": run["recipe"]["spec"], "runs": 1,
            "metric_name": "accuracy", "metric_mean": run["metric"]["value"], "metric_std": None,
            "final_loss_mean": run["final_loss"], "skipped_steps": run["skipped_steps"],
            "final_scale": run["final_scale"], "step_time_s": run["step_time_s"],
            "step_time_ratio": run["step_time_ratio"],
            "saved_activation_bytes": run["saved_activation_bytes"],
            "saved_activation_ratio": run["saved_activation_ratio"], "verdict": verdict,
            "departs_at": run["departs_at"], "detail": detail}


@pytest.fixture
def results():
    runs = [_run("fp32", "fp32", metric=0.975, loss=None, scale=1.0),
            _run("fp16-mixed", "fp16-mixed", metric=0.9625, loss=None, scale=65536.0,
                 skipped_at=(1, 2), time_s=0.025, saved=500),
            _run("fp8-e5m2:grads.rounding=nearest", "fp8-e5m2[g.r=nearest]", metric=None,
                 loss=None, scale=3.0, status="failed", error="NonFiniteError: boom", departs=4)]
    runs[2]["steps_run"] = 4
    runs[1]["coverage"] = {
        "emulated": 4, "kept": 2, "fp32": 0, "unrecognised": 3,
        "rows": [{"op": "addmm", "module": "h.0.c_fc", "status": "emulated", "calls": 4,
                  "formats": {"weight": "fp16", "activation": "fp16"}, "reason": "",
                  "has_weight": True},
                 {"op": "linear", "module": "head", "status": "kept", "calls": 2,
                  "formats": {}, "reason": "", "has_weight": True},
                 {"op": "lstm", "module": "rnn", "status": "unrecognised", "calls": 3,
                  "formats": {}, "reason": "a composite", "has_weight": False}]}
    summary = [_row(runs[0], "baseline"), _row(runs[1], "matches fp32"),
               _row(runs[2], "failed", "stopped at step 4: NonFiniteError: boom")]
    doc = {"schema_version": 1, "kind": "mixprec.compare", "created": "2025-01-01T00:00:00+00:00",
           "config": {"workload": "w", "model": "net", "recipes": [r["recipe"]["spec"] for r in runs],
                      "data": {"name": "toy", "task": "classification", "num_classes": 10,
                               "train_examples": 100, "test_examples": 20, "example_shape": [4]},
                      "baseline": "fp32", "seeds": [0], "steps": 6, "batch_size": 4, "lr": 0.01,
                      "optimizer": "AdamW", "hist_points": 2,
                      "tolerances": {"accuracy": 0.01, "perplexity": 0.02, "loss": 0.1,
                                     "loss_abs": 0.02},
                      "command": "mixprec compare"},
           "environment": {"torch_version": "x", "python_version": "3", "platform": "p"},
           "formats": {"fp16": {"min_subnormal": 2.0 ** -24, "min_normal": 2.0 ** -14, "max": 65504.0},
                       "e4m3": {"min_subnormal": 2.0 ** -9, "min_normal": 2.0 ** -6, "max": 448.0}},
           "runs": runs, "summary": summary, "wall_time_s": 3.0}
    assert schema_errors(doc) == []
    return doc


def test_table_shows_the_recorded_numbers(results):
    lines = format_table(results).splitlines()
    assert lines[0].split() == ["recipe", "accuracy", "final", "loss", "skipped", "final",
                                "scale", "step", "time", "saved", "act.", "verdict"]
    assert lines[2].split()[:7] == ["fp32", "97.50%", "1.0000", "0", "2^0", "1.00x", "1.00x"]
    assert lines[3].split()[:7] == ["fp16-mixed", "96.25%", "1.0000", "2", "2^16", "2.50x", "0.50x"]
    assert lines[4].split()[:2] == ["fp8-e5m2[g.r=nearest]", "n/a"]
    assert "3" in lines[4].split() and "failed at step 4" in lines[4]
    assert "stopped at step 4: NonFiniteError: boom" in lines[-1]


def test_table_lists_the_recorded_coverage_counts(results):
    line = next(ln for ln in format_table(results).splitlines() if ln.startswith("matmul-like"))
    assert line.endswith("(emulated/kept/fp32/not recognised): fp16-mixed 4/2/0/3")


def test_table_reads_records_only(results):
    results["summary"][1]["metric_mean"] = 0.5            # no recomputation from runs
    assert "50.00%" in format_table(results)


def test_plots_draw_the_recorded_histograms(results):
    fig = plot_grad_histograms(results)
    top = fig.axes[0]
    bars = [p for p in top.patches]
    assert [b.get_x() for b in bars] == [-30, -29, -28, -27]
    assert [b.get_height() for b in bars] == [0.1, 0.0, 0.3, 0.4]     # counts / total
    assert "20.0% zeros" in top.get_title()
    bands = fig.axes[1]
    widths = sorted(round(b.get_width(), 6) for b in bands.patches)
    # fp16: subnormal 10 binades, normal log2(65504) + 14; e4m3: 3 and log2(448) + 6
    import math
    assert widths == sorted(round(w, 6) for w in
                            (10, math.log2(65504) + 14, 3, math.log2(448) + 6))


def test_loss_scale_plot_is_log2(results):
    ax = plot_loss_scales(results).axes[0]
    assert ax.get_yscale() == "log"
    lines = [l for l in ax.get_lines() if l.get_label().startswith("fp16-mixed")]
    assert list(lines[0].get_ydata()) == [65536.0] * 6


def test_report_files_and_regeneration_from_json_alone(results, tmp_path):
    first = write_report(results, tmp_path / "a")
    assert set(first) == {"loss_curves.png", "loss_scale.png", "grad_histograms.png", "report.html"}
    for name, path in first.items():
        if name.endswith(".png"):
            assert path.read_bytes().startswith(PNG_MAGIC)
    page = first["report.html"].read_text()
    for run in results["runs"]:
        assert run["recipe"]["name"] in page and run["recipe"]["spec"] in page
    images = re.findall(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page)
    assert len(images) == 3
    assert base64.b64decode(images[0]) == first["loss_curves.png"].read_bytes()
    assert "NonFiniteError: boom" in page and "2^16" in page
    # saved to results.json, read back, redrawn: the same page, byte for byte
    save_results(results, tmp_path / "b")
    again = write_report(tmp_path / "b")
    assert again["report.html"].read_text() == page
    assert again["grad_histograms.png"].read_bytes() == first["grad_histograms.png"].read_bytes()


def test_html_escapes_recorded_text(results):
    results["runs"][2]["error"] = "<script>alert(1)</script>"
    page = render_html(results, {})
    assert "<script>" not in page and "&lt;script&gt;" in page


def test_report_of_missing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="no results file at"):
        write_report(tmp_path / "nothing-here")


def test_html_shows_the_recorded_coverage(results):
    page = render_html(results, {})
    assert "<h2>Coverage</h2>" in page
    assert ("<td>fp16-mixed</td><td>4</td><td>2</td><td>0</td><td>3</td>"
            "<td>weight fp16, activation fp16</td>"
            "<td>linear in head (kept by a rule) x2; lstm in rnn (not recognised: a composite) x3"
            "</td>") in page
    assert "not recorded (native backend or failed run)" in page      # fp32 run: None
    results["runs"][1]["coverage"]["rows"][2]["calls"] = 7            # drawn, not recomputed
    assert "x7" in render_html(results, {})


def test_schema_requires_the_coverage_record(results):
    del results["runs"][0]["coverage"]
    assert any("coverage" in e for e in schema_errors(results))
    results["runs"][0]["coverage"] = {"emulated": 1, "kept": 0, "fp32": 0, "rows": []}
    assert any("unrecognised" in e for e in schema_errors(results))
