"""Tables, plots and a self-contained HTML report drawn from saved ``compare`` records.

Everything here reads a results document (``results.json``, see
``mixprec/experiments/results.schema.json``) and draws it; nothing is recomputed from a
model, so a report regenerated from a saved ``results.json`` is the same report.

>>> from mixprec.report import write_report
>>> paths = write_report("runs/compare-20250101-120000")    # reads results.json there
>>> print(format_table(load_results("runs/compare-20250101-120000")))
"""
from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path
from typing import Optional, Union

from mixprec.experiments.schema import load_results

__all__ = ["format_table", "table_rows", "coverage_rows", "plot_loss_curves", "plot_loss_scales",
           "plot_grad_histograms", "figure_png", "render_html", "write_report", "PLOTS"]

# Output file name -> what it shows (the HTML report inlines all of them).
PLOTS = {
    "loss_curves.png": "Training loss per step (faint: raw, solid: moving average); "
                       "dotted lines mark where a recipe's loss departs from fp32.",
    "loss_scale.png": "Loss scale per step (log2 axis); crosses mark skipped steps.",
    "grad_histograms.png": "log2|g| of all weight gradients of the fp32 run, with the "
                           "representable range of each format (light: subnormal, dark: "
                           "normal) -- cf. Figure 3 of Micikevicius et al. 2018.",
}
_COLORS = ("#222222", "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b",
           "#e377c2", "#17becf", "#bcbd22")


# --------------------------------------------------------------------------------------
# numbers as text
# --------------------------------------------------------------------------------------
def _scale_text(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v > 0 and math.log2(v).is_integer():
        return f"2^{int(math.log2(v))}"
    return f"{v:.4g}"


def _metric_text(row: dict) -> str:
    mean, std = row["metric_mean"], row["metric_std"]
    if mean is None:
        return "n/a"
    if row["metric_name"] == "accuracy":
        return f"{100 * mean:.2f}%" + (f" ±{100 * std:.2f}" if std is not None else "")
    return f"{mean:.3f}" + (f" ±{std:.3f}" if std is not None else "")


def _ratio_text(v: Optional[float]) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _verdict_text(row: dict) -> str:
    if row["verdict"] == "failed":
        return f"failed at step {row['departs_at']}"
    if row["departs_at"] is not None:
        return f"{row['verdict']}, departs at step {row['departs_at']}"
    return row["verdict"]


def table_rows(results: dict) -> tuple:
    """(header, rows) of the summary table, every cell a string."""
    metric = results["summary"][0]["metric_name"]
    header = ["recipe", metric, "final loss", "skipped", "final scale", "step time",
              "saved act.", "verdict"]
    rows = [[r["recipe"], _metric_text(r),
             "n/a" if r["final_loss_mean"] is None else f"{r['final_loss_mean']:.4f}",
             str(r["skipped_steps"]), _scale_text(r["final_scale"]),
             _ratio_text(r["step_time_ratio"]), _ratio_text(r["saved_activation_ratio"]),
             _verdict_text(r)] for r in results["summary"]]
    return header, rows


def format_table(results: dict) -> str:
    """The summary as an aligned text table (times and bytes relative to fp32)."""
    header, rows = table_rows(results)
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    out = [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]
    notes = [f"  {r['recipe']}: {r['detail']}" for r in results["summary"] if r["detail"]]
    cfg = results["config"]
    out.append(f"{cfg['model']} on {cfg['data']['name']}, {cfg['steps']} steps, batch "
               f"{cfg['batch_size']}, lr {cfg['lr']:g}, seeds {cfg['seeds']}; step time and "
               f"saved activations relative to fp32")
    covered = [(r[0], r[1:5]) for r in coverage_rows(results) if r[1] != "-"]
    if covered:
        out.append("matmul-like calls of step 0 (emulated/kept/fp32/not recognised): "
                   + ", ".join(f"{name} {'/'.join(map(str, c))}" for name, c in covered))
    return "\n".join(out + notes)


# --------------------------------------------------------------------------------------
# plots (matplotlib's Agg canvas, no global backend state)
# --------------------------------------------------------------------------------------
def _figure(width: float, height: float):
    try:
        from matplotlib.figure import Figure
    except ImportError as e:   # an optional dependency ("experiments" extra)
        raise ValueError("plots need matplotlib: pip install 'mixprec[experiments]'") from e
    return Figure(figsize=(width, height), dpi=100)


def figure_png(fig) -> bytes:
    """PNG bytes of a figure; no software/time metadata, so equal figures give equal bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def _color(results: dict, spec: str) -> str:
    return _COLORS[results["config"]["recipes"].index(spec) % len(_COLORS)]


def _first_runs(results: dict) -> list:
    """The run of the first seed of every recipe, in recipe order."""
    seed = results["config"]["seeds"][0]
    return [r for spec in results["config"]["recipes"] for r in results["runs"]
            if r["recipe"]["spec"] == spec and r["seed"] == seed]


def _smooth(values: list, window: int) -> list:
    out, acc = [], []
    for v in values:
        acc.append(math.nan if v is None else v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def plot_loss_curves(results: dict):
    """Training loss of every recipe (first seed) against the step."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    for run in _first_runs(results):
        color, loss = _color(results, run["recipe"]["spec"]), run["loss_history"]
        raw = [math.nan if v is None else v for v in loss]
        ax.plot(range(len(raw)), raw, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(range(len(raw)), _smooth(loss, max(5, len(loss) // 20)), color=color,
                linewidth=1.6, label=run["recipe"]["name"])
        if run["departs_at"] is not None:
            ax.axvline(run["departs_at"], color=color, linestyle=":", linewidth=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"Loss: {results['config']['model']} on {results['config']['data']['name']}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def plot_loss_scales(results: dict):
    """Loss scale of every recipe (first seed) on a log2 axis; skipped steps marked."""
    fig = _figure(8, 3.8)
    ax = fig.add_subplot()
    for i, run in enumerate(_first_runs(results)):
        color, scales = _color(results, run["recipe"]["spec"]), run["scale_history"]
        # earlier lines wider, so equal trajectories (fp32 and bf16 at 1) stay visible
        ax.step(range(len(scales)), scales, where="post", color=color,
                linewidth=max(1.0, 3.2 - 0.4 * i),
                label=f"{run['recipe']['name']} ({run['skipped_steps']} skipped)")
        if run["skipped_at"]:
            ax.plot(run["skipped_at"], [scales[i] for i in run["skipped_at"]], "x", color=color)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("step")
    ax.set_ylabel("loss scale")
    ax.set_title("Loss scale trajectory")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def _log2(v: Optional[float]) -> Optional[float]:
    return None if not v else math.log2(v)


def plot_grad_histograms(results: dict):
    """log2-magnitude histograms of the fp32 run's weight gradients at the recorded steps,
    above bars showing each format's subnormal and normal range."""
    base = next(r for r in _first_runs(results) if r["recipe"]["spec"] == results["config"]["baseline"])
    hists, formats = base["grad_histograms"], results["formats"]
    cols = max(1, len(hists))
    fig = _figure(4.2 * cols, 5.2)
    grid = fig.add_gridspec(2, cols, height_ratios=(3, 1.3), hspace=0.08)
    # x range: the data and the narrow formats' limits (bf16's 2^-133..2^128 runs off-plot)
    edges = [h["binade_lo"] for h in hists] + [h["binade_lo"] + len(h["counts"]) for h in hists]
    narrow = [_log2(f[k]) for n, f in formats.items() if n != "bf16"
              for k in ("min_subnormal", "max")]
    lo = math.floor(min(edges + [v for v in narrow if v is not None])) - 2
    hi = math.ceil(max(edges + [v for v in narrow if v is not None])) + 2
    for col, h in enumerate(hists):
        ax = fig.add_subplot(grid[0, col])
        total = max(1, h["total"])
        xs = [h["binade_lo"] + i for i in range(len(h["counts"]))]
        ax.bar(xs, [c / total for c in h["counts"]], width=1.0, align="edge", color="#555555")
        for i, (name, f) in enumerate(formats.items()):
            color = _COLORS[(i + 1) % len(_COLORS)]
            for key, style in (("min_subnormal", ":"), ("min_normal", "--"), ("max", "-")):
                x = _log2(f[key])
                if x is not None and lo <= x <= hi:
                    ax.axvline(x, color=color, linestyle=style, linewidth=1.0, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_title(f"step {h['step']}: {100 * h['zeros'] / total:.1f}% zeros", fontsize=9)
        ax.tick_params(labelbottom=False)
        if col == 0:
            ax.set_ylabel("fraction of gradient elements")
        bands = fig.add_subplot(grid[1, col], sharex=ax)
        for i, (name, f) in enumerate(formats.items()):
            color = _COLORS[(i + 1) % len(_COLORS)]
            sub, norm, top = _log2(f["min_subnormal"]), _log2(f["min_normal"]), _log2(f["max"])
            if sub is not None:
                bands.barh(i, norm - sub, left=sub, color=color, alpha=0.35, height=0.7)
            bands.barh(i, top - norm, left=norm, color=color, alpha=0.85, height=0.7)
        bands.set_yticks(range(len(formats)), list(formats))
        bands.invert_yaxis()
        bands.set_xlim(lo, hi)
        bands.set_xlabel("log2 |gradient|")
    fig.suptitle(f"Weight-gradient magnitudes, {base['recipe']['name']} run "
                 f"(dotted: min subnormal, dashed: min normal, solid: max)", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------
def _html_table(header: list, rows: list) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in r) + "</tr>"
                   for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _config_rows(results: dict) -> list:
    cfg, env = results["config"], results["environment"]
    data = cfg["data"]
    rows = [["workload", cfg["workload"]], ["model", cfg["model"]],
            ["data", f"{data['name']} ({data['task']}, {data['num_classes']} classes, "
                     f"{data['train_examples']} train / {data['test_examples']} test)"],
            ["recipes", ", ".join(cfg["recipes"])], ["seeds", ", ".join(map(str, cfg["seeds"]))],
            ["steps", cfg["steps"]], ["batch size", cfg["batch_size"]], ["learning rate", cfg["lr"]],
            ["optimizer", cfg["optimizer"]],
            ["tolerances", ", ".join(f"{k} {v:g}" for k, v in cfg["tolerances"].items())],
            ["command", cfg.get("command") or "-"], ["created", results["created"]],
            ["wall time", f"{results['wall_time_s']:.1f} s"]]
    rows += [[k.replace("_", " "), v] for k, v in env.items()]
    return rows


def _run_rows(results: dict) -> list:
    rows = []
    for r in results["runs"]:
        rows.append([r["recipe"]["spec"], r["seed"], r["backend"] or "-", r["status"],
                     "n/a" if r["metric"]["value"] is None else f"{r['metric']['value']:.4f}",
                     "n/a" if r["final_loss"] is None else f"{r['final_loss']:.4f}",
                     r["skipped_steps"],
                     "-" if r["step_time_s"] is None else f"{1e3 * r['step_time_s']:.2f} ms",
                     f"{r['saved_activation_bytes']:,} ("
                     + ", ".join(f"{k} {v:,}" for k, v in r["saved_bytes_by_dtype"].items())
                     + ")", r["error"] or ""])
    return rows


COVERAGE_HEADER = ["recipe", "emulated", "kept by a rule", "FP32 ops", "not recognised",
                   "formats of emulated calls", "calls not emulated"]


def coverage_rows(results: dict) -> list:
    """One row per recipe (first seed) from the runs' coverage records: call counts by
    status, the distinct role formats of emulated calls, and every call that was not
    emulated as "op in module (why) xN". Runs without a record show "-"."""
    rows = []
    for run in _first_runs(results):
        cov = run.get("coverage")
        if cov is None:
            rows.append([run["recipe"]["name"], "-", "-", "-", "-",
                         "not recorded (native backend or failed run)", "-"])
            continue
        formats = []
        for r in cov["rows"]:
            text = ", ".join(f"{k} {v}" for k, v in r["formats"].items())
            if r["status"] == "emulated" and text not in formats:
                formats.append(text)
        why = {"kept": "kept by a rule", "fp32": "FP32 op", "unrecognised": "not recognised"}
        others = [f"{r['op']} in {r['module'] or '(root)'} ({why[r['status']]}"
                  f"{': ' + r['reason'] if r['reason'] else ''}) x{r['calls']}"
                  for r in cov["rows"] if r["status"] != "emulated"]
        rows.append([run["recipe"]["name"], cov["emulated"], cov["kept"], cov["fp32"],
                     cov["unrecognised"], " | ".join(formats) or "-", "; ".join(others) or "-"])
    return rows


_CSS = ("body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
        "padding:3px 8px;text-align:left;font-size:90%}th{background:#f0f0f0}"
        "img{max-width:100%;border:1px solid #eee}figcaption{font-size:90%;color:#555}")


def render_html(results: dict, images: dict) -> str:
    """A self-contained page: summary table, notes, inlined PNGs, runs and configuration."""
    header, rows = table_rows(results)
    notes = "".join(f"<li><b>{html.escape(r['recipe'])}</b>: {html.escape(r['detail'])}</li>"
                    for r in results["summary"] if r["detail"])
    figures = "".join(
        f"<figure><img alt='{html.escape(name)}' src='data:image/png;base64,"
        f"{base64.b64encode(png).decode('ascii')}'><figcaption>{html.escape(PLOTS[name])}"
        f"</figcaption></figure>" for name, png in images.items())
    cfg = results["config"]
    title = f"mixprec compare: {cfg['model']} on {cfg['data']['name']}"
    runs_header = ["recipe", "seed", "backend", "status", results["summary"][0]["metric_name"],
                   "final loss", "skipped", "step time", "saved for backward (by dtype)", "error"]
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}"
            f"</title><style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<h2>Summary</h2><p>Step time and bytes saved for backward are relative to the "
            f"fp32 run of the same seed.</p>{_html_table(header, rows)}"
            f"{'<ul>' + notes + '</ul>' if notes else ''}"
            f"<h2>Plots</h2>{figures}"
            f"<h2>Coverage</h2><p>Matmul-like calls of step 0 (forward and backward) by what "
            f"they did: emulated in the listed formats, kept in high precision by a rule, "
            f"computed in FP32 by the recipe, or not recognised (torch's own kernel).</p>"
            f"{_html_table(COVERAGE_HEADER, coverage_rows(results))}"
            f"<h2>Runs</h2>{_html_table(runs_header, _run_rows(results))}"
            f"<h2>Configuration</h2>{_html_table(['setting', 'value'], _config_rows(results))}"
            f"</body></html>\n")


def write_report(results: Union[dict, str, Path], out_dir: Union[str, Path, None] = None) -> dict:
    """Draw the plots and ``report.html`` of a results document (or the path of a run
    folder / results.json) into ``out_dir`` (default: the run folder). Returns the paths
    written, by file name."""
    if not isinstance(results, dict):
        src = Path(results)
        out_dir = out_dir or (src if src.is_dir() else src.parent)
        results = load_results(src)
    if out_dir is None:
        raise ValueError("out_dir is required when results is a dict")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    makers = {"loss_curves.png": plot_loss_curves, "loss_scale.png": plot_loss_scales,
              "grad_histograms.png": plot_grad_histograms}
    images, paths = {}, {}
    for name, make in makers.items():
        images[name] = figure_png(make(results))
        paths[name] = out / name
        paths[name].write_bytes(images[name])
    paths["report.html"] = out / "report.html"
    paths["report.html"].write_text(render_html(results, images))
    return paths
