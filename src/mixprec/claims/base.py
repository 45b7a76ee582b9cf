"""The claim registry: what a paper claim is, how it runs and what record it leaves.

A claim is a small function ``run(ctx) -> Outcome`` registered with :func:`claim`. Running
it (:func:`run_claim`) gives a *record*, a JSON-ready dict::

    {id, claim, source, paper_value, measured, checks, summary, verdict, needs, reason,
     config, seconds, plot}

``measured`` maps names to finite numbers or booleans (a non-finite result is recorded
as a flag such as ``"fp16_mean_nonfinite": true``, never as inf/NaN), so records stay
valid JSON. ``plot`` is optional data for the report: ``{title, xlabel, ylabel, logy,
x, lines: {label: [y, ...]}}``.

Verdicts keep apart what was measured from what was not:

    measured    reproduced | partly | not reproduced     (``checks`` say which held)
    not measured  out of reach  (``needs`` names the data or hardware this machine lacks)
                  not run       (a mixprec module is missing, or the experiment raised)

``checks`` maps each named test of the claim to whether it held; a "reproduced" record
has every check true; "partly" and "not reproduced" records name any that failed.
"""
from __future__ import annotations

import enum
import importlib
import math
import time
import traceback
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

__all__ = ["Verdict", "MEASURED_VERDICTS", "RunContext", "Outcome", "Claim", "claim", "REGISTRY",
           "run_claim", "RECORD_FIELDS", "put_finite", "verdict_of", "explain"]

RECORD_FIELDS = ("id", "claim", "source", "paper_value", "measured", "checks", "summary",
                 "verdict", "needs", "reason", "config", "seconds", "plot")


class Verdict(str, enum.Enum):
    REPRODUCED = "reproduced"            # the paper's statement holds here, as stated
    PARTLY = "partly"                    # the mechanism holds; the paper's setting or number does not carry over
    NOT_REPRODUCED = "not reproduced"    # measured, and it came out otherwise
    OUT_OF_REACH = "out of reach"        # not measured: needs data or hardware we lack (``needs``)
    NOT_RUN = "not run"                  # a dependency was missing or the experiment raised


MEASURED_VERDICTS = (Verdict.REPRODUCED, Verdict.PARTLY, Verdict.NOT_REPRODUCED)


@dataclass(frozen=True)
class RunContext:
    """Run-wide settings: ``quick`` picks smoke-test sizes, ``seed`` all randomness."""
    quick: bool = False
    seed: int = 0

    def pick(self, quick, full):
        """The quick-mode value or the full-run value."""
        return quick if self.quick else full

    def generator(self, offset: int = 0) -> torch.Generator:
        """A CPU generator seeded with seed + offset (one offset per use, so claims do not
        share random streams and can run in any order)."""
        g = torch.Generator()
        g.manual_seed(self.seed * 1_000_003 + offset)
        return g


@dataclass(frozen=True)
class Outcome:
    """What a claim function measured and concluded.

    A measured verdict (reproduced, partly, not reproduced) needs measured values; a
    "reproduced" one, every check true. "out of reach" needs ``needs`` (what is missing,
    e.g. "ImageNet") and no measured values. Anything else raises ValueError, so a claim
    cannot report an experiment it did not run.
    """
    measured: dict
    summary: str
    verdict: Verdict
    reason: str
    config: dict = field(default_factory=dict)
    plot: Optional[dict] = None
    checks: dict = field(default_factory=dict)
    needs: Optional[str] = None

    def __post_init__(self):
        bad = {k: v for k, v in self.checks.items() if not isinstance(v, bool)}
        if bad:
            raise ValueError(f"checks must be booleans, got {bad}")
        if self.verdict in MEASURED_VERDICTS and not self.measured:
            raise ValueError(f"verdict {self.verdict.value!r} without measured values; a claim "
                             f"that was not measured is {Verdict.OUT_OF_REACH.value!r}")
        if self.verdict is Verdict.REPRODUCED and not all(self.checks.values()):
            failed = [k for k, v in self.checks.items() if not v]
            raise ValueError(f"verdict 'reproduced' with failed checks {failed}")
        if self.verdict is Verdict.OUT_OF_REACH and (not self.needs or self.measured):
            raise ValueError("verdict 'out of reach' needs `needs` (what is missing) and no "
                             f"measured values; got needs={self.needs!r}, "
                             f"measured={sorted(self.measured)}")


@dataclass(frozen=True)
class Claim:
    id: str
    claim: str                 # the statement under test, one sentence
    source: str                # paper / specification
    paper_value: str           # what the source reports (as FACTS.md states it)
    run: Callable[[RunContext], Outcome]
    needs: tuple = ()          # mixprec submodules the experiment imports


REGISTRY: dict = {}


def claim(id: str, *, claim: str, source: str, paper_value: str, needs: tuple = ()):
    """Register ``run(ctx) -> Outcome`` as the experiment of a claim (decorator)."""
    def register(fn: Callable[[RunContext], Outcome]) -> Callable[[RunContext], Outcome]:
        if id in REGISTRY:
            raise ValueError(f"claim id {id!r} registered twice")
        REGISTRY[id] = Claim(id, claim, source, paper_value, fn, tuple(needs))
        return fn
    return register


def put_finite(measured: dict, key: str, value) -> None:
    """Store ``value`` under ``key`` if finite; otherwise flag ``key_nonfinite``."""
    v = float(value)
    if math.isfinite(v):
        measured[key] = v
    else:
        measured[key + "_nonfinite"] = True


def verdict_of(checks: dict, *, partly: bool = False) -> Verdict:
    """reproduced if every check holds (partly when the setting differs from the
    paper's), not reproduced otherwise (the checks were measured and failed)."""
    if not all(checks.values()):
        return Verdict.NOT_REPRODUCED
    return Verdict.PARTLY if partly else Verdict.REPRODUCED


def explain(checks: dict, reason: str) -> str:
    """``reason``, prefixed with the names of the failed checks if any failed (so a
    reason written for the expected outcome never stands unqualified)."""
    failed = [name for name, ok in checks.items() if not ok]
    return f"checks failed: {failed}. {reason}" if failed else reason


def _missing(needs: tuple) -> Optional[str]:
    for name in needs:
        try:
            importlib.import_module(f"mixprec.{name}")
        except ImportError as exc:
            return f"needs mixprec.{name}, which could not be imported here ({exc})"
    return None


def run_claim(c: Claim, ctx: RunContext) -> dict:
    """Run one claim and return its record; an experiment that cannot run or raises
    gives a "not run" record with the reason, never an exception."""
    t0 = time.perf_counter()
    record = {"id": c.id, "claim": c.claim, "source": c.source, "paper_value": c.paper_value}
    missing = _missing(c.needs)
    if missing is not None:
        out = Outcome({}, "-", Verdict.NOT_RUN, missing)
    else:
        try:
            out = c.run(ctx)
        except Exception:  # a failed experiment is reported as such, never hidden
            tail = traceback.format_exc(limit=3).strip().splitlines()[-1]
            out = Outcome({}, "-", Verdict.NOT_RUN, f"the experiment raised: {tail}")
    record.update(measured=out.measured, checks=dict(out.checks), summary=out.summary,
                  verdict=out.verdict.value, needs=out.needs, reason=out.reason,
                  config={"quick": ctx.quick, "seed": ctx.seed, **out.config},
                  seconds=round(time.perf_counter() - t0, 3), plot=out.plot)
    return record
