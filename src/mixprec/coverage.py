"""Coverage: which matmul-like calls were emulated, in which formats, and which were not.

Every matmul-like call made under :class:`mixprec.emulate.PrecisionMode` passes through
one dispatch function (:mod:`mixprec.dispatch`), which records it here with one status:

    emulated      rounded per the layer's policy, forward and backward; ``formats``
                  gives the format of each tensor role the op uses
    kept          the owning module was kept in high precision by a rule
                  (``keep_high_precision``); it ran in ``recipe.high_precision``
    fp32          an FP32 op: the recipe computes it in FP32 (the policy is FP32,
                  the op is in ``recipe.fp32_ops``, or no policy applies)
    unrecognised  not recognised: the call ran torch's own kernel in the widest dtype
                  of its operands (a composite such as an LSTM, an in-place variant,
                  an einsum that is not a contraction); ``reason`` says which

Under the native backend with a per-tensor FP8 recipe (:mod:`mixprec.native`), the
three GEMMs of each linear layer (fprop, dgrad, wgrad) are counted as well, in
``Coverage.gemms``: "native" (``torch._scaled_mm``; the reason then notes the dimensions
zero-padded to a shape it takes, if any) or "emulated" with the reason ``_scaled_mm``
refused them.

Each call is attributed to the module that owns its weight operand (the innermost
running module holding that Parameter), else to the innermost running module.
An unrecognised call outside every kept module warns once per (op, module)
(:class:`CoverageWarning`), or raises :class:`UnemulatedOpError` under ``strict``.

Under ``torch.compile`` the calls are seen when Dynamo traces them, not when the
compiled graph runs: they get rows of their own with ``compiled=True`` and ``calls``
0 (a count read while tracing would become a guard that fails on the next run, and the
model would recompile every step until Dynamo's recompile limit sent it back to eager).

>>> mp = mixprec.prepare(model, optimizer, "fp8-hybrid")
>>> with mp.autocast():
...     loss = loss_fn(model(x), y)
>>> mp.backward(loss)
>>> print(mp.coverage())          # counts and one row per (op, module, status, formats)
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .recipe import ScalingKind, TensorSpec

__all__ = ["STATUSES", "GEMM_PATHS", "CoverageRow", "GemmRow", "Coverage", "CoverageRecorder",
           "CoverageWarning",
           "UnemulatedOpError", "spec_text", "policy_formats", "OUTSIDE"]

STATUSES = ("emulated", "kept", "fp32", "unrecognised")
GEMM_PATHS = ("native", "emulated")
_WHY = {"emulated": "", "kept": "kept by a rule", "fp32": "an FP32 op",
        "unrecognised": "not recognised"}
# module name of calls made outside every module that has a policy
OUTSIDE = "<outside modules>"


class CoverageWarning(UserWarning):
    """A matmul-like call ran unemulated inside ``autocast()``, outside any kept module."""


class UnemulatedOpError(RuntimeError):
    """Raised under ``prepare(..., strict=True)`` instead of a :class:`CoverageWarning`."""


def spec_text(spec: TensorSpec) -> str:
    """A tensor spec as ``format[/scaling][/rounding]``: "fp16", "e4m3/current",
    "e5m2/stochastic", "e4m3/mx", "e2m1/nvfp4" (a block scheme by its name)."""
    parts = [spec.format]
    if spec.scaling is not ScalingKind.NONE:
        parts.append(spec.scheme or spec.scaling.value)
    if spec.rounding.value != "nearest":
        parts.append(spec.rounding.value)
    return "/".join(parts)


@dataclass(frozen=True)
class CoverageRow:
    """Calls of one op in one module with one status and one set of formats.

    ``formats``: (role, spec text) for each tensor role the op rounds (empty unless
    emulated or kept in a narrow format); ``has_weight``: the module owned the op's
    weight operand (a GEMM layer); ``reason``: why it ran in high precision;
    ``compiled``: traced by torch.compile, where runs are not counted (``calls`` 0)."""
    op: str
    module: str
    status: str
    calls: int
    formats: Tuple[Tuple[str, str], ...] = ()
    reason: str = ""
    has_weight: bool = False
    compiled: bool = False

    def to_dict(self) -> dict:
        return {"op": self.op, "module": self.module, "status": self.status,
                "calls": self.calls, "formats": dict(self.formats), "reason": self.reason,
                "has_weight": self.has_weight, "compiled": self.compiled}

    @classmethod
    def from_dict(cls, d: dict) -> "CoverageRow":
        return cls(d["op"], d["module"], d["status"], int(d["calls"]),
                   tuple(d["formats"].items()), d["reason"], bool(d["has_weight"]),
                   bool(d.get("compiled", False)))


@dataclass(frozen=True)
class GemmRow:
    """Calls of one GEMM (fprop, dgrad, wgrad) of one linear layer under the native FP8
    backend, by path: "native" (``torch._scaled_mm``; ``reason``: "" or which dimensions
    were zero-padded, e.g. "K and N zero-padded to multiples of 16") or "emulated"
    (``reason``: why ``_scaled_mm`` refused it). ``calls`` is 0 for a GEMM seen while
    torch.compile traced (see the module docstring)."""
    module: str
    gemm: str
    path: str
    calls: int
    reason: str = ""

    def to_dict(self) -> dict:
        return {"module": self.module, "gemm": self.gemm, "path": self.path,
                "calls": self.calls, "reason": self.reason}

    @classmethod
    def from_dict(cls, d: dict) -> "GemmRow":
        return cls(d["module"], d["gemm"], d["path"], int(d["calls"]), d["reason"])


@dataclass(frozen=True)
class Coverage:
    """What the matmul-like calls did, one row per (op, module, status, formats), in the
    order they first ran. Counts are numbers of calls. ``gemms``: the linear layers'
    GEMMs under the native FP8 backend, native or emulated (empty otherwise).

    >>> cov = mp.coverage()
    >>> cov.emulated, cov.kept, cov.fp32, cov.unrecognised
    >>> cov.native_gemms, cov.emulated_gemms
    >>> print(cov)
    """
    rows: Tuple[CoverageRow, ...] = ()
    gemms: Tuple[GemmRow, ...] = ()

    def count(self, status: str) -> int:
        if status not in STATUSES:
            raise ValueError(f"unknown coverage status {status!r}; valid choices: "
                             f"{', '.join(STATUSES)}")
        return sum(r.calls for r in self.rows if r.status == status)

    @property
    def emulated(self) -> int:
        return self.count("emulated")

    @property
    def kept(self) -> int:
        return self.count("kept")

    @property
    def fp32(self) -> int:
        return self.count("fp32")

    @property
    def unrecognised(self) -> int:
        return self.count("unrecognised")

    @property
    def total(self) -> int:
        return sum(r.calls for r in self.rows)

    def gemm_count(self, path: str) -> int:
        """GEMMs of linear layers that ran ``path`` ("native" or "emulated") under the
        native FP8 backend."""
        if path not in GEMM_PATHS:
            raise ValueError(f"unknown GEMM path {path!r}; valid choices: "
                             f"{', '.join(GEMM_PATHS)}")
        return sum(r.calls for r in self.gemms if r.path == path)

    @property
    def native_gemms(self) -> int:
        return self.gemm_count("native")

    @property
    def emulated_gemms(self) -> int:
        return self.gemm_count("emulated")

    @property
    def padded_gemms(self) -> int:
        """Native GEMMs whose FP8 operands were zero-padded to a shape ``_scaled_mm``
        takes (counted in :attr:`native_gemms` too)."""
        return sum(r.calls for r in self.gemms if r.path == "native" and r.reason)

    def counts(self) -> Dict[str, int]:
        """{status: calls} for every status."""
        return {s: self.count(s) for s in STATUSES}

    def gemm_layers(self) -> Tuple[str, ...]:
        """Modules that owned the weight operand of a matmul-like call (Linear, Conv,
        transformers' Conv1D calling addmm, ...), in the order of their first call."""
        seen: dict = {}
        for r in self.rows:
            if r.has_weight:
                seen.setdefault(r.module, None)
        return tuple(seen)

    def by_module(self, module: str) -> Tuple[CoverageRow, ...]:
        return tuple(r for r in self.rows if r.module == module)

    def to_dict(self) -> dict:
        out = {**self.counts(), "rows": [r.to_dict() for r in self.rows]}
        if self.gemms:
            out["gemms"] = [r.to_dict() for r in self.gemms]
        return out

    @classmethod
    def from_dict(cls, d: dict) -> "Coverage":
        return cls(tuple(CoverageRow.from_dict(r) for r in d["rows"]),
                   tuple(GemmRow.from_dict(r) for r in d.get("gemms", ())))

    def __str__(self) -> str:
        head = ["op", "module", "status", "calls", "formats / why"]
        body = [[r.op, r.module or "(root)", r.status,
                 "compiled" if r.compiled else str(r.calls),
                 ", ".join(f"{k} {v}" for k, v in r.formats) if r.status == "emulated"
                 else "; ".join(x for x in (_WHY[r.status], r.reason,
                                            ", ".join(f"{k} {v}" for k, v in r.formats)) if x)]
                for r in self.rows]
        widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
        line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
        c = self.counts()
        summary = (f"{self.total} matmul-like calls: {c['emulated']} emulated, {c['kept']} "
                   f"kept by a rule, {c['fp32']} FP32 ops, {c['unrecognised']} not recognised")
        traced = sum(r.compiled for r in self.rows)
        if traced:
            summary += (f"; {traced} rows traced by torch.compile (their calls in compiled "
                        f"graphs are not counted)")
        lines = [summary, line(head), line(["-" * w for w in widths])] + [line(r) for r in body]
        if self.gemms:
            padded = f" ({self.padded_gemms} padded)" if self.padded_gemms else ""
            traced = sum(r.calls == 0 for r in self.gemms)
            lines.append(f"linear GEMMs under the native backend: {self.native_gemms} through "
                         f"torch._scaled_mm{padded}, {self.emulated_gemms} emulated"
                         + (f"; {traced} traced by torch.compile (their calls in compiled "
                            f"graphs are not counted)" if traced else ""))
            lines += [f"  {r.module or '(root)'} {r.gemm}: "
                      f"{'compiled' if r.calls == 0 else r.calls} "
                      f"{'padded' if r.path == 'native' else 'emulated'} ({r.reason})"
                      for r in self.gemms if r.path == "emulated" or r.reason]
        return "\n".join(lines)


class CoverageRecorder:
    """Counts calls by (op, module, status, formats, reason, has_weight); warns once per
    (op, module) about unrecognised calls, or raises under ``strict``."""

    def __init__(self, *, strict: bool = False):
        if not isinstance(strict, bool):
            raise TypeError(f"strict must be a bool, got {strict!r}")
        self.strict = strict
        self._counts: Dict[tuple, int] = {}
        self._gemms: Dict[tuple, int] = {}
        # keys seen while torch.compile traced (calls, GEMMs)
        self._traced: Dict[tuple, bool] = {}
        self._traced_gemms: Dict[tuple, bool] = {}
        self._policies: dict = {}
        self._warned: set = set()

    def record(self, op: str, module: str, status: str, policy=None, roles: tuple = (),
               reason: str = "", has_weight: bool = False, *,
               policy_id: Optional[int] = None) -> None:
        """Count one call; ``policy`` (a LayerPolicy) and ``roles`` give the formats,
        spelled out only when :meth:`coverage` is asked for. ``policy_id``: ``id(policy)``
        when the caller has it already."""
        if policy is not None and policy_id is None:
            policy_id = id(policy)
        key = (op, module, status, None if policy is None else policy_id, roles, reason,
               has_weight)
        if torch.compiler.is_compiling():
            # written, never read: Dynamo replays the write after each run, and guards
            # only on which keys exist (one recompile after the first run, then none)
            self._traced[key] = True
            if policy is not None:
                self._policies[policy_id] = policy
            return
        count = self._counts.get(key)
        if count is None:
            if policy is not None:
                self._policies[policy_id] = policy      # keeps the id valid
            count = 0
        self._counts[key] = count + 1

    def record_gemm(self, module: str, gemm: str, path: str, reason: str = "") -> None:
        """Count one GEMM of a linear layer under the native FP8 backend."""
        key = (module, gemm, path, reason)
        if torch.compiler.is_compiling():
            self._traced_gemms[key] = True   # as in record
            return
        self._gemms[key] = self._gemms.get(key, 0) + 1

    def unrecognised(self, op: str, module: str, reason: str, has_weight: bool = False) -> None:
        """Record an unrecognised call; warn once per (op, module), or raise if strict."""
        self.record(op, module, "unrecognised", None, (), reason, has_weight)
        where = module or "(root)"
        message = (f"{op} in module {where!r} is not emulated ({reason}): it runs torch's own "
                   f"kernel in the widest dtype of its operands")
        if self.strict:
            raise UnemulatedOpError(message + "; keep the module in high precision "
                                    "(keep_high_precision) or call a supported op")
        if (op, module) not in self._warned:
            self._warned.add((op, module))
            warnings.warn(message, CoverageWarning, stacklevel=4)

    def reset(self) -> None:
        """Forget the counts (warnings already given are not repeated). Rows traced by
        torch.compile stay: the compiled graphs still make those calls, and emptying
        what they write would make them recompile."""
        self._counts = {}
        self._gemms = {}

    def coverage(self) -> Coverage:
        rows = []
        for (op, module, status, pid, roles, reason, has_weight), n in self._counts.items():
            formats = () if pid is None else policy_formats(self._policies[pid], roles)
            rows.append(CoverageRow(op, module, status, n, formats, reason, has_weight))
        gemms = [GemmRow(*key[:3], n, key[3]) for key, n in self._gemms.items()]
        gemms += [GemmRow(*key[:3], 0, key[3]) for key in self._traced_gemms]
        for key in self._traced:
            op, module, status, pid, roles, reason, has_weight = key
            formats = () if pid is None else policy_formats(self._policies[pid], roles)
            rows.append(CoverageRow(op, module, status, 0, formats, reason, has_weight,
                                    compiled=True))
        gemms = tuple(gemms)
        return Coverage(tuple(rows), gemms)

    def __repr__(self) -> str:
        return f"CoverageRecorder(strict={self.strict}, rows={len(self._counts)})"


def policy_formats(policy, roles: Tuple[str, ...]) -> Tuple[Tuple[str, str], ...]:
    """(role, spec text) of ``roles`` under ``policy`` (a LayerPolicy)."""
    return tuple((r, spec_text(getattr(policy, r))) for r in roles)
