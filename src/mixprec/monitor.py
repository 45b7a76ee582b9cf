"""Numerics monitor: where a model's tensors sit relative to each format's range.

Plain PyTorch hooks on any ``nn.Module`` (no emulation needed) record, per layer and
tensor role, what a reduced-precision format would do to the values:

* ``activation``  floating-point layer inputs (forward pre-hook)
* ``weight``      the layer's own parameters, once per step (forward pre-hook)
* ``grad_output`` gradient of the loss w.r.t. the layer output (tensor hook on the output)
* ``weight_grad`` the parameters' ``.grad`` once accumulated (post-accumulate-grad hook)
* ``update``      the parameter change across an optimizer step (``record_updates``)
* ``optimizer_state`` the optimizer's per-element moments after a step (Adam's exp_avg and
                  exp_avg_sq, momentum buffers), once :meth:`NumericsMonitor.record_optimizer_state`
                  is called: their underflow is what an optimizer state stored in the
                  format would lose

Layer outputs are only checked for inf/NaN (role ``output`` in ``last_step_nonfinite``);
their values are the next layer's activations.

For each format ``f`` (round to nearest even) and ``a = |x| * S`` (``S`` the loss scale for
gradient roles, 1 otherwise)::

    underflow   0 < a <= f.min_subnormal / 2                         (becomes zero)
    subnormal   f.min_subnormal / 2 < a < f.min_normal - f.min_subnormal / 2
    overflow    a > f.max + ulp(f.max) / 2   (>= where the tie rounds up, i.e. the code
                of f.max is odd, as in IEEE formats: fp16 overflows from 65520)

Fractions are of the nonzero finite values. Counting is exact and takes about one
histogram pass per tensor: float32 bit patterns of ``|x|`` are ordered like the values,
and one bincount of ``2 * (bits >> 17) + (low bits nonzero)`` gives ``count(|x| < t)`` and
``count(|x| <= t)`` for every bound on a 1/64-binade edge: at a power-of-two scale, all
bounds of e5m2 and e4m3 and the zero bounds of fp16 and bf16. Any other bound costs one
comparison pass when its bucket is occupied (in practice fp16's normal bound, 2^-14 -
2^-25). float64 tensors are rounded to float32 first.

A *step* opens at the model's forward call after a backward pass or an
update (or with :meth:`NumericsMonitor.begin_step`); ``every`` records one step in N.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from functools import lru_cache, partial
from typing import Callable, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch
from torch import nn

from mixprec.formats import FloatFormat, FormatLike, get_format

__all__ = ["NumericsMonitor", "TensorStats", "Thresholds", "format_thresholds", "ROLES",
           "GRAD_ROLES", "DEFAULT_EDGES"]

ROLES = ("activation", "weight", "grad_output", "weight_grad", "update", "optimizer_state")
GRAD_ROLES = frozenset({"grad_output", "weight_grad"})   # the roles the loss scale multiplies
DEFAULT_EDGES = tuple(range(-40, 21))
# Index i of the binade histogram holds [2^(i-127), 2^(i-126)), index 0 every nonzero value
# below 2^-126 (float32 subnormals); exact powers of two are counted apart as well, so that
# "rounds to zero when |x| <= 2^k" is exact too.
_EXP_BINS, _EXP_OFFSET = 256, 127
_KEY_SHIFT = 17                # finest buckets: 1/64 binade (2^15 keys with the sticky bit)
_BATCH_NUMEL = 1 << 16         # a layer's small tensors are counted together
_SORT_NUMEL = 1 << 14          # up to this size, sorting the bit patterns is cheaper
_INF_BITS = 0x7F800000         # bit patterns at or above are inf/NaN
_F32_MAX = float(np.finfo(np.float32).max)

LayerFilter = Union[None, Callable[[str, nn.Module], bool], Iterable[str]]


@dataclass(frozen=True)
class Thresholds:
    """Bounds on ``|x|`` (already divided by the scale) for one format and scale."""
    zero: float        # a <= zero rounds to 0
    normal: float      # zero < a < normal rounds to a subnormal
    over: float        # a > over (a >= over when over_inclusive) overflows
    over_inclusive: bool


@lru_cache(maxsize=256)
def format_thresholds(fmt: FormatLike, scale: float = 1.0) -> Thresholds:
    """Round-to-nearest-even range bounds of ``fmt`` for values multiplied by ``scale``."""
    f = get_format(fmt)
    if not f.has_zero:
        raise ValueError(f"format {f.name!r} has no zero (a scale format); monitor element "
                         "formats such as fp16, bf16, e5m2, e4m3")
    half_sub = f.min_subnormal / 2
    normal = f.min_normal - half_sub if f.mbits > 0 else half_sub   # no subnormals at M=0
    e_top = math.floor(math.log2(f.max))
    mantissa = round((f.max / 2.0 ** e_top - 1) * 2 ** f.mbits)
    code = ((e_top + f.bias) << f.mbits) | mantissa
    over = f.max + 2.0 ** (e_top - f.mbits) / 2
    # A tie above max goes to the even neighbour: upward (out of range) when max's code is odd.
    return Thresholds(half_sub / scale, normal / scale, over / scale, bool(code & 1))


def _bit_bound(t: float, *, inclusive: bool) -> int:
    """B with ``|x| < t`` (``<= t`` when inclusive) iff bits(|x|) < B, for float32 x."""
    if t > _F32_MAX:
        return _INF_BITS                                  # every finite float32 is below t
    f = np.float32(t)
    if float(f) > t:
        f = np.nextafter(f, np.float32(0))
    b = int(np.array(f).view(np.int32))
    return b + 1 if inclusive or float(f) != t else b


@lru_cache(maxsize=256)
def _format_bounds(fmt: FloatFormat, scale: float) -> tuple[int, int, int]:
    """Bit bounds: rounds to zero below the first, subnormal below the second, in range below the third."""
    th = format_thresholds(fmt, scale)
    return (_bit_bound(th.zero, inclusive=True), _bit_bound(th.normal, inclusive=False),
            _bit_bound(th.over, inclusive=not th.over_inclusive))


@lru_cache(maxsize=256)
def _all_bounds(fmts: tuple[FloatFormat, ...], scale: float) -> tuple[int, ...]:
    return tuple(b for f in fmts for b in _format_bounds(f, scale))


@lru_cache(maxsize=256)
def _update_bounds(fmts: tuple[FloatFormat, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """|u / w| < 2^-(m+1) (paper rule: fp16 swallows |u| < 2^-11 |w|) and |u| < min_subnormal."""
    return (tuple(_bit_bound(2.0 ** -(f.mbits + 1), inclusive=False) for f in fmts),
            tuple(_bit_bound(f.min_subnormal, inclusive=False) for f in fmts))


@dataclass(frozen=True)
class _Counts:
    """One tensor's magnitude counts (see :func:`_count_magnitudes`)."""
    n: int
    zeros: int
    finite: int
    below: np.ndarray          # count(bits(|x|) < B) for each requested bound B
    binades: np.ndarray        # nonzero finite values per [2^e, 2^(e+1)), at e + 127
    powers: np.ndarray         # values equal to 2^e, at e + 127
    amax: float                # largest finite |x|, 0 when none


class _Scratch(threading.local):
    """Per-thread buffers reused across tensors: a fresh large result costs page faults."""

    def __init__(self):
        self.buffers: dict = {}

    def get(self, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        bufs = self.buffers.get(device)
        if bufs is None or bufs[0].numel() < n:
            bufs = self.buffers[device] = (torch.empty(n, dtype=torch.int32, device=device),
                                           torch.empty(n, dtype=torch.int32, device=device),
                                           torch.empty(n, dtype=torch.bool, device=device))
        return bufs[0][:n], bufs[1][:n], bufs[2][:n]


_SCRATCH = _Scratch()


@lru_cache(maxsize=1024)
def _key_shift(bounds: tuple[int, ...]) -> int:
    """Bucket width 2^shift in bit patterns: at most 1/64 binade (2^17), coarser while every
    bound B (B - 1 for an inclusive, odd B) stays on a bucket edge. FP8 and bf16 bounds all
    fall on 1/64-binade edges; fp16's normal and overflow bounds need 1/1024 and 1/2048."""
    aligned = 23
    for b in bounds:
        v = b - (b & 1)
        if v:
            aligned = min(aligned, (v & -v).bit_length() - 1)
    return max(aligned, _KEY_SHIFT)


def _count_magnitudes(x: torch.Tensor, bounds: Sequence[int]) -> _Counts:
    """Count ``bits(|x|) < B`` for each bound B from one histogram of the bit patterns of |x|.

    key = 2 * (bits >> shift) + (any bit below shift set): for a bound on a bucket edge e,
    ``bits < e`` and ``bits <= e`` (B = e + 1) are both sums of whole keys, and so are the
    zeros, infinities and NaNs. Other bounds inside an occupied bucket cost one comparison.
    """
    x = x.detach().reshape(-1)
    if x.dtype != torch.float32:
        x = x.float()
    n = x.numel()
    if n <= _SORT_NUMEL and x.device.type == "cpu":
        return _count_sorted(x.numpy(), bounds)
    shift = _key_shift(tuple(bounds))
    buckets, low = 1 << (31 - shift), (1 << shift) - 1
    per_binade = 2 << (23 - shift)                                    # keys per binade
    work, keys, mask = _SCRATCH.get(n, x.device)
    bits = x.view(torch.int32)
    # 2 * (|bits| >> shift), the sign dropped by the mask, plus 1 where a low bit is set
    torch.bitwise_right_shift(bits, shift - 1, out=keys).bitwise_and_((buckets - 1) << 1)
    keys.add_(torch.bitwise_and(bits, low, out=work).clamp_(max=1))
    dense_t = torch.bincount(keys, minlength=2 * buckets).cpu()
    dense = dense_t.numpy().reshape(_EXP_BINS, per_binade)
    floor_binades = dense.sum(1)                                      # [2^e, 2^(e+1)) at e + 127
    below_binade = np.concatenate(([0], np.cumsum(floor_binades)))
    # Elements with key < K, for all bounds and for inf at once: whole binades, then a prefix
    bs = np.asarray([*bounds, _INF_BITS], np.int64)
    ks = 2 * (bs >> shift) + np.minimum(bs & low, 1)
    e, off = ks // per_binade, ks % per_binade
    rows = np.cumsum(dense[e], axis=1)
    res = below_binade[e] + np.where(off > 0, rows[np.arange(len(ks)), np.maximum(off - 1, 0)], 0)
    split = np.flatnonzero(((bs & low) > 1) & (dense.reshape(-1)[ks] > 0))    # bound inside a bucket
    if len(split):
        torch.bitwise_and(bits, 0x7FFFFFFF, out=work)                 # ordered like |x|
        for i in split.tolist():
            res[i] = int(torch.count_nonzero(torch.lt(work, int(bs[i]), out=mask)))
    zeros, finite = int(dense[0, 0]), int(res[-1])
    n_inf = int(dense.reshape(-1)[ks[-1]])
    if finite == n:
        lo, hi = torch.aminmax(x)
        amax = max(-float(lo), float(hi))
    else:
        amax = float(x[torch.isfinite(x)].abs().amax()) if finite else 0.0
    powers = dense[:, 0].copy()                      # an exact power of two sits alone in a key
    powers[0] = powers[-1] = floor_binades[-1] = 0   # zeros; inf and NaN (exponent field 255)
    floor_binades[0] -= zeros
    return _Counts(n, zeros, finite, res[:-1], floor_binades, powers, amax)


def _count_sorted(x: np.ndarray, bounds: Sequence[int]) -> _Counts:
    """The same counts for a small tensor, by sorting its bit patterns (cheaper per call)."""
    bits = np.sort(x.view(np.int32) & 0x7FFFFFFF)
    res = np.searchsorted(bits, np.asarray([*bounds, 1, _INF_BITS, _INF_BITS + 1], np.int64))
    zeros, finite, n_inf = int(res[-3]), int(res[-2]), int(res[-1] - res[-2])
    live = bits[zeros:finite]                                         # nonzero finite, ascending
    powers = np.bincount(live[(live & 0x7FFFFF) == 0] >> 23, minlength=_EXP_BINS)
    amax = float(live[-1:].view(np.float32)[0]) if len(live) else 0.0
    return _Counts(len(bits), zeros, finite, res[:-3], np.bincount(live >> 23, minlength=_EXP_BINS),
                   powers, amax)


@dataclass
class TensorStats:
    """Counts accumulated over every tensor recorded for one (layer, role)."""
    layer: str
    role: str
    records: int = 0                        # hook calls (a layer's weight and bias are one)
    numel: int = 0
    zeros: int = 0
    nonfinite: int = 0
    amax: float = 0.0                       # largest finite |x|
    scale: float = 1.0                      # scale in force at the last record
    binades: np.ndarray = field(default_factory=lambda: np.zeros(_EXP_BINS, np.int64))
    powers: np.ndarray = field(default_factory=lambda: np.zeros(_EXP_BINS, np.int64))
    underflow: dict = field(default_factory=dict)   # per format name
    subnormal: dict = field(default_factory=dict)
    overflow: dict = field(default_factory=dict)
    below_rel: dict = field(default_factory=dict)   # updates: 0 < |u| < 2^-(m+1) |w|
    below_abs: dict = field(default_factory=dict)   # updates: 0 < |u| < min_subnormal

    @property
    def finite_nonzero(self) -> int:
        return self.numel - self.zeros - self.nonfinite

    def frac(self, count: int) -> float:
        return count / self.finite_nonzero if self.finite_nonzero else 0.0

    def count_at_most_pow2(self, j: int) -> int:
        """Nonzero finite values with ``|x| <= 2^j``, read from the binade histogram."""
        i = min(max(j + _EXP_OFFSET, 0), _EXP_BINS)
        return int(self.binades[:i].sum() + (self.powers[i] if i < _EXP_BINS else 0))

    def hist(self, edges: Sequence[int]) -> dict:
        """log2 histogram on integer ``edges``: below (< 2^e_0), counts per [2^e_i, 2^e_i+1), above."""
        idx = np.searchsorted(np.asarray(edges) + _EXP_OFFSET, np.arange(_EXP_BINS), side="right")
        binned = np.bincount(idx, weights=self.binades, minlength=len(edges) + 1).astype(np.int64)
        return {"below": int(binned[0]), "counts": binned[1:-1].tolist(), "above": int(binned[-1])}

    def headroom_log2(self, fmt: FloatFormat) -> Optional[float]:
        """log2(max / (amax * S)): binades left before overflow; None without nonzero values."""
        return math.log2(fmt.max / (self.amax * self.scale)) if self.amax > 0 else None

    def add(self, x: torch.Tensor, fmts: Sequence[FloatFormat], scale: float,
            extra_bounds: Sequence[int] = ()) -> _Counts:
        """Count ``x`` (any float dtype) into the stats; ``extra_bounds`` are counted too."""
        c = _count_magnitudes(x, _all_bounds(tuple(fmts), scale) + tuple(extra_bounds))
        for i, f in enumerate(fmts):
            to_zero, to_normal, in_range = (int(v) for v in c.below[3 * i: 3 * i + 3])
            _bump(self.underflow, f.name, to_zero - c.zeros)
            _bump(self.subnormal, f.name, to_normal - to_zero if f.mbits > 0 else 0)
            _bump(self.overflow, f.name, c.finite - in_range)
        self.binades += c.binades
        self.powers += c.powers
        self.amax = max(self.amax, c.amax)
        self.numel += c.n
        self.zeros += c.zeros
        self.nonfinite += c.n - c.finite
        self.scale = scale
        return c

    def add_update(self, u: torch.Tensor, w: torch.Tensor, fmts: Sequence[FloatFormat]) -> _Counts:
        """Count update ``u`` of weights ``w``, and the nonzero updates a weight in each format loses.

        ``|u| < 2^-p |w|`` is tested as ``|u / w| < 2^-p``: float32 division rounds correctly
        and a quotient of two float32 values never lies within half an ulp below a power of
        two, so the test is exact.
        """
        u, w = _as_float32(u), _as_float32(w)
        rel_bounds, abs_bounds = _update_bounds(tuple(fmts))
        c = self.add(u, fmts, 1.0, abs_bounds)
        ratio = _count_magnitudes(torch.div(u, w).abs_(), rel_bounds)
        # zero updates (0 / w = 0 where w != 0) pass the ratio test but move nothing
        idle = int(torch.count_nonzero((u == 0) & (w != 0))) if c.zeros else 0
        for f, r, a in zip(fmts, ratio.below, c.below[3 * len(fmts):]):
            _bump(self.below_rel, f.name, int(r) - idle)
            _bump(self.below_abs, f.name, int(a) - c.zeros)
        return c


def _bump(d: dict, key: str, n: int) -> None:
    d[key] = d.get(key, 0) + n


def _as_float32(x: torch.Tensor) -> torch.Tensor:
    x = x.detach()
    return x if x.dtype == torch.float32 else x.float()


def _has_nonfinite(x: torch.Tensor) -> bool:
    lo, hi = torch.aminmax(x.detach().reshape(-1))      # NaN propagates; one pass
    return not (math.isfinite(float(lo)) and math.isfinite(float(hi)))


def _pct(count: int, total: int) -> str:
    if count == 0:
        return "0"
    p = 100.0 * count / total
    return "<0.01%" if p < 0.01 else f"{p:.3g}%"


def _num(v: float) -> str:
    """Powers of two as 2^k (the scales and thresholds of this module), others as %.3g."""
    if v > 0 and math.log2(v) == int(math.log2(v)) and abs(math.log2(v)) >= 4:
        return f"2^{int(math.log2(v))}"
    return f"{v:.3g}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()
    return [line(header), line(["-" * w for w in widths])] + [line(r) for r in rows]


def _select_layers(model: nn.Module, layers: LayerFilter) -> dict[str, nn.Module]:
    named = {(n or "(model)"): m for n, m in model.named_modules()}
    if layers is None:
        return {n: m for n, m in named.items()
                if next(m.children(), None) is None and next(m.parameters(recurse=False), None) is not None}
    if callable(layers):
        return {n: m for n, m in named.items() if layers(n, m)}
    wanted = [layers] if isinstance(layers, str) else list(layers)
    unknown = [n for n in wanted if n not in named]
    if unknown:
        raise ValueError(f"unknown layer names {unknown}; valid names: {', '.join(named)}")
    return {n: named[n] for n in wanted}


def _float_tensors(obj) -> list[torch.Tensor]:
    items = obj if isinstance(obj, (tuple, list)) else (obj,)
    return [t for t in items if isinstance(t, torch.Tensor) and t.is_floating_point() and t.numel()]


def _batched(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Small tensors of one record (a weight and its bias) counted in one call: the cost of
    a call is mostly fixed below about 2^16 elements."""
    if len(tensors) > 1 and sum(t.numel() for t in tensors) <= _BATCH_NUMEL:
        return [torch.cat([t.detach().reshape(-1).float() for t in tensors])]
    return list(tensors)


class NumericsMonitor:
    """Record range statistics of a model's tensors for several formats at once.

    Args:
        model: any module; its leaf modules with parameters are watched by default.
        formats: formats to evaluate (names or FloatFormat); round to nearest even.
        layers: None, a predicate ``(name, module) -> bool`` or a list of module names.
        bins: integer log2 edges of the reported magnitude histogram, within [-126, 128].
        every: record one step in ``every``.

    Cost: one histogram pass (plus about five cheap elementwise passes) per recorded
    tensor, and two for each weight-sized update. On one CPU thread a fully recorded step
    of the digits CNN takes about 3x an unrecorded one, of a 784-1024-10 MLP (weights
    dominate) about 4.5x; ``every=4`` brings both under 2x.

    >>> mon = NumericsMonitor(model, formats=("fp16", "bf16"))
    >>> with mon:
    ...     loss_fn(model(x), y).backward()
    ...     mon.snapshot_weights(); opt.step(); mon.record_updates()
    >>> print(mon.summary()); print(mon.advice("fp16")["text"])
    """

    def __init__(self, model: nn.Module, formats: Sequence[FormatLike] = ("fp16", "bf16", "e5m2", "e4m3"),
                 layers: LayerFilter = None, bins: Sequence[int] = DEFAULT_EDGES, every: int = 1):
        self.model = model
        self.formats = tuple(get_format(f) for f in formats)
        if not self.formats:
            raise ValueError("formats is empty; give at least one format name such as 'fp16'")
        for f in self.formats:
            format_thresholds(f)                       # rejects formats without zero
        self.edges = tuple(int(e) for e in bins)
        if (len(self.edges) < 2 or list(self.edges) != sorted(set(self.edges))
                or self.edges[0] < -126 or self.edges[-1] > 128):
            raise ValueError(f"bins {bins!r} must be at least two increasing integers in [-126, 128]")
        if not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive integer, got {every!r}")
        self.every = every
        self.layers = _select_layers(model, layers)
        seen: set[int] = set()
        self._params: dict[str, dict[str, nn.Parameter]] = {}
        for name, mod in self.layers.items():   # a shared parameter belongs to its first layer
            own = {pn: p for pn, p in mod.named_parameters(recurse=False)
                   if p.requires_grad and id(p) not in seen}
            seen.update(id(p) for p in own.values())
            self._params[name] = own
        self._scale = 1.0
        self._handles: list = []
        self._grad_handles: list = []
        self.reset()

    # -- lifecycle ------------------------------------------------------------------------
    def attach(self) -> "NumericsMonitor":
        """Register the hooks (idempotent)."""
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._on_model_forward, prepend=True))
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_pre_hook(partial(self._on_forward_pre, name)))
            self._handles.append(mod.register_forward_hook(partial(self._on_forward, name)))
            for p in self._params[name].values():
                self._handles.append(p.register_post_accumulate_grad_hook(partial(self._on_grad, name)))
        return self

    def detach(self) -> None:
        """Remove every hook, including those on tensors of a step still in flight."""
        for h in self._handles + self._grad_handles:
            h.remove()
        self._handles, self._grad_handles = [], []
        _SCRATCH.buffers.clear()           # this thread's work buffers (9 bytes per element)

    def __enter__(self) -> "NumericsMonitor":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def reset(self) -> None:
        """Forget every statistic (the hooks stay)."""
        self.stats: dict[tuple[str, str], TensorStats] = {}
        self.last_step_nonfinite: list[tuple[str, str]] = []
        self.steps_recorded = 0
        self._step = -1
        self._open = False            # a step stays open until an update or a backward ends it
        self._backward_seen = False
        self._active = False
        self._weights_seen: set[str] = set()
        self._grads: dict[str, list[torch.Tensor]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def set_scale(self, scale: float) -> None:
        """Set the loss scale S applied to gradient roles before the format cast.

        Gradients are taken as recorded: when the loss of the watched run is already
        multiplied by S, leave this at 1. Counts accumulate under the scale in force.
        """
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (
                math.isfinite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive finite number, got {scale!r}")
        self._scale = float(scale)

    @property
    def scale(self) -> float:
        return self._scale

    def begin_step(self) -> None:
        """Start a new step (done automatically at the model's first forward after a backward)."""
        self._flush_grads()
        self._step += 1
        self._open, self._backward_seen = True, False
        self._active = self._step % self.every == 0
        self.steps_recorded += int(self._active)
        self.last_step_nonfinite = []
        self._weights_seen = set()
        self._before = {}
        self._grad_handles = []      # hooks on last step's tensors die with those tensors

    # -- hooks ----------------------------------------------------------------------------
    def _on_model_forward(self, module, args) -> None:
        if not self._open or self._backward_seen:
            self.begin_step()

    def _on_forward_pre(self, name, module, args) -> None:
        if not self._active:
            return
        for t in _float_tensors(args):
            self._record(name, "activation", t)
        params = list(module.parameters(recurse=False))
        if params and name not in self._weights_seen:
            self._weights_seen.add(name)
            self._record(name, "weight", *params)

    def _on_forward(self, name, module, args, output) -> None:
        if not self._active:
            return
        for t in _float_tensors(output):
            if _has_nonfinite(t):
                self.last_step_nonfinite.append((name, "output"))
            if t.requires_grad:
                self._grad_handles.append(t.register_hook(partial(self._on_grad_output, name)))

    def _on_grad_output(self, name, grad) -> None:
        self._backward_seen = True
        self._record(name, "grad_output", grad)

    def _on_grad(self, name, param) -> None:
        self._backward_seen = True
        if not self._active or param.grad is None:
            return
        pending = self._grads.setdefault(name, [])
        pending.append(param.grad)
        if len(pending) == len(self._params[name]):     # the layer's last gradient arrived
            self._flush_grads(name)

    def _flush_grads(self, name: Optional[str] = None) -> None:
        for layer in [name] if name else list(self._grads):
            grads = self._grads.pop(layer, [])
            if grads:
                self._record(layer, "weight_grad", *grads)

    def _stats_for(self, layer: str, role: str) -> TensorStats:
        st = self.stats.get((layer, role))
        if st is None:
            st = self.stats[(layer, role)] = TensorStats(layer, role)
        return st

    def _record(self, layer: str, role: str, *tensors: torch.Tensor) -> None:
        """Count tensors into (layer, role); one non-finite event however many of them had inf/NaN."""
        st = self._stats_for(layer, role)
        scale = self._scale if role in GRAD_ROLES else 1.0
        counts = [st.add(t, self.formats, scale) for t in _batched(tensors)]
        st.records += 1
        if any(c.finite < c.n for c in counts):
            self.last_step_nonfinite.append((layer, role))

    # -- updates --------------------------------------------------------------------------
    def snapshot_weights(self) -> dict[str, torch.Tensor]:
        """Copy the watched parameters (call right before ``optimizer.step()``)."""
        self._flush_grads()
        recording = self._step < 0 or self._active
        self._before = {f"{layer}.{pn}": p.detach().clone()
                        for layer, ps in self._params.items() for pn, p in ps.items()} if recording else {}
        return self._before

    def record_updates(self) -> None:
        """Record ``update = new - old`` against the last :meth:`snapshot_weights`; ends the step."""
        before, self._before = self._before, {}
        self._open = False
        if not before:
            return
        for layer, ps in self._params.items():
            if not ps:
                continue
            st = self._stats_for(layer, "update")
            olds = [before[f"{layer}.{pn}"] for pn in ps]
            news = _batched([p.detach() - old for p, old in zip(ps.values(), olds)])
            counts = [st.add_update(u, w, self.formats) for u, w in zip(news, _batched(olds))]
            st.records += 1
            if any(c.finite < c.n for c in counts):
                self.last_step_nonfinite.append((layer, "update"))

    def record_optimizer_state(self, optimizer: torch.optim.Optimizer) -> None:
        """Record the optimizer's per-element state of the watched parameters (tensors of
        the parameter's shape: moments, momentum; call after ``optimizer.step()``) as role
        ``optimizer_state``. Its underflow in a format is the fraction of nonzero moment
        values that a state stored in that format would hold as zero."""
        if not (self._step < 0 or self._active):
            return
        for layer, ps in self._params.items():
            moments = [v for p in ps.values() for k, v in optimizer.state.get(p, {}).items()
                       if k != "step" and torch.is_tensor(v) and v.is_floating_point()
                       and v.shape == p.shape]
            if moments:
                self._record(layer, "optimizer_state", *(m.detach() for m in moments))

    def observe_update(self, before_params: Mapping[str, torch.Tensor]) -> None:
        """Record updates against ``before_params``, keyed like ``model.named_parameters()``."""
        names = {id(p): n for n, p in self.model.named_parameters()}
        before = {}
        for layer, ps in self._params.items():
            for pn, p in ps.items():
                if names[id(p)] not in before_params:
                    raise ValueError(f"before_params lacks parameter {names[id(p)]!r}; pass "
                                     "{name: p.detach().clone() for name, p in model.named_parameters()}")
                before[f"{layer}.{pn}"] = before_params[names[id(p)]]
        self._flush_grads()
        self._before = before if (self._step < 0 or self._active) else {}
        self.record_updates()

    def first_nonfinite(self) -> Optional[tuple[str, str]]:
        """(layer, role) of the first tensor with inf/NaN in the last step, in execution order."""
        return self.last_step_nonfinite[0] if self.last_step_nonfinite else None

    # -- reports --------------------------------------------------------------------------
    def _ordered(self) -> list[TensorStats]:
        rank = {n: i for i, n in enumerate(self.layers)}
        return sorted(self.stats.values(), key=lambda s: (rank.get(s.layer, len(rank)), ROLES.index(s.role)))

    def _format(self, fmt: FormatLike) -> FloatFormat:
        f = get_format(fmt)
        if f not in self.formats:
            raise ValueError(f"format {f.name!r} is not monitored; valid choices: "
                             f"{', '.join(g.name for g in self.formats)}")
        return f

    def _stats_dict(self, st: TensorStats) -> dict:
        module = self.layers.get(st.layer)
        d = {"layer": st.layer, "module": type(module).__name__ if module is not None else None,
             "role": st.role, "records": st.records, "numel": st.numel,
             "zeros": st.zeros, "nonfinite": st.nonfinite, "amax": st.amax, "scale": st.scale,
             "hist": st.hist(self.edges), "formats": {}}
        for f in self.formats:
            u, s, o = st.underflow[f.name], st.subnormal[f.name], st.overflow[f.name]
            d["formats"][f.name] = {
                "underflow": u, "subnormal": s, "overflow": o, "underflow_frac": st.frac(u),
                "subnormal_frac": st.frac(s), "overflow_frac": st.frac(o),
                "headroom_log2": st.headroom_log2(f)}
            if st.role == "update":
                d["formats"][f.name].update(
                    below_rel=st.below_rel[f.name], below_abs=st.below_abs[f.name],
                    below_rel_frac=st.frac(st.below_rel[f.name]),
                    below_abs_frac=st.frac(st.below_abs[f.name]))
        return d

    def _updates(self) -> dict:
        """Per format: nonzero updates below 2^-(m+1)|w| and below min_subnormal, by layer and overall."""
        ups = [st for st in self._ordered() if st.role == "update"]
        out = {}
        for f in self.formats:
            rows = {st.layer: (st.finite_nonzero, st.below_rel[f.name], st.below_abs[f.name]) for st in ups}
            total = [sum(r[i] for r in rows.values()) for i in range(3)]
            as_dict = lambda n, r, a: {"nonzero": n, "below_rel": r, "below_abs": a,
                                       "below_rel_frac": r / n if n else 0.0, "below_abs_frac": a / n if n else 0.0}
            out[f.name] = {"rel_threshold_log2": -(f.mbits + 1), "abs_threshold": f.min_subnormal,
                           "overall": as_dict(*total), "layers": {k: as_dict(*v) for k, v in rows.items()}}
        return out

    def _closest_to_overflow(self, k: int = 5) -> list[dict]:
        live = [st for st in self._ordered() if st.amax > 0]
        live.sort(key=lambda st: -st.amax * st.scale)
        return [{"layer": st.layer, "role": st.role, "amax": st.amax, "scale": st.scale,
                 "headroom_log2": {f.name: st.headroom_log2(f) for f in self.formats}} for st in live[:k]]

    def report(self) -> dict:
        """Everything recorded, as a JSON-serializable dict."""
        return {"formats": [f.name for f in self.formats], "scale": self._scale, "edges": list(self.edges),
                "steps": self.steps_recorded, "tensors": [self._stats_dict(st) for st in self._ordered()],
                "closest_to_overflow": self._closest_to_overflow(), "updates": self._updates(),
                "last_step_nonfinite": [list(k) for k in self.last_step_nonfinite],
                "first_nonfinite": list(self.first_nonfinite() or []) or None}

    def to_records(self) -> list[dict]:
        """One flat row per (layer, role, format), for tables and data frames."""
        rows = []
        for d in self.report()["tensors"]:
            base = {k: d[k] for k in ("layer", "module", "role", "records", "numel", "zeros", "nonfinite",
                                      "amax", "scale")}
            rows += [{**base, "format": name, **vals} for name, vals in d["formats"].items()]
        return rows

    def summary(self) -> str:
        """Text table: amax and underflow/overflow per layer and role, headroom, swallowed updates."""
        rep = self.report()
        names = rep["formats"]
        lines = [f"Numerics over {rep['steps']} recorded step(s); gradient roles scaled by S = {_num(self._scale)}; "
                 "under/over = fraction of nonzero finite values that round to 0 / overflow"]
        rows = [[d["layer"], d["module"] or "", d["role"], str(d["numel"]), f"{d['amax']:.3g}", str(d["nonfinite"])]
                + [f"{_pct(d['formats'][n]['underflow'], d['numel'] - d['zeros'] - d['nonfinite'])}/"
                   f"{_pct(d['formats'][n]['overflow'], d['numel'] - d['zeros'] - d['nonfinite'])}" for n in names]
                for d in rep["tensors"]]
        lines += _table(["layer", "module", "role", "numel", "amax", "nonfinite"]
                        + [f"{n} under/over" for n in names], rows)
        if rep["closest_to_overflow"]:
            lines += ["", "Closest to overflow: headroom log2(max / (amax * S)) in binades"]
            rows = [[c["layer"], c["role"], f"{c['amax'] * c['scale']:.3g}"]
                    + [f"{c['headroom_log2'][n]:+.1f}" for n in names] for c in rep["closest_to_overflow"]]
            lines += _table(["layer", "role", "amax*S"] + names, rows)
        if any(u["overall"]["nonzero"] for u in rep["updates"].values()):
            lines += ["", "Nonzero updates a weight stored in the format would lose: "
                          "|u| < 2^-(m+1) |w| / |u| < min subnormal"]
            ups = rep["updates"]
            layers = list(ups[names[0]]["layers"]) + ["overall"]
            get = lambda n, l: ups[n]["overall"] if l == "overall" else ups[n]["layers"][l]
            rows = [[l, str(get(names[0], l)["nonzero"])]
                    + [f"{_pct(get(n, l)['below_rel'], get(n, l)['nonzero'])}/"
                       f"{_pct(get(n, l)['below_abs'], get(n, l)['nonzero'])}" for n in names] for l in layers]
            lines += _table(["layer", "updates"] + [f"{n} <2^{ups[n]['rel_threshold_log2']}|w|/<"
                                                    f"{_num(ups[n]['abs_threshold'])}" for n in names], rows)
        if rep["first_nonfinite"]:
            lines += ["", "First non-finite tensor in the last step: {} {}".format(*rep["first_nonfinite"])]
        return "\n".join(lines)

    def advice(self, fmt: FormatLike = "fp16", *, margin: float = 2.0, threshold: float = 0.01) -> dict:
        """Loss scale, master-weight and per-layer precision advice for ``fmt``; ``text`` says it in words.

        * scale: the largest power of two S with ``margin * S * max|grad| < fmt.max`` (the
          paper's rule S * max|grad| < 65504, with a safety margin); its effect on gradient
          underflow (``|g * S| <= min_subnormal / 2``) is read exactly from the binade
          histograms (S and the threshold are powers of two). S multiplies the gradients as
          recorded: where the watched loss is already scaled by S0, the total is S0 * S.
        * master weights: needed when more than ``threshold`` of the nonzero updates are
          below 2^-(m+1) of their weight (fp16: 2^-11), which the weight would swallow.
        * layers to keep in higher precision: any role above ``threshold`` underflow or
          overflow; non-gradient roles unscaled, gradient roles at the advised scale.
        """
        f = self._format(fmt)
        if not (margin >= 1 and 0 <= threshold < 1):
            raise ValueError(f"need margin >= 1 and 0 <= threshold < 1, got {margin!r}, {threshold!r}")
        stats = self._ordered()
        grads = [st for st in stats if st.role in GRAD_ROLES]
        amax_g = max((st.amax for st in grads), default=0.0)
        n_g = sum(st.finite_nonzero for st in grads)
        j_zero = f.emin - f.mbits - 1                    # |g| <= 2^j_zero rounds to zero
        under = lambda k: sum(st.count_at_most_pow2(j_zero - k) for st in grads) / n_g if n_g else 0.0
        k = None
        if amax_g > 0:
            k = math.floor(math.log2(f.max / (margin * amax_g)))
            while margin * amax_g * 2.0 ** k >= f.max:    # guard the float log2 at exact powers
                k -= 1
        adv = {"format": f.name, "margin": margin, "threshold": threshold, "max_grad": amax_g,
               "scale": None if k is None else 2.0 ** k, "scale_log2": k,
               "underflow_at_1": under(0), "underflow_at_scale": None if k is None else under(k)}
        adv["lifted"] = None if k is None else adv["underflow_at_1"] - adv["underflow_at_scale"]
        adv["scaling_needed"] = adv["underflow_at_1"] > threshold
        ups = [st for st in stats if st.role == "update"]
        n_u = sum(st.finite_nonzero for st in ups)
        rel = sum(st.below_rel[f.name] for st in ups) / n_u if n_u else None
        adv["master_weights"] = {
            "needed": None if rel is None else rel > threshold, "below_rel_frac": rel,
            "updates_recorded": sum(st.numel for st in ups), "nonzero_updates": n_u,
            "rel_threshold_log2": -(f.mbits + 1), "abs_threshold": f.min_subnormal,
            "below_abs_frac": sum(st.below_abs[f.name] for st in ups) / n_u if n_u else None}
        states = [st for st in stats if st.role == "optimizer_state"]
        n_s = sum(st.finite_nonzero for st in states)
        adv["optimizer_state"] = {
            "recorded": bool(states),
            "underflow_frac": sum(st.underflow[f.name] for st in states) / n_s if n_s else None}
        worst: dict[str, dict] = {}
        for st in stats:
            if st.role in ("update", "optimizer_state"):
                continue
            if st.role in GRAD_ROLES and k is not None:
                u, o = st.count_at_most_pow2(j_zero - k) / max(st.finite_nonzero, 1), 0.0
            else:
                u, o = st.frac(st.underflow[f.name]), st.frac(st.overflow[f.name])
            cur = worst.get(st.layer)
            if max(u, o) > threshold and (cur is None or max(u, o) > max(cur["underflow"], cur["overflow"])):
                worst[st.layer] = {"layer": st.layer, "role": st.role, "underflow": u, "overflow": o}
        adv["keep_high_precision"] = sorted(worst.values(), key=lambda w: -max(w["underflow"], w["overflow"]))
        adv["text"] = _advice_text(adv, f)
        return adv


def _advice_text(adv: dict, f: FloatFormat) -> str:
    pct = lambda v: "0" if v == 0 else "<0.01%" if v < 1e-4 else f"{100 * v:.4g}%"
    thr = pct(adv["threshold"])
    lines = [f"Advice for {f.name} (round to nearest even; 'significant' means more than {thr} "
             "of nonzero finite values):"]
    if adv["scale"] is None:
        lines.append("- Loss scale: no nonzero gradient was recorded; run a backward pass with the monitor attached.")
    else:
        lines.append(
            f"- Loss scale: S = {_num(adv['scale'])}, the largest power of two with {adv['margin']:g} x S x "
            f"max|grad| < {f.max:g} (max|grad| = {adv['max_grad']:.3g}). Gradient values that round to zero "
            f"(|g*S| <= {_num(f.min_subnormal / 2)}): {pct(adv['underflow_at_1'])} at S = 1, "
            f"{pct(adv['underflow_at_scale'])} at S = {_num(adv['scale'])}, so S lifts {pct(adv['lifted'])} of the "
            f"nonzero gradient values above the threshold. Loss scaling is {'needed' if adv['scaling_needed'] else 'not needed'}.")
    m = adv["master_weights"]
    rel = f"2^{m['rel_threshold_log2']}"
    if m["needed"] is None and m["updates_recorded"]:
        lines.append(f"- Master weights: unknown; all {m['updates_recorded']} recorded updates were zero: the "
                     "weights did not move (updates below their own precision, or a zero learning rate).")
    elif m["needed"] is None:
        lines.append("- Master weights: unknown; no update was recorded (call snapshot_weights() before "
                     "optimizer.step() and record_updates() after it).")
    else:
        lines.append(
            f"- Master weights: {'needed' if m['needed'] else 'not needed'}: {pct(m['below_rel_frac'])} of nonzero "
            f"updates are below {rel} of their weight (threshold {thr}), which a {f.name} weight would swallow; "
            f"{pct(m['below_abs_frac'])} are below {_num(m['abs_threshold'])} absolute.")
    s = adv.get("optimizer_state", {})
    if s.get("underflow_frac") is not None:
        bad = s["underflow_frac"] > adv["threshold"]
        lines.append(
            f"- Optimizer state: {pct(s['underflow_frac'])} of the nonzero moment values round to "
            f"zero in {f.name}; " + ("store the state in fp32 (optimizer_state.format=fp32) or "
                                     "raise the optimizer's eps." if bad else
                                     f"{f.name} can hold it."))
    if adv["keep_high_precision"]:
        worst = ", ".join(f"{w['layer']} ({w['role']}: underflow {pct(w['underflow'])}, overflow {pct(w['overflow'])})"
                          for w in adv["keep_high_precision"])
        lines.append(f"- Keep in higher precision: {worst}.")
    else:
        lines.append(f"- Keep in higher precision: none; no layer underflows or overflows more than {thr}.")
    return "\n".join(lines)
