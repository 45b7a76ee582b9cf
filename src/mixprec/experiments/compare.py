"""``compare``: train one model under several recipes and record where each matches FP32.

Fairness: every recipe starts from the same initial weights (one model built under the
seed, deep-copied per recipe), sees the same batches in the same order (the order
depends only on the seed) and uses the same optimizer and learning rate.  The FP32 run
of the same seed is the baseline of every ratio and verdict; it is always run.

The result is one JSON document (``results.json``, schema ``results.schema.json``):
``config``, ``environment``, ``formats`` (the ranges the gradient plot draws), ``runs``
(one record per recipe and seed, see :func:`mixprec.experiments.train.train_recipe`) and
``summary`` (one row per recipe: means over seeds, ratios to FP32, verdict).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from mixprec.distributed import is_distributed
from mixprec.formats import get_format
from mixprec.optim import STATE_UNDERFLOW_WARN
from mixprec.recipe import PRESETS, get_recipe

from .data import Dataset, Task
from .runfolder import RUN_FILE, CompareFolder, config_differences, is_rank0, on_rank0
from .schema import load_results, save_results
from .train import TrainConfig, train_recipe
from .workloads import DEFAULT_WORKLOAD, resolve_workload

__all__ = ["DEFAULT_RECIPES", "BASELINE", "HISTOGRAM_FORMATS", "CompareConfig", "split_recipes",
           "run_compare", "save_results", "load_results", "divergence_step", "environment",
           "format_ranges", "resume_config", "saved_checkpoint_every", "RUN_FILE"]

DEFAULT_RECIPES = ("fp32", "fp16-mixed", "bf16-mixed", "fp8-e5m2", "fp8-hybrid", "mxfp8")
BASELINE = "fp32"
HISTOGRAM_FORMATS = ("fp16", "bf16", "e5m2", "e4m3")
SCHEMA_VERSION = 1


@dataclass(frozen=True)
class CompareConfig:
    """What to compare.  ``steps``/``batch_size``/``lr`` of None take the workload's
    defaults; ``epochs`` (if set) overrides ``steps`` with whole passes over the data.

    Verdict tolerances: a recipe "matches fp32" when its accuracy is at most
    ``accuracy_tol`` below (absolute) or its perplexity at most ``perplexity_tol``
    above (relative) the FP32 run's; its loss curve "departs" from the step after which
    its moving-average loss stays above (1 + ``loss_tol``) x FP32's + ``loss_abs_tol``
    (the absolute part keeps noise on near-zero late losses from counting).

    ``threads``: torch CPU threads during the comparison (None: leave torch's setting).
    One thread by default: these models are small, and on a busy machine several
    threads per op spend most of their time waiting for each other (measured 3-30x
    slower steps on 2 shared cores), which would swamp the step-time ratios.

    ``nproc``: data-parallel processes (DistributedDataParallel); the comparison must
    run in an initialised process group of that many ranks (``mixprec compare --nproc``
    or torchrun start one).  ``shard``: shard each run's model with FSDP2
    (``fully_shard``) instead of DDP; needs ``nproc`` >= 2.
    """
    recipes: tuple = DEFAULT_RECIPES
    workload: str = DEFAULT_WORKLOAD
    model: Optional[str] = None
    data: Optional[str] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    batch_size: Optional[int] = None
    lr: Optional[float] = None
    seeds: tuple = (0,)
    hist_points: int = 3
    threads: Optional[int] = 1
    nproc: int = 1
    shard: bool = False
    accuracy_tol: float = 0.01
    perplexity_tol: float = 0.02
    loss_tol: float = 0.10
    loss_abs_tol: float = 0.02

    def __post_init__(self):
        recipes = split_recipes(self.recipes) if isinstance(self.recipes, str) else self.recipes
        if not recipes:
            raise ValueError(f"no recipe given; valid presets: {', '.join(PRESETS)}")
        canon = [_recipe_text(r) for r in recipes]
        if BASELINE not in canon:          # every ratio and verdict is relative to fp32
            canon.insert(0, BASELINE)
        else:
            canon.insert(0, canon.pop(canon.index(BASELINE)))
        dupes = sorted({r for r in canon if canon.count(r) > 1})
        if dupes:
            raise ValueError(f"recipe(s) listed twice: {', '.join(dupes)}")
        object.__setattr__(self, "recipes", tuple(canon))
        object.__setattr__(self, "seeds", tuple(int(s) for s in self.seeds))
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"seeds must be distinct and non-empty, got {self.seeds}")
        if not isinstance(self.nproc, int) or self.nproc < 1:
            raise ValueError(f"nproc must be a positive number of processes, got {self.nproc!r}")
        if not isinstance(self.shard, bool):
            raise TypeError(f"shard must be a bool, got {self.shard!r}")
        if self.shard and self.nproc < 2:
            raise ValueError(f"shard=True (FSDP2, fully_shard) needs at least 2 data-parallel "
                             f"processes, got nproc={self.nproc}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads must be at least 1, got {self.threads}")
        if self.epochs is not None and not self.epochs > 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")


def _recipe_text(r) -> str:
    recipe = get_recipe(r)          # ValueError naming the unknown recipe and the presets
    try:
        return str(recipe)
    except ValueError:
        return recipe.short_str()


def split_recipes(text: str) -> tuple:
    """Split a comma list of recipes; commas inside a recipe's overrides are kept.

    A piece starts a new recipe unless it is a bare ``key=value`` override (an '=' with
    no ':' before it), which continues the previous recipe:

    >>> split_recipes("fp32,fp8-e5m2:grads.rounding=nearest,backend=emulated,bf16-mixed")
    ('fp32', 'fp8-e5m2:grads.rounding=nearest,backend=emulated', 'bf16-mixed')
    """
    out: list = []
    for piece in (p.strip() for p in text.split(",")):
        if not piece:
            continue
        head = piece.split("=", 1)[0]
        if "=" in piece and ":" not in head:
            if not out:
                raise ValueError(f"recipe list {text!r} starts with an override {piece!r}; "
                                 f"expected a preset first, one of: {', '.join(PRESETS)}")
            out[-1] += "," + piece
        else:
            out.append(piece)
    return tuple(out)


# --------------------------------------------------------------------------------------
# comparison against the baseline
# --------------------------------------------------------------------------------------
def _moving_average(values: Sequence[Optional[float]], window: int) -> list:
    out, acc = [], []
    for v in values:
        acc.append(math.inf if v is None else v)
        if len(acc) > window:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def divergence_step(losses: Sequence[Optional[float]], baseline: Sequence[Optional[float]], *,
                    tol: float, abs_tol: float = 0.0,
                    window: Optional[int] = None) -> Optional[int]:
    """First step from which the moving-average loss stays above the baseline's:
    avg(loss) > (1 + tol) * avg(baseline) + abs_tol from that step to the last.

    The window is max(5, n/20) steps by default.  A non-finite loss counts as infinitely
    worse.  None when the curves agree at the end.
    """
    n = min(len(losses), len(baseline))
    if n == 0:
        return None
    window = window or max(5, n // 20)
    mine, ref = _moving_average(losses[:n], window), _moving_average(baseline[:n], window)
    bad = [m > (1.0 + tol) * r + abs_tol + 1e-12 for m, r in zip(mine, ref)]
    if not bad[-1]:
        return None
    good = [i for i, b in enumerate(bad) if not b]
    return good[-1] + 1 if good else 0


def _metric_matches(metric: Optional[float], ref: Optional[float], higher_is_better: bool,
                    cfg: CompareConfig) -> Optional[bool]:
    if metric is None or ref is None:
        return None if ref is None else False
    if higher_is_better:
        return metric >= ref - cfg.accuracy_tol
    return metric <= ref * (1.0 + cfg.perplexity_tol)


def _metric_text(name: str, value: Optional[float]) -> str:
    if value is None:
        return "n/a"
    return f"{100 * value:.2f}%" if name == "accuracy" else f"{value:.4g}"


def _verdict(runs: list, base: list, cfg: CompareConfig, is_baseline: bool) -> tuple:
    """(verdict, departs_at, detail) of one recipe from its runs and the fp32 runs."""
    if is_baseline:
        return "baseline", None, ""
    failed = [r for r in runs if r["status"] == "failed"]
    if failed:
        r = failed[0]
        return "failed", r["steps_run"], f"stopped at step {r['steps_run']}: {r['error']}"
    departs = [r["departs_at"] for r in runs if r["departs_at"] is not None]
    nonfinite = [r["loss_history"].index(None) for r in runs if None in r["loss_history"]]
    metric_ok = all(r["matches_fp32"] is True for r in runs)
    where = min(departs) if departs else None
    if metric_ok and where is None:
        return "matches fp32", None, ""
    parts = []
    if nonfinite:
        parts.append(f"non-finite loss first at step {min(nonfinite)}")
    if where is not None:
        parts.append(f"moving-average loss stays above fp32's by >{cfg.loss_tol:.0%} "
                     f"+ {cfg.loss_abs_tol:g} from step {where}")
    if not metric_ok:
        name = runs[0]["metric"]["name"]
        points = 100 * cfg.accuracy_tol
        tol = (f"{points:g} percentage point{'' if points == 1 else 's'}" if name == "accuracy"
               else f"{cfg.perplexity_tol:.0%}")
        parts.append(f"{name} {_metric_text(name, _mean([r['metric']['value'] for r in runs]))} "
                     f"vs fp32 {_metric_text(name, _mean([r['metric']['value'] for r in base]))}"
                     f" (tolerance {tol})")
    verdict = "matches fp32 (metric); loss higher" if metric_ok else "worse than fp32"
    return verdict, where, "; ".join(parts)


def _mean(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.fmean(vals) if vals and len(vals) == len(values) else None


def _std(values: list) -> Optional[float]:
    vals = [v for v in values if v is not None]
    return statistics.stdev(vals) if len(vals) > 1 and len(vals) == len(values) else None


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if a is not None and b else None


def _summarize(runs: list, cfg: CompareConfig) -> list:
    rows = []
    base = [r for r in runs if r["recipe"]["spec"] == BASELINE]
    for name in cfg.recipes:
        mine = [r for r in runs if r["recipe"]["spec"] == name]
        verdict, departs, detail = _verdict(mine, base, cfg, name == BASELINE)
        rows.append({
            "recipe": mine[0]["recipe"]["name"], "spec": name, "runs": len(mine),
            "metric_name": mine[0]["metric"]["name"],
            "metric_mean": _mean([r["metric"]["value"] for r in mine]),
            "metric_std": _std([r["metric"]["value"] for r in mine]),
            "final_loss_mean": _mean([r["final_loss"] for r in mine]),
            "skipped_steps": sum(r["skipped_steps"] for r in mine),
            "final_scale": mine[0]["final_scale"],
            "step_time_s": _mean([r["step_time_s"] for r in mine]),
            "step_time_ratio": _mean([r["step_time_ratio"] for r in mine]),
            "saved_activation_bytes": mine[0]["saved_activation_bytes"],
            "saved_activation_ratio": mine[0]["saved_activation_ratio"],
            "verdict": verdict, "departs_at": departs, "detail": detail,
        })
    return rows


def _compare_to_baseline(run: dict, base: dict, cfg: CompareConfig) -> None:
    run["step_time_ratio"] = _ratio(run["step_time_s"], base["step_time_s"])
    run["saved_activation_ratio"] = _ratio(run["saved_activation_bytes"],
                                           base["saved_activation_bytes"])
    run["departs_at"] = divergence_step(run["loss_history"], base["loss_history"],
                                        tol=cfg.loss_tol, abs_tol=cfg.loss_abs_tol)
    if run["status"] == "failed":
        run["departs_at"] = run["steps_run"] if run["departs_at"] is None else run["departs_at"]
    run["matches_fp32"] = _metric_matches(run["metric"]["value"], base["metric"]["value"],
                                          run["metric"]["higher_is_better"], cfg)


# --------------------------------------------------------------------------------------
# the whole comparison
# --------------------------------------------------------------------------------------
def _check_model(model: torch.nn.Module, data: Dataset, what: str) -> None:
    """One forward pass on two test examples, to fail early with a readable message."""
    probe = copy.deepcopy(model).eval()
    with torch.no_grad():
        try:
            out = probe(data.x_test[:2])
        except Exception as e:   # noqa: BLE001 -- any failure here is a mismatch
            raise ValueError(f"the model ({what}) cannot run on the data {data.name!r} "
                             f"(inputs of shape {tuple(data.x_test[:2].shape)}): "
                             f"{type(e).__name__}: {e}") from e
    want = ((2, data.num_classes) if data.task is Task.CLASSIFICATION
            else (2, data.x_test.shape[1], data.num_classes))
    got_shape = tuple(out.shape) if torch.is_tensor(out) else None
    if (data.task is Task.LM and got_shape is not None and len(got_shape) == 3
            and got_shape[:2] == want[:2] and got_shape[2] >= data.num_classes):
        return      # a vocabulary larger than the data's tokens is a valid language model
    if got_shape != want:
        got = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise ValueError(f"the model ({what}) returns {got} for the data {data.name!r}; "
                         f"task {data.task.value!r} expects logits of shape {want}"
                         + (" (or a larger vocabulary)" if data.task is Task.LM else ""))


def _train_config(cfg: CompareConfig, workload, data: Dataset, seed: int) -> TrainConfig:
    batch_size = cfg.batch_size or workload.batch_size
    steps = cfg.steps or workload.steps
    if cfg.epochs is not None:
        steps = max(1, round(cfg.epochs * -(-len(data.x_train) // batch_size)))
    return TrainConfig(steps=steps, batch_size=batch_size, lr=cfg.lr or workload.lr, seed=seed,
                       hist_points=cfg.hist_points)


def _run_line(run: dict, i: int, n: int) -> str:
    m = run["metric"]
    value = "n/a" if m["value"] is None else f"{m['value']:.4g}"
    status = "" if run["status"] == "ok" else f"  FAILED: {run['error']}"
    dead = run.get("state_underflow")
    state = (f", optimizer state {100 * dead:.1f}% zero where the gradient is not"
             if dead is not None and dead > STATE_UNDERFLOW_WARN else "")
    return (f"[{i}/{n}] {run['recipe']['name']} (seed {run['seed']}): {m['name']} {value}, "
            f"{run['skipped_steps']} skipped{state}, {run['wall_time_s']:.1f} s{status}")


def environment() -> dict:
    """Versions and machine facts saved with every result."""
    from importlib.metadata import PackageNotFoundError, version
    try:
        mixprec_version = version("mixprec")
    except PackageNotFoundError:
        mixprec_version = None
    return {"torch_version": torch.__version__, "python_version": platform.python_version(),
            "platform": platform.platform(), "machine": platform.machine(),
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "mixprec_version": mixprec_version}


def format_ranges(names: Sequence[str] = HISTOGRAM_FORMATS) -> dict:
    """min subnormal, min normal and max of each format, from mixprec.formats."""
    out = {}
    for n in names:
        f = get_format(n)
        out[f.name] = {"min_subnormal": f.min_subnormal, "min_normal": f.min_normal,
                       "max": f.max}
    return out


def run_compare(cfg: CompareConfig, *, progress: bool = False,
                prepare: Optional[Callable] = None,
                log: Optional[Callable[[str], None]] = None,
                out: Union[str, Path, None] = None, resume: bool = False,
                checkpoint_every: Optional[int] = None) -> dict:
    """Run every recipe of ``cfg`` for every seed; return the results document.

    ``prepare`` builds each engine (default :func:`mixprec.engine.prepare`); ``log``
    receives one line per finished run.

    ``out``: the run folder (see :mod:`mixprec.experiments.runfolder`).  Each finished
    run is written there as it completes, a checkpoint of the running one every
    ``checkpoint_every`` steps (None: none), and results.json at the end.  A folder
    holding an unfinished comparison is refused unless ``resume`` is set; then its
    records are kept, an unfinished run continues from its checkpoint, and ``cfg`` must
    equal the saved configuration (see :func:`resume_config`).

    >>> results = run_compare(CompareConfig(recipes=("fp32", "bf16-mixed"), steps=50))
    >>> [row["verdict"] for row in results["summary"]]
    """
    if checkpoint_every is not None and out is None:
        raise ValueError("checkpoints need a run folder: pass out= with checkpoint_every=")
    world = torch.distributed.get_world_size() if is_distributed() else 1
    if world != cfg.nproc:
        raise ValueError(f"the comparison asks for nproc={cfg.nproc} data-parallel processes "
                         f"but runs in {world}; start it with `mixprec compare --nproc "
                         f"{cfg.nproc}` or torchrun --nproc-per-node {cfg.nproc}")
    folder = None
    if out is not None:
        folder = CompareFolder(Path(out), CompareConfig)
        if resume:
            def check() -> None:
                saved = folder.load_config()
                if saved != cfg:
                    raise ValueError(f"the configuration differs from the one saved in "
                                     f"{str(folder.run_file)!r}: {config_differences(saved, cfg)}")
                results = folder.root / "results.json"
                if results.exists() and log is not None:
                    try:
                        load_results(results)
                    except ValueError as e:   # rebuilt from the records below
                        log(f"{e}; writing it again from the run records")
            on_rank0(check)
        else:
            on_rank0(lambda: folder.start(cfg, checkpoint_every))
    elif resume:
        raise ValueError("resume=True needs the run folder to resume (out=)")
    previous_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    try:
        doc = _run_compare(cfg, progress, prepare, log, folder, checkpoint_every)
    finally:
        torch.set_num_threads(previous_threads)
    if folder is not None and is_rank0():
        save_results(doc, folder.root)
    return doc


def resume_config(out: Union[str, Path], **given) -> CompareConfig:
    """The configuration saved in the run folder ``out``, checked against ``given``.

    ``given`` holds the CompareConfig fields a caller asked for explicitly (None: not
    given).  Any that differs from the saved value, after the same normalisation
    (recipes canonical and fp32 first), raises ValueError naming the field and both
    values: a resumed comparison must be the comparison that was started.
    """
    saved = CompareFolder(Path(out), CompareConfig).load_config()
    asked = {k: v for k, v in given.items() if v is not None}
    unknown = sorted(set(asked) - {f.name for f in dataclasses.fields(CompareConfig)})
    if unknown:
        raise ValueError(f"unknown configuration field(s): {', '.join(unknown)}")
    try:
        wanted = dataclasses.replace(saved, **asked)
    except ValueError as e:     # e.g. --shard on a comparison saved with nproc 1
        raw = "; ".join(f"{k} {v!r} (saved: {getattr(saved, k)!r})" for k, v in asked.items()
                        if v != getattr(saved, k))
        raise ValueError(f"--resume {out}: the arguments conflict with the saved "
                         f"configuration: {raw} ({e})") from e
    if wanted != saved:
        raise ValueError(f"--resume {out}: the arguments conflict with the saved "
                         f"configuration: {config_differences(saved, wanted)}; leave them out "
                         f"to continue, or start a new comparison with --out")
    return saved


def saved_checkpoint_every(out: Union[str, Path]) -> Optional[int]:
    """The checkpoint interval the comparison in ``out`` was started with."""
    return CompareFolder(Path(out), CompareConfig).saved().get("checkpoint_every")


def _run_compare(cfg: CompareConfig, progress: bool, prepare: Optional[Callable],
                 log: Optional[Callable[[str], None]], folder: Optional[CompareFolder],
                 checkpoint_every: Optional[int]) -> dict:
    started = time.perf_counter()
    workload = resolve_workload(cfg.workload, model=cfg.model, data=cfg.data)
    data = workload.make_data()
    runs = []
    total = len(cfg.recipes) * len(cfg.seeds)
    warmed = False
    for seed in cfg.seeds:
        torch.manual_seed(seed)
        initial = workload.make_model()
        _check_model(initial, data, workload.model_name)
        tcfg = _train_config(cfg, workload, data, seed)
        seed_runs = []
        for index, spec in enumerate(cfg.recipes):
            run = (on_rank0(lambda: folder.load_record(seed, index, spec))
                   if folder is not None else None)
            done = len(runs) + len(seed_runs) + 1
            if run is not None:
                # killed between writing the record and removing the checkpoint
                if is_rank0():
                    folder.remove_checkpoint(seed, index)
                if log is not None:
                    log(_run_line(run, done, total) + " (recorded earlier)")
            else:
                if not warmed:   # untimed warm-up: one-off imports and allocator growth
                    train_recipe(copy.deepcopy(initial), data, BASELINE,
                                 TrainConfig(steps=3, batch_size=tcfg.batch_size, lr=tcfg.lr,
                                             seed=seed, hist_points=1), prepare=prepare,
                                 data_parallel=cfg.nproc > 1, shard=cfg.shard)
                    warmed = True
                ckpt = None if folder is None else folder.checkpoint(
                    seed, index, checkpoint_every,
                    {"spec": spec, "workload": workload.name, **dataclasses.asdict(tcfg),
                     **({"shard": True} if cfg.shard else {})})
                at = ckpt.saved_step() if ckpt is not None else None   # every rank asks
                if at is not None and log is not None:
                    log(f"[{done}/{total}] {spec} (seed {seed}): continuing from the "
                        f"checkpoint at step {at} of {tcfg.steps}")
                run = train_recipe(copy.deepcopy(initial), data, spec, tcfg, progress=progress,
                                   prepare=prepare, checkpoint=ckpt, data_parallel=cfg.nproc > 1,
                                   shard=cfg.shard)
                run["recipe"]["spec"] = spec
                run["config"].update(model=workload.model_name, data=workload.data_name,
                                     workload=workload.name)
                if folder is not None and is_rank0():
                    folder.save_record(run, seed, index)
                    if ckpt is not None:
                        ckpt.remove()
                if log is not None:
                    log(_run_line(run, done, total))
            if spec == BASELINE and run["status"] == "failed":
                raise RuntimeError(f"the fp32 baseline failed (seed {seed}): {run['error']}")
            seed_runs.append(run)
        for run in seed_runs:
            _compare_to_baseline(run, seed_runs[0], cfg)
        runs.extend(seed_runs)
    command = " ".join(["mixprec"] + sys.argv[1:]) if sys.argv else None
    if folder is not None and is_rank0():    # the other ranks' documents are not written
        command = folder.saved().get("command", command)
    first = runs[0]["config"]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "mixprec.compare",
        "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "config": {
            "workload": workload.name, "model": workload.model_name,
            "data": data.describe(), "recipes": list(cfg.recipes), "baseline": BASELINE,
            "seeds": list(cfg.seeds), "steps": first["steps"], "batch_size": first["batch_size"],
            "lr": first["lr"], "optimizer": first["optimizer"], "hist_points": cfg.hist_points,
            "threads": cfg.threads, "nproc": cfg.nproc, "shard": cfg.shard,
            "tolerances": {"accuracy": cfg.accuracy_tol, "perplexity": cfg.perplexity_tol,
                           "loss": cfg.loss_tol, "loss_abs": cfg.loss_abs_tol},
            "command": command,
        },
        "environment": environment(),
        "formats": format_ranges(),
        "runs": runs,
        "summary": _summarize(runs, cfg),
        "wall_time_s": time.perf_counter() - started,
    }
