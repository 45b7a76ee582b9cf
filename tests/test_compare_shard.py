"""``mixprec compare --shard``: every run's model sharded with FSDP2 on two gloo ranks,
against the same comparison with DDP; checkpoints through torch.distributed.checkpoint,
killed and resumed."""
from __future__ import annotations

import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from spawning import leave_process_group, spawn_ranks
from test_resume import TIMING, _numerics

from mixprec.cli import main
from mixprec.experiments import runfolder
from mixprec.experiments.compare import CompareConfig, run_compare

pytestmark = pytest.mark.distributed

WORLD = 2
# fp8-hybrid keeps its first and last layers by rules that trace the first forward (a
# resumed engine must know them before DCP loads into it); fp8-e5m2 rounds
# stochastically, from each rank's generator over its own shard
RECIPES = "fp32,fp16-mixed,bf16-mixed,fp8-hybrid,fp8-e5m2"
STEPS, EVERY = 6, 2
SAME_AS_DDP = ("fp32", "fp16-mixed", "bf16-mixed", "fp8-hybrid")
# where the run is killed: (recipe index, steps done at its last checkpoint)
KILLS = [(3, 4), (4, 2)]


def _config(shard: bool) -> CompareConfig:
    return CompareConfig(recipes=RECIPES, workload="digits-mlp", steps=STEPS, batch_size=32,
                         nproc=WORLD, shard=shard)


class _Killed(BaseException):
    """Stands in for SIGKILL of every rank right after a checkpoint: nothing catches it."""


def _kill_after(index: int, step: int):
    """Patch the run folder's checkpoints to stop every rank once run ``index`` has
    saved its checkpoint after ``step`` steps (rank 0 writes it, all ranks stop)."""
    original = runfolder.Rank0Checkpoint.save

    def save(self, state: dict) -> None:
        original(self, state)
        if self.path.name.endswith(f"-{index}.pt") and state["step"] == step:
            raise _Killed
    runfolder.Rank0Checkpoint.save = save
    return original


def _worker(rank: int, init_file: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        if rank == 0:     # a retried attempt starts afresh
            for name in ("ddp", "fsdp", "killed"):
                shutil.rmtree(f"{out}/{name}", ignore_errors=True)
        dist.barrier()
        run_compare(_config(False), out=f"{out}/ddp", checkpoint_every=EVERY)
        run_compare(_config(True), out=f"{out}/fsdp", checkpoint_every=EVERY)
        # killed twice (once in the first invocation, once in the first resume), then
        # resumed to the end
        seen = []
        for i, kill in enumerate(KILLS + [None]):
            original = _kill_after(*kill) if kill is not None else None
            try:
                run_compare(_config(True), out=f"{out}/killed", resume=i > 0,
                            checkpoint_every=EVERY)
            except _Killed:
                if rank == 0:
                    ckpts = Path(f"{out}/killed/checkpoints")
                    (pointer,) = ckpts.glob("*.pt")
                    named = torch.load(pointer, weights_only=True)["state"]["sharded"]
                    seen.append({"records": sorted(p.name for p in
                                                   Path(f"{out}/killed/records").iterdir()),
                                 "checkpoints": sorted(p.name for p in ckpts.iterdir()),
                                 "in force": named})
            finally:
                if original is not None:
                    runfolder.Rank0Checkpoint.save = original
        if rank == 0:
            Path(f"{out}/killed-files.json").write_text(json.dumps(seen))
        layout = _layout()
        if rank == 0:
            Path(f"{out}/layout.json").write_text(json.dumps(layout))
    finally:
        leave_process_group()


def _layout() -> dict:
    """Which modules shard_model_ makes FSDP units, and the error for a parameter shared
    between a block and the rest."""
    from torch import nn
    from torch.distributed.fsdp import FSDPModule

    from mixprec.distributed.fsdp import shard_model_
    from mixprec.experiments.models import CharTransformer
    model = shard_model_(CharTransformer(n_layer=2))
    units = [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    tied = nn.Module()
    tied.emb = nn.Embedding(10, 4)
    tied.blocks = nn.ModuleList([nn.Linear(4, 10)])
    tied.blocks[0].weight = tied.emb.weight
    try:
        shard_model_(tied)
        error = None
    except ValueError as e:
        error = str(e)
    return {"units": units, "tied": error}


@pytest.fixture(scope="module")
def compared(tmp_path_factory):
    d = tmp_path_factory.mktemp("shard")
    spawn_ranks(_worker, (str(d / "init"), str(d)), WORLD, init_file=str(d / "init"),
                timeout=110)
    return {name: json.loads((d / name / "results.json").read_text())
            for name in ("ddp", "fsdp", "killed")} | {
        "files": json.loads((d / "killed-files.json").read_text()), "dir": d,
        "layout": json.loads((d / "layout.json").read_text())}


def _record(doc: dict, spec: str) -> dict:
    (run,) = [r for r in doc["runs"] if r["recipe"]["spec"].split(":")[0] == spec]
    return run


def test_shard_records_say_they_were_sharded(compared):
    assert compared["fsdp"]["config"]["shard"] is True
    assert compared["ddp"]["config"]["shard"] is False
    for run in compared["fsdp"]["runs"]:
        assert run["status"] == "ok", run["error"]
        assert run["parallel"] == {"mode": "fsdp2", "world": WORLD}
    for run in compared["ddp"]["runs"]:
        assert run["parallel"] == {"mode": "ddp", "world": WORLD}


@pytest.mark.parametrize("spec", SAME_AS_DDP)
def test_shard_equals_ddp_bit_for_bit(compared, spec):
    """Two ranks, each its half of every global batch. DDP: each rank's gradient of its
    loss weighted x2, averaged. FSDP2: the engine divides the scaled loss by 2 and the
    reduce-scatter sums. Powers of two are exact and each layer rounds the whole
    (all-gathered) weight, so every value and history is the same, bit for bit."""
    fsdp, ddp = _record(compared["fsdp"], spec), _record(compared["ddp"], spec)
    differ = sorted(k for k in ddp if k not in TIMING | {"parallel"} and fsdp[k] != ddp[k])
    # saved act.: native bf16-mixed autocast keeps BF16 copies of the all-gathered FP32
    # weights for backward under FSDP2, where DDP's parameters are BF16 themselves
    allowed = ({"saved_activation_bytes", "saved_bytes_by_dtype", "saved_activation_ratio"}
               if fsdp["backend"] == "native" else set())
    assert set(differ) <= allowed, differ
    assert fsdp["loss_history"] == ddp["loss_history"] and len(fsdp["loss_history"]) == STEPS
    assert fsdp["grad_histograms"] == ddp["grad_histograms"]
    assert fsdp["metric"] == ddp["metric"] and fsdp["scale_history"] == ddp["scale_history"]


def test_shard_stochastic_rounding_draws_per_shard(compared):
    # fp8-e5m2: stochastic rounding (the FP16 masters to the model's weights, already at
    # set-up) draws from each rank's generator over its own shard, not from one stream
    # over the whole weight as under DDP, so even the first loss differs, slightly
    fsdp, ddp = _record(compared["fsdp"], "fp8-e5m2"), _record(compared["ddp"], "fp8-e5m2")
    assert fsdp["status"] == ddp["status"] == "ok"
    assert fsdp["loss_history"][0] != ddp["loss_history"][0]
    diff = max(abs(a - b) / b for a, b in zip(fsdp["loss_history"], ddp["loss_history"]))
    print(f"fp8-e5m2 FSDP2 vs DDP: max relative loss difference {diff:.3g}")
    assert diff < 0.05


def test_shard_killed_twice_resumes_to_the_uninterrupted_results(compared):
    first, second = compared["files"]
    # killed during fp8-hybrid (run 3) right after its checkpoint file at step 4 was
    # written, before the step-2 sharded save was removed: the file names the step-4 one
    assert first["records"] == ["seed0-0.json", "seed0-1.json", "seed0-2.json"]
    assert first["checkpoints"] == ["seed0-3.pt", "seed0-3.step2.dcp", "seed0-3.step4.dcp"]
    assert first["in force"] == "seed0-3.step4.dcp"
    # the resume continued run 3 from step 4, recorded it, then was killed in run 4
    assert second["records"][-1] == "seed0-3.json"
    assert second["checkpoints"] == ["seed0-4.pt", "seed0-4.step2.dcp"]
    assert second["in force"] == "seed0-4.step2.dcp"
    assert _numerics(compared["killed"]) == _numerics(compared["fsdp"])
    # every checkpoint file and sharded save is gone once the runs are recorded
    assert not list((compared["dir"] / "killed" / "checkpoints").iterdir())


def test_shard_model_shards_blocks_then_the_root(compared):
    # one FSDP unit per Transformer block, the embeddings, final norm and head with the root
    assert compared["layout"]["units"] == ["", "blocks.0", "blocks.1"]
    assert compared["layout"]["tied"] == (
        "cannot shard the model block by block: emb.weight and blocks.0.weight are one "
        "parameter in two groups; apply fully_shard yourself so that they share one")


def test_shard_needs_two_processes_and_resume_keeps_it(tmp_path, capsys):
    out = str(tmp_path / "x")
    small = ["compare", "--workload", "digits-mlp", "--recipes", "fp32", "--steps", "2",
             "--quiet", "--out", out]
    assert main([*small, "--shard"]) == 2
    err = capsys.readouterr().err
    assert "--shard (FSDP2, fully_shard) needs at least 2 processes" in err
    assert "got 1 process" in err and "Traceback" not in err
    assert main([*small, "--shard", "--nproc", "1"]) == 2
    assert "needs at least 2 processes" in capsys.readouterr().err
    with pytest.raises(ValueError, match="shard=True .* needs at least 2 data-parallel "
                                         "processes, got nproc=1"):
        CompareConfig(shard=True)
    assert main(small) == 0
    capsys.readouterr()
    assert main(["compare", "--resume", out, "--shard", "--quiet"]) == 2
    assert "conflict with the saved configuration: shard True (saved: False)" in \
        capsys.readouterr().err


def test_compare_nproc_2_shard_killed_with_sigkill_resumes(compared, tmp_path, capfd):
    """The command line: `mixprec compare --nproc 2 --shard`, its process group killed
    with SIGKILL (the launcher and both ranks) once a sharded checkpoint exists, then
    `--resume`: the same results as the uninterrupted comparison."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    argv = ["compare", "--workload", "digits-mlp", "--recipes", RECIPES, "--steps", str(STEPS),
            "--batch-size", "32", "--nproc", "2", "--shard", "--dist-timeout", "60",
            "--checkpoint-every", str(EVERY), "--out", str(out), "--quiet"]
    proc = subprocess.Popen([sys.executable, "-m", "mixprec", *argv], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 90
    try:
        while (proc.poll() is None and time.monotonic() < deadline
               and not list(out.glob("checkpoints/seed0-[1-9].pt"))):
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-3000:]
    assert not (out / "results.json").exists()
    # a checkpoint file is written once its sharded save is complete (usually the kill
    # finds one; when it came just as its run was recorded, the next run starts afresh)
    kept = list(out.glob("checkpoints/seed0-*.pt"))
    assert main(["compare", "--resume", str(out), "--dist-timeout", "60"]) == 0
    log = capfd.readouterr().err        # rank 0, a spawned process, writes the log
    assert "2 processes (FSDP2)" in log and "(resumed)" in log
    if kept:
        assert "continuing from the checkpoint at step" in log
    resumed = json.loads((out / "results.json").read_text())
    assert resumed["config"]["shard"] is True
    assert _numerics(resumed) == _numerics(compared["fsdp"])
