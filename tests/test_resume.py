"""Runs that survive being killed: records written as runs finish, checkpoints, --resume,
and clear errors for damaged run folders."""
from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixprec.cli import main
from mixprec.experiments.compare import CompareConfig, run_compare
from mixprec.experiments.data import iterate_batches, load_digits_dataset
from mixprec.experiments.models import digits_mlp
from mixprec.experiments.runfolder import Checkpoint, atomic_torch_save, atomic_write_text
from mixprec.experiments.train import TrainConfig, train_recipe

# fields that measure time, not numerics: they may differ between runs
TIMING = {"wall_time_s", "step_time_s", "step_time_ratio"}


def _numerics(doc: dict) -> dict:
    """The results document without timings, creation time, command line and machine."""
    drop = lambda d: {k: v for k, v in d.items() if k not in TIMING}   # noqa: E731
    return {"runs": [drop(r) for r in doc["runs"]], "summary": [drop(r) for r in doc["summary"]],
            "config": {k: v for k, v in doc["config"].items() if k != "command"},
            "formats": doc["formats"]}


@pytest.fixture(scope="module")
def digits():
    return load_digits_dataset()


# -- a run continues from its checkpoint bit for bit ---------------------------------------
class _Killed(BaseException):
    """Stands in for SIGKILL: nothing of the run catches it."""


class _KilledAfter(Checkpoint):
    def __init__(self, *args, at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.at = at

    def save(self, state: dict) -> None:
        super().save(state)
        if state["step"] == self.at:
            raise _Killed


# fp16-mixed grows its scale every 2 clean steps and fp8-e5m2 rounds stochastically, so a
# resume that lost the loss scaler or the generator would show in the histories; the
# delayed fp8-hybrid keeps amax histories in its layers
RECIPES = ["fp16-mixed:loss_scale.growth_interval=2", "fp8-e5m2", "bf16-mixed",
           "fp8-hybrid:weight.scaling=delayed,activation.scaling=delayed,grads.scaling=delayed"]


@pytest.mark.parametrize("recipe", RECIPES)
def test_run_killed_after_a_checkpoint_resumes_bit_identically(recipe, digits, tmp_path):
    torch.manual_seed(0)
    initial = digits_mlp()
    cfg = TrainConfig(steps=11, batch_size=32, lr=2e-3, seed=3, hist_points=4)
    full = train_recipe(copy.deepcopy(initial), digits, recipe, cfg)
    path, identity = tmp_path / "ckpt.pt", {"recipe": recipe}
    with pytest.raises(_Killed):
        train_recipe(copy.deepcopy(initial), digits, recipe, cfg,
                     checkpoint=_KilledAfter(path, every=3, identity=identity, at=6))
    assert Checkpoint(path, every=3, identity=identity).saved_step() == 6
    resumed = train_recipe(copy.deepcopy(initial), digits, recipe, cfg,
                           checkpoint=Checkpoint(path, every=3, identity=identity))
    assert resumed["status"] == "ok" == full["status"], resumed["error"]
    assert len(resumed["loss_history"]) == 11 and len(resumed["grad_histograms"]) == 4
    assert ({k: v for k, v in resumed.items() if k not in TIMING}
            == {k: v for k, v in full.items() if k not in TIMING})


def test_batches_from_a_position_are_the_batches_at_that_position():
    x, y = torch.arange(10).float()[:, None], torch.arange(10)
    whole = iterate_batches(x, y, 3, seed=5)
    expected = [next(whole)[1].tolist() for _ in range(9)]    # 4 batches per epoch
    for start in (0, 1, 4, 6):
        it = iterate_batches(x, y, 3, seed=5, start=start)
        assert [next(it)[1].tolist() for _ in range(9 - start)] == expected[start:]


def test_checkpoint_of_another_run_is_refused(tmp_path):
    path = tmp_path / "c.pt"
    Checkpoint(path, every=1, identity={"spec": "fp32"}).save({"step": 1})
    with pytest.raises(ValueError, match=r"c\.pt' belongs to another run"):
        Checkpoint(path, every=1, identity={"spec": "fp16-mixed"}).load()


def test_atomic_writes_leave_the_old_file_when_writing_fails(tmp_path):
    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle this")

    path = tmp_path / "state.pt"
    atomic_torch_save({"step": 1}, path)
    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_torch_save({"step": 2, "bad": Unpicklable()}, path)
    assert torch.load(path, weights_only=True) == {"step": 1}
    atomic_write_text(tmp_path / "a.json", "[1]")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json", "state.pt"]   # no temp left


# -- kill a compare with SIGKILL, resume it ------------------------------------------------
ARGS = ["--workload", "digits-mlp", "--recipes", "fp32,fp16-mixed,fp8-e5m2", "--steps", "100",
        "--batch-size", "32", "--seeds", "0"]


def test_compare_killed_with_sigkill_resumes_to_the_uninterrupted_results(tmp_path, capsys):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-m", "mixprec", "compare", *ARGS,
                             "--checkpoint-every", "5", "--out", str(out), "--quiet"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    # kill once the first run is recorded and the second has a checkpoint: both the kept
    # record and the continued run are exercised
    second = out / "checkpoints" / "seed0-1.pt"
    deadline = time.monotonic() + 120
    try:
        while not second.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()
    assert not (out / "results.json").exists()
    assert (out / "records" / "seed0-0.json").exists()
    json.loads((out / "records" / "seed0-0.json").read_text())     # complete, never partial
    kept = {p.name for p in (out / "checkpoints").glob("*.pt")}
    assert kept, "killed with no checkpoint left"

    # `mixprec report` on the unfinished folder says how to continue it
    assert main(["report", str(out)]) == 2
    assert f"continue it with `mixprec compare --resume {out}`" in capsys.readouterr().err

    assert main(["compare", "--resume", str(out)]) == 0
    log = capsys.readouterr().err
    assert "fp32 (seed 0)" in log and "(recorded earlier)" in log
    if "seed0-1.pt" in kept:
        assert "fp16-mixed (seed 0): continuing from the checkpoint at step" in log
    assert not list((out / "checkpoints").glob("*.pt"))
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["config"]["command"].startswith("mixprec compare --workload digits-mlp")

    cfg = CompareConfig(recipes="fp32,fp16-mixed,fp8-e5m2", workload="digits-mlp", steps=100,
                        batch_size=32)
    uninterrupted = run_compare(cfg)
    assert _numerics(resumed) == _numerics(uninterrupted)


# -- resume arguments and damaged folders --------------------------------------------------
SMALL = ["--workload", "digits-mlp", "--recipes", "fp32,bf16-mixed", "--steps", "4",
         "--batch-size", "32", "--quiet"]


@pytest.fixture
def finished(tmp_path):
    out = tmp_path / "run"
    assert main(["compare", *SMALL, "--out", str(out), "--checkpoint-every", "2"]) == 0
    return out


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_resume_refuses_conflicting_arguments(finished, capsys):
    assert main(["compare", "--resume", str(finished), "--steps", "5", "--quiet"]) == 2
    err = _error(capsys)
    assert "conflict with the saved configuration: steps 5 (saved: 4)" in err
    assert main(["compare", "--resume", str(finished), "--recipes", "fp32,fp16-mixed",
                 "--quiet"]) == 2
    assert "recipes ('fp32', 'fp16-mixed') (saved: ('fp32', 'bf16-mixed'))" in _error(capsys)
    # the same values (fp32 is always first, so leaving it out is the same list) are fine
    before = json.loads((finished / "results.json").read_text())
    assert main(["compare", "--resume", str(finished), "--recipes", "bf16-mixed", "--steps",
                 "4", "--quiet"]) == 0
    after = json.loads((finished / "results.json").read_text())
    assert _numerics(after) == _numerics(before)


def test_new_compare_into_an_unfinished_folder_is_refused(finished, capsys):
    (finished / "results.json").unlink()
    assert main(["compare", *SMALL, "--out", str(finished)]) == 2
    assert f"holds an unfinished comparison (2 run(s) recorded); continue it with " \
           f"`mixprec compare --resume {finished}`" in _error(capsys)


def test_truncated_results_file_is_an_error_naming_it(finished, capsys):
    path = finished / "results.json"
    path.write_text(path.read_text()[:-200])
    assert main(["report", str(finished)]) == 2
    assert f"mixprec: error: the results file '{path}' is not valid JSON" in _error(capsys)
    path.write_text("")
    assert main(["report", str(finished)]) == 2
    assert f"the results file '{path}' is empty" in _error(capsys)


def test_resume_writes_a_truncated_results_file_again_from_the_records(finished, capsys):
    path = finished / "results.json"
    before = json.loads(path.read_text())
    path.write_text(path.read_text()[:-300])
    assert main(["compare", "--resume", str(finished)]) == 0
    assert (f"the results file '{path}' is not valid JSON" in capsys.readouterr().err)
    assert _numerics(json.loads(path.read_text())) == _numerics(before)


def test_results_file_missing_a_run_is_an_error_not_a_shorter_table(finished, capsys):
    path = finished / "results.json"
    doc = json.loads(path.read_text())
    doc["runs"] = doc["runs"][:1]
    path.write_text(json.dumps(doc))
    assert main(["report", str(finished)]) == 2
    err = _error(capsys)
    assert f"the results in '{path}' are incomplete: missing the run(s) bf16-mixed (seed 0)" in err


def test_resume_with_a_damaged_record_or_checkpoint_names_the_file(finished, capsys):
    record = finished / "records" / "seed0-1.json"
    record.write_text(record.read_text()[:100])
    assert main(["compare", "--resume", str(finished), "--quiet"]) == 2
    assert f"the run record '{record}' is not valid JSON" in _error(capsys)
    record.unlink()
    ckpt = finished / "checkpoints" / "seed0-1.pt"
    ckpt.write_bytes(b"PK\x03\x04 not a whole zip")
    assert main(["compare", "--resume", str(finished), "--quiet"]) == 2
    assert f"the checkpoint '{ckpt}' cannot be read" in _error(capsys)


def test_resume_of_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["compare", "--resume", str(tmp_path), "--quiet"]) == 2
    assert f"'{tmp_path}' is not a compare run folder: it has no run.json" in _error(capsys)
    (tmp_path / "run.json").write_text('{"kind": "mixprec.compare.run", "con')
    assert main(["compare", "--resume", str(tmp_path), "--quiet"]) == 2
    assert f"the compare run file '{tmp_path / 'run.json'}' is not valid JSON" in _error(capsys)


# -- mixprec reproduce: one record per claim, --resume -------------------------------------
def test_reproduce_writes_each_claim_and_resumes_the_missing_ones(tmp_path, capsys):
    out = tmp_path / "rep"
    argv = ["reproduce", "--quick", "--only", "swamping,fp16-underflow", "--out", str(out)]
    assert main(argv) == 0
    capsys.readouterr()
    whole = json.loads((out / "results.json").read_text())
    for rec in whole["records"]:
        assert json.loads((out / "records" / f"{rec['id']}.json").read_text()) == rec
    # as if killed during the second claim: no results.json, its record missing; the kept
    # record is marked so that the resumed document shows it was kept, not run again
    (out / "results.json").unlink()
    (out / "records" / "fp16-underflow.json").unlink()
    kept = json.loads((out / "records" / "swamping.json").read_text())
    kept["summary"] = "kept from the first run"
    (out / "records" / "swamping.json").write_text(json.dumps(kept))
    assert main(argv) == 2                # a new run into the unfinished folder: refused
    assert "holds an unfinished reproduce run (1 claim(s) recorded)" in _error(capsys)
    assert main(["reproduce", "--resume", str(out)]) == 0
    log = capsys.readouterr().err.splitlines()
    assert log[0].startswith("[1/2] fp16-underflow: reproduced") and "earlier" not in log[0]
    assert log[1].startswith("[2/2] swamping: reproduced") and log[1].endswith("(recorded earlier)")
    doc = json.loads((out / "results.json").read_text())
    assert doc["args"] == whole["args"]
    assert [r["id"] for r in doc["records"]] == ["fp16-underflow", "swamping"]
    assert doc["records"][1] == kept
    fresh = {k: v for k, v in doc["records"][0].items() if k != "seconds"}
    assert fresh == {k: v for k, v in whole["records"][0].items() if k != "seconds"}


def test_reproduce_resume_refuses_conflicts_and_damaged_records(tmp_path, capsys):
    out = tmp_path / "rep"
    assert main(["reproduce", "--quick", "--only", "swamping", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["reproduce", "--resume", str(out), "--seed", "3"]) == 2
    assert "conflict with the saved ones: seed 3 (saved: 0)" in _error(capsys)
    record = out / "records" / "swamping.json"
    record.write_text(record.read_text()[:50])
    assert main(["reproduce", "--resume", str(out)]) == 2
    assert f"the claim record '{record}' is not valid JSON" in _error(capsys)


# -- mixprec compare --nproc N: data parallel, rank 0 writes -------------------------------
DDP_ARGS = ["compare", "--workload", "digits-mlp", "--recipes", "fp32,fp16-mixed", "--steps",
            "6", "--batch-size", "32", "--quiet", "--dist-timeout", "60", "--checkpoint-every", "3"]


@pytest.fixture(scope="module")
def one_process():
    return run_compare(CompareConfig(recipes="fp32,fp16-mixed", workload="digits-mlp", steps=6,
                                     batch_size=32))


def _matches_one_process(two: dict, one: dict) -> None:
    assert two["config"]["nproc"] == 2
    for a, b in zip(one["runs"], two["runs"]):
        # "ok" includes the check that both ranks ended with the same weights, bit for bit
        assert a["status"] == b["status"] == "ok", b["error"]
        assert a["scale_history"] == b["scale_history"]
        # same initial weights and global batch: the step-0 loss differs only by the
        # order of the sums (measured: equal for fp32; 1e-7 relative for fp16-mixed)
        assert b["loss_history"][0] == pytest.approx(a["loss_history"][0], rel=1e-6)
        # measured max over 6 steps: 1.1e-7 (fp32), 5.0e-6 (fp16-mixed) relative
        assert b["loss_history"] == pytest.approx(a["loss_history"], rel=1e-4)
        assert b["grad_histograms"][0]["total"] == a["grad_histograms"][0]["total"]


@pytest.mark.distributed
def test_compare_nproc_2_trains_data_parallel_and_rank0_writes(tmp_path, one_process):
    out = tmp_path / "two"
    assert main([*DDP_ARGS, "--nproc", "2", "--out", str(out)]) == 0
    _matches_one_process(json.loads((out / "results.json").read_text()), one_process)
    assert sorted(p.name for p in (out / "records").iterdir()) == ["seed0-0.json", "seed0-1.json"]
    assert not list((out / "checkpoints").glob("*.pt"))


@pytest.mark.distributed
def test_compare_under_torchrun_trains_data_parallel(tmp_path, one_process):
    """The documented launch: torchrun --nproc-per-node 2 -m mixprec compare ..."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    launched = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "mixprec", *DDP_ARGS, "--out", str(tmp_path / "run")],
        env=env, capture_output=True, text=True, timeout=300)
    assert launched.returncode == 0, launched.stderr[-3000:]
    _matches_one_process(json.loads((tmp_path / "run" / "results.json").read_text()), one_process)


def test_nproc_and_launcher_conflicts_are_clear_errors(tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "x")
    assert main(["compare", *SMALL, "--nproc", "0", "--out", out]) == 2
    assert "--nproc must be at least 1, got 0" in _error(capsys)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["compare", *SMALL, "--nproc", "3", "--out", out]) == 2
    assert "--nproc 3 conflicts with the 2 processes the launcher started" in _error(capsys)
    assert not (tmp_path / "x").exists()


def test_resume_keeps_the_number_of_processes(finished, capsys):
    assert main(["compare", "--resume", str(finished), "--nproc", "2", "--quiet"]) == 2
    assert "conflict with the saved configuration: nproc 2 (saved: 1)" in _error(capsys)


def test_saved_bytes_do_not_depend_on_what_ran_before(digits):
    """A native recipe converts the parameters in prepare(); their storages are taken
    when the measurement starts, so the freed FP32 ones cannot match new tensors."""
    torch.manual_seed(0)
    initial = digits_mlp()
    cfg = TrainConfig(steps=1, batch_size=32, seed=0)
    counts = [train_recipe(copy.deepcopy(initial), digits, r, cfg)["saved_activation_bytes"]
              for r in ("bf16-mixed", "fp32", "bf16-mixed", "bf16-mixed")]
    assert counts[0] == counts[2] == counts[3] < counts[1]
