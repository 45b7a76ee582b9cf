"""The README's accuracy figures come from the commands it names next to them.

Default run: each figure of the README's accuracy claims sits beside the `mixprec compare`
command that prints it, for every recipe that command runs. Slow (``pytest -m slow``,
about 3 minutes on 2 cores): each command runs through the CLI, and its printed table
must hold the README's figures exactly; the presets are also held to their tolerances
against fp32 on the digits CNN.
"""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from mixprec.cli import main
from mixprec.experiments.compare import DEFAULT_RECIPES, split_recipes

README = Path(__file__).parents[1] / "README.md"
_FIGURE = re.compile(r"([a-z0-9][\w-]*) (\d+\.\d\d% ±\d+\.\d\d)")


def _readme_text() -> str:
    return " ".join(README.read_text().split())


def readme_claims() -> list:
    """[(command, {recipe: "98.74% ±0.26"})] for every "as printed by `mixprec compare
    ...`: recipe figure, ..." sentence of the README."""
    out = []
    for m in re.finditer(r"as printed by `(mixprec compare[^`]*)`: ([^;(]*)", _readme_text()):
        out.append((m.group(1), dict(_FIGURE.findall(m.group(2)))))
    return out


def _command_recipes(command: str) -> list:
    argv = shlex.split(command)
    if "--recipes" in argv:
        return list(split_recipes(argv[argv.index("--recipes") + 1]))
    return list(DEFAULT_RECIPES)


def readme_table() -> list:
    """The rows of the README's example table of `mixprec compare` (what `make run` prints)."""
    text = README.read_text()
    block = re.search(r"```\n(recipe +accuracy +final loss.*?)```", text, re.S)
    assert block, "README lost the example table of `mixprec compare`"
    return [_cells(line) for line in block.group(1).splitlines()[2:] if line.strip()]


def _cells(row: str) -> list:
    return [c.strip() for c in re.split(r" {2,}", row.strip())]


def test_readme_names_the_command_beside_every_accuracy_figure():
    claims = readme_claims()
    assert [c for c, _ in claims] == [
        "mixprec compare --seeds 0,1,2",
        "mixprec compare --recipes fp32,fp16-mixed,fp16-pure --seeds 0,1,2 --lr 3e-5"]
    for command, figures in claims:
        assert list(figures) == _command_recipes(command), command
    assert len(readme_table()) == len(DEFAULT_RECIPES)


# --------------------------------------------------------------------------------------
# slow: run the commands
# --------------------------------------------------------------------------------------
def _run(command: str, out: Path, capsys) -> tuple:
    capsys.readouterr()
    assert main(shlex.split(command)[1:] + ["--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    rows = {cells[0]: cells for cells in map(_cells, printed.splitlines()) if cells}
    return rows, json.loads((out / "results.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize("index", [0, 1])
def test_commands_print_the_readme_figures(index, tmp_path, capsys):
    command, figures = readme_claims()[index]
    rows, results = _run(command, tmp_path, capsys)
    assert {r: rows[r][1] for r in figures} == figures
    summary = {s["recipe"]: s for s in results["summary"]}
    base = summary["fp32"]["metric_mean"]
    if index == 0:       # the presets track fp32 on the digits CNN
        assert base > 0.95
        for name, points in [("fp16-mixed", 1.0), ("bf16-mixed", 1.0), ("fp8-e5m2", 1.5),
                             ("fp8-hybrid", 1.5), ("mxfp8", 1.5)]:
            assert summary[name]["skipped_steps"] <= 3, name
            assert base - summary[name]["metric_mean"] <= points / 100, name
    else:                # without master weights FP16 loses updates and accuracy
        lost = [r["lost_update_fraction"] for r in results["runs"]
                if r["recipe"]["name"] == "fp16-pure"]
        said = re.search(r"fp16-pure loses about (\d+)% of its element updates", _readme_text())
        assert said and round(100 * sum(lost) / len(lost)) == int(said.group(1))
        assert base - summary["fp16-mixed"]["metric_mean"] <= 0.01
        assert base - summary["fp16-pure"]["metric_mean"] >= 0.01
        assert summary["fp16-pure"]["final_loss_mean"] > summary["fp32"]["final_loss_mean"]


@pytest.mark.slow
def test_make_run_prints_the_readme_table(tmp_path, capsys):
    rows, _ = _run("mixprec compare", tmp_path, capsys)
    step_time = 5        # the one column that depends on the machine's load
    for want in readme_table():
        got = rows[want[0]]
        assert got[:step_time] + got[step_time + 1:] == want[:step_time] + want[step_time + 1:]
