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

from .experiments.runfolder import atomic_write_text, read_json

__all__ = ["reproduce", "write_results", "add_reproduce_parser", "run_reproduce", "main",
           "resume_args", "SCHEMA"]

from .claims.schema import SCHEMA_ID as SCHEMA


def _environment() -> dict:
    import mixprec
    return {"mixprec": mixprec.__version__, "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "threads": torch.get_num_threads()}


def reproduce(*, only: Optional[Sequence[str]] = None, quick: bool = False, seed: int = 0,
              threads: int = 1, progress: Optional[Callable[[str], None]] = None,
              out: Optional[Path] = None, resume: bool = False) -> dict:
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
        out: the run folder. Each finished claim's record is written to
            ``out/records/<id>.json`` as it completes (atomically), after the arguments
            in ``out/run.json``; a folder holding an unfinished run is refused unless
            ``resume`` is set.
        resume: keep the records already in ``out`` and run only the missing claims
            (a claim interrupted midway runs again from its start: claims take seconds).
            The arguments must equal the saved ones.

    Returns:
        ``{schema, created, args, environment, seconds, records: [...]}``.
    """
    from .claims import RunContext, claims, run_claim
    selected = claims(list(only) if only else None)
    ctx = RunContext(quick=quick, seed=seed)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    args = {"quick": quick, "seed": seed, "threads": threads,
            "only": list(only) if only else None}
    folder = _Folder(Path(out)) if out is not None else None
    if folder is not None and resume:
        folder.resume(args)
    elif folder is not None:
        folder.start(args)
    elif resume:
        raise ValueError("resume=True needs the run folder to resume (out=)")
    t0 = time.perf_counter()
    records = []
    saved_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        env = _environment()
        for i, c in enumerate(selected, 1):
            rec = folder.load_record(c.id) if folder is not None else None
            kept = rec is not None
            if rec is None:
                rec = run_claim(c, ctx)
                if folder is not None:
                    folder.save_record(rec)
            records.append(rec)
            if progress is not None:
                progress(f"[{i}/{len(selected)}] {c.id}: {rec['verdict']} ({rec['seconds']:.1f} s)"
                         + (" (recorded earlier)" if kept else ""))
    finally:
        torch.set_num_threads(saved_threads)
    return {"schema": SCHEMA,
            "created": _dt.datetime.now().isoformat(timespec="seconds"),
            "args": args,
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
    # allow_nan=False: records keep non-finite outcomes as flags, so this never fires;
    # atomic (temp file + os.replace): results.json is the whole document or absent
    atomic_write_text(out / "results.json", json.dumps(doc, indent=1, allow_nan=False))
    paths = write_reports(doc, out)
    return {"json": out / "results.json", **paths}


RUN_FILE = "run.json"
RUN_KIND = "mixprec.reproduce.run"


class _Folder:
    """A reproduce run folder: run.json (the arguments), records/<claim id>.json (one
    per finished claim, written as it completes), results.json (at the end)."""

    def __init__(self, root: Path):
        self.root = root
        self.run_file = root / RUN_FILE

    def _record_path(self, cid: str) -> Path:
        return self.root / "records" / f"{cid}.json"

    def _recorded(self) -> list:
        return sorted((self.root / "records").glob("*.json"))

    def start(self, args: dict) -> None:
        if (self.run_file.exists() and not (self.root / "results.json").exists()
                and self._recorded()):
            raise ValueError(f"{str(self.root)!r} holds an unfinished reproduce run "
                             f"({len(self._recorded())} claim(s) recorded); continue it with "
                             f"`mixprec reproduce --resume {self.root}` or choose another --out")
        for old in self._recorded():
            old.unlink()
        atomic_write_text(self.run_file, json.dumps({"kind": RUN_KIND, "args": args}, indent=1))

    def saved_args(self) -> dict:
        if not self.run_file.exists() and self.root.is_dir():
            raise ValueError(f"{str(self.root)!r} is not a reproduce run folder: it has no "
                             f"{RUN_FILE}")
        doc = read_json(self.run_file, what="reproduce run file")
        if not isinstance(doc, dict) or doc.get("kind") != RUN_KIND or "args" not in doc:
            raise ValueError(f"{str(self.run_file)!r} is not a reproduce run file "
                             f"(expected kind {RUN_KIND!r})")
        return doc["args"]

    def resume(self, args: dict) -> None:
        saved = self.saved_args()
        if saved != args:
            diff = "; ".join(f"{k} {args.get(k)!r} (saved: {saved.get(k)!r})"
                             for k in sorted(set(saved) | set(args)) if saved.get(k) != args.get(k))
            raise ValueError(f"--resume {self.root}: the arguments conflict with the saved "
                             f"ones: {diff}; leave them out to continue, or start a new run "
                             f"with --out")

    def load_record(self, cid: str) -> Optional[dict]:
        path = self._record_path(cid)
        if not path.exists():
            return None
        rec = read_json(path, what="claim record")
        if not isinstance(rec, dict) or rec.get("id") != cid or "verdict" not in rec:
            raise ValueError(f"the claim record {str(path)!r} is not the record of {cid!r}; "
                             f"delete it to run that claim again")
        return rec

    def save_record(self, rec: dict) -> None:
        atomic_write_text(self._record_path(rec["id"]),
                          json.dumps(rec, indent=1, allow_nan=False))


def resume_args(out: Path, **given) -> dict:
    """The arguments saved in the reproduce run folder ``out``, with ``given`` (None: not
    given) checked against them: ValueError naming each conflicting argument."""
    saved = _Folder(Path(out)).saved_args()
    asked = {k: (list(v) if k == "only" and v is not None else v)
             for k, v in given.items() if v is not None}
    conflicts = [f"{k} {v!r} (saved: {saved.get(k)!r})" for k, v in asked.items()
                 if saved.get(k) != v]
    if conflicts:
        raise ValueError(f"--resume {out}: the arguments conflict with the saved ones: "
                         f"{'; '.join(conflicts)}; leave them out to continue, or start a "
                         f"new run with --out")
    return saved


def _ids(text: str) -> list:
    return [t.strip() for t in text.split(",") if t.strip()]


def add_reproduce_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``reproduce`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "reproduce", help="run the papers' claims as experiments and report verdicts",
        description="Run the papers' claims (FP16 underflow, master weights, loss scaling, "
                    "swamping, FP8, MX, BF16, memory, FP8 accumulation, MXFP8 scale "
                    "rules, MXFP4 with RHT and SR, NVFP4) as experiments; write results.json, "
                    "report.md and report.html.")
    # defaults None, filled in by run_reproduce, so that --resume sees what was given
    p.add_argument("--quick", action="store_true", default=None,
                   help="smoke-test sizes (under a minute)")
    p.add_argument("--only", type=_ids, default=None, metavar="ID,ID",
                   help="run only these claim ids (see --list)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--out", type=Path, default=None, metavar="DIR",
                       help="output directory (default runs/reproduce-<timestamp>)")
    where.add_argument("--resume", type=Path, default=None, metavar="RUN_DIR",
                       help="continue the interrupted run in RUN_DIR: claims already "
                            "recorded are kept, the others run")
    p.add_argument("--seed", type=int, default=None, help="seed of all randomness (default 0)")
    p.add_argument("--threads", type=int, default=None,
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
    given = {"quick": getattr(args, "quick", None), "seed": getattr(args, "seed", None),
             "threads": getattr(args, "threads", None), "only": args.only}
    resume = getattr(args, "resume", None)
    if resume is not None:
        out, given = resume, resume_args(resume, **given)
    else:
        out = args.out or Path("runs") / f"reproduce-{_dt.datetime.now():%Y%m%d-%H%M%S}"
        given = {"quick": bool(given["quick"]), "seed": 0 if given["seed"] is None else given["seed"],
                 "threads": 1 if given["threads"] is None else given["threads"],
                 "only": given["only"]}
    doc = reproduce(only=given["only"], quick=given["quick"], seed=given["seed"],
                    threads=given["threads"], out=out, resume=resume is not None,
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
