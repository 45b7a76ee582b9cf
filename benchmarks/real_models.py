"""Real models under every preset: final loss and step time against FP32.

Models: tiny random-init GPT-2, Llama and ResNet (BatchNorm) from transformers configs
(:mod:`mixprec.experiments.hf`), the same initial weights for every preset. Data: four
fixed random batches, cycled (so the loss can fall), and at step i the global seed i, so
that every preset draws the same dropout masks (GPT-2). Optimizer: AdamW, lr 1e-3.
Per model and preset, after ``--steps`` steps:

* final loss: the mean loss of the last four steps (one pass over the four batches),
  and its ratio to FP32's;
* step time: median CPU time of this process per step (forward under the recipe,
  backward, step, zero_grad; step 0 excluded), as a ratio to FP32's in the same run;
  the presets of one model are interleaved step by step, so load from other processes
  spreads over all of them;
* coverage: matmul-like calls of step 0 emulated / kept in high precision by a rule /
  FP32 ops / not recognised, from ``mp.coverage()`` ("-" where the engine has no
  coverage report, and under the native backend, which leaves precision to autocast).

A preset that fails prints the error in its row. One intra-op thread (``--threads``).

    python benchmarks/real_models.py [--steps 30] [--quick] [--models gpt2,llama]
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Optional, Sequence

import torch

import mixprec
from mixprec.experiments.hf import TINY_MODELS, tiny_batch, tiny_model

N_BATCHES = 4


class Run:
    """One model under one preset, stepped one step at a time."""

    def __init__(self, name: str, preset: str, initial: dict):
        torch.manual_seed(0)
        self.model = tiny_model(name).train()
        self.model.load_state_dict(initial)
        opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.preset, self.error = preset, None
        self.losses: list = []
        self.times: list = []
        self.coverage = None      # mp.coverage() of step 0, where the engine reports it
        try:
            self.mp = mixprec.prepare(self.model, opt, preset, seed=0)
        except Exception as e:  # noqa: BLE001 -- a preset that cannot start is a result
            self.error = f"{type(e).__name__}: {e}"

    def step(self, batch: dict) -> None:
        if self.error is not None:
            return
        c0 = time.process_time()
        try:
            with self.mp.autocast():
                loss = self.model(**batch).loss
            self.mp.backward(loss)
            self.mp.step()
            self.mp.zero_grad()
        except Exception as e:  # noqa: BLE001
            self.error = f"{type(e).__name__}: {str(e).splitlines()[0][:60]}"
            return
        self.times.append(time.process_time() - c0)
        self.losses.append(float(loss.detach()))
        report = getattr(self.mp, "coverage", None)
        if report is not None and len(self.losses) == 1 and self.mp.backend != "native":
            self.coverage = report()

    @property
    def final_loss(self) -> Optional[float]:
        tail = self.losses[-N_BATCHES:]
        return statistics.fmean(tail) if tail and self.error is None else None

    @property
    def step_time(self) -> Optional[float]:
        t = self.times[1:] or self.times
        return statistics.median(t) if t and self.error is None else None


def coverage_counts(run: Run) -> str:
    """emulated/kept/fp32/unrecognised calls of step 0, from ``mp.coverage()`` where the
    engine has it ("-" otherwise, and under the native backend, which records nothing)."""
    cov = run.coverage
    if cov is None or run.error is not None:
        return "-"
    c = cov.counts()
    return "/".join(str(c.get(k, 0)) for k in ("emulated", "kept", "fp32", "unrecognised"))


def bench_model(name: str, presets: Sequence[str], steps: int) -> list:
    torch.manual_seed(0)
    initial = {k: v.clone() for k, v in tiny_model(name).state_dict().items()}
    gen = torch.Generator().manual_seed(0)
    batches = [tiny_batch(name, gen) for _ in range(N_BATCHES)]
    runs = [Run(name, p, initial) for p in presets]
    for i in range(steps):
        for run in runs:            # interleaved: load spreads over every preset
            torch.manual_seed(i)    # the same dropout masks (GPT-2) for every preset
            run.step(batches[i % N_BATCHES])
    return runs


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    if a is None or b is None or not math.isfinite(a) or b == 0:
        return "-"
    return f"{a / b:.3f}x"


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quick", action="store_true", help="3 steps (a smoke run for the tests)")
    ap.add_argument("--models", default=",".join(TINY_MODELS),
                    help=f"comma list of {', '.join(TINY_MODELS)}")
    ap.add_argument("--presets", default=",".join(mixprec.list_presets()))
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    steps = 3 if args.quick else args.steps
    if steps < 2:
        raise SystemExit(f"--steps must be at least 2, got {steps}")
    models = [m for m in args.models.split(",") if m]
    presets = [p for p in args.presets.split(",") if p]
    if "fp32" in presets:
        presets.remove("fp32")
    presets.insert(0, "fp32")                 # the reference of every ratio
    torch.set_num_threads(args.threads)
    header = ("model", "preset", "final loss", "vs fp32", "step ms", "time vs fp32",
              "emulated/kept/fp32/unrecognised", "error")
    rows = []
    for name in models:
        runs = bench_model(name, presets, steps)
        base = runs[0]
        for run in runs:
            loss, t = run.final_loss, run.step_time
            rows.append((name, run.preset,
                         "failed" if run.error else f"{loss:.4f}",
                         _ratio(loss, base.final_loss),
                         "-" if t is None else f"{1e3 * t:.1f}",
                         _ratio(t, base.step_time), coverage_counts(run), run.error or ""))
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    print(f"{steps} AdamW steps (lr 1e-3) on {N_BATCHES} fixed batches; final loss = mean of "
          f"the last {N_BATCHES}; step time = median CPU time, {args.threads} thread(s)")
    for r in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
