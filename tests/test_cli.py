"""The ``mixprec`` command line: formats, compare end to end, report, and its errors."""
import json
import re

import pytest

from mixprec.cli import main
from mixprec.experiments.compare import load_results
from mixprec.experiments.schema import schema_errors
from mixprec.formats import get_format


def test_formats_table(capsys):
    assert main(["formats", "fp16", "e4m3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:2] == ["name", "bits"]
    assert out[2].split()[0] == "fp16" and "65504" in out[2]
    assert out[3].split()[0] == "e4m3" and f"{get_format('e4m3').max:g}" in out[3]


@pytest.fixture(scope="module")
def compare_run(tmp_path_factory):
    """One tiny comparison through main(argv) with the real engine."""
    out = tmp_path_factory.mktemp("cmp") / "run"
    argv = ["compare", "--recipes", "fp16-mixed,bf16-mixed,fp8-e5m2", "--steps", "6",
            "--batch-size", "32", "--workload", "digits-cnn", "--out", str(out), "--quiet"]
    rc = main(argv)
    return rc, out


def test_compare_end_to_end(compare_run, capsys):
    rc, out = compare_run
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert schema_errors(doc) == []
    assert load_results(out) == doc
    assert (out / "results.schema.json").exists()
    specs = ["fp32", "fp16-mixed", "bf16-mixed", "fp8-e5m2"]
    assert doc["config"]["recipes"] == specs
    assert [r["recipe"]["spec"] for r in doc["runs"]] == specs
    for run in doc["runs"]:
        assert run["status"] == "ok", run["error"]
        assert len(run["loss_history"]) == 6 == len(run["scale_history"])
        assert run["config"]["steps"] == 6 and run["config"]["model"] == "digits_cnn"
        assert run["grad_histograms"] and sum(run["grad_histograms"][0]["counts"]) > 0
    fp16, fp8 = doc["runs"][1], doc["runs"][3]
    assert fp16["scale_history"][0] == 2.0 ** 16       # the dynamic scaler's initial scale
    # the measurement sees the real low-precision storage the recipes keep for backward
    assert doc["runs"][0]["saved_bytes_by_dtype"].get("float16", 0) == 0
    assert fp16["saved_bytes_by_dtype"]["float16"] > 0
    assert fp8["saved_bytes_by_dtype"]["float8_e5m2"] > 0
    for run in doc["runs"]:
        assert sum(run["saved_bytes_by_dtype"].values()) == run["saved_activation_bytes"]
    assert set(doc["formats"]) == {"fp16", "bf16", "e5m2", "e4m3"}
    # coverage of step 0: every matmul-like call of the CNN, and why
    for run in doc["runs"]:
        assert (run["coverage"] is None) == (run["backend"] == "native")
    cov32, cov16, cov8 = doc["runs"][0]["coverage"], fp16["coverage"], fp8["coverage"]
    total = cov32["fp32"]
    assert total > 0 and cov32["emulated"] == cov32["kept"] == cov32["unrecognised"] == 0
    assert cov16["emulated"] == total and cov16["unrecognised"] == 0
    assert {r["formats"]["weight"] for r in cov16["rows"] if "weight" in r["formats"]} == {"fp16"}
    assert cov8["kept"] >= 2 and cov8["emulated"] + cov8["kept"] == total   # first + last kept
    page = (out / "report.html").read_text()
    assert "<h2>Coverage</h2>" in page
    for png in ("loss_curves.png", "loss_scale.png", "grad_histograms.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    for run in doc["runs"]:
        assert run["recipe"]["name"] in page


def test_report_subcommand_redraws_the_same_page(compare_run, tmp_path, capsys):
    _, out = compare_run
    assert main(["report", str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "report.html").read_text() == (out / "report.html").read_text()
    table = capsys.readouterr().out
    assert re.search(r"^fp8-e5m2\s", table, re.M) and "verdict" in table


@pytest.mark.parametrize("argv, message", [
    (["--recipes", "fp32,fp9"], r"unknown recipe 'fp9'; valid presets: fp32, fp16-mixed"),
    (["--model", "nocolon"], r"bad --model spec 'nocolon': expected the form 'package\.module:callable'"),
    (["--data", "no_such_module_q:make"], r"bad --data spec 'no_such_module_q:make': cannot import"),
    (["--model", "mixprec.cli:no_such_attr"], r"module 'mixprec.cli' has no attribute 'no_such_attr'"),
    (["--model", "mixprec.cli:__doc__"], r"'__doc__' is a str, not callable"),
    (["--seeds", "1,1"], r"seeds must be distinct"),
])
def test_compare_errors_exit_2_with_a_message(argv, message, tmp_path, capsys):
    rc = main(["compare", "--out", str(tmp_path / "x"), "--quiet"] + argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert re.search(r"^mixprec: error: .*" + message, err, re.M), err
    assert not (tmp_path / "x").exists()


def test_model_factory_returning_the_wrong_type(tmp_path, monkeypatch, capsys):
    (tmp_path / "cli_user_mod.py").write_text("def make():\n    return 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    rc = main(["compare", "--model", "cli_user_mod:make", "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2
    assert "--model 'cli_user_mod:make' returned a int" in capsys.readouterr().err


def test_steps_and_epochs_exclude_each_other(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["compare", "--steps", "3", "--epochs", "1"])
    assert exc.value.code == 2
    assert "not allowed with argument" in capsys.readouterr().err
