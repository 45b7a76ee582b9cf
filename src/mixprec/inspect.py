"""``mixprec inspect``: train a few FP32 steps under a NumericsMonitor and print advice.

The default workload is a small batch-norm CNN on scikit-learn's bundled 8x8 digits;
``--model pkg.mod:factory --data pkg.mod:factory`` inspects your own model instead
(the model factory returns an ``nn.Module``, the data factory an iterable of
``(inputs, targets)`` batches, cycled as long as needed).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from typing import Callable, Iterable, Iterator

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.formats import get_format
from mixprec.monitor import NumericsMonitor

__all__ = ["add_inspect_parser", "run_inspect", "load_factory", "digits_cnn", "digits_batches",
           "WORKLOADS"]

_SPEC_FORM = "'package.module:factory'"
_LOSSES = {"cross_entropy": F.cross_entropy, "mse": F.mse_loss}
_OPTIMIZERS = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def digits_cnn(num_classes: int = 10) -> nn.Module:
    """Conv-BN-ReLU x2, max-pool, linear: about 8K parameters for 1x8x8 inputs."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 4 * 4, num_classes))


def digits_batches(batch_size: int = 64, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Shuffled batches of load_digits: images scaled to [0, 1], shape (B, 1, 8, 8)."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:   # an optional dependency ("experiments" extra)
        raise ValueError("the digits workload needs scikit-learn: pip install 'mixprec[experiments]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    return [(x[i], y[i]) for i in order.split(batch_size)]


WORKLOADS: dict[str, tuple[Callable[[], nn.Module], Callable[..., Iterable]]] = {
    "digits-cnn": (digits_cnn, digits_batches),
}


def load_factory(spec: str) -> Callable:
    """Import ``package.module:factory``; the working directory is importable, as for ``python -m``."""
    module_name, sep, attr = spec.partition(":")
    if not (sep and module_name and attr):
        raise ValueError(f"bad factory spec {spec!r}; expected the form {_SPEC_FORM}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load {spec!r} ({e}); expected the form {_SPEC_FORM}") from e
    if not callable(factory):
        raise ValueError(f"{spec!r} is not callable; expected the form {_SPEC_FORM} naming a function")
    return factory


def _cycle(data: Iterable) -> Iterator:
    """Repeat an iterable (a DataLoader is iterated afresh each pass)."""
    while True:
        empty = True
        for batch in data:
            empty = False
            yield batch
        if empty:
            raise ValueError("the data factory returned no batches")


def _split_formats(text: str) -> tuple[str, ...]:
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    for n in names:
        get_format(n)                     # ValueError naming the valid forms
    if not names:
        raise ValueError(f"--formats {text!r} names no format; e.g. 'fp16,bf16,e5m2,e4m3'")
    return names


def add_inspect_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``inspect`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "inspect", help="train a few FP32 steps and report which tensors a format would lose",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="digits-cnn",
                   help="built-in model and data (default: digits-cnn)")
    p.add_argument("--model", metavar="PKG.MOD:FACTORY", help="your model factory (needs --data)")
    p.add_argument("--data", metavar="PKG.MOD:FACTORY", help="your data factory: iterable of (x, y) batches")
    p.add_argument("--loss", choices=sorted(_LOSSES), default="cross_entropy")
    p.add_argument("--steps", type=int, default=20, help="FP32 training steps to watch (default 20)")
    p.add_argument("--every", type=int, default=1, help="record one step in N (default 1)")
    p.add_argument("--optimizer", choices=sorted(_OPTIMIZERS), default="adam")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch-size", type=int, default=64, help="built-in workload batch size")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--formats", default="fp16,bf16,e5m2,e4m3", help="comma-separated formats")
    p.add_argument("--scale", type=float, default=1.0,
                   help="loss scale S applied to gradients before the cast (default 1)")
    p.add_argument("--advise", metavar="FORMAT", help="format to advise on (default: the first of --formats)")
    p.add_argument("--json", metavar="PATH", help="also write the report and advice as JSON")
    p.set_defaults(func=run_inspect)
    return p


def _workload(args: argparse.Namespace) -> tuple[nn.Module, Iterable]:
    if args.model and not args.data:
        raise ValueError("--model needs --data (a factory returning (inputs, targets) batches)")
    make_model, make_data = WORKLOADS[args.workload]
    model = load_factory(args.model)() if args.model else make_model()
    data = load_factory(args.data)() if args.data else make_data(args.batch_size, args.seed)
    if not isinstance(model, nn.Module):
        raise ValueError(f"--model factory {args.model!r} returned {type(model).__name__}, not an nn.Module")
    return model, data


def run_inspect(args: argparse.Namespace) -> int:
    """Train ``args.steps`` FP32 steps with the monitor attached; print summary and advice."""
    if args.steps < 1:
        raise ValueError(f"--steps must be at least 1, got {args.steps}")
    formats = _split_formats(args.formats)
    advise = get_format(args.advise or formats[0])
    if advise not in [get_format(n) for n in formats]:
        raise ValueError(f"--advise {args.advise!r} is not among --formats; valid choices: {', '.join(formats)}")
    torch.manual_seed(args.seed)
    model, data = _workload(args)
    optimizer = _OPTIMIZERS[args.optimizer](model.parameters(), lr=args.lr)
    loss_fn = _LOSSES[args.loss]
    mon = NumericsMonitor(model, formats=formats, every=args.every)
    mon.set_scale(args.scale)
    model.train()
    with mon:
        for _, (x, y) in zip(range(args.steps), _cycle(data)):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(x), y)
            loss.backward()
            mon.snapshot_weights()
            optimizer.step()
            mon.record_updates()
    advice = mon.advice(advise)
    print(mon.summary())
    print()
    print(advice["text"])
    if args.json:
        config = {k: v for k, v in vars(args).items() if k != "func"}
        with open(args.json, "w") as fh:
            json.dump({"config": config, "report": mon.report(), "advice": advice}, fh, indent=1)
        print(f"\nwrote {args.json}")
    return 0
