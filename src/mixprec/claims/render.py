"""Draw a reproduce results document as a terminal table, Markdown and self-contained HTML.

Reads records only; never recomputes. Plots (matplotlib Agg, optional) are drawn from a
record's ``plot`` data: PNG files beside report.md, inlined as base64 in report.html.
"""
from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Optional

__all__ = ["terminal_table", "markdown", "html_page", "draw_plots", "write_reports",
           "verdict_text", "checks_text"]

_COLOURS = {"reproduced": "#d8f0d8", "partly": "#fff3c4", "not reproduced": "#f6d6d6",
            "out of reach": "#e4e4ee", "not run": "#e4e4e4"}


def verdict_text(record: dict) -> str:
    """The verdict as shown: "out of reach: needs ImageNet" for a claim that could not be
    measured here, the plain verdict otherwise."""
    needs = record.get("needs")
    return f"{record['verdict']}: needs {needs}" if needs else record["verdict"]


def checks_text(record: dict) -> str:
    """"passed: a, b; failed: c" from the record's checks ("" when it has none)."""
    checks = record.get("checks") or {}
    passed = [k for k, v in checks.items() if v]
    failed = [k for k, v in checks.items() if not v]
    return "; ".join(f"{what}: {', '.join(names)}"
                     for what, names in (("passed", passed), ("failed", failed)) if names)


def _cut(text: str, width: int) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[:width - 3] + "..."


def terminal_table(records: list, *, width: int = 150) -> str:
    """claim | paper | measured | verdict, one line per record, cells shortened."""
    cols = (("claim", "id", 28), ("paper", "paper_value", 40), ("measured", "summary", 42),
            ("verdict", "verdict", 34))
    scale = max(0.5, min(1.0, width / 150))
    widths = [max(len(h), int(w * scale)) for h, _, w in cols]
    lines = ["  ".join(h.ljust(w) for (h, _, _), w in zip(cols, widths)),
             "  ".join("-" * w for w in widths)]
    for r in records:
        cells = {**r, "verdict": verdict_text(r)}
        lines.append("  ".join(_cut(cells.get(k, ""), w).ljust(w)
                               for (_, k, _), w in zip(cols, widths)).rstrip())
    counts = _counts(records)
    lines.append("")
    lines.append(", ".join(f"{n} {v}" for v, n in counts.items()))
    return "\n".join(lines)


def _counts(records: list) -> dict:
    out: dict = {}
    for r in records:
        out[r["verdict"]] = out.get(r["verdict"], 0) + 1
    return out


def _fmt(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return f"{v:.6g}"
    return str(v)


def _md_cell(text) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def markdown(doc: dict, plots: Optional[dict] = None) -> str:
    """The report as Markdown; ``plots`` maps claim ids to PNG file names."""
    plots = plots or {}
    recs = doc["records"]
    out = [f"# mixprec reproduce: the papers' claims, run here", "",
           f"Created {doc['created']}; mode {'quick' if doc['args']['quick'] else 'full'}, "
           f"seed {doc['args']['seed']}; {doc['seconds']:.1f} s; torch {doc['environment']['torch']}, "
           f"{doc['environment']['platform']}.", "",
           "Verdicts: " + ", ".join(f"{n} {v}" for v, n in _counts(recs).items()) + ".", "",
           "| # | claim | source | paper | measured | verdict |", "|---|---|---|---|---|---|"]
    for i, r in enumerate(recs, 1):
        out.append(f"| {i} | {_md_cell(r['id'])} | {_md_cell(r['source'])} | {_md_cell(r['paper_value'])} "
                   f"| {_md_cell(r['summary'])} | **{verdict_text(r)}** |")
    for i, r in enumerate(recs, 1):
        out += ["", f"## {i}. {r['id']}: {verdict_text(r)}", "", f"*Claim.* {r['claim']}", "",
                f"*Source.* {r['source']}", "", f"*Paper.* {r['paper_value']}", "",
                f"*Measured.* {r['summary']}", "",
                f"*Verdict.* **{verdict_text(r)}**: {r['reason']}", ""]
        if checks_text(r):
            out += [f"*Checks.* {checks_text(r)}", ""]
        if r["measured"]:
            out += ["| quantity | value |", "|---|---|"]
            out += [f"| {_md_cell(k)} | {_fmt(v)} |" for k, v in r["measured"].items()]
            out.append("")
        if r["id"] in plots:
            out += [f"![{r['id']}]({plots[r['id']]})", ""]
        out += [f"Configuration: `{json.dumps(r['config'], sort_keys=True)}`; "
                f"{r['seconds']:.2f} s.", ""]
    return "\n".join(out)


def draw_plots(records: list) -> dict:
    """PNG bytes per claim id for every record with plot data (empty without matplotlib)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}
    pngs = {}
    for r in records:
        p = r.get("plot")
        if not p:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
        for label, ys in p["lines"].items():
            ax.plot(p["x"][:len(ys)], ys, label=label, linewidth=1.2)
        if p.get("logy"):
            ax.set_yscale("log")
        ax.set(title=p["title"], xlabel=p["xlabel"], ylabel=p["ylabel"])
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        pngs[r["id"]] = buf.getvalue()
    return pngs


def html_page(doc: dict, pngs: Optional[dict] = None) -> str:
    """The report as one self-contained HTML page (plots inlined as base64 PNG)."""
    pngs = pngs or {}
    e = lambda s: html.escape(str(s))
    recs = doc["records"]
    rows = "".join(
        f"<tr style='background:{_COLOURS.get(r['verdict'], '#fff')}'><td>{i}</td>"
        f"<td><a href='#{e(r['id'])}'>{e(r['id'])}</a></td><td>{e(r['paper_value'])}</td>"
        f"<td>{e(r['summary'])}</td><td><b>{e(verdict_text(r))}</b></td></tr>"
        for i, r in enumerate(recs, 1))
    sections = []
    for i, r in enumerate(recs, 1):
        measured = "".join(f"<tr><td>{e(k)}</td><td>{e(_fmt(v))}</td></tr>"
                           for k, v in r["measured"].items())
        img = (f"<img alt='{e(r['id'])}' src='data:image/png;base64,"
               f"{base64.b64encode(pngs[r['id']]).decode()}'>" if r["id"] in pngs else "")
        sections.append(
            f"<h2 id='{e(r['id'])}'>{i}. {e(r['id'])}: {e(verdict_text(r))}</h2>"
            f"<p><i>Claim.</i> {e(r['claim'])}</p><p><i>Source.</i> {e(r['source'])}</p>"
            f"<p><i>Paper.</i> {e(r['paper_value'])}</p><p><i>Measured.</i> {e(r['summary'])}</p>"
            f"<p style='background:{_COLOURS.get(r['verdict'], '#fff')}'><i>Verdict.</i> "
            f"<b>{e(verdict_text(r))}</b>: {e(r['reason'])}</p>"
            + (f"<p><i>Checks.</i> {e(checks_text(r))}</p>" if checks_text(r) else "")
            + (f"<table class='m'><tr><th>quantity</th><th>value</th></tr>{measured}</table>"
               if measured else "")
            + img + f"<p class='c'>Configuration: <code>{e(json.dumps(r['config'], sort_keys=True))}"
            f"</code>; {r['seconds']:.2f} s.</p>")
    counts = ", ".join(f"{n} {v}" for v, n in _counts(recs).items())
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mixprec reproduce</title>"
        "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;line-height:1.4}"
        "table{border-collapse:collapse;font-size:13px}td,th{border:1px solid #bbb;padding:3px 6px;"
        "vertical-align:top}table.m td:last-child{font-family:monospace}.c{font-size:12px;color:#555}"
        "</style></head><body><h1>mixprec reproduce: the papers' claims, run here</h1>"
        f"<p>Created {e(doc['created'])}; mode {'quick' if doc['args']['quick'] else 'full'}, seed "
        f"{e(doc['args']['seed'])}; {doc['seconds']:.1f} s; torch {e(doc['environment']['torch'])}, "
        f"{e(doc['environment']['platform'])}.</p><p>Verdicts: {e(counts)}.</p>"
        "<table><tr><th>#</th><th>claim</th><th>paper</th><th>measured</th><th>verdict</th></tr>"
        f"{rows}</table>{''.join(sections)}</body></html>")


def write_reports(doc: dict, out: Path) -> dict:
    """Write report.md, report.html and plots/*.png into ``out``; returns the paths."""
    out = Path(out)
    pngs = draw_plots(doc["records"])
    names = {}
    if pngs:
        (out / "plots").mkdir(parents=True, exist_ok=True)
        for cid, data in pngs.items():
            (out / "plots" / f"{cid}.png").write_bytes(data)
            names[cid] = f"plots/{cid}.png"
    (out / "report.md").write_text(markdown(doc, names), encoding="utf-8")
    (out / "report.html").write_text(html_page(doc, pngs), encoding="utf-8")
    return {"md": out / "report.md", "html": out / "report.html",
            "plots": [out / p for p in names.values()]}
