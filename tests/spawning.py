"""Spawn the ranks of a distributed test with a deadline.

``torch.multiprocessing.spawn(..., join=True)`` waits forever for a rank that hangs (a
collective whose peer already left, a deadlock at start-up), which would stall the whole
suite. :func:`spawn_ranks` joins with a deadline instead: past it the ranks still alive
are killed and the attempt fails, naming them. Gloo ranks on a loaded 2-core machine
have been seen to hang or fail rarely and irreproducibly (cause not found), so a failed
attempt is retried once from a fresh rendezvous file; a second failure fails the test.
Before killing a hung rank, its Python stacks (every thread, by ``faulthandler`` on
SIGUSR1) are added to the failure message, so the retry warning says where it hung; a
rank with no stack was still starting (importing) at the deadline.

One cause of the hangs, found with gdb on a hung rank (torch 2.13): a worker returns
after ``destroy_process_group()``, and freeing its DDP model (or FSDP state) drops the
last reference to the gloo process group. ``~ProcessGroupGloo`` then joins its worker
threads while the main thread holds the GIL, and a worker thread still destroying its
last finished all-reduce needs the GIL to release that work's tensors: a deadlock, rare
and timing-dependent. Workers therefore end with :func:`leave_process_group`, which
keeps the group object alive, and :func:`spawn_ranks` ends each rank that returns with
``os._exit(0)``, so the destructor never runs.
"""
from __future__ import annotations

import faulthandler
import os
import signal
import sys
import tempfile
import time
import warnings

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

# process groups left by leave_process_group(), never destroyed (see module docstring)
_LEFT: list = []


def leave_process_group() -> None:
    """``dist.destroy_process_group()``, but the group object stays referenced here, so
    freeing the rank's DDP/FSDP objects never runs the gloo destructor; the rank then
    ends with ``os._exit`` (:func:`spawn_ranks`)."""
    if dist.is_initialized():
        _LEFT.append(dist.group.WORLD)
        dist.destroy_process_group()


def _rank_main(rank: int, fn, stack_dir: str, *args) -> None:
    """Run ``fn(rank, *args)`` with the rank's stacks dumped to a file on SIGUSR1; on
    return, exit at once (``os._exit(0)``)."""
    with open(os.path.join(stack_dir, f"rank{rank}.txt"), "w") as f:
        faulthandler.register(signal.SIGUSR1, file=f, all_threads=True)
        fn(rank, *args)
    # no interpreter teardown: it would destroy the groups kept by leave_process_group
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _stacks(ctx, alive: list, stack_dir: str) -> str:
    for rank in alive:
        os.kill(ctx.processes[rank].pid, signal.SIGUSR1)
    time.sleep(2.0)
    out = []
    for rank in alive:
        with open(os.path.join(stack_dir, f"rank{rank}.txt")) as f:
            text = f.read().strip()
        out.append(f"--- rank {rank}:\n" + (text[-3000:] if text else
                                              "(no stack: still starting up)"))
    return "\n".join(out)


def _attempt(fn, args: tuple, nprocs: int, timeout: float) -> None:
    with tempfile.TemporaryDirectory(prefix="ranks-") as stack_dir:
        for rank in range(nprocs):
            open(os.path.join(stack_dir, f"rank{rank}.txt"), "w").close()
        ctx = mp.spawn(_rank_main, args=(fn, stack_dir) + tuple(args), nprocs=nprocs,
                       join=False)
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):   # raises if a rank failed
            if time.monotonic() > deadline:
                alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
                stacks = _stacks(ctx, alive, stack_dir)
                for p in ctx.processes:
                    if p.is_alive():
                        p.kill()
                for p in ctx.processes:
                    p.join(5)
                pytest.fail(f"ranks {alive} of {nprocs} still running after {timeout:.0f} s: "
                            f"a rank hangs\n{stacks}", pytrace=False)


def spawn_ranks(fn, args: tuple, nprocs: int, *, timeout: float = 150.0, attempts: int = 2,
                init_file: str = None) -> None:
    for attempt in range(1, attempts + 1):
        if init_file is not None and os.path.exists(init_file):
            os.remove(init_file)
        try:
            _attempt(fn, args, nprocs, timeout)
            return
        except (pytest.fail.Exception, mp.ProcessRaisedException,
                mp.ProcessExitedException) as e:
            if attempt == attempts:
                raise
            warnings.warn(f"distributed attempt {attempt} failed, retrying once: {e}")
