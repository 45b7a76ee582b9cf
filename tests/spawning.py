"""Spawn the ranks of a distributed test with a deadline.

``torch.multiprocessing.spawn(..., join=True)`` waits forever for a rank that hangs (a
collective whose peer already left, a deadlock at start-up), which would stall the whole
suite. :func:`spawn_ranks` joins with a deadline instead: past it the ranks still alive
are killed and the attempt fails, naming them. Gloo ranks on a loaded 2-core machine
have been seen to hang or fail rarely and irreproducibly (cause not found), so a failed
attempt is retried once from a fresh rendezvous file; a second failure fails the test.
"""
from __future__ import annotations

import os
import time
import warnings

import pytest
import torch.multiprocessing as mp


def _attempt(fn, args: tuple, nprocs: int, timeout: float) -> None:
    ctx = mp.spawn(fn, args=args, nprocs=nprocs, join=False)
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):   # raises if a rank failed
        if time.monotonic() > deadline:
            alive = [rank for rank, p in enumerate(ctx.processes) if p.is_alive()]
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            for p in ctx.processes:
                p.join(5)
            pytest.fail(f"ranks {alive} of {nprocs} still running after {timeout:.0f} s: "
                        f"a rank hangs", pytrace=False)


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
