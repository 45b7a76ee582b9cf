"""``mixprec inspect``: train a few FP32 steps under a NumericsMonitor and print advice.

Runs a built-in workload (default: digits-cnn, a small batch-norm CNN on scikit-learn's
bundled 8x8 digits) or your own: ``--model pkg.mod:factory`` returns an ``nn.Module``,
``--data pkg.mod:factory`` a :class:`mixprec.experiments.data.Dataset`. The model trains
in FP32 with Adam or SGD while the monitor records every layer's activations, weights,
gradients and updates; then the table of underflow/overflow fractions per format and
the advice (loss scale, master weights, layers to keep in higher precision) are printed.

``--coverage RECIPE`` adds a section: one forward and backward of the same model under
RECIPE, and the coverage report of its matmul-like calls -- which were emulated and in
which formats, which ran in high precision and why (kept by a rule, an FP32 op, or not
recognised), by op and module (:mod:`mixprec.coverage`).
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

import torch

from mixprec.experiments.data import iterate_batches
from mixprec.experiments.train import task_loss
from mixprec.experiments.workloads import DEFAULT_WORKLOAD, WORKLOADS, resolve_workload
from mixprec.formats import get_format
from mixprec.monitor import NumericsMonitor
from mixprec.recipe import get_recipe

__all__ = ["add_inspect_parser", "run_inspect"]

_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
_DEFAULT_FORMATS = "fp16,bf16,e5m2,e4m3"


def _split_formats(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    if not names:
        raise ValueError(f"--formats {text!r} names no format; e.g. '{_DEFAULT_FORMATS}'")
    return tuple(get_format(n).name for n in names)     # ValueError naming the valid forms


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "inspect", help="train a few FP32 steps and report which tensors a format would lose",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", "--task", dest="workload", default=DEFAULT_WORKLOAD,
                   choices=list(WORKLOADS), help="built-in model and data (default: %(default)s)")
    p.add_argument("--model", metavar="PKG.MOD:FACTORY", help="your model factory")
    p.add_argument("--data", metavar="PKG.MOD:FACTORY", help="your data factory (a Dataset)")
    p.add_argument("--steps", type=int, default=20, help="FP32 training steps to watch (default 20)")
    p.add_argument("--every", type=int, default=1, help="record one step in N (default 1)")
    p.add_argument("--optimizer", choices=sorted(_OPTIMIZERS), default="adam")
    p.add_argument("--lr", type=float, help="learning rate (default: the workload's)")
    p.add_argument("--batch-size", type=int, help="default: the workload's")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 keeps torch's default (default: 1)")
    p.add_argument("--formats", default=_DEFAULT_FORMATS,
                   help="comma-separated formats (default: %(default)s)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="loss scale S applied to gradients before the cast (default 1)")
    p.add_argument("--advise", metavar="FORMAT", help="format to advise on (default: the first of --formats)")
    p.add_argument("--coverage", metavar="RECIPE",
                   help="also run one forward+backward under RECIPE and print which "
                        "matmul-like calls were emulated, in which formats, and why not")
    p.add_argument("--json", metavar="PATH", help="also write the report and advice as JSON")
    p.set_defaults(func=run_inspect)
    return p


def _watch(args: argparse.Namespace, formats: tuple[str, ...]) -> NumericsMonitor:
    """Train ``args.steps`` FP32 steps with a monitor attached; return the monitor."""
    work = resolve_workload(args.workload, model=args.model, data=args.data)
    torch.manual_seed(args.seed)
    data = work.make_data()
    model = work.make_model()
    optimizer = _OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr or work.lr)
    batches = iterate_batches(data.x_train, data.y_train, args.batch_size or work.batch_size,
                              seed=args.seed)
    mon = NumericsMonitor(model, formats=formats, every=args.every)
    mon.set_scale(args.scale)
    model.train()
    with mon:
        for _, (x, y) in zip(range(args.steps), batches):
            optimizer.zero_grad(set_to_none=True)
            task_loss(data.task, model(x), y).backward()
            mon.snapshot_weights()
            optimizer.step()
            mon.record_optimizer_state(optimizer)
            mon.record_updates()
    return mon


def coverage_of(args: argparse.Namespace, recipe: str):
    """The coverage report of one forward and backward of the workload's model (built
    under ``args.seed``) on its first training batch, under ``recipe``."""
    from mixprec.engine import prepare      # the engine sits above the monitor
    work = resolve_workload(args.workload, model=args.model, data=args.data)
    torch.manual_seed(args.seed)
    data = work.make_data()
    model = work.make_model()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), recipe, seed=args.seed,
                 backend="emulated")
    x, y = next(iter(iterate_batches(data.x_train, data.y_train,
                                     args.batch_size or work.batch_size, seed=args.seed)))
    model.train()
    with mp.autocast():
        loss = task_loss(data.task, model(x), y)
    mp.backward(loss)
    return mp.coverage()


def run_inspect(args: argparse.Namespace) -> int:
    """Watch FP32 training, print the summary table and the advice; 0 on success."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    formats = _split_formats(args.formats)
    advise: Optional[str] = get_format(args.advise).name if args.advise else formats[0]
    if advise not in formats:
        raise ValueError(f"--advise {args.advise!r} is not among --formats; valid choices: "
                         f"{', '.join(formats)}")
    threads = torch.get_num_threads()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.coverage:
        get_recipe(args.coverage)      # a bad recipe fails before the FP32 steps
    try:
        mon = _watch(args, formats)
        coverage = coverage_of(args, args.coverage) if args.coverage else None
    finally:
        torch.set_num_threads(threads)
    advice = mon.advice(advise)
    print(mon.summary())
    print()
    print(advice["text"])
    if coverage is not None:
        print(f"\nCoverage under {args.coverage} (one forward and backward):")
        print(coverage)
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        doc = {"config": config, "report": mon.report(), "advice": advice}
        if coverage is not None:
            doc["coverage"] = coverage.to_dict()
        with open(args.json, "w") as fh:
            json.dump(doc, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0
