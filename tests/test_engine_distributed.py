"""Data-parallel training: every rank skips the same steps and the weights stay equal, and
draws the same Hadamard signs under hadamard.signs=redraw."""
import datetime
import os

import pytest

from spawning import leave_process_group, spawn_ranks
import torch
import torch.distributed as dist
import torch.multiprocessing as mp_
import torch.nn.functional as F
from torch import nn

from mixprec.engine import prepare

pytestmark = pytest.mark.distributed

WORLD = 2
STEPS = 4
INJECT_AT = 2            # rank 1 puts an inf into one gradient at this step


def _worker(rank: int, init_file: str, out_dir: str) -> None:
    # Spawned, not forked (a fork of a process with running torch threads can deadlock),
    # rendezvous through a file (no port to race for), and a timeout rather than a hang.
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        ddp = nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.Adam(ddp.parameters(), lr=1e-2)
        engine = prepare(ddp, opt, "fp16-mixed", seed=7)
        applied = []
        for step in range(STEPS):
            g = torch.Generator().manual_seed(100 * step + rank)   # each rank its own data
            x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
            with engine.autocast():
                loss = F.cross_entropy(ddp(x), y)
            engine.backward(loss)        # DDP all-reduces the gradients here
            if rank == 1 and step == INJECT_AT:
                model[2].weight.grad[0, 0] = float("inf")   # after the all-reduce: rank 1 only
            applied.append(engine.step())
            engine.zero_grad()
        # hadamard.signs=redraw with another stochastic-rounding seed on each rank: the
        # signs come from hadamard.seed and the step count, the same on every rank
        torch.manual_seed(0)
        model2 = nn.Sequential(nn.Linear(8, 64), nn.ReLU(), nn.Linear(64, 4))
        ddp2 = nn.parallel.DistributedDataParallel(model2)
        engine2 = prepare(ddp2, torch.optim.Adam(ddp2.parameters(), lr=1e-2), "mxfp4-rht-sr",
                          seed=7 + rank)
        signs = []
        for step in range(2):
            signs.append(engine2.signs.current()[64].clone())
            g = torch.Generator().manual_seed(100 * step + rank)
            x, y = torch.randn(32, 8, generator=g), torch.randint(0, 4, (32,), generator=g)
            with engine2.autocast():
                loss = F.cross_entropy(ddp2(x), y)
            engine2.backward(loss)
            engine2.step()
            engine2.zero_grad()
        torch.save({"applied": applied, "scale": engine.scale, "history": engine.history,
                    "weights": {k: v.clone() for k, v in model.state_dict().items()},
                    "masters": [m.detach().clone() for m in engine.master_params],
                    "signs": signs + [engine2.signs.current()[64].clone()],
                    "signs_weights": {k: v.clone() for k, v in model2.state_dict().items()}},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_process_group()


def _run_ranks(worker, tmp_path, prefix: str) -> list:
    """Spawn the ranks of ``worker``; what each saved as ``{prefix}{rank}.pt``."""
    spawn_ranks(worker, (str(tmp_path / "init"), str(tmp_path)), WORLD,
                init_file=str(tmp_path / "init"))
    return [torch.load(tmp_path / f"{prefix}{r}.pt", weights_only=False) for r in range(WORLD)]


def test_ranks_skip_the_same_steps_and_stay_equal(tmp_path):
    r0, r1 = _run_ranks(_worker, tmp_path, "rank")
    expected = [step != INJECT_AT for step in range(STEPS)]
    assert r0["applied"] == expected and r1["applied"] == expected
    assert r0["scale"] == r1["scale"] == 2.0 ** 15
    assert r0["history"] == r1["history"]
    for k in r0["weights"]:
        assert torch.equal(r0["weights"][k], r1["weights"][k]), k
    for a, b in zip(r0["masters"], r1["masters"]):
        assert torch.equal(a, b)
    # hadamard.signs=redraw: both ranks drew the same signs at every step, fresh each step
    assert all(torch.equal(a, b) for a, b in zip(r0["signs"], r1["signs"]))
    assert not torch.equal(r0["signs"][0], r0["signs"][1])
    for k in r0["signs_weights"]:
        assert torch.equal(r0["signs_weights"][k], r1["signs_weights"][k]), k


class _HeadNet(nn.Module):
    """A body, and a head the training step applies outside the model's forward."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16))
        self.head = nn.Parameter(torch.randn(4, 16) * 0.3)

    def forward(self, x):
        return self.body(x)


def _scaler_table(engine) -> dict:
    states = {**engine._attached.states, "<outside>": engine.outside_state}
    return {f"{name}/{key}": (s.amax_history, s.scale.clone(), int(s._count))
            for name, st in states.items() for key, s in st.scalers.items()}


def _reserve_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=120))
    try:
        runs = {}
        for example in (False, True):
            model = _HeadNet()
            ddp = nn.parallel.DistributedDataParallel(model)
            g = torch.Generator().manual_seed(50 + rank)        # each rank its own data
            engine = prepare(ddp, torch.optim.SGD(ddp.parameters(), lr=0.1), "te-delayed",
                             seed=7, example_inputs=torch.randn(16, 8, generator=g)
                             if example else None)
            made = _scaler_table(engine)
            for step in range(2):
                g = torch.Generator().manual_seed(100 * step + rank)
                x, y = torch.randn(16, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
                with engine.autocast():
                    loss = F.cross_entropy(F.linear(ddp(x), model.head), y)
                engine.backward(loss)        # DDP all-reduces the gradients here
                engine.step()
                engine.zero_grad()
            runs[example] = {"made": made, "scalers": _scaler_table(engine),
                             "weights": {k: v.clone() for k, v in model.state_dict().items()}}
        torch.save(runs, os.path.join(out_dir, f"reserve{rank}.pt"))
    finally:
        leave_process_group()


def test_reserve_scalers_under_ddp_makes_every_scaler_and_changes_nothing(tmp_path):
    # prepare(ddp, ..., example_inputs=x) makes every delayed scaler (the layers' and
    # those of the head called outside the forward) with one forward under no_sync();
    # training is then bit-identical across ranks (amaxes are MAX-reduced, gradients
    # all-reduced) and to training without example_inputs, whose scalers come at first use
    r0, r1 = _run_ranks(_reserve_worker, tmp_path, "reserve")
    made = r0[True]["made"]
    gemm_keys = [f"module.body.{i}/{role}" for i in (0, 2)
                 for role in ("activation", "grad_output", "weight")]
    outside = [f"<outside>/{key}" for key in ("activation", "activation.rhs", "grad_output",
                                              "weight", "weight.rhs")]
    assert sorted(made) == sorted(gemm_keys + outside)
    assert all(count == 0 and float(scale) == 1.0 for _, scale, count in made.values())
    assert r0[False]["made"] == {}
    for runs in (r0, r1):
        used = {k: v for k, v in runs[True]["scalers"].items() if v[2] > 0}
        assert sorted(used) == sorted(runs[False]["scalers"])
        assert len(used) == 9 and all(v[2] == 2 for v in used.values())
    for a, b in ((r0[True], r1[True]), (r0[True], r0[False]), (r1[True], r1[False])):
        for k in b["scalers"]:
            assert torch.equal(a["scalers"][k][0], b["scalers"][k][0]), k
            assert torch.equal(a["scalers"][k][1], b["scalers"][k][1]), k
        for k in a["weights"]:
            assert torch.equal(a["weights"][k], b["weights"][k]), k
