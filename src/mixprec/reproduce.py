"""``mixprec reproduce``: run the papers' claims as experiments and report the verdicts.

Each claim (see :mod:`mixprec.claims`) is a small experiment that measures what the
paper states and concludes "reproduced", "partly" or "not reproduced" with its reason and
the checks that held or failed. A claim that no experiment here can measure (it needs
ImageNet, say) is "out of reach" with what it needs; "not run" means a dependency is
missing or the experiment failed. The run writes ``results.json`` (the records, schema
:data:`mixprec.claims.schema.RESULTS_SCHEMA`), then ``report.md`` and ``report.html``
drawn from those records only, and prints a table.

>>> doc = reproduce(only=["swamping"], quick=True)
>>> doc["records"][0]["measured"]["sum_fp16_sequential"]
256.0
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

__all__ = ["reproduce", "write_results", "add_reproduce_parser", "run_reproduce", "main",
           "SCHEMA"]

from .claims.schema import SCHEMA_ID as SCHEMA


def _environment() -> dict:
    import mixprec
    return {"mixprec": mixprec.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads()}


def reproduce(*, only: Optional[Sequence[str]] = None, quick: bool = False, seed: int = 0,
              threads: int = 1, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run the selected claims and return the results document (JSON-ready).

    Args:
        only: claim ids to run (default: all, in report order).
        quick: smoke-test sizes (a few seconds per claim).
        seed: seed of every random stream.
        threads: torch intra-op threads during the run (restored afterwards). One is the
            default: the experiments use small tensors, and on a shared machine extra
            threads spin-wait for cores (a digits step ran ~10x slower with 2 threads
            under load).
        progress: called with one line per finished claim.

    Returns:
        ``{schema, created, args, environment, seconds, records: [...]}``.
    """
    from .claims import RunContext, claims, run_claim
    selected = claims(list(only) if only else None)
    ctx = RunContext(quick=quick, seed=seed)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    t0 = time.perf_counter()
    records = []
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = _environment()
        for i, c in enumerate(selected, 1):
            rec = run_claim(c, ctx)
            records.append(rec)
            if progress is not None:
                progress(f"[{i}/{len(selected)}] {c.id}: {rec['verdict']} ({rec['seconds']:.1f} s)")
    finally:
        torch.set_num_threads(saved_threads)
    return {"schema": SCHEMA,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "args": {"quick": quick, "seed": seed, "threads": threads,
                     "only": list(only) if only else None},
            "environment": env,
            "seconds": round(time.perf_counter() - t0, 2),
            "records": records}


def write_results(doc: dict, out: Path) -> dict:
    """Validate ``doc`` (ValueError naming the problems) and write results.json,
    report.md, report.html (and plots/) into ``out``."""
    from .claims.render import write_reports
    from .claims.schema import validate_results
    validate_results(doc)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: records keep non-finite outcomes as flags, so this never fires
    (out / "results.json").write_text(json.dumps(doc, indent=1, allow_nan=False),
                                      encoding="utf-8")
    paths = write_reports(doc, out)
    return {"json": out / "results.json", **paths}


def _ids(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "reproduce", help="run the papers' claims as experiments and report verdicts",
        description="Run the papers' claims (FP16 underflow, master weights, loss scaling, "
                    "swamping, FP8, MX, BF16, memory) as experiments; write results.json, "
                    "report.md and report.html.")
    p.add_argument("--quick", action="store_true", help="smoke-test sizes (under a minute)")
    p.add_argument("--only", type=_ids, default=None, metavar="ID,ID",
                   help="run only these claim ids (see --list)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR",
                   help="output directory (default runs/reproduce-<timestamp>)")
    p.add_argument("--seed", type=int, default=0, help="seed of all randomness (default 0)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads during the run (default 1: small tensors)")
    p.add_argument("--list", action="store_true", help="list the claim ids and exit")
    p.set_defaults(func=run_reproduce)
    return p


def run_reproduce(args: argparse.Namespace) -> int:
    """Entry point of ``mixprec reproduce``; returns the exit status (0 also when claims
    are not reproduced: that is a finding, not an error)."""
    from .claims import claims
    from .claims.render import terminal_table
    if getattr(args, "list", False):
        for c in claims():
            print(f"{c.id:30s} {c.claim}")
        return 0
    claims(args.only)     # unknown ids: ValueError before any work
    out = args.out or Path("runs") / f"reproduce-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    doc = reproduce(only=args.only, quick=args.quick, seed=args.seed,
                    threads=getattr(args, "threads", 1),
                    progress=lambda line: print(line, file=sys.stderr, flush=True))
    paths = write_results(doc, out)
    print(terminal_table(doc["records"]))
    print(f"\n{len(doc['records'])} claims in {doc['seconds']:.1f} s; wrote {paths['json']}, "
          f"{paths['md']}, {paths['html']}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m mixprec.reproduce [options]`` (the same options as the subcommand)."""
    parser = argparse.ArgumentParser(prog="mixprec")
    add_reproduce_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["reproduce", *(argv if argv is not None else sys.argv[1:])])
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"mixprec: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
