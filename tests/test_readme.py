"""The README's examples run as shown and its printed tables are what the code prints."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import get_recipe

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", README, flags=re.S)


def _blocks(lang):
    return [body for kind, body in BLOCKS if kind == lang]


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_examples_run(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})


def test_recipe_examples_parse_and_round_trip():
    lines = [ln.split("#")[0].strip() for body in _blocks("") for ln in body.splitlines()]
    recipes = [ln for ln in lines if re.match(r"^(fp|bf|mx)[\w-]*:", ln)]
    assert len(recipes) >= 6
    for text in recipes:
        recipe = get_recipe(text)
        assert get_recipe(str(recipe)) == recipe


def _mixprec(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mixprec", *args], capture_output=True,
                          text=True, cwd=cwd, check=True).stdout


def test_formats_table_is_what_the_command_prints():
    block = next(b for b in _blocks("") if b.startswith("$ mixprec formats"))
    command, *table = block.rstrip("\n").splitlines()
    out = _mixprec(*command.split()[2:])
    assert out.rstrip("\n").splitlines() == table


def test_inspect_command_runs_as_shown(tmp_path):
    line = next(ln for b in _blocks("") for ln in b.splitlines() if ln.startswith("mixprec inspect"))
    out = _mixprec(*line.split()[1:], "--steps", "3", cwd=tmp_path)
    assert "fp16" in out and (tmp_path / "inspect.json").exists()


def test_conformance_table_is_the_registry():
    from mixprec.conformance import CONFORMANCE, conformance_table
    assert conformance_table() in README
    for entry in CONFORMANCE:
        assert get_recipe(entry.preset).name == entry.preset
