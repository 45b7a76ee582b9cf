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

from mixprec.distributed.fsdp import is_fsdp, shard_model_
from mixprec.recipe import Recipe, get_recipe

from .data import Dataset, Task, iterate_batches
from .runfolder import Checkpoint

__all__ = ["TrainConfig", "SavedTensorBytes", "grad_log2_histogram", "histogram_steps",
           "task_loss", "evaluate", "train_recipe", "finite_or_none", "CheckpointWriteError",
           "CheckpointReadError"]


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

    Storages of the model's own parameters and buffers, and of the batch named with
    :meth:`holding`, are left out, so the count is what the forward pass *adds*:
    activations, and any low-precision copies of the weights or of the batch that a layer
    keeps for its backward.  Under FSDP2 the all-gathered parameters of the forward count
    as the model's own (they are the weights, whole, on every rank).  ``by_dtype`` splits
    the count by storage dtype.

    >>> with SavedTensorBytes(model).holding(x) as saved:
    ...     loss = model(x).sum()
    >>> saved.nbytes
    """

    def __init__(self, model: nn.Module):
        self._model = model
        self._exclude: set = set()
        self._seen: set = set()
        self._sharded = False
        self.nbytes = 0
        self.by_dtype: dict = {}
        self._held: tuple = ()
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def holding(self, *batch: torch.Tensor) -> "SavedTensorBytes":
        """Leave out the storages of ``batch`` (the tensors the training loop passes in
        and holds through the step) in the next ``with`` block; returns self."""
        self._held = batch
        return self

    @staticmethod
    def _key(t: torch.Tensor):
        try:
            st = t.untyped_storage()
            return (st.data_ptr(), st.nbytes())
        except (RuntimeError, NotImplementedError):   # tensors without a plain storage
            return (id(t), t.numel() * t.element_size())

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        key = self._key(t)
        if self._sharded and key not in self._seen:
            # FSDP2: the all-gathered parameters registered for this forward are weights
            self._exclude |= {self._key(p) for p in self._model.parameters()}
        if key not in self._seen and key not in self._exclude:
            self._seen.add(key)
            self.nbytes += key[1]
            dtype = str(t.dtype).removeprefix("torch.")
            self.by_dtype[dtype] = self.by_dtype.get(dtype, 0) + key[1]
        return t

    def __enter__(self) -> "SavedTensorBytes":
        # the storages as they are now: set-up (a native recipe converting parameter
        # dtypes) frees the old ones, whose addresses new tensors may then reuse
        model = self._model
        self._exclude = {self._key(t) for t in
                         list(model.parameters()) + list(model.buffers()) + list(self._held)}
        self._sharded = is_fsdp(model)
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)
        self._held = ()


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
                 progress: bool = False, prepare: Optional[Callable] = None,
                 checkpoint: Optional[Checkpoint] = None, data_parallel: bool = False,
                 shard: bool = False) -> dict:
    """Train ``model`` (modified in place) on ``data`` under ``recipe``; return its record.

    ``prepare`` builds the engine (default :func:`mixprec.engine.prepare`; any callable
    ``(model, optimizer, recipe, *, seed) -> Engine`` with the same interface).

    The record holds the loss / scale / skip history, the metric, timings, saved bytes
    and gradient histograms (see ``results.schema.json``, ``$defs/run``).  A run the
    engine aborts (e.g. too many consecutive skipped steps) is recorded with
    ``status="failed"`` and the error, not raised: where a recipe breaks is a result.

    ``checkpoint``: saved after every ``checkpoint.every`` steps (engine, model,
    optimizer, global RNG, position in the data order and the record so far); when it
    holds a saved state, training continues from there, and the record equals an
    uninterrupted run's bit for bit (timings aside).

    ``data_parallel``: run under torch.distributed with DistributedDataParallel (the
    process group must be initialised).  Every rank sees the same global batches and
    trains on its contiguous slice of each; the local loss is weighted by
    n_local * world / n_global, so DDP's gradient average is the gradient of the mean
    loss over the global batch, as in one process (up to the order of the sums).  The
    recorded loss is that global mean.  At the end the ranks' weights are compared
    bit for bit: a mismatch fails the run.

    ``shard``: with ``data_parallel``, shard the model with FSDP2 instead of DDP
    (:func:`mixprec.distributed.fsdp.shard_model_`, before ``prepare``).  The engine
    divides the loss by the world size and FSDP sums the gradient shards, which is
    DDP's average; master weights and optimizer state are DTensor shards, so each
    rank holds a different part of the model and there is nothing to compare at the
    end.  Gradient histograms are of the full gradients.  Checkpoints go through
    torch.distributed.checkpoint (:class:`mixprec.distributed.checkpoint.EngineState`,
    every rank writing its shards); on resume the engine is prepared with the batch
    of the step it continues from as ``example_inputs`` (keep rules that wait for a
    forward are resolved before the checkpoint loads into it), so a custom
    ``prepare`` must accept that keyword.
    """
    recipe = get_recipe(recipe)
    if shard and not data_parallel:
        raise ValueError("shard=True (FSDP2) needs data_parallel=True and an initialised "
                         "process group")
    torch.manual_seed(config.seed)
    hist_at = set(histogram_steps(config.steps, config.hist_points))
    losses, scales, skipped_at, times, hists = [], [], [], [], []
    saved = SavedTensorBytes(model)
    record = {"status": "ok", "error": None, "backend": None, "lost_update_fraction": None,
              "coverage": None, "state_underflow": None}
    # read before training: an unreadable checkpoint is an error of the run folder, not a
    # finding about the recipe
    resume = checkpoint.load() if checkpoint is not None else None
    first = 0 if resume is None else int(resume["step"])
    bar = _progress(config.steps, recipe.short_str(), progress)
    if bar is not None and first:
        bar.update(first)
    start = time.perf_counter() - (0.0 if resume is None else float(resume["wall_time_s"]))
    try:
        if shard:        # sharded before prepare: masters are made from the shards
            shard_model_(model)
        optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr,
                                      weight_decay=config.weight_decay)
        make_engine = prepare or _default_prepare()
        if shard and resume is not None:
            # DCP loads into the engine's tensors: its kept layers must be known before
            x, _ = next(iterate_batches(data.x_train, data.y_train, config.batch_size,
                                        seed=config.seed, start=first))
            mp = make_engine(model, optimizer, recipe, seed=config.seed,
                             example_inputs=_local_rows(x))
        else:
            mp = make_engine(model, optimizer, recipe, seed=config.seed)
        record["backend"] = getattr(mp, "backend", None)
        # DDP wraps after prepare: the native backend converts parameter dtypes first
        net = (nn.parallel.DistributedDataParallel(model) if data_parallel and not shard
               else model)
        if resume is not None:
            if shard:
                _load_sharded_checkpoint(checkpoint, resume, mp)
            else:
                model.load_state_dict(resume["model"])
                mp.load_state_dict(resume["engine"])
            torch.set_rng_state(resume["torch_rng"])
            losses, scales, skipped_at, times, hists = (
                list(resume[k]) for k in ("losses", "scales", "skipped_at", "times", "hists"))
            record["coverage"] = resume["coverage"]
            saved.nbytes, saved.by_dtype = resume["saved_bytes"], dict(resume["saved_by_dtype"])
        model.train()
        batches = iterate_batches(data.x_train, data.y_train, config.batch_size,
                                  seed=config.seed, start=first)
        for step, (x, y) in zip(range(first, config.steps), batches):
            scale = float(mp.scale)
            t0 = time.perf_counter()
            with (saved.holding(x, y) if step == 0 else contextlib.nullcontext()):
                with mp.autocast():
                    if data_parallel:
                        loss, local = _data_parallel_loss(net, data.task, x, y)
                    else:
                        loss = local = task_loss(data.task, net(x), y)
            mp.backward(local)
            t1 = time.perf_counter()
            if step in hist_at:      # outside the timed region
                hists.append(grad_log2_histogram((_full(p.grad) for p in model.parameters()),
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
            if checkpoint is not None and checkpoint.due(step + 1, config.steps):
                _save_checkpoint(checkpoint, step + 1, model, mp, record, saved,
                                 (losses, scales, skipped_at, times, hists),
                                 time.perf_counter() - start, sharded=shard)
        if data_parallel and not shard:   # sharded: each element lives on one rank only
            _check_ranks_agree(model)
        metric, test_loss = evaluate(model, data, mp, batch_size=config.eval_batch_size)
        final_scale = float(mp.scale)
        lost = [h["lost_updates"] for h in getattr(mp, "history", [])
                if h.get("lost_updates") is not None and not h.get("skipped")]
        record["lost_update_fraction"] = statistics.fmean(lost) if lost else None
        dead = [h["state_underflow"] for h in getattr(mp, "history", [])
                if h.get("state_underflow") is not None]
        record["state_underflow"] = max(dead) if dead else None
    except (CheckpointWriteError, CheckpointReadError):
        raise                    # the run folder failed, not the recipe
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
        "parallel": _parallel(data_parallel, shard),
        "wall_time_s": time.perf_counter() - start,
        "config": {**asdict(config), "optimizer": "AdamW", "torch_version": torch.__version__},
    })
    return record


def _full(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """The whole tensor of a DTensor shard (an all-gather every rank joins), else ``t``."""
    return t.full_tensor() if t is not None and hasattr(t, "full_tensor") else t


def _parallel(data_parallel: bool, shard: bool) -> Optional[dict]:
    """How the run was distributed: None in one process, else the mode and world size."""
    if not data_parallel:
        return None
    import torch.distributed as dist
    return {"mode": "fsdp2" if shard else "ddp", "world": dist.get_world_size()}


def _local_rows(x: torch.Tensor) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (as :func:`_data_parallel_loss`)."""
    import torch.distributed as dist
    return x.tensor_split(dist.get_world_size())[dist.get_rank()]


def _data_parallel_loss(net: nn.Module, task: Task, x: torch.Tensor,
                        y: torch.Tensor) -> tuple:
    """(global mean loss, detached; this rank's weighted loss for backward)."""
    import torch.distributed as dist
    rank, world = dist.get_rank(), dist.get_world_size()
    if len(x) < world:
        raise ValueError(f"a batch of {len(x)} cannot be split over {world} processes; "
                         f"use a batch size of at least {world}")
    xs, ys = _local_rows(x), _local_rows(y)
    local = task_loss(task, net(xs), ys)
    weight = ys.numel() * world / y.numel()
    total = (local.detach().float() * ys.numel()).reshape(1)
    dist.all_reduce(total)
    return total[0] / y.numel(), local * weight


_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _check_ranks_agree(model: nn.Module) -> None:
    """Raise RuntimeError unless every rank holds the same weights, bit for bit: two
    checksums of the bit patterns (their sum and their index-weighted sum, in int64
    arithmetic that wraps), gathered from every rank."""
    import torch.distributed as dist
    sums = []
    for p in model.parameters():
        flat = p.detach().reshape(-1)
        bits = flat.view(_INT_OF_SIZE[flat.element_size()]).to(torch.int64)
        index = torch.arange(1, bits.numel() + 1, dtype=torch.int64)
        sums.append(torch.stack([bits.sum(), (bits * index).sum()]))
    mine = torch.stack(sums) if sums else torch.zeros(0, 2, dtype=torch.int64)
    every = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
    dist.all_gather(every, mine)
    differ = [r for r, theirs in enumerate(every) if not torch.equal(theirs, every[0])]
    if differ:
        raise RuntimeError(f"the weights of rank(s) {differ} differ from rank 0's after "
                           f"data-parallel training")


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (raised through, never recorded as a failed run)."""


class CheckpointReadError(ValueError):
    """A checkpoint could not be read (raised through, never recorded as a failed run)."""


def _save_checkpoint(checkpoint: Checkpoint, steps_done: int, model: nn.Module, mp, record: dict,
                     saved: SavedTensorBytes, lists: tuple, wall_time_s: float, *,
                     sharded: bool = False) -> None:
    """Everything the rest of the run depends on: the engine (master weights, optimizer,
    loss scaler, amax histories, stochastic-rounding stream, counters), the model (its
    rounded weights and buffers), torch's global RNG, the position in the data order
    (``step``: batches are a function of seed and position) and the record so far.

    ``sharded`` (FSDP2): the model and engine go through torch.distributed.checkpoint
    into a folder of their own, every rank writing its shards; the checkpoint file then
    names that folder.  It is written after the folder is complete, so a kill in between
    leaves the previous checkpoint in force."""
    losses, scales, skipped_at, times, hists = lists
    state = {"step": steps_done, "torch_rng": torch.get_rng_state(), "losses": losses,
             "scales": scales, "skipped_at": skipped_at, "times": times, "hists": hists,
             "coverage": record["coverage"], "saved_bytes": saved.nbytes,
             "saved_by_dtype": saved.by_dtype, "wall_time_s": wall_time_s}
    try:
        if sharded:
            import torch.distributed.checkpoint as dcp

            from mixprec.distributed.checkpoint import EngineState
            folder = checkpoint.sharded_path(steps_done)
            dcp.save({"train": EngineState(mp)}, checkpoint_id=str(folder))
            state["sharded"] = folder.name
        else:
            state.update(model=model.state_dict(), engine=mp.state_dict())
        checkpoint.save(state)
        if sharded:
            checkpoint.remove_sharded(keep=folder.name)
    except Exception as e:   # noqa: BLE001 -- disk full, permissions, unpicklable state
        raise CheckpointWriteError(f"cannot write the checkpoint {str(checkpoint.path)!r}: "
                                   f"{type(e).__name__}: {e}") from e


def _load_sharded_checkpoint(checkpoint: Checkpoint, resume: dict, mp) -> None:
    """Load the model and engine of a sharded checkpoint (every rank its shards)."""
    import torch.distributed.checkpoint as dcp

    from mixprec.distributed.checkpoint import EngineState
    if "sharded" not in resume:
        raise CheckpointReadError(f"the checkpoint {str(checkpoint.path)!r} is not of a sharded "
                                  f"(FSDP2) run; delete it to rerun that run from its first step")
    folder = checkpoint.path.parent / resume["sharded"]
    try:
        dcp.load({"train": EngineState(mp)}, checkpoint_id=str(folder))
    except Exception as e:   # noqa: BLE001 -- DCP gathers every rank's error
        raise CheckpointReadError(f"the sharded checkpoint {str(folder)!r} cannot be read "
                                  f"({type(e).__name__}: {e}); delete "
                                  f"{str(checkpoint.path)!r} to rerun that run from its first "
                                  f"step") from e


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
