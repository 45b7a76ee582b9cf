"""Train one model under one recipe and return a JSON-ready record of what happened.

The loop is the engine's contract, read top to bottom::

    mp = prepare(model, optimizer, recipe, seed=seed)
    for x, y in batches:
        with mp.autocast():
            loss = loss_fn(model(x), y)
        mp.backward(loss)
        applied = mp.step()          # False when the step was skipped
        mp.zero_grad()

Measured along the way: the loss and loss scale of every step, skipped steps, the
step time (lower quartile), the bytes saved for backward in one step, the coverage
report of step 0 (which matmul-like calls were emulated, in which formats), and
log2-magnitude histograms of the weight gradients at a few points.  Nothing here branches on the recipe.
"""
from __future__ import annotations

import contextlib
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Optional

import torch
from torch import nn
from torch.nn import functional as F

from mixprec.recipe import Recipe, get_recipe

from .data import Dataset, Task, iterate_batches

__all__ = ["TrainConfig", "SavedTensorBytes", "grad_log2_histogram", "histogram_steps",
           "task_loss", "evaluate", "train_recipe", "finite_or_none"]


@dataclass(frozen=True)
class TrainConfig:
    """Settings shared by every recipe of a comparison (AdamW, constant learning rate)."""
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    seed: int = 0
    weight_decay: float = 0.0
    hist_points: int = 3          # gradient histograms at this many evenly spaced steps
    eval_batch_size: int = 512

    def __post_init__(self):
        for name in ("steps", "batch_size", "hist_points", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite number, got {self.lr}")


def finite_or_none(v: float) -> Optional[float]:
    """JSON has no inf/NaN: non-finite values are recorded as null."""
    v = float(v)
    return v if math.isfinite(v) else None


def task_loss(task: Task, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross entropy over examples (classification) or tokens (lm)."""
    if task is Task.LM:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
    return F.cross_entropy(logits, y)


class SavedTensorBytes:
    """Count the bytes autograd saves for backward inside the context, each storage once.

    Storages of the model's own parameters and buffers are left out, so the count is what
    the forward pass *adds*: activations, and any low-precision copies of the weights that
    a layer keeps for its backward.  ``by_dtype`` splits the count by storage dtype.

    >>> with SavedTensorBytes(model) as saved:
    ...     loss = model(x).sum()
    >>> saved.nbytes
    """

    def __init__(self, model: nn.Module):
        self._exclude = {self._key(t) for t in list(model.parameters()) + list(model.buffers())}
        self._seen: set = set()
        self.nbytes = 0
        self.by_dtype: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    @staticmethod
    def _key(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            return (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):   # tensors without a plain storage
            return (id(t), t.numel() * t.element_size())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self.nbytes += key[1]
            dtype = str(t.dtype).removeprefix("torch.")
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + key[1]
        return t

    def __enter__(self) -> "SavedTensorBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def grad_log2_histogram(grads: Iterable[torch.Tensor], *, scale: float = 1.0,
                        step: int = 0) -> dict:
    """Histogram of floor(log2 |g / scale|) over all finite non-zero gradient elements.

    ``counts[i]`` is the number of elements with 2^(binade_lo + i) <= |g| < 2^(binade_lo + i + 1);
    exact zeros and non-finite elements are counted apart.
    """
    flat = [g.detach().reshape(-1).to(torch.float64) for g in grads if g is not None]
    g = torch.cat(flat) / scale if flat else torch.zeros(0, dtype=torch.float64)
    finite = torch.isfinite(g)
    nonzero = g[finite & (g != 0)].abs()
    # frexp: |g| = m * 2^e with m in [0.5, 1), so floor(log2|g|) = e - 1 exactly
    binade = torch.frexp(nonzero).exponent.to(torch.int64) - 1
    lo = int(binade.min()) if len(binade) else 0
    counts = torch.bincount(binade - lo).tolist() if len(binade) else []
    return {"step": step, "binade_lo": lo, "counts": counts,
            "zeros": int((g[finite] == 0).sum()), "nonfinite": int((~finite).sum()),
            "total": int(g.numel())}


def histogram_steps(steps: int, points: int) -> list:
    """``points`` evenly spaced step indices from the first to the last step."""
    if points == 1 or steps == 1:
        return [steps - 1]
    return sorted({round(i * (steps - 1) / (points - 1)) for i in range(points)})


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, mp, *, batch_size: int = 512) -> tuple:
    """(metric, test loss) on the test split, the forward pass under the recipe.

    accuracy = mean(argmax(logits) == y); perplexity = exp(mean token cross entropy).
    """
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, 0, 0
    try:
        for x, y in zip(data.x_test.split(batch_size), data.y_test.split(batch_size)):
            with mp.autocast():
                logits = model(x)
                loss = task_loss(data.task, logits, y)
            n = y.numel()
            total_loss += float(loss) * n
            count += n
            if data.task is Task.CLASSIFICATION:
                correct += int((logits.argmax(dim=-1) == y).sum())
    finally:
        model.train(was_training)
    mean_loss = total_loss / count
    if data.task is Task.CLASSIFICATION:
        return correct / count, mean_loss
    return (math.exp(mean_loss) if mean_loss < 700 else math.inf), mean_loss


def _progress(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:          # optional: no bar without tqdm
        return None
    return tqdm(total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True)


def _default_prepare() -> Callable:
    # imported on first use: the data and model code stays usable without the engine
    from mixprec.engine import prepare
    return prepare


def train_recipe(model: nn.Module, data: Dataset, recipe, config: TrainConfig, *,
                 progress: bool = False, prepare: Optional[Callable] = None) -> dict:
    """Train ``model`` (modified in place) on ``data`` under ``recipe``; return its record.

    ``prepare`` builds the engine (default :func:`mixprec.engine.prepare`; any callable
    ``(model, optimizer, recipe, *, seed) -> Engine`` with the same interface).

    The record holds the loss / scale / skip history, the metric, timings, saved bytes
    and gradient histograms (see ``results.schema.json``, ``$defs/run``).  A run the
    engine aborts (e.g. too many consecutive skipped steps) is recorded with
    ``status="failed"`` and the error, not raised: where a recipe breaks is a result.
    """
    recipe = get_recipe(recipe)
    torch.manual_seed(config.seed)
    hist_at = set(histogram_steps(config.steps, config.hist_points))
    losses, scales, skipped_at, times, hists = [], [], [], [], []
    saved = SavedTensorBytes(model)
    record = {"status": "ok", "error": None, "backend": None, "lost_update_fraction": None,
              "coverage": None, "state_underflow": None}
    bar = _progress(config.steps, recipe.short_str(), progress)
    start = time.perf_counter()
    try:
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
        mp = (prepare or _default_prepare())(model, optimizer, recipe, seed=config.seed)
        record["backend"] = getattr(mp, "backend", None)
        model.train()
        batches = iterate_batches(data.x_train, data.y_train, config.batch_size, seed=config.seed)
        for step, (x, y) in zip(range(config.steps), batches):
            scale = float(mp.scale)
            t0 = time.perf_counter()
            with (saved if step == 0 else contextlib.nullcontext()):
                with mp.autocast():
                    loss = task_loss(data.task, model(x), y)
            mp.backward(loss)
            t1 = time.perf_counter()
            if step in hist_at:      # outside the timed region
                hists.append(grad_log2_histogram((p.grad for p in model.parameters()),
                                                 scale=scale, step=step))
            t2 = time.perf_counter()
            applied = mp.step()
            mp.zero_grad()
            t3 = time.perf_counter()
            if step == 0:
                record["coverage"] = _first_step_coverage(mp)
            times.append((t1 - t0) + (t3 - t2))
            losses.append(finite_or_none(loss.detach().float()))
            scales.append(scale)
            if not applied:
                skipped_at.append(step)
            if bar is not None:
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(loss=f"{losses[-1]:.3f}" if losses[-1] is not None else "nan")
        metric, test_loss = evaluate(model, data, mp, batch_size=config.eval_batch_size)
        final_scale = float(mp.scale)
        lost = [h["lost_updates"] for h in getattr(mp, "history", [])
                if h.get("lost_updates") is not None and not h.get("skipped")]
        record["lost_update_fraction"] = statistics.fmean(lost) if lost else None
        dead = [h["state_underflow"] for h in getattr(mp, "history", [])
                if h.get("state_underflow") is not None]
        record["state_underflow"] = max(dead) if dead else None
    except Exception as e:       # noqa: BLE001 -- the failure itself is the finding
        record.update(status="failed", error=f"{type(e).__name__}: {e}")
        metric, test_loss, final_scale = math.nan, math.nan, scales[-1] if scales else math.nan
    finally:
        if bar is not None:
            bar.close()
    tail = losses[-max(1, len(losses) // 10):]
    timed = sorted(times[1:] if len(times) > 2 else times)   # step 0 pays one-off set-up costs
    record.update({
        "recipe": {"name": recipe.short_str(), "preset": recipe.name, "spec": _spec(recipe)},
        "seed": config.seed,
        "steps_run": len(losses),
        "metric": {"name": data.metric, "value": finite_or_none(metric),
                   "higher_is_better": data.task is Task.CLASSIFICATION},
        "test_loss": finite_or_none(test_loss),
        "final_loss": (statistics.fmean(tail) if tail and None not in tail else None),
        "loss_history": losses,
        "scale_history": scales,
        "skipped_steps": len(skipped_at),
        "skipped_at": skipped_at,
        "final_scale": finite_or_none(final_scale),
        # lower quartile: on a shared CPU the slow tail is other processes' time
        "step_time_s": timed[len(timed) // 4] if timed else None,
        "saved_activation_bytes": saved.nbytes,
        "saved_bytes_by_dtype": dict(sorted(saved.by_dtype.items())),
        "grad_histograms": hists,
        "wall_time_s": time.perf_counter() - start,
        "config": {**asdict(config), "optimizer": "AdamW", "torch_version": torch.__version__},
    })
    return record


def _first_step_coverage(mp) -> Optional[dict]:
    """The engine's coverage report of step 0 (forward and backward) as a dict; None
    for engines without one and for the native backend (torch.autocast decides)."""
    coverage = getattr(mp, "coverage", None)
    if coverage is None or getattr(mp, "backend", None) != "emulated":
        return None
    return coverage().to_dict()


def _spec(recipe: Recipe) -> str:
    try:
        return str(recipe)
    except ValueError:          # a hand-built recipe whose name is not a preset
        return repr(recipe)
