"""The mixprec command line.

  mixprec formats [NAME ...]    the table of number formats and their limits
  mixprec compare [options]     train one model under several recipes, compare to FP32
  mixprec report RUN_DIR        redraw the plots and report.html of a saved comparison
  mixprec reproduce [--quick]   run the papers' claims as experiments, with verdicts
  mixprec inspect [options]     per-layer numerics of a model: what each format would lose
"""
from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
from typing import Optional, Sequence

from .formats import get_format, list_formats

__all__ = ["main", "build_parser", "add_formats_parser", "add_compare_parser",
           "add_report_parser", "add_reproduce_parser", "add_inspect_parser", "cmd_formats",
           "cmd_compare", "cmd_report"]


# --------------------------------------------------------------------------------------
# formats
# --------------------------------------------------------------------------------------
def _fmt_num(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v == 0:
        return "0"
    e = math.log2(v)
    if e == int(e) and abs(e) >= 4:
        return f"2^{int(e)}"
    return f"{v:.6g}"


def cmd_formats(args: argparse.Namespace) -> int:
    fmts = [get_format(n) for n in args.names] if args.names else list_formats()
    header = ["name", "bits", "E", "M", "bias", "max", "min normal", "min subnormal",
              "inf", "NaN", "storage"]
    rows = [[f.name, str(f.bits), str(f.ebits), str(f.mbits), str(f.bias), _fmt_num(f.max),
             _fmt_num(f.min_normal), _fmt_num(f.min_subnormal),
             "yes" if f.has_inf else "no", f.nan_codes, f.storage] for f in fmts]
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    print(line(header))
    print(line(["-" * w for w in widths]))
    for r in rows:
        print(line(r))
    return 0


def add_formats_parser(sub) -> argparse.ArgumentParser:
    f = sub.add_parser("formats", help="print the table of number formats and their limits")
    f.add_argument("names", nargs="*", help="formats to show (default: all builtins)")
    f.set_defaults(func=cmd_formats)
    return f


# --------------------------------------------------------------------------------------
# compare
# --------------------------------------------------------------------------------------
_COMPARE_EPILOG = """\
examples:
  mixprec compare
  mixprec compare --recipes fp32,fp16-mixed,fp8-e5m2:grads.rounding=nearest --steps 500
  mixprec compare --workload text-transformer --seeds 0,1
  mixprec compare --model mypkg.nets:make_model --data mypkg.data:make_dataset
  mixprec compare --model hf:examples/tiny-llama --recipes fp16-mixed,fp8-hybrid
  mixprec compare --resume runs/compare-20260101-120000
  mixprec compare --nproc 2
  mixprec compare --nproc 2 --shard
  torchrun --nproc-per-node 2 -m mixprec compare

--model names a callable returning a torch.nn.Module; --data one returning a
mixprec.experiments.data.Dataset(name, task, x_train, y_train, x_test, y_test,
num_classes) with task "classification" or "lm". --model hf:SPEC builds a Hugging
Face causal LM with random weights from SPEC, a config.json, a directory holding one,
or a model name already in the local cache (nothing is downloaded); without --data it
trains on the text workload's data. fp32 is always run: it is the baseline of every
ratio and verdict.
"""


def _int_list(text: str) -> tuple:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}")


def add_compare_parser(sub) -> argparse.ArgumentParser:
    from .experiments.compare import DEFAULT_RECIPES
    from .experiments.workloads import DEFAULT_WORKLOAD, WORKLOADS
    p = sub.add_parser(
        "compare", help="train one model under several precision recipes and compare to FP32",
        description="Train one model under several precision recipes on built-in data (same "
                    "seed, data order and initial weights) and write results.json, plots and "
                    "report.html.", epilog=_COMPARE_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    # defaults are None here and filled in by cmd_compare, so that --resume can tell the
    # arguments given from the defaults
    p.add_argument("--recipes", metavar="LIST",
                   help=f"comma list of presets or recipe strings (default: "
                        f"{','.join(DEFAULT_RECIPES)})")
    p.add_argument("--workload", "--task", dest="workload", choices=list(WORKLOADS),
                   help=f"built-in model and data (default: {DEFAULT_WORKLOAD})")
    p.add_argument("--model", metavar="PKG.MOD:FACTORY|hf:CONFIG",
                   help="your model factory, or hf:CONFIG for a Hugging Face causal LM built "
                        "from a config (random weights)")
    p.add_argument("--data", metavar="PKG.MOD:FACTORY", help="your data factory (a Dataset)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="training steps per recipe "
                                                  "(default: the workload's: 300 digits, 200 text)")
    length.add_argument("--epochs", type=float, help="passes over the training data instead")
    p.add_argument("--batch-size", type=int, help="default: the workload's")
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the workload's)")
    p.add_argument("--seeds", type=_int_list, metavar="LIST",
                   help="comma list of seeds (default: 0)")
    p.add_argument("--threads", type=int,
                   help="torch CPU threads; 0 keeps torch's default (default: 1, best for "
                        "these small models)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="DIR",
                       help="run folder (default: runs/compare-<timestamp>)")
    where.add_argument("--resume", metavar="RUN_DIR",
                       help="continue the interrupted comparison in RUN_DIR: finished runs "
                            "are kept, an unfinished one continues from its last checkpoint")
    p.add_argument("--checkpoint-every", type=int, metavar="N",
                   help=f"checkpoint the running recipe every N steps; 0: never (default: "
                        f"{DEFAULT_CHECKPOINT_EVERY}, or the interval of the run resumed)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="train data-parallel in N processes on this machine "
                        "(DistributedDataParallel over gloo; default 1, or torchrun's world)")
    p.add_argument("--shard", action="store_true",
                   help="shard each run's model with FSDP2 (fully_shard) instead of DDP; "
                        "needs --nproc N >= 2 or torchrun; checkpoints go through "
                        "torch.distributed.checkpoint")
    p.add_argument("--dist-timeout", type=float, default=600.0, metavar="SECONDS",
                   help="how long a rendezvous or collective may wait before failing "
                        "(default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=cmd_compare)
    return p


DEFAULT_CHECKPOINT_EVERY = 100


def _launched_world() -> Optional[int]:
    """The world size torchrun (or any torch.distributed launcher) set, else None."""
    import os
    world = os.environ.get("WORLD_SIZE")
    return int(world) if world else None


def _compare_setup(args: argparse.Namespace) -> tuple:
    """(CompareConfig, run folder, checkpoint interval or None) from the arguments, or
    from the folder's saved configuration under --resume."""
    from .experiments.compare import (DEFAULT_RECIPES, CompareConfig, resume_config,
                                      saved_checkpoint_every)
    from .experiments.workloads import DEFAULT_WORKLOAD, resolve_workload
    every = args.checkpoint_every
    if every is not None and every < 0:
        raise ValueError(f"--checkpoint-every must be a number of steps >= 0, got {every}")
    nproc = args.nproc
    launched = _launched_world()
    if launched is not None and nproc is not None and nproc != launched:
        raise ValueError(f"--nproc {nproc} conflicts with the {launched} processes the launcher "
                         f"started (WORLD_SIZE); leave --nproc out under torchrun")
    if launched is not None:
        nproc = launched
    if nproc is not None and nproc < 1:
        raise ValueError(f"--nproc must be at least 1, got {nproc}")
    if args.shard and not args.resume and (nproc or 1) < 2:
        raise ValueError(f"--shard (FSDP2, fully_shard) needs at least 2 processes: add "
                         f"--nproc N with N >= 2, or launch with torchrun --nproc-per-node N; "
                         f"got {nproc or 1} process")
    given = dict(recipes=args.recipes, workload=args.workload, model=args.model,
                 data=args.data, steps=args.steps, epochs=args.epochs,
                 batch_size=args.batch_size, lr=args.lr, seeds=args.seeds, nproc=nproc,
                 shard=True if args.shard else None,
                 threads=None if args.threads is None else (args.threads or None))
    if args.resume:
        out = args.resume
        cfg = resume_config(out, **given)
        if args.threads == 0 and cfg.threads is not None:   # 0 asks for torch's default
            raise ValueError(f"--resume {out}: the arguments conflict with the saved "
                             f"configuration: threads None (saved: {cfg.threads})")
        if every is None:
            every = saved_checkpoint_every(out)
    else:
        values = {k: v for k, v in given.items() if v is not None}
        values.setdefault("recipes", ",".join(DEFAULT_RECIPES))
        values.setdefault("workload", DEFAULT_WORKLOAD)
        values.setdefault("seeds", (0,))
        values["threads"] = 1 if args.threads is None else (args.threads or None)
        cfg = CompareConfig(**values)
        out = args.out or f"runs/compare-{datetime.datetime.now():%Y%m%d-%H%M%S}"
        if every is None:
            every = DEFAULT_CHECKPOINT_EVERY
    resolve_workload(cfg.workload, model=cfg.model, data=cfg.data)   # bad specs fail here
    return cfg, out, every or None


def cmd_compare(args: argparse.Namespace) -> int:
    import torch.distributed as dist
    cfg, out, every = _compare_setup(args)
    launched = _launched_world()
    if launched is not None and launched > 1 and not dist.is_initialized():
        # under torchrun: the rendezvous comes from its environment (env://)
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=args.dist_timeout))
        try:
            return _compare(args, cfg, out, every)
        finally:
            dist.destroy_process_group()
    if cfg.nproc > 1 and not dist.is_initialized():
        return _spawn_compare(args, cfg, out, every)
    return _compare(args, cfg, out, every)


def _spawn_compare(args: argparse.Namespace, cfg, out: str, every: Optional[int]) -> int:
    """Start ``cfg.nproc`` processes (torch.multiprocessing, spawned: a fork of a
    process with running torch threads can deadlock) that meet through a file."""
    import shutil
    import tempfile

    import torch.multiprocessing as mp
    rendezvous = tempfile.mkdtemp(prefix="mixprec-rdzv-")
    try:
        mp.spawn(_compare_rank, args=(args, cfg, out, every, f"{rendezvous}/init"),
                 nprocs=cfg.nproc, join=True)
    except mp.ProcessExitedException as e:
        return e.exit_code if e.exit_code and e.exit_code > 0 else 1
    except mp.ProcessRaisedException as e:
        print(f"mixprec: error: a compare process failed:\n{e}", file=sys.stderr)
        return 1
    finally:
        shutil.rmtree(rendezvous, ignore_errors=True)
    return 0


def _compare_rank(rank: int, args: argparse.Namespace, cfg, out: str, every: Optional[int],
                  init_file: str) -> None:
    """One spawned rank of ``mixprec compare --nproc N`` (rank 0 prints and writes)."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=cfg.nproc,
                            timeout=datetime.timedelta(seconds=args.dist_timeout))
    try:
        rc = _compare(args, cfg, out, every)
    except ValueError as e:
        if rank == 0:
            print(f"mixprec: error: {e}", file=sys.stderr)
        rc = 2
    finally:
        # torch's gloo group destructor can deadlock: it joins its worker threads while
        # holding the GIL that a worker needs to free its last collective's tensors.
        # The group is kept referenced and the rank leaves without interpreter teardown
        # (everything it writes is written and renamed by now).
        _KEPT_GROUPS.append(dist.group.WORLD)
        dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)


_KEPT_GROUPS: list = []


def _compare(args: argparse.Namespace, cfg, out: str, every: Optional[int]) -> int:
    """Run the comparison in this process (one rank of it, when distributed)."""
    import torch.distributed as dist

    from .experiments.compare import run_compare
    from .report import format_table, write_report
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    log = None if args.quiet or not rank0 else (
        lambda line: print(line, file=sys.stderr, flush=True))
    if log:
        log(f"mixprec compare: {len(cfg.recipes)} recipes x {len(cfg.seeds)} seed(s)"
            f"{f' x {cfg.nproc} processes' if cfg.nproc > 1 else ''}"
            f"{' (FSDP2)' if cfg.shard else ''} -> {out}"
            f"{' (resumed)' if args.resume else ''}")
    started = time.perf_counter()
    try:
        results = run_compare(cfg, progress=log is not None and sys.stderr.isatty(), log=log,
                              out=out, resume=bool(args.resume), checkpoint_every=every)
    except RuntimeError as e:
        if rank0:
            print(f"mixprec: error: {e}", file=sys.stderr)
        return 1
    if not rank0:
        return 0
    paths = write_report(results, out)
    print(format_table(results))
    print(f"\nwrote {out}/results.json, {', '.join(p.name for p in paths.values())} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


# --------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------
def add_report_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("report", help="redraw plots and report.html from a saved results.json")
    p.add_argument("run", metavar="RUN_DIR", help="a compare run folder (or its results.json)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads; 0 keeps torch's default (default: 1, best for "
                        "these small models)")
    p.add_argument("--out", metavar="DIR", help="where to write (default: the run folder)")
    p.set_defaults(func=cmd_report)
    return p


def cmd_report(args: argparse.Namespace) -> int:
    from .experiments.compare import load_results
    from .report import format_table, write_report
    results = load_results(args.run)
    paths = write_report(args.run, args.out)
    print(format_table(results))
    print(f"\nwrote {', '.join(str(p) for p in paths.values())}")
    return 0


# --------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------
def add_reproduce_parser(sub) -> argparse.ArgumentParser:
    from .reproduce import add_reproduce_parser as add
    return add(sub)


def add_inspect_parser(sub) -> argparse.ArgumentParser:
    from .inspection import add_inspect_parser as add
    return add(sub)


SUBCOMMANDS = (add_formats_parser, add_compare_parser, add_report_parser,
               add_reproduce_parser, add_inspect_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mixprec", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for add in SUBCOMMANDS:
        add(sub)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mixprec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
