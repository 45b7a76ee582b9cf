"""A small, deterministic training run for the training claims: an MLP on sklearn's
bundled 8x8 digits (1,797 images, nothing downloaded), trained through mixprec.prepare.

The loop is the engine's contract, top to bottom::

    with mp.autocast(): loss = cross_entropy(model(x), y)
    mp.backward(loss * loss_multiplier)     # multiplier < 1 shrinks every gradient
    mp.step(); mp.zero_grad()

``loss_multiplier`` builds a model "whose gradients sit below 2^-24": every gradient is
multiplied by it, and SGD's learning rate is divided by it, so the FP32 run is the same
run as without it while low-precision formats see tiny gradients.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["TrainConfig", "digits_split", "make_mlp", "train_digits", "init_grad_log2_median",
           "multiplier_for"]


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "fp32"
    steps: int = 300
    batch: int = 64
    lr: float = 0.1                 # SGD learning rate of the unmultiplied loss
    hidden: tuple = (64, 64, 64)
    loss_multiplier: float = 1.0
    seed: int = 0
    backend: Optional[str] = None   # None: the recipe's (auto)


@functools.lru_cache(maxsize=4)
def digits_split(seed: int) -> tuple:
    """(x_train, y_train, x_test, y_test): pixels / 16, a seeded 80/20 split."""
    from sklearn.datasets import load_digits
    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    return x[tr], y[tr], x[te], y[te]


def make_mlp(hidden: tuple, seed: int) -> nn.Sequential:
    """64 -> hidden... -> 10 with ReLU, initialised from ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sizes, layers = (64,) + tuple(hidden), []
        for a, b in zip(sizes[:-1], sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        layers.append(nn.Linear(sizes[-1], 10))
        return nn.Sequential(*layers)


def _batches(n: int, batch: int, steps: int, seed: int):
    """Index batches of a reshuffled-every-epoch order."""
    g = torch.Generator().manual_seed(seed + 1)
    perm, pos = torch.randperm(n, generator=g), 0
    for _ in range(steps):
        if pos + batch > n:
            perm, pos = torch.randperm(n, generator=g), 0
        yield perm[pos:pos + batch]
        pos += batch


def init_grad_log2_median(cfg: TrainConfig) -> float:
    """log2 of the median |weight gradient| of the FP32 model at initialisation (one batch,
    unmultiplied loss)."""
    x, y, _, _ = digits_split(cfg.seed)
    model = make_mlp(cfg.hidden, cfg.seed)
    idx = next(_batches(len(y), cfg.batch, 1, cfg.seed))
    F.cross_entropy(model(x[idx]), y[idx]).backward()
    g = torch.cat([p.grad.flatten() for p in model.parameters() if p.dim() > 1])
    return float(torch.log2(g[g != 0].abs().median()))


def multiplier_for(cfg: TrainConfig, target_log2: float) -> float:
    """The power of two that moves the median initial weight gradient to 2^target_log2."""
    return 2.0 ** round(target_log2 - init_grad_log2_median(cfg))


def _evaluate(model, mp, x, y) -> tuple:
    with torch.no_grad(), mp.autocast():
        logits = model(x)
    logits = logits.float()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(-1) == y).float().mean())


@functools.lru_cache(maxsize=64)
def train_digits(cfg: TrainConfig) -> dict:
    """Train and return final train loss / test accuracy, counters and per-step curves.

    Cached per configuration (runs are deterministic), so claims that share a baseline
    train it once; treat the result as read-only.
    """
    from ..engine import NonFiniteError, prepare
    x, y, x_test, y_test = digits_split(cfg.seed)
    model = make_mlp(cfg.hidden, cfg.seed)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.lr / cfg.loss_multiplier)
    mp = prepare(model, opt, cfg.recipe, backend=cfg.backend, seed=cfg.seed,
                 count_lost_updates=True)
    losses, zero_fracs, error = [], [], None
    weights = [p for p in model.parameters() if p.dim() > 1]
    try:
        for idx in _batches(len(y), cfg.batch, cfg.steps, cfg.seed):
            with mp.autocast():
                loss = F.cross_entropy(model(x[idx]), y[idx])
            mp.backward(loss * cfg.loss_multiplier)
            grads = [p.grad for p in weights if p.grad is not None]
            zeros = sum(int((g == 0).sum()) for g in grads)
            zero_fracs.append(zeros / max(sum(g.numel() for g in grads), 1))
            mp.step()
            mp.zero_grad()
            losses.append(float(loss.detach()))
    except NonFiniteError as exc:
        error = str(exc).splitlines()[0][:200]
    train_loss, _ = _evaluate(model, mp, x, y)
    test_loss, test_acc = _evaluate(model, mp, x_test, y_test)
    hist = mp.history
    return {
        "train_loss": train_loss, "test_loss": test_loss, "test_accuracy": test_acc,
        "steps": mp.steps, "skipped_steps": mp.skipped_steps,
        "zero_grad_fraction": sum(zero_fracs) / max(len(zero_fracs), 1),
        "lost_update_fraction": (sum(h["lost_updates"] for h in hist) / len(hist)) if hist else 0.0,
        "final_scale": mp.scale, "backend": mp.backend, "recipe": str(mp.recipe),
        "losses": losses, "scales": [h["scale"] for h in hist], "stopped": error,
        "finite": math.isfinite(train_loss),
    }


def smooth(values: list, points: int = 100) -> list:
    """Means of consecutive windows, at most ``points`` of them (for plots)."""
    if not values:
        return []
    w = max(1, len(values) // points)
    return [sum(values[i:i + w]) / len(values[i:i + w]) for i in range(0, len(values), w)]
