"""The training engine: one object that runs a mixed-precision training step.

>>> mp = prepare(model, optimizer, recipe="fp16-mixed")
>>> with mp.autocast():
...     loss = loss_fn(model(x), y)
>>> mp.backward(loss)          # backward of loss * S
>>> mp.clip_grad_norm_(1.0)    # optional: sees unscaled gradients
>>> applied = mp.step()        # False when the step was skipped
>>> mp.zero_grad()

A step, stage by stage (every recipe runs the same stages; "off" is an identity object):

1. backward      (loss * S).backward(); remember whether the loss itself was finite
                 (an FSDP2 model: (loss * S / world).backward(), gradients summed)
2. unscale       master.grad = fp32(model.grad) / S, once per step; found_inf reduced
                 across ranks so every rank skips the same steps
3. check finite  a non-finite gradient or loss skips the step: nothing is updated
4. step master   the user's optimizer updates the master weights (then re-rounded to
                 the recipe's master format)
5. round         model weights <- round(master, weight format)
6. state         optimizer moments <- round(moments, recipe.optimizer_state)
7. loss scale    S <- update(S, found_inf); a forward NaN leaves S alone (scaling
                 cannot fix it)
"""
from __future__ import annotations

import contextlib
import copy
import enum
import fnmatch
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import nn

from .distributed import all_reduce_found_inf
from .distributed.fsdp import sum_gradient_reduction_
from .emulate import LayerPolicy, PrecisionMode, attach
from .native import (NATIVE_DTYPES, convert_parameters_, keep_full_precision, native_autocast,
                     native_dtype, resolve_backend)
from .optim import MasterOptimizer, ParamSlot, round_into_
from .recipe import Recipe, ScalingKind, TensorSpec, get_recipe

__all__ = ["prepare", "Engine", "NonFiniteError", "Stage", "KEEP_KEYWORDS",
           "resolve_keep_high_precision"]

KEEP_KEYWORDS = ("first", "last", "norm")
KeepFilter = Union[str, Callable[[str, nn.Module], bool]]

_GEMM_MODULES = (nn.Linear, nn.modules.conv._ConvNd)
_NORM_MODULES = tuple(m for m in (
    nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm, getattr(nn, "RMSNorm", None)) if m is not None)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps were skipped for non-finite losses or gradients."""


class Stage(str, enum.Enum):
    READY = "ready"          # gradients zeroed; backward() next
    BACKWARD = "backward"    # scaled gradients accumulated; more backward() or step()
    UNSCALED = "unscaled"    # gradients unscaled (by clip_grad_norm_); step() next
    STEPPED = "stepped"      # step() done; zero_grad() next


# --------------------------------------------------------------------------------------
# Which modules stay in high precision
# --------------------------------------------------------------------------------------
def resolve_keep_high_precision(model: nn.Module, filters) -> frozenset:
    """Qualified names of the modules kept in high precision.

    ``filters``: "first" (the first Linear/Conv by registration order), "last" (the
    last Linear), "norm" (every BatchNorm/LayerNorm/GroupNorm/InstanceNorm/RMSNorm),
    fnmatch patterns on qualified names, or callables ``(name, module) -> bool``.
    Submodules of a kept module are kept too.
    """
    if filters is None:
        filters = ()
    elif isinstance(filters, str) or callable(filters):
        filters = (filters,)
    modules = list(model.named_modules())
    chosen: set = set()
    for f in filters:
        if callable(f):
            chosen |= {n for n, m in modules if f(n, m)}
        elif f == "first":
            chosen |= set([n for n, m in modules if isinstance(m, _GEMM_MODULES)][:1])
        elif f == "last":
            chosen |= set([n for n, m in modules if isinstance(m, nn.Linear)][-1:])
        elif f == "norm":
            chosen |= {n for n, m in modules if isinstance(m, _NORM_MODULES)}
        elif isinstance(f, str):
            matched = {n for n, _ in modules if fnmatch.fnmatchcase(n, f)}
            if not matched:
                names = ", ".join(repr(n) for n, _ in modules[1:12])
                raise ValueError(f"keep_high_precision pattern {f!r} matches no module; valid: "
                                 f"{', '.join(KEEP_KEYWORDS)}, a callable, or a pattern on "
                                 f"module names such as {names}")
            chosen |= matched
        else:
            raise ValueError(f"keep_high_precision entry {f!r} is not a string or a callable; "
                             f"valid: {', '.join(KEEP_KEYWORDS)}, fnmatch patterns, callables")
    if "" in chosen:
        return frozenset(n for n, _ in modules)
    return frozenset(n for n, _ in modules
                     if any(n == c or n.startswith(c + ".") for c in chosen))


def _storage_spec(recipe: Recipe, kept: bool) -> TensorSpec:
    """The format a model weight is stored in: the weight format, the high-precision
    format for kept modules, FP32 when the weight format is scaled (the layer scales and
    rounds it at every use)."""
    if kept:
        return TensorSpec(recipe.high_precision)
    if recipe.weight.scaling is not ScalingKind.NONE:
        return TensorSpec()
    return TensorSpec(recipe.weight.format, recipe.weight.rounding)


# --------------------------------------------------------------------------------------
# The engine
# --------------------------------------------------------------------------------------
class Engine:
    """Mixed-precision training of ``model`` with the user's ``optimizer``; see the module
    docstring for the stages of a step. Build it with :func:`prepare`."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, recipe: Recipe, *,
                 backend: str, keep: frozenset, generator: torch.Generator,
                 count_lost_updates: Optional[bool] = None):
        self.model, self.optimizer, self.recipe = model, optimizer, recipe
        self.backend, self.keep, self.generator = backend, keep, generator
        self.loss_scaler = recipe.loss_scale.build()
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        self._steps = self._skipped = self._consecutive = 0
        self._history: list = []
        self._run: list = []           # diagnoses of the current run of skipped steps
        self._stage = Stage.READY
        self._reset_step_flags()
        self._hooks, self._attached = [], None
        self.monitor = None            # a NumericsMonitor attached by attach_monitor()
        if backend == "native":      # validate before the optimizer is touched
            self._dtype = native_dtype(recipe)
            if isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError("backend='native' converts parameter dtypes: call prepare() on "
                                 "the model before wrapping it in DistributedDataParallel")
        # FSDP2: reduce-scatter as a sum; backward() divides the loss by the data-parallel
        # size instead (see mixprec.distributed.fsdp)
        self._dp_size = sum_gradient_reduction_(model)
        self._masters = MasterOptimizer(
            optimizer, self._make_slots(), optimizer_state=recipe.optimizer_state,
            scaling=recipe.scaling, generator=generator,
            count_lost_updates=(recipe.master is None if count_lost_updates is None
                                else count_lost_updates))
        if backend == "native":
            self._setup_native()
        else:
            self._setup_emulated()
        self._masters.copy_to_model_()

    def _make_slots(self) -> list:
        modules = dict(self.model.named_modules())
        names = {id(p): n for n, p in self.model.named_parameters()}
        slots, seen = [], set()
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                if id(p) not in names:
                    raise ValueError(f"the optimizer holds a parameter of shape {tuple(p.shape)} "
                                     f"that is not a parameter of the model")
                if id(p) in seen:
                    continue
                seen.add(id(p))
                name = names[id(p)]
                module_name = name.rpartition(".")[0]
                slots.append(MasterOptimizer.make_slot(
                    name, modules[module_name], module_name, p,
                    storage=_storage_spec(self.recipe, module_name in self.keep),
                    master=self.recipe.master, native=self.backend == "native",
                    generator=self.generator))
        return slots

    def _setup_emulated(self) -> None:
        normal = LayerPolicy.from_recipe(self.recipe)
        high = LayerPolicy.from_recipe(self.recipe, high_precision=True)
        self._default_policy = normal
        self._attached = attach(self.model, lambda n, m: high if n in self.keep else normal)
        # Weights not optimized (frozen) are rounded to their storage format once, here.
        optimized = {id(s.model) for s in self._masters.slots}
        for name, module in self.model.named_modules():
            spec = _storage_spec(self.recipe, name in self.keep)
            for p in module.parameters(recurse=False):
                if id(p) not in optimized and p.dtype == torch.float32:
                    round_into_(p.data, p.data, spec, self.recipe.scaling, self.generator)

    def _setup_native(self) -> None:
        keep_dtype = NATIVE_DTYPES.get(self.recipe.high_precision, torch.float32)
        convert_parameters_(self.model, self._dtype, self.keep, keep_dtype)
        self._hooks = keep_full_precision(self.model, self.keep, self.device.type)

    # -- context --------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the forward pass (and the loss) under the recipe's precision policy."""
        if self.backend == "native":
            with native_autocast(self.device.type, self._dtype, self.recipe.fp32_ops):
                yield
        else:
            with PrecisionMode(fp32_ops=self.recipe.fp32_ops,
                               default_policy=self._default_policy, generator=self.generator):
                yield

    # -- stage bookkeeping ------------------------------------------------------------
    def _reset_step_flags(self) -> None:
        self._loss_nonfinite: Optional[torch.Tensor] = None
        self._found_inf = False
        self._loss_finite = True
        self._bad_slot: Optional[ParamSlot] = None
        self._culprit: Optional[tuple] = None     # (layer, role) the monitor saw go non-finite

    def _require(self, allowed: Sequence[Stage], call: str) -> None:
        if self._stage in allowed:
            return
        hints = {
            Stage.READY: "no backward() since zero_grad(): call mp.backward(loss) first",
            Stage.UNSCALED: "gradients were already unscaled by clip_grad_norm_(): call "
                            "mp.step() and mp.zero_grad() before the next backward()",
            Stage.STEPPED: "step() already ran for these gradients: call mp.zero_grad() "
                           "(not only optimizer.zero_grad()) before the next backward()",
            Stage.BACKWARD: "",
        }
        raise RuntimeError(f"mixprec: {call} called out of order: {hints[self._stage]}")

    # -- stage 1 --------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, **kwargs) -> None:
        """Backward of ``loss * scale``; may be called several times before step()."""
        self._require((Stage.READY, Stage.BACKWARD), "backward()")
        # (1) backward: record a non-finite loss before backward turns it into NaN grads
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
        scaled = self.loss_scaler.scale_loss(loss)
        if self._dp_size > 1:
            # each rank's gradient is its share of the global-batch gradient, as in one
            # process; FSDP sums the shares (mixprec.distributed.fsdp)
            scaled = scaled / self._dp_size
        scaled.backward(**kwargs)
        self._stage = Stage.BACKWARD

    # -- stage 2 --------------------------------------------------------------------
    def _unscale_once(self) -> None:
        if self._stage is Stage.UNSCALED:
            return
        # (2) unscale: master grads <- model grads / S; every rank agrees on skipping
        local_inf = self._masters.unscale_(self.loss_scaler.scale)
        local_bad_loss = bool(self._loss_nonfinite) if self._loss_nonfinite is not None else False
        self._bad_slot = self._masters.first_nonfinite() if local_inf else None
        self._found_inf = bool(all_reduce_found_inf(local_inf, device=self.device))
        self._loss_finite = not bool(all_reduce_found_inf(local_bad_loss, device=self.device))
        self._stage = Stage.UNSCALED

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale (if not yet done) and clip the FP32 master gradients; returns their
        total norm. A non-finite norm means step() will skip."""
        self._require((Stage.BACKWARD, Stage.UNSCALED), "clip_grad_norm_()")
        self._unscale_once()
        return self._masters.clip_grad_norm_(max_norm, norm_type)

    # -- stages 3-7 -----------------------------------------------------------------
    def step(self) -> bool:
        """Unscale, check finite, step or skip, round master -> model, update the scale.

        Returns False when the step was skipped. Raises :class:`NonFiniteError` after
        ``recipe.max_consecutive_skips`` consecutive skips.
        """
        self._require((Stage.BACKWARD, Stage.UNSCALED), "step()")
        self._unscale_once()
        scale = self.loss_scaler.scale
        # (3) check finite -> skip: a skipped step touches no weight and no optimizer state
        skipped = self._found_inf or not self._loss_finite
        lost = 0.0 if self._masters.count_lost_updates else None
        mon = self.monitor
        self._culprit = mon.first_nonfinite() if (mon is not None and skipped) else None
        if not skipped:
            if mon is not None:
                mon.snapshot_weights()
            # (4) step the master (and re-round it to the master format)
            lost = self._masters.step()
            # (5) round master -> model weights
            self._masters.copy_to_model_()
            # (6) optimizer state precision
            self._masters.round_optimizer_state_()
        if mon is not None:
            mon.record_updates()       # ends the monitor's step (no update when skipped)
        # (7) update the loss scale; a forward NaN is no overflow, so it leaves S alone
        if self._loss_finite:
            self.loss_scaler.update(self._found_inf)
        self._record(scale, skipped, lost)
        self._stage = Stage.STEPPED
        if self._consecutive >= self.recipe.max_consecutive_skips:
            raise NonFiniteError(self._diagnosis())
        return not skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear model and master gradients; the next step starts with backward()."""
        self._masters.zero_grad()
        self.model.zero_grad(set_to_none=set_to_none)
        self._reset_step_flags()
        self._stage = Stage.READY

    # -- counters and diagnosis ------------------------------------------------------
    def _record(self, scale: float, skipped: bool, lost: Optional[float]) -> None:
        entry = {"step": self._steps, "scale": scale, "skipped": skipped,
                 "loss_finite": self._loss_finite, "grads_finite": not self._found_inf,
                 "lost_updates": lost}
        if self.monitor is not None:
            entry["first_nonfinite"] = ("/".join(self._culprit) if self._culprit else None)
        self._history.append(entry)
        self._steps += 1
        if skipped:
            self._skipped += 1
            self._consecutive += 1
            self._run.append((self._steps - 1, scale, self._loss_finite, self._bad_slot,
                              self._culprit))
        else:
            self._consecutive = 0
            self._run = []

    def _diagnosis(self) -> str:
        n, last = len(self._run), self._run[-1]
        head = (f"mixprec: {n} consecutive steps skipped (recipe {self.recipe.short_str()!r}, "
                f"max_consecutive_skips={self.recipe.max_consecutive_skips}). ")
        slot, culprit = last[3], last[4]
        where = (f"First parameter (model order) with a non-finite gradient: {slot.describe()}."
                 if slot is not None else
                 "No gradient on this rank was non-finite (another rank's was).")
        if culprit is not None:
            where += (f" The monitor saw the first non-finite tensor (execution order) in "
                      f"layer {culprit[0]!r}, role {culprit[1]}.")
        forward = [r for r in self._run if not r[2]]
        if forward:
            return (head + f"The loss was already NaN/inf in the forward pass ({len(forward)} of "
                    f"the {n} steps, first at step {forward[0][0]}): the model produces NaN/inf "
                    f"before backward; loss scaling cannot fix this. Look for overflow, log(0) or "
                    f"0/0 in the forward pass, or keep the offending layer in high precision. "
                    + where)
        scales = ", ".join(f"{r[1]:g}" for r in self._run[-4:])
        return (head + f"The loss was finite but the gradients overflowed in backward at loss "
                f"scale {last[1]:g} (last scales: {scales}). " + where +
                " Lower loss_scale.init_scale or max_scale, or keep that layer in high precision.")

    def attach_monitor(self, monitor) -> "object":
        """Run ``monitor`` (a :class:`mixprec.NumericsMonitor` of this model) with the
        engine: it records every step's tensors (gradients as the engine computes them,
        i.e. multiplied by the loss scale, so leave the monitor's own scale at 1) and the
        applied updates; a skipped step's history entry and the diagnosis of repeated
        skips name the first non-finite tensor it saw (layer and role, execution order).
        Returns the monitor, attached; ``monitor.detach()`` or ``attach_monitor(None)``
        ends it."""
        if self.monitor is not None and self.monitor is not monitor:
            self.monitor.detach()
        self.monitor = monitor.attach() if monitor is not None else None
        return self.monitor

    @property
    def scale(self) -> float:
        return float(self.loss_scaler.scale)

    @property
    def steps(self) -> int:
        """step() calls so far, applied and skipped."""
        return self._steps

    @property
    def skipped_steps(self) -> int:
        return self._skipped

    @property
    def consecutive_skips(self) -> int:
        return self._consecutive

    @property
    def history(self) -> list:
        """One dict per step: step, scale, skipped, loss_finite, grads_finite, lost_updates."""
        return self._history

    @property
    def lost_update_fraction(self) -> Optional[float]:
        """Fraction of parameter elements whose last update was lost to rounding; None
        unless counted (``prepare(..., count_lost_updates=True)``; on by default only
        for recipes without master weights, such as fp16-pure)."""
        return self._masters.lost_update_fraction

    @property
    def master_params(self) -> list:
        return [s.master for s in self._masters.slots]

    @property
    def stage(self) -> Stage:
        return self._stage

    # -- checkpoints ------------------------------------------------------------------
    def _layer_states(self) -> Optional[dict]:
        return self._attached.state_dict() if self._attached is not None else None

    def state_dict(self) -> dict:
        """A snapshot of everything a bit-identical resume needs (model buffers aside:
        save ``model.state_dict()`` too). For torch.distributed.checkpoint use
        :class:`mixprec.distributed.checkpoint.EngineState`."""
        return copy.deepcopy({
            **self._extra_state(),
            "masters": self._masters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        })

    def _extra_state(self) -> dict:
        """The state that is neither a tensor to reshard nor per-rank: recipe, backend,
        loss scaler, counters, history, delayed-scaling states (the same on every rank,
        since found-inf and amax are reduced across ranks)."""
        return {
            "recipe": _recipe_text(self.recipe), "backend": self.backend,
            "loss_scaler": self.loss_scaler.state_dict(),
            "counters": {"steps": self._steps, "skipped_steps": self._skipped,
                         "consecutive_skips": self._consecutive},
            "history": self._history, "layer_states": self._layer_states(),
        }

    def _load_extra_state(self, state: dict) -> None:
        if state["recipe"] != _recipe_text(self.recipe):
            raise ValueError(f"checkpoint recipe {state['recipe']!r} differs from this "
                             f"engine's {_recipe_text(self.recipe)!r}")
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        counters = state["counters"]
        self._steps, self._skipped = counters["steps"], counters["skipped_steps"]
        self._consecutive = counters["consecutive_skips"]
        self._history = list(state["history"])
        if state.get("layer_states") is not None and self._attached is not None:
            self._attached.load_state_dict(state["layer_states"])

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; master and model weights are overwritten."""
        self._load_extra_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._masters.load_state_dict(state["masters"])
        self.generator.set_state(state["generator"])

    def remove(self) -> None:
        """Detach the precision hooks from the model (weights stay as they are)."""
        for h in self._hooks:
            h.remove()
        if getattr(self, "_attached", None) is not None:
            self._attached.remove()


def _recipe_text(recipe: Recipe) -> str:
    try:
        return str(recipe)
    except ValueError:    # a recipe whose name is not a preset
        return repr(recipe)


def prepare(model: nn.Module, optimizer: torch.optim.Optimizer,
            recipe: Union[str, Recipe] = "fp16-mixed", *, backend: Optional[str] = None,
            keep_high_precision: Union[KeepFilter, Sequence[KeepFilter], None] = None,
            generator: Optional[torch.Generator] = None,
            seed: Optional[int] = None,
            count_lost_updates: Optional[bool] = None) -> Engine:
    """Set up ``model`` and ``optimizer`` for training with ``recipe``.

    Args:
        model: the model; its weights are rounded (emulated) or converted (native).
        optimizer: a torch.optim optimizer over the model's parameters; it is rewired to
            update master weights and stays usable with LR schedulers.
        recipe: a preset name, a recipe string ("fp8-e5m2:grads.rounding=nearest") or a Recipe.
        backend: "emulated", "native" or "auto" (default: the recipe's backend).
        keep_high_precision: overrides ``recipe.keep_high_precision`` ("first", "last",
            "norm", fnmatch patterns, callables ``(name, module) -> bool``).
        generator: randomness of stochastic rounding; default a new generator seeded
            with ``seed`` (or ``torch.initial_seed()``), so runs are reproducible.
        count_lost_updates: count, every step, the fraction of parameter elements whose
            update the master rounding lost (``Engine.lost_update_fraction`` and the
            history's ``lost_updates``). Default: only for recipes without master
            weights (fp16-pure), where it is the diagnosis; it costs a few percent.

    Returns:
        The :class:`Engine`.

    >>> mp = prepare(model, torch.optim.AdamW(model.parameters()), "bf16-mixed")
    """
    recipe = get_recipe(recipe)
    if keep_high_precision is not None:
        filters = ((keep_high_precision,) if isinstance(keep_high_precision, str)
                   or callable(keep_high_precision) else tuple(keep_high_precision))
        if all(isinstance(f, str) for f in filters):
            recipe = get_recipe(recipe, keep_high_precision=filters)
    else:
        filters = recipe.keep_high_precision
    keep = resolve_keep_high_precision(model, filters)
    device = next(iter(model.parameters()), torch.empty(0)).device
    backend = resolve_backend(backend or recipe.backend, recipe, device)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.initial_seed() if seed is None else seed)
    return Engine(model, optimizer, recipe, backend=backend, keep=keep, generator=generator,
                  count_lost_updates=count_lost_updates)
