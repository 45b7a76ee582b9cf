"""Loss scaling: multiply the loss by S before backward, unscale and check the gradients.

Every scaler has the same interface, so a training loop never branches on precision:

    scaled = ls.scale_loss(loss); scaled.backward()
    found_inf = ls.unscale_(grads)          # grads *= 1/S in place, True if any inf/NaN
    if not ls.should_skip(found_inf): optimizer.step()
    ls.update(found_inf)                    # advance one step, adjust S

:class:`NoOpLossScale` is S = 1 (FP32, BF16), :class:`StaticLossScale` a constant S
(2018 paper: 8 to 32K), :class:`DynamicLossScale` the grow/back-off rule of
``torch.amp.GradScaler`` with DeepSpeed's hysteresis, a clamp range and the rising floor
of "enhanced" loss scaling (Mellempudi et al. 2019).  All scalers count steps, skipped
steps and consecutive skips, so a run that skips steps never does so silently.

Every scale is a float32 value held in a Python float, as GradScaler keeps it in a
float32 tensor: the scale arithmetic and the unscaling reciprocal match it bit for bit.
"""
from __future__ import annotations

import abc
import bisect
import enum
import math
import struct
from collections.abc import Mapping
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "LossScaleKind", "LossScale", "NoOpLossScale", "StaticLossScale", "DynamicLossScale",
    "from_config", "unscale_grads_", "SMALLEST_SCALE", "LARGEST_SCALE",
]

# Range of a usable scale.  Below the smallest normal float32 (2^-126) GradScaler walks on
# into subnormals, its float32 reciprocal overflows at 2^-128 and the scale reaches 0
# after 166 consecutive back-offs from 2^16: we stop at 2^-126 instead.
SMALLEST_SCALE = 2.0 ** -126                          # 1.1755e-38
LARGEST_SCALE = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]   # float32 max, 3.4028e38

FloorLike = Union[None, Mapping, Callable[[int], float]]


class LossScaleKind(str, enum.Enum):
    NONE = "none"
    STATIC = "static"
    DYNAMIC = "dynamic"


def _to_f32(x: float) -> float:
    """Round a Python float to the nearest float32 (ties to even), as a C cast does."""
    try:
        return struct.unpack("<f", struct.pack("<f", x))[0]
    except OverflowError:
        return math.copysign(math.inf, x)


def _scale_value(value, name: str) -> float:
    """Validate a scale-like number and return it rounded to float32."""
    try:
        v = float(value)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be a number, got {value!r}") from e
    v32 = _to_f32(v) if math.isfinite(v) else v
    if not (math.isfinite(v32) and SMALLEST_SCALE <= v32 <= LARGEST_SCALE):
        raise ValueError(f"{name} must be finite and in [2^-126, 3.4028e38] "
                         f"(float32 normal range), got {value!r}")
    return v32


def _found(found_inf) -> bool:
    """``found_inf`` as a bool: accepts bool, int and one-element tensors."""
    return bool(found_inf.item()) if isinstance(found_inf, Tensor) else bool(found_inf)


class LossScale(abc.ABC):
    """Common interface and step counters of every loss scaler.

    Counters (part of the state): ``steps`` = calls to :meth:`update`, ``skipped_steps``
    = updates with ``found_inf``, ``consecutive_skips`` = length of the current run of
    skipped steps, ``last_step_skipped`` = whether the latest update was a skip.
    """

    kind: LossScaleKind

    def __init__(self) -> None:
        self.steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self.last_step_skipped = False

    @property
    @abc.abstractmethod
    def scale(self) -> float:
        """The current loss scale S (a float32 value as a Python float)."""

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Return ``loss * S``, S as a float32 0-d tensor exactly as GradScaler.scale
        multiplies: a 0-d FP16/BF16 loss gives a float32 product (no overflow of the
        scaled loss itself); a larger tensor keeps its dtype."""
        return loss * torch.full((), self.scale, dtype=torch.float32, device=loss.device)

    def unscale_(self, grads: Sequence[Optional[Tensor]]) -> bool:
        """Multiply ``grads`` by 1/S in place; True if any gradient is inf/NaN."""
        return unscale_grads_(grads, self.scale)

    def should_skip(self, found_inf) -> bool:
        """Whether a step with this ``found_inf`` must be skipped: a non-finite gradient
        never reaches a weight, whatever the scaler."""
        return _found(found_inf)

    def update(self, found_inf) -> None:
        """Advance one step: count it, then let the scaler adjust S."""
        found = _found(found_inf)
        self.steps += 1
        self.last_step_skipped = found
        if found:
            self.skipped_steps += 1
            self.consecutive_skips += 1
        else:
            self.consecutive_skips = 0
        self._update_scale(found)

    def _update_scale(self, found_inf: bool) -> None:
        """Adjust the scale after a step (constant scalers: nothing)."""

    def state_dict(self) -> dict:
        """Everything needed to resume exactly."""
        return {"kind": self.kind.value, "scale": self.scale, "steps": self.steps,
                "skipped_steps": self.skipped_steps,
                "consecutive_skips": self.consecutive_skips,
                "last_step_skipped": self.last_step_skipped}

    def load_state_dict(self, sd: dict) -> None:
        """Restore the state saved by :meth:`state_dict` of the same kind of scaler."""
        if sd.get("kind") != self.kind.value:
            raise ValueError(f"state dict of a {sd.get('kind')!r} loss scale cannot be "
                             f"loaded into a {self.kind.value!r} one")
        missing = sorted(set(self.state_dict()) - set(sd) - {"floor"})
        if missing:
            raise ValueError(f"loss-scale state dict lacks keys {missing}")
        counters = {k: int(sd[k]) for k in ("steps", "skipped_steps", "consecutive_skips")}
        if any(v < 0 for v in counters.values()):
            raise ValueError(f"loss-scale counters must be >= 0, got {counters}")
        self._load_scale_state(sd)      # validates before anything is assigned below
        for k, v in counters.items():
            setattr(self, k, v)
        self.last_step_skipped = bool(sd["last_step_skipped"])

    def _load_scale_state(self, sd: dict) -> None:
        """Restore the scaler-specific part of the state."""

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(scale={self.scale!r}, steps={self.steps}, "
                f"skipped_steps={self.skipped_steps})")


class NoOpLossScale(LossScale):
    """S = 1 for ever: the identity scaler of FP32 and BF16 runs (steps still counted)."""

    kind = LossScaleKind.NONE

    @property
    def scale(self) -> float:
        return 1.0

    def scale_loss(self, loss: Tensor) -> Tensor:
        """Return ``loss`` itself."""
        return loss

    def _load_scale_state(self, sd: dict) -> None:
        if float(sd["scale"]) != 1.0:
            raise ValueError(f"a 'none' loss scale has scale 1.0, got {sd['scale']!r}")


class StaticLossScale(LossScale):
    """A constant scale S; overflowing steps are skipped and counted, S never changes."""

    kind = LossScaleKind.STATIC

    def __init__(self, scale: float) -> None:
        super().__init__()
        self._scale = _scale_value(scale, "scale")

    @property
    def scale(self) -> float:
        return self._scale

    def _load_scale_state(self, sd: dict) -> None:
        self._scale = _scale_value(sd["scale"], "scale")


def _floor_table(floor: Mapping) -> tuple:
    """Validate a {step: floor} mapping into sorted ((step, floor32), ...)."""
    table = []
    for step, value in floor.items():
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"floor steps must be integers >= 0, got {step!r}")
        table.append((step, _floor_value(value, step)))
    return tuple(sorted(table))


def _floor_value(value, step: int) -> float:
    """A floor value: 0 (no floor) or a valid scale, rounded to float32."""
    try:
        if float(value) == 0.0:
            return 0.0
    except (TypeError, ValueError) as e:
        raise ValueError(f"floor at step {step} must be a number, got {value!r}") from e
    return _scale_value(value, f"floor at step {step}")


class DynamicLossScale(LossScale):
    """Dynamic loss scaling: back off on overflow, grow after a run of clean steps.

    Update rule, one call per step (``h`` = hysteresis, all products rounded to float32
    as GradScaler's float32 scale tensor rounds them)::

        if found_inf:
            growth_tracker = 0
            if hysteresis_left > 1: hysteresis_left -= 1       # absorb the overflow
            else:                   S = f32(S * backoff_factor)
        else:
            if consecutive_hysteresis: hysteresis_left = h
            growth_tracker += 1
            if growth_tracker == growth_interval:
                growth_tracker = 0
                hysteresis_left = h
                if isfinite(f32(S * growth_factor)): S = f32(S * growth_factor)
        steps += 1
        lo = max(min_scale, floor(steps)); hi = max_scale
        S = min(max(S, lo), hi)      # a rising floor lifts S; S never leaves [lo, hi]

    Hysteresis is DeepSpeed's ``delayed_shift``: the scale backs off only at the h-th
    overflow since the last growth (or, with ``consecutive_hysteresis``, since the last
    clean step); once spent it stays at 1 until the next growth, so later overflows back
    off at once.  h = 1 is GradScaler.  With its defaults this class gives exactly
    GradScaler's scale after any sequence of updates that keeps the scale >= 2^-126
    (below that GradScaler degenerates into subnormals and eventually 0).

    ``floor`` is the rising minimum of enhanced loss scaling: a mapping {step: floor}
    (the floor at step s is the value of the largest key <= s; 0 before the first key)
    or a callable step -> floor.  Step s is the step about to use the scale, i.e.
    ``steps`` updates have been made.  Overflowing steps are still skipped, but cannot
    drive S below the floor.

    >>> ls = DynamicLossScale(init_scale=8.0, growth_interval=2)
    >>> ls.update(False); ls.update(False); ls.scale
    16.0
    >>> ls.update(True); ls.scale
    8.0
    """

    kind = LossScaleKind.DYNAMIC

    def __init__(self, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000,
                 hysteresis: int = 1, min_scale: Optional[float] = None,
                 max_scale: Optional[float] = None, floor: FloorLike = None, *,
                 consecutive_hysteresis: bool = False) -> None:
        super().__init__()
        self._configure(growth_factor, backoff_factor, growth_interval, hysteresis,
                         min_scale, max_scale, consecutive_hysteresis)
        self._set_floor(floor)
        scale = _scale_value(init_scale, "init_scale")
        if not self.min_scale <= scale <= self.max_scale:
            raise ValueError(f"init_scale must be in [min_scale, max_scale] = "
                             f"[{self.min_scale}, {self.max_scale}], got {init_scale!r}")
        self._scale = self._clamp(scale, 0)     # a floor above init_scale lifts it
        self.growth_tracker = 0
        self.hysteresis_left = self.hysteresis

    # -- configuration -----------------------------------------------------------------
    def _configure(self, growth_factor, backoff_factor, growth_interval, hysteresis,
                   min_scale, max_scale, consecutive_hysteresis) -> None:
        growth_factor, backoff_factor = float(growth_factor), float(backoff_factor)
        if not (math.isfinite(growth_factor) and growth_factor > 1.0):
            raise ValueError(f"growth_factor must be finite and > 1, got {growth_factor!r}")
        if not 0.0 < backoff_factor < 1.0:
            raise ValueError(f"backoff_factor must be in (0, 1), got {backoff_factor!r}")
        if isinstance(growth_interval, bool) or int(growth_interval) != growth_interval \
                or growth_interval < 1:
            raise ValueError(f"growth_interval must be an integer >= 1, got {growth_interval!r}")
        if isinstance(hysteresis, bool) or int(hysteresis) != hysteresis or hysteresis < 1:
            raise ValueError(f"hysteresis must be an integer >= 1, got {hysteresis!r}")
        lo = SMALLEST_SCALE if min_scale is None else _scale_value(min_scale, "min_scale")
        hi = LARGEST_SCALE if max_scale is None else _scale_value(max_scale, "max_scale")
        if lo > hi:
            raise ValueError(f"min_scale must be <= max_scale, got {min_scale!r} > {max_scale!r}")
        self.growth_factor, self.backoff_factor = growth_factor, backoff_factor
        self.growth_interval, self.hysteresis = int(growth_interval), int(hysteresis)
        self.min_scale, self.max_scale = lo, hi
        self.consecutive_hysteresis = bool(consecutive_hysteresis)

    def _set_floor(self, floor: FloorLike) -> None:
        self._floor_fn: Optional[Callable[[int], float]] = None
        self._floor_steps: tuple = ()
        self._floor_values: tuple = ()
        if floor is None:
            return
        if isinstance(floor, Mapping):
            table = _floor_table(floor)
            self._floor_steps = tuple(s for s, _ in table)
            self._floor_values = tuple(v for _, v in table)
            too_high = [(s, v) for s, v in table if v > self.max_scale]
            if too_high:
                raise ValueError(f"floor values must be <= max_scale = {self.max_scale}, "
                                 f"got {too_high}")
        elif callable(floor):
            self._floor_fn = floor
        else:
            raise ValueError("floor must be None, a mapping {step: floor} or a callable "
                             f"step -> floor, got {type(floor).__name__}")

    def floor_at(self, step: int) -> float:
        """The floor in force at ``step`` (0.0 where none is)."""
        if self._floor_fn is not None:
            return _floor_value(self._floor_fn(step), step)
        i = bisect.bisect_right(self._floor_steps, step)
        return self._floor_values[i - 1] if i else 0.0

    def min_scale_at(self, step: int) -> float:
        """The effective minimum max(min_scale, floor(step))."""
        lo = max(self.min_scale, self.floor_at(step))
        if lo > self.max_scale:
            raise ValueError(f"floor at step {step} is {lo}, above max_scale = "
                             f"{self.max_scale}")
        return lo

    def _clamp(self, scale: float, step: int) -> float:
        return min(max(scale, self.min_scale_at(step)), self.max_scale)

    # -- the update rule ---------------------------------------------------------------
    @property
    def scale(self) -> float:
        return self._scale

    @property
    def at_minimum(self) -> bool:
        """Whether the scale sits at its effective minimum (back-off has no effect)."""
        return self._scale <= self.min_scale_at(self.steps)

    def _update_scale(self, found_inf: bool) -> None:
        scale = self._scale
        if found_inf:
            self.growth_tracker = 0
            if self.hysteresis_left > 1:
                self.hysteresis_left -= 1
            else:
                scale = _to_f32(scale * self.backoff_factor)
        else:
            if self.consecutive_hysteresis:
                self.hysteresis_left = self.hysteresis
            self.growth_tracker += 1
            if self.growth_tracker == self.growth_interval:
                self.growth_tracker = 0
                self.hysteresis_left = self.hysteresis
                grown = _to_f32(scale * self.growth_factor)
                if math.isfinite(grown):    # as GradScaler: never grow into inf
                    scale = grown
        self._scale = self._clamp(scale, self.steps)

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd.update(growth_tracker=self.growth_tracker, hysteresis_left=self.hysteresis_left,
                  growth_factor=self.growth_factor, backoff_factor=self.backoff_factor,
                  growth_interval=self.growth_interval, hysteresis=self.hysteresis,
                  consecutive_hysteresis=self.consecutive_hysteresis,
                  min_scale=self.min_scale, max_scale=self.max_scale)
        if self._floor_fn is None:      # a callable floor is configuration, not state
            sd["floor"] = list(zip(self._floor_steps, self._floor_values))
        return sd

    def _load_scale_state(self, sd: dict) -> None:
        # Validate on a scratch object so a bad state dict leaves self untouched.
        new = DynamicLossScale.__new__(DynamicLossScale)
        new._configure(sd["growth_factor"], sd["backoff_factor"], sd["growth_interval"],
                       sd["hysteresis"], sd["min_scale"], sd["max_scale"],
                       sd["consecutive_hysteresis"])
        if "floor" in sd:
            new._set_floor(dict(sd["floor"]))
        else:
            new._floor_fn, new._floor_steps, new._floor_values = (
                self._floor_fn, self._floor_steps, self._floor_values)
        scale = _scale_value(sd["scale"], "scale")
        tracker, left = int(sd["growth_tracker"]), int(sd["hysteresis_left"])
        if not 0 <= tracker < new.growth_interval:
            raise ValueError(f"growth_tracker must be in [0, {new.growth_interval}), "
                             f"got {tracker}")
        if not 1 <= left <= new.hysteresis:
            raise ValueError(f"hysteresis_left must be in [1, {new.hysteresis}], got {left}")
        self.__dict__.update({k: v for k, v in new.__dict__.items()})
        self._scale, self.growth_tracker, self.hysteresis_left = scale, tracker, left


def from_config(kind: Union[str, LossScaleKind], **kw) -> LossScale:
    """Build a scaler: "none" -> NoOp, "static" -> Static(scale), "dynamic" -> Dynamic(**kw).

    >>> from_config("static", scale=1024.0).scale
    1024.0
    """
    try:
        kind = LossScaleKind(kind)
    except ValueError as e:
        raise ValueError(f"unknown loss scale kind {kind!r}; valid kinds: "
                         f"{[k.value for k in LossScaleKind]}") from e
    cls = {LossScaleKind.NONE: NoOpLossScale, LossScaleKind.STATIC: StaticLossScale,
           LossScaleKind.DYNAMIC: DynamicLossScale}[kind]
    try:
        return cls(**kw)
    except TypeError as e:
        raise ValueError(f"bad options for a {kind.value!r} loss scale: {e}") from e


# -- unscaling ---------------------------------------------------------------------------
def unscale_grads_(grads: Sequence[Optional[Tensor]], scale: float) -> bool:
    """Multiply every gradient in place by 1/scale; True if any is inf/NaN afterwards.

    inv = f32(1 / f64(scale)) as GradScaler computes it, and each element becomes
    ``dtype(float32(g) * inv)``.  The check is made after unscaling, so it also catches
    a finite gradient that 1/scale pushes to inf when scale < 1 (a non-finite gradient
    stays non-finite, since 0 < inv < inf).  ``None`` entries are ignored; a sparse
    gradient is unscaled through its values.  One host sync per call.

    Fast path: ``torch._amp_foreach_non_finite_check_and_unscale_`` (one fused pass
    per device and dtype; it checks before unscaling, so when inv > 1 a second pass with
    inv = 1, which only checks, follows).  Where it is unavailable: foreach ops.
    """
    scale = float(scale)
    inv = _to_f32(1.0 / scale) if math.isfinite(scale) and scale > 0 else math.nan
    if not (math.isfinite(inv) and inv > 0):
        raise ValueError(f"scale must be positive, finite and have a finite float32 "
                         f"reciprocal, got {scale!r}")
    groups: dict = {}
    for g in grads:
        if g is None:
            continue
        if not g.is_floating_point():
            raise ValueError(f"gradients must be floating point, got dtype {g.dtype}")
        g = g._values() if g.is_sparse else g
        groups.setdefault((g.device, g.dtype), []).append(g)
    flags = []
    with torch.no_grad():
        for (device, _), group in groups.items():
            flags.append(_unscale_group_(group, inv, device))
    if not flags:
        return False
    return bool(torch.stack([f.to(flags[0].device) for f in flags]).sum().item() > 0)


def _unscale_group_(group: list, inv: float, device: torch.device) -> Tensor:
    """Unscale one same-device same-dtype group; a 0-d float32 flag, > 0 if non-finite."""
    found = torch.zeros((), dtype=torch.float32, device=device)
    try:
        inv_t = torch.full((), inv, dtype=torch.float32, device=device)
        torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_t)
        if inv > 1.0:   # unscaling may have overflowed a finite value: check again
            torch._amp_foreach_non_finite_check_and_unscale_(group, found, inv_t.fill_(1.0))
        return found
    except (RuntimeError, NotImplementedError, AttributeError):
        return _unscale_group_foreach_(group, inv)


def _unscale_group_foreach_(group: list, inv: float) -> Tensor:
    """Plain foreach fallback: multiply in float32 at least (the fused kernel's opmath;
    a foreach multiply of a half tensor would round inv to half first), then the
    infinity norm of each tensor is non-finite iff the tensor holds inf or NaN."""
    if inv != 1.0 and group[0].dtype in (torch.float16, torch.bfloat16):
        torch._foreach_copy_(group, torch._foreach_mul([g.float() for g in group], inv))
    elif inv != 1.0:
        torch._foreach_mul_(group, inv)
    norms = torch._foreach_norm(group, math.inf)
    return (~torch.stack(norms).isfinite()).sum().to(torch.float32)
