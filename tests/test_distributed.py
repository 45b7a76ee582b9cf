"""Cross-rank reductions on two CPU processes (gloo), and the single-process identity."""
import datetime
import math
import os

import time

import pytest

from spawning import leave_process_group, spawn_ranks
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mixprec.distributed import all_reduce_amax_, all_reduce_found_inf, is_distributed
from mixprec.loss_scale import DynamicLossScale, unscale_grads_

NAN, INF = math.nan, math.inf

# Per-rank amax; the expected result is the element-wise max, NaN wherever any rank has
# NaN -- on rank 0 only, on rank 1 only, and on both.
AMAX = {0: [1.0, NAN, 3.0, 0.0, INF, NAN], 1: [2.0, 5.0, NAN, 0.5, 1.0, NAN]}
EXPECTED_AMAX = [2.0, NAN, NAN, 0.5, INF, NAN]


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=120))
    try:
        res = {"is_distributed": is_distributed()}
        res["one_inf"] = all_reduce_found_inf(rank == 1)       # only rank 1 overflowed
        res["none_inf"] = all_reduce_found_inf(False)
        res["tensor_inf"] = all_reduce_found_inf(torch.tensor(float(rank == 0)))
        amax = torch.tensor(AMAX[rank])
        res["amax_same_object"] = all_reduce_amax_(amax) is amax
        res["amax"] = amax
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            res[f"amax_{dtype}"] = all_reduce_amax_(torch.tensor(AMAX[rank], dtype=dtype))
        grid = torch.tensor([[float(rank), 7.0], [-1.0, 9.0 - 8 * rank]])
        all_reduce_amax_(grid.t())                             # a non-contiguous view
        res["amax_2d"] = grid
        # A training step: rank 1's gradient overflows; both ranks must skip and agree.
        ls = DynamicLossScale(init_scale=1024.0, growth_interval=1)
        grads = [torch.full((3,), 1024.0), torch.tensor([INF if rank else 2048.0])]
        found = all_reduce_found_inf(unscale_grads_(grads, ls.scale))
        ls.update(found)
        res["skipped"], res["scale"] = ls.last_step_skipped, ls.scale
        torch.save(res, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        leave_process_group()


@pytest.mark.distributed
def test_two_ranks_agree_on_found_inf_and_amax(tmp_path):
    spawn_ranks(_worker, (2, str(tmp_path / "init"), str(tmp_path)), 2,
                init_file=str(tmp_path / "init"))
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    expected = torch.tensor(EXPECTED_AMAX)
    for res in results:
        assert res["is_distributed"]
        assert res["one_inf"] is True and res["none_inf"] is False and res["tensor_inf"] is True
        assert res["amax_same_object"]
        assert torch.equal(res["amax"].isnan(), expected.isnan())
        assert torch.equal(res["amax"].nan_to_num(), expected.nan_to_num())
        for dtype in (torch.float16, torch.bfloat16, torch.float64):
            got = res[f"amax_{dtype}"]
            assert got.dtype == dtype
            assert torch.equal(got.double().isnan(), expected.isnan())
            assert torch.equal(got.double().nan_to_num(), expected.double().nan_to_num())
        assert res["amax_2d"].tolist() == [[1.0, 7.0], [-1.0, 9.0]]
        assert res["skipped"] is True and res["scale"] == 512.0


def test_identity_when_not_distributed():
    assert not is_distributed()
    assert all_reduce_found_inf(True) is True and all_reduce_found_inf(False) is False
    assert all_reduce_found_inf(torch.tensor(0.0)) is False
    amax = torch.tensor([1.0, NAN])
    assert all_reduce_amax_(amax) is amax and amax[0] == 1.0 and amax[1].isnan()
    with pytest.raises(ValueError, match="floating-point tensor"):
        all_reduce_amax_(torch.tensor([1, 2]))


def _hanging_worker(rank: int) -> None:
    if rank == 1:
        time.sleep(120)


def test_a_hanging_rank_fails_the_test_instead_of_stalling_the_suite():
    # On a loaded machine a spawned rank can take longer than the 3 s deadline just to
    # start (import torch), so rank 0 may still be listed; its stack then says so.
    t0 = time.monotonic()
    with pytest.raises(pytest.fail.Exception,
                       match=r"ranks \[(0, )?1\] of 2 still running") as failed:
        spawn_ranks(_hanging_worker, (), 2, timeout=3, attempts=1)
    assert time.monotonic() - t0 < 60
    rank1 = str(failed.value).split("--- rank 1:")[1]
    assert "in _hanging_worker" in rank1 or "still starting up" in rank1
