"""The training engine: one object that runs a mixed-precision training step.

Set-up: the keep rules are resolved (:func:`resolve_keep_high_precision`; "first" and
"last" by one traced forward, from ``example_inputs`` or from the first forward under
``autocast()``), then master weights, layer policies and the weights' storage formats
are fixed.

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
6. state         optimizer moments <- round(moments, recipe.optimizer_state); elements
                 rounded to zero where the gradient is not are counted (the history's
                 state_underflow) and warned about once
7. loss scale    S <- update(S, found_inf); a forward NaN leaves S alone (scaling
                 cannot fix it)
8. signs         Hadamard signs <- the next draw of the seeded stream
                 (``hadamard.signs=redraw``), on applied and skipped steps alike: the
                 signs of step k are the stream's k-th draw on every rank
"""
from __future__ import annotations

import contextlib
import copy
import enum
import warnings
from typing import Iterator, Optional, Sequence, Union

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .coverage import Coverage, CoverageRecorder
from .distributed import all_reduce_found_inf
from .distributed.fp8_all_gather import FP8AllGather
from .distributed.fsdp import fsdp_modules, is_fsdp, sum_gradient_reduction_
from .emulate import LayerPolicy, LayerState, PrecisionMode, attach, outside_layer
from .native import (NATIVE_DTYPES, ScaledMMGemms, TF32Warning, convert_parameters_,
                     keep_full_precision, tf32_problems,
                     native_autocast, native_dtype, native_kind, resolve_backend,
                     scaled_mm_available)
from .layers import (KEEP_KEYWORDS, KeepFilter, as_keep_filters, needs_trace, parameter_owners,
                     resolve_keep_high_precision, split_example_inputs, trace_gemm_calls)
from .optim import (STATE_UNDERFLOW_WARN, MasterOptimizer, OptimizerStateUnderflowWarning,
                    ParamSlot, StateUnderflow, round_into_)
from .recipe import Recipe, ScalingKind, TensorSpec, get_recipe
from .blocks import SignStream
from .shared import enter_caller_inputs, exit_caller_inputs

__all__ = ["prepare", "Engine", "NonFiniteError", "Stage", "KEEP_KEYWORDS",
           "STATE_UNDERFLOW_WARN", "needs_trace", "resolve_keep_high_precision"]



class NonFiniteError(RuntimeError):
    """Too many consecutive steps were skipped for non-finite losses or gradients."""


class Stage(str, enum.Enum):
    READY = "ready"          # gradients zeroed; backward() next
    BACKWARD = "backward"    # scaled gradients accumulated; more backward() or step()
    UNSCALED = "unscaled"    # gradients unscaled (by clip_grad_norm_); step() next
    STEPPED = "stepped"      # step() done; zero_grad() next


# --------------------------------------------------------------------------------------
# Storage of kept modules
# --------------------------------------------------------------------------------------
def _storage_spec(recipe: Recipe, kept: bool) -> TensorSpec:
    """The format a model weight is stored in: the weight format, the high-precision
    format for kept modules, FP32 when the weight format is scaled (the layer scales and
    rounds it at every use). A parameter shared by several modules (tied embeddings) is
    kept when any of them is: each layer still rounds it to its own format at use."""
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
                 backend: str, keep: Optional[frozenset], generator: torch.Generator,
                 count_lost_updates: Optional[bool] = None, filters=(), strict: bool = False,
                 fp8_all_gather: bool = False):
        self.model, self.optimizer, self.recipe = model, optimizer, recipe
        self.recorder = CoverageRecorder(strict=strict)
        self.backend, self.generator = backend, generator
        self.device = next(iter(model.parameters()), torch.empty(0)).device
        # backend="native": torch.autocast in fp16/bf16, or (per-tensor FP8) the emulated
        # set-up with every linear layer's GEMMs through torch._scaled_mm
        kind = native_kind(recipe) if backend == "native" else None
        self._autocast_native = kind == "autocast"
        self._scaled_mm: Optional[ScaledMMGemms] = None
        if kind == "scaled_mm":
            if not scaled_mm_available(self.device):
                raise ValueError(f"backend='native' runs {recipe.short_str()!r} through "
                                 f"torch._scaled_mm, which does not run on {self.device} "
                                 f"(CUDA needs compute capability 8.9 or more); valid: "
                                 f"backend='emulated'")
            self._scaled_mm = ScaledMMGemms(self.device, self.recorder)
        self.loss_scaler = recipe.loss_scale.build()
        # hadamard.signs=redraw: the signs of every transform size, fresh each step
        self.signs: Optional[SignStream] = None
        if (not self._autocast_native and recipe.hadamard.signs == "redraw"
                and recipe.hadamard.sizes()):
            self.signs = SignStream(recipe.hadamard.sizes(), seed=recipe.hadamard.seed)
        self._steps = self._skipped = self._consecutive = 0
        self._history: list = []
        self._run: list = []           # diagnoses of the current run of skipped steps
        self._stage = Stage.READY
        self._reset_step_flags()
        self._hooks, self._attached = [], None
        self.monitor = None            # a NumericsMonitor attached by attach_monitor()
        self._filters = as_keep_filters(filters)
        self._keep: Optional[frozenset] = None
        self._masters: Optional[MasterOptimizer] = None
        self._count_lost = (recipe.master is None if count_lost_updates is None
                            else count_lost_updates)
        self._autocast_depth = 0
        self._tf32_checked = False     # TF32 flags looked at (CUDA, emulated GEMMs)
        self._tracing = False
        self._state_warned = False
        self._pending_hook = None
        self._reserve_hook = None
        self._fp8_all_gather: Union[bool, FP8AllGather] = bool(fp8_all_gather)
        if fp8_all_gather and (backend == "native" or not is_fsdp(model)):
            raise ValueError("fp8_all_gather=True needs the emulated backend and a model "
                             "sharded with torch.distributed.fsdp.fully_shard; got backend "
                             f"{backend!r} and a model {'with' if is_fsdp(model) else 'without'}"
                             " fully_shard")
        if self._autocast_native:      # validate before the optimizer is touched
            self._dtype = native_dtype(recipe)
            if isinstance(model, nn.parallel.DistributedDataParallel):
                raise ValueError("backend='native' converts parameter dtypes: call prepare() on "
                                 "the model before wrapping it in DistributedDataParallel")
            self._outside = None
        else:
            self._default_policy = LayerPolicy.from_recipe(recipe)
            # calls outside every attached module: one state for the engine's lifetime,
            # given to every autocast(), so their delayed scalers keep their history
            self._outside = outside_layer(self._default_policy)
        # FSDP2: reduce-scatter as a sum; backward() divides the loss by the data-parallel
        # size instead (see mixprec.distributed.fsdp)
        self._dp_size = sum_gradient_reduction_(model)
        self._input_hooks = []
        if not self._autocast_native:
            # the model's inputs are the caller's: layers save them rather than copies
            self._input_hooks = [
                model.register_forward_pre_hook(_enter_inputs, with_kwargs=True),
                model.register_forward_hook(_exit_inputs, always_call=True)]
        if keep is not None:
            self._finalize(keep)
        else:
            # "first"/"last" need a forward pass: the first one under autocast() is traced.
            # torch.compiler.disable applied here, not as a decorator, since it imports
            # torch._dynamo (about 1 s), which `import mixprec` does not need.
            self._pending_hook = model.register_forward_pre_hook(
                torch.compiler.disable(self._trace_first_forward), with_kwargs=True,
                prepend=True)

    # -- set-up ---------------------------------------------------------------------
    def _finalize(self, keep: frozenset) -> None:
        """Fix the kept modules, then build master weights and precision policies and
        round the model's weights to their storage formats (nothing before this touches
        the weights or the optimizer)."""
        self._keep = frozenset(keep)
        if self._pending_hook is not None:
            self._pending_hook.remove()
            self._pending_hook = None
        # FSDP2 keeps the root's parameters unsharded after a forward (the trace): put the
        # sharded ones back, which the optimizer holds and the masters are made from
        for module in fsdp_modules(self.model):
            module.reshard()
        self._masters = MasterOptimizer(
            self.optimizer, self._make_slots(), optimizer_state=self.recipe.optimizer_state,
            scaling=self.recipe.scaling, generator=self.generator,
            count_lost_updates=self._count_lost)
        if self._autocast_native:
            self._setup_native()
        else:
            self._setup_emulated()
        self._masters.copy_to_model_()

    # Run eagerly under torch.compile: the one-time trace and set-up build parameters and
    # hooks, which a graph cannot hold (one graph break, on the first forward only; the
    # hook is removed after it, or pass example_inputs to prepare() to avoid it); the
    # hook is registered through torch.compiler.disable (see __init__).
    def _trace_first_forward(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the model while the keep rules wait for a trace: the first
        forward under :meth:`autocast` is first traced (eval mode, no gradients, plain
        FP32; see :func:`mixprec.layers.trace_gemm_calls`) with the same inputs, the
        engine is finalised, and the forward then runs under the finished policies."""
        if self._keep is not None or self._tracing or self._autocast_depth == 0:
            return None
        root_hooks = set(module._forward_pre_hooks)
        monitor, self._tracing = self.monitor, True
        try:
            if monitor is not None:    # the trace is no training step: the monitor skips it
                monitor.detach()
            calls = trace_gemm_calls(module, args, kwargs)
        finally:
            self._tracing = False
            if monitor is not None:
                monitor.attach()
        self._finalize(resolve_keep_high_precision(module, self._filters, calls=calls))
        # Hooks just registered on the model itself (its layer policy, a kept region,
        # the monitor) were not in this call's hook list: run them for this call too.
        for hook_id, hook in list(module._forward_pre_hooks.items()):
            if hook_id in root_hooks:
                continue
            if hook_id in module._forward_pre_hooks_with_kwargs:
                out = hook(module, args, kwargs)
                if out is not None:
                    args, kwargs = out
            else:
                out = hook(module, args)
                if out is not None:
                    args = out if isinstance(out, tuple) else (out,)
        return args, kwargs

    def _reserve_before_compile(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook of the model under a recipe with delayed scaling: the first
        forward that torch.compile traces first makes every delayed scaler
        (:meth:`reserve_scalers`), eagerly (one graph break, once; the hook is removed
        after it). Eager forwards make them as they go."""
        if torch.compiler.is_compiling() and self._autocast_depth and not self._tracing:
            self._reserve_once(args, kwargs)
        return None

    # torch._disable_dynamo: torch.compiler.disable that imports torch._dynamo at the
    # first call, not at `import mixprec` (about 1 s); Dynamo skips it the same way.
    @torch._disable_dynamo
    def _reserve_once(self, args: tuple, kwargs: dict) -> None:
        if self._reserve_hook is not None:      # not yet made by this hook or prepare()
            self.reserve_scalers(args, kwargs)

    @torch._disable_dynamo
    def reserve_scalers(self, args: tuple = (), kwargs: Optional[dict] = None) -> None:
        """Make the delayed-scaling state of every tensor one forward (and its backward)
        rounds, changing nothing else: torch.compile can only update scalers that exist
        before it traces the graph (:meth:`mixprec.policy.LayerState.reserve`).

        Runs ``model(*args, **kwargs)`` once, eagerly, under this engine's precision
        mode, in eval mode with gradients enabled (so the backward's scalers are made
        too; no backward runs), with the random generators restored afterwards; every
        scaler then holds the state it had before (new ones: empty history, scale 1).
        Calls outside the model's forward (:attr:`outside_state`) do not run here: that
        state gets a scaler for every tensor key such a call can round.
        ``prepare(..., example_inputs=...)`` calls it; otherwise the first compiled
        forward does, with its own inputs. Eager training needs none of it."""
        if self._attached is None:     # autocast-native: no emulated layers, no scalers
            return
        if self._reserve_hook is not None:
            self._reserve_hook.remove()
            self._reserve_hook = None
        states = [*self._attached.states.values(), self._outside.state]
        saved = {id(s): s.state_dict() for st in states for s in st.scalers.values()}
        self._outside.state.reserve_all(self._default_policy)
        flags = [(m, m.training) for m in self.model.modules()]
        gen = self.generator.get_state()
        monitor, self._tracing = self.monitor, True
        cuda = [d for d in {p.device for p in self.model.parameters()} if d.type == "cuda"]
        try:
            if monitor is not None:
                monitor.detach()
            self.model.eval()
            # DDP would wait for the gradients of a backward that never comes
            ddp = isinstance(self.model, nn.parallel.DistributedDataParallel)
            no_sync = self.model.no_sync() if ddp else contextlib.nullcontext()
            with torch.enable_grad(), torch.random.fork_rng(devices=cuda), no_sync, \
                    PrecisionMode(fp32_ops=self.recipe.fp32_ops, default_layer=self._outside,
                                  generator=self.generator, recorder=CoverageRecorder(),
                                  signs=self.signs):
                self.model(*args, **(kwargs or {}))
        finally:
            self._tracing = False
            for m, training in flags:
                m.training = training
            self.generator.set_state(gen)
            if monitor is not None:
                monitor.attach()
            for st in states:
                for s in st.scalers.values():
                    if id(s) in saved:
                        s.load_state_dict(saved[id(s)])
                    else:
                        s.reset()

    def _require_ready(self, call: str) -> MasterOptimizer:
        if self._masters is None:
            raise RuntimeError(
                f"mixprec: {call} before the model ran under mp.autocast(): keep rules "
                f"{'+'.join(f for f in self._filters if isinstance(f, str))} name positions "
                f"in execution order, found by tracing the model's first forward under "
                f"mp.autocast(). Call the model itself inside `with mp.autocast():`, or (when "
                f"a step calls only its submodules) pass prepare(..., example_inputs=...)")
        return self._masters

    def _kept(self, param: torch.Tensor, owners: dict, fallback: str) -> bool:
        return any(name in self._keep for name in owners.get(id(param), (fallback,)))

    def _make_slots(self) -> list:
        modules = dict(self.model.named_modules())
        names = {id(p): n for n, p in self.model.named_parameters()}
        owners = parameter_owners(self.model)
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
                    storage=_storage_spec(self.recipe, self._kept(p, owners, module_name)),
                    master=self.recipe.master, native=self._autocast_native,
                    generator=self.generator))
        return slots

    def _setup_emulated(self) -> None:
        normal, keep = self._default_policy, self._keep
        high = LayerPolicy.from_recipe(self.recipe, high_precision=True)
        self._attached = attach(self.model, lambda n, m: high if n in keep else normal,
                                kept=keep)
        if normal.has_delayed or high.has_delayed:
            # the delayed scalers are made before the first compiled forward is traced
            self._reserve_hook = self.model.register_forward_pre_hook(
                self._reserve_before_compile, with_kwargs=True)
        if self._fp8_all_gather is True:
            # FSDP2 all-gathers the FP8 weights as 1-byte codes from now on
            self._fp8_all_gather = FP8AllGather(self.model, self._attached.policies)
        # Weights not optimized (frozen) are rounded to their storage format once, here.
        optimized = {id(s.model) for s in self._masters.slots}
        owners = parameter_owners(self.model)
        for name, p in self.model.named_parameters():
            if id(p) not in optimized and p.dtype == torch.float32:
                spec = _storage_spec(self.recipe, self._kept(p, owners, name.rpartition(".")[0]))
                round_into_(p.data, p.data, spec, self.recipe.scaling, self.generator)

    def _setup_native(self) -> None:
        keep_dtype = NATIVE_DTYPES.get(self.recipe.high_precision, torch.float32)
        convert_parameters_(self.model, self._dtype, self._keep, keep_dtype)
        self._hooks = keep_full_precision(self.model, self._keep, self.device.type)

    # -- context --------------------------------------------------------------------
    @contextlib.contextmanager
    def autocast(self) -> Iterator[None]:
        """Run the forward pass (and the loss) under the recipe's precision policy.

        When the keep rules wait for a trace ("first"/"last" without ``example_inputs``),
        the first model forward in here is traced first and the engine finalised."""
        self._autocast_depth += 1
        if self.device.type == "cuda" and not self._autocast_native and not self._tf32_checked:
            # checked at the first autocast(): a script sets the flags after prepare()
            self._tf32_checked = True
            problems = tf32_problems(self.model)
            if problems:
                warnings.warn(f"mixprec: the emulated GEMMs on {self.device} may not be "
                              f"FP32: {'; '.join(problems)}", TF32Warning, stacklevel=3)
        try:
            if self._autocast_native:
                with native_autocast(self.device.type, self._dtype, self.recipe.fp32_ops):
                    yield
            else:
                with PrecisionMode(fp32_ops=self.recipe.fp32_ops, default_layer=self._outside,
                                   generator=self.generator, recorder=self.recorder,
                                   signs=self.signs), \
                        (self._scaled_mm.active() if self._scaled_mm is not None
                         else contextlib.nullcontext()):
                    yield
        finally:
            self._autocast_depth -= 1

    def coverage(self, *, reset: bool = False) -> Coverage:
        """What the matmul-like calls under :meth:`autocast` did since the engine was
        built (or the last reset): emulated and in which formats, kept by a rule, FP32
        ops, or not recognised (:mod:`mixprec.coverage`). ``reset=True`` starts a new
        count after returning this one. The native backend in fp16/bf16 leaves precision
        to torch.autocast and records nothing; with a per-tensor FP8 recipe it records
        the calls as emulated (the rounding is) and counts every linear GEMM in
        ``Coverage.gemms``: through ``torch._scaled_mm`` or emulated, and why.

        >>> print(mp.coverage())
        """
        out = self.recorder.coverage()
        if reset:
            self.recorder.reset()
        return out

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
        self.scale_loss(loss, _call="backward()").backward(**kwargs)

    def scale_loss(self, loss: torch.Tensor, *, _call: str = "scale_loss()") -> torch.Tensor:
        """Stage 1 for a training loop that runs backward itself (a framework's own
        backward hook): record whether ``loss`` is finite and return ``loss * S`` (divided
        by the data-parallel size under FSDP), whose backward the caller must run before
        step(). ``backward(loss)`` is ``scale_loss(loss).backward()``."""
        self._require((Stage.READY, Stage.BACKWARD), _call)
        self._require_ready(_call)
        # (1) backward: record a non-finite loss before backward turns it into NaN grads
        bad = ~torch.isfinite(loss.detach()).all()
        self._loss_nonfinite = bad if self._loss_nonfinite is None else self._loss_nonfinite | bad
        scaled = self.loss_scaler.scale_loss(loss)
        if self._dp_size > 1:
            # each rank's gradient is its share of the global-batch gradient, as in one
            # process; FSDP sums the shares (mixprec.distributed.fsdp)
            scaled = scaled / self._dp_size
        self._stage = Stage.BACKWARD
        return scaled

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

    def unscale_(self) -> None:
        """Stage 2 on its own: master gradients <- model gradients / S (once per step;
        step() does it when not done). For code that reads or clips the FP32 master
        gradients (``mp.master_params``) before step()."""
        self._require((Stage.BACKWARD, Stage.UNSCALED), "unscale_()")
        self._unscale_once()

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Unscale (if not yet done) and clip the FP32 master gradients; returns their
        total norm. A non-finite norm means step() will skip."""
        self._require((Stage.BACKWARD, Stage.UNSCALED), "clip_grad_norm_()")
        self._unscale_once()
        return self._masters.clip_grad_norm_(max_norm, norm_type)

    # -- stages 3-8 -----------------------------------------------------------------
    def step(self) -> bool:
        """Unscale, check finite, step or skip, round master -> model, update the scale,
        draw the next step's Hadamard signs (``hadamard.signs=redraw``).

        Returns False when the step was skipped. Raises :class:`NonFiniteError` after
        ``recipe.max_consecutive_skips`` consecutive skips.
        """
        self._require((Stage.BACKWARD, Stage.UNSCALED), "step()")
        self._unscale_once()
        scale = self.loss_scaler.scale
        # (3) check finite -> skip: a skipped step touches no weight and no optimizer state
        skipped = self._found_inf or not self._loss_finite
        lost = 0.0 if self._masters.count_lost_updates else None
        underflow = None
        mon = self.monitor
        self._culprit = mon.first_nonfinite() if (mon is not None and skipped) else None
        if not skipped:
            if mon is not None:
                mon.snapshot_weights()
            # (4) step the master (and re-round it to the master format)
            lost = self._masters.step()
            # (5) round master -> model weights
            self._masters.copy_to_model_()
            # (6) optimizer state precision; moments left at zero where the gradient is
            # not are counted (the history's state_underflow) and warned about once
            underflow = self._masters.round_optimizer_state_()
            self._warn_state_underflow(underflow)
        if mon is not None:
            mon.record_updates()       # ends the monitor's step (no update when skipped)
        # (7) update the loss scale; a forward NaN is no overflow, so it leaves S alone
        if self._loss_finite:
            self.loss_scaler.update(self._found_inf)
        self._record(scale, skipped, lost,
                     underflow.worst if underflow is not None else None)
        # (8) fresh Hadamard signs for the next step (its forward and backward)
        if self.signs is not None:
            self.signs.advance()
        self._stage = Stage.STEPPED
        if self._consecutive >= self.recipe.max_consecutive_skips:
            raise NonFiniteError(self._diagnosis())
        return not skipped

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear model and master gradients; the next step starts with backward()."""
        if self._masters is not None:
            self._masters.zero_grad()
        self.model.zero_grad(set_to_none=set_to_none)
        self._reset_step_flags()
        self._stage = Stage.READY

    # -- counters and diagnosis ------------------------------------------------------
    def _warn_state_underflow(self, underflow: Optional[StateUnderflow]) -> None:
        if self._state_warned or underflow is None or underflow.worst <= STATE_UNDERFLOW_WARN:
            return
        self._state_warned = True
        keys = ", ".join(f"{100 * f:.1f}% of {k}" for k, f in
                         sorted(underflow.fraction.items(), key=lambda kv: -kv[1]))
        names = ", ".join(f"{n!r} ({k} {100 * f:.0f}%)" for n, k, f in underflow.params[:6])
        more = f" and {len(underflow.params) - 6} more" if len(underflow.params) > 6 else ""
        warnings.warn(
            f"mixprec: optimizer state underflows in {self.recipe.optimizer_state.format} at "
            f"step {self._steps}: {keys} elements are 0 where the gradient is not (parameters "
            f"{names}{more}); those moments no longer follow their gradients. Fix: keep the "
            f"state in a wider format ('{self.recipe.name}:optimizer_state.format=fp32') or "
            f"use a larger eps in the optimizer.", OptimizerStateUnderflowWarning, stacklevel=3)

    def _record(self, scale: float, skipped: bool, lost: Optional[float],
                underflow: Optional[float] = None) -> None:
        entry = {"step": self._steps, "scale": scale, "skipped": skipped,
                 "loss_finite": self._loss_finite, "grads_finite": not self._found_inf,
                 "lost_updates": lost, "state_underflow": underflow}
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
        """One dict per step: step, scale, skipped, loss_finite, grads_finite, lost_updates,
        state_underflow (the largest fraction, over the optimizer's moments, of elements
        rounded to zero where the gradient is not; None when the state is kept in FP32
        or the step was skipped)."""
        return self._history

    @property
    def lost_update_fraction(self) -> Optional[float]:
        """Fraction of parameter elements whose last update was lost to rounding; None
        unless counted (``prepare(..., count_lost_updates=True)``; on by default only
        for recipes without master weights, such as fp16-pure)."""
        return self._masters.lost_update_fraction if self._masters is not None else None

    @property
    def master_params(self) -> list:
        return [s.master for s in self._require_ready("master_params").slots]

    @property
    def keep(self) -> Optional[frozenset]:
        """Qualified names of the modules kept in high precision; None until the first
        forward under :meth:`autocast` when "first"/"last" wait for a trace."""
        return self._keep

    @property
    def stage(self) -> Stage:
        return self._stage

    @property
    def outside_state(self) -> Optional[LayerState]:
        """The state of matmul-like calls under :meth:`autocast` outside every attached
        module (a functional call or ``@`` in the training step, outside the model's
        forward; :data:`mixprec.coverage.OUTSIDE` in the coverage report): their delayed
        scalers, one per tensor key, kept for the engine's lifetime and checkpointed
        with the layers'. None under ``backend="native"`` in fp16/bf16 (torch.autocast)."""
        return None if self._outside is None else self._outside.state

    # -- checkpoints ------------------------------------------------------------------
    def _layer_states(self) -> Optional[dict]:
        return self._attached.state_dict() if self._attached is not None else None

    def _outside_scalers(self) -> Optional[dict]:
        state = self.outside_state
        return state.state_dict() if state is not None and state.scalers else None

    def all_gather_bytes(self) -> Optional[dict]:
        """All-gather traffic of the weights FSDP gathers in FP8, or None without
        ``prepare(..., fp8_all_gather=True)`` (or before the layers are set up).

        A dict: ``params`` (the FP8-gathered weights), ``gathers``, ``fp8_bytes``
        (all-gather outputs, 1 byte per element), ``amax_bytes`` (one 8-byte amax
        all-reduce per gather), ``full_bytes`` (the same gathers in the parameters'
        dtype) and ``ratio`` = (fp8_bytes + amax_bytes) / full_bytes.
        """
        gather = self._fp8_all_gather
        if not isinstance(gather, FP8AllGather):
            return None
        return {"params": list(gather.params), **gather.bytes()}

    def state_dict(self) -> dict:
        """A snapshot of everything a bit-identical resume needs (model buffers aside:
        save ``model.state_dict()`` too). For torch.distributed.checkpoint use
        :class:`mixprec.distributed.checkpoint.EngineState`."""
        masters = self._require_ready("state_dict()")
        return copy.deepcopy({
            **self._extra_state(),
            "masters": masters.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "generator": self.generator.get_state(),
        })

    def _extra_state(self) -> dict:
        """The state that is neither a tensor to reshard nor per-rank: recipe, backend,
        kept modules, loss scaler, counters, history, delayed-scaling states of the
        layers and of calls outside them (the same on every rank, since found-inf and
        amax are reduced across ranks), the Hadamard sign stream (the same on every
        rank: one seed, one draw per step)."""
        self._require_ready("state_dict()")
        return {
            "recipe": _recipe_text(self.recipe), "backend": self.backend,
            "keep": sorted(self._keep),
            "loss_scaler": self.loss_scaler.state_dict(),
            "counters": {"steps": self._steps, "skipped_steps": self._skipped,
                         "consecutive_skips": self._consecutive},
            "history": self._history, "layer_states": self._layer_states(),
            "outside_scalers": self._outside_scalers(),
            "hadamard_signs": None if self.signs is None else self.signs.state_dict(),
        }

    def _load_extra_state(self, state: dict) -> None:
        """Check the recipe and kept modules, restore what :meth:`_extra_state` holds."""
        if state["recipe"] != _recipe_text(self.recipe):
            raise ValueError(f"checkpoint recipe {state['recipe']!r} differs from this "
                             f"engine's {_recipe_text(self.recipe)!r}")
        keep = state.get("keep")
        if self._keep is None and keep is not None:
            self._finalize(frozenset(keep))
        elif keep is not None and frozenset(keep) != self._keep:
            raise ValueError(f"checkpoint keeps modules {sorted(keep)} in high precision, this "
                             f"engine keeps {sorted(self._keep)}")
        self._require_ready("load_state_dict()")
        self.loss_scaler.load_state_dict(state["loss_scaler"])
        counters = state["counters"]
        self._steps, self._skipped = counters["steps"], counters["skipped_steps"]
        self._consecutive = counters["consecutive_skips"]
        self._history = list(state["history"])
        if state.get("layer_states") is not None and self._attached is not None:
            self._attached.load_state_dict(state["layer_states"])
        if state.get("outside_scalers") is not None and self._outside is not None:
            self._outside.state.load_state_dict(state["outside_scalers"])
        if self.signs is not None:
            if state.get("hadamard_signs") is None:
                raise ValueError("the checkpoint holds no Hadamard sign stream, but this "
                                 "engine's recipe re-draws signs every step "
                                 "(hadamard.signs=redraw): it cannot resume the same signs")
            self.signs.load_state_dict(state["hadamard_signs"])

    def load_state_dict(self, state: dict) -> None:
        """Restore a :meth:`state_dict`; master and model weights are overwritten. An
        engine still waiting for its first forward takes the kept modules from the
        checkpoint."""
        self._load_extra_state(state)
        self.optimizer.load_state_dict(state["optimizer"])
        self._masters.load_state_dict(state["masters"])
        self.generator.set_state(state["generator"])

    def remove(self) -> None:
        """Detach the precision hooks from the model (weights stay as they are)."""
        for h in self._hooks + self._input_hooks:
            h.remove()
        self._input_hooks = []
        if self._pending_hook is not None:
            self._pending_hook.remove()
            self._pending_hook = None
        if self._reserve_hook is not None:
            self._reserve_hook.remove()
            self._reserve_hook = None
        if getattr(self, "_attached", None) is not None:
            self._attached.remove()


def _enter_inputs(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook of the model: its tensor arguments count as held by the caller
    for the duration of the call (:func:`mixprec.shared.caller_inputs`). Not while
    compiling: saved tensors are not shared in a graph (``sharing_enabled``)."""
    if not torch.compiler.is_compiling():
        enter_caller_inputs(tree_leaves((args, kwargs)))


def _exit_inputs(module: nn.Module, args: tuple, output) -> None:
    if not torch.compiler.is_compiling():
        exit_caller_inputs()


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
            count_lost_updates: Optional[bool] = None, strict: bool = False,
            example_inputs: Union[torch.Tensor, tuple, list, dict, None] = None,
            fp8_all_gather: bool = False) -> Engine:
    """Set up ``model`` and ``optimizer`` for training with ``recipe``.

    Args:
        model: the model; its weights are rounded (emulated) or converted (native).
        optimizer: a torch.optim optimizer over the model's parameters; it is rewired to
            update master weights and stays usable with LR schedulers.
        recipe: a preset name, a recipe string ("fp8-e5m2:grads.rounding=nearest") or a Recipe.
        backend: "emulated", "native" or "auto" (default: the recipe's backend).
        keep_high_precision: overrides ``recipe.keep_high_precision`` ("first", "last",
            "norm", fnmatch patterns, callables ``(name, module) -> bool``; see
            :func:`resolve_keep_high_precision`).
        generator: randomness of stochastic rounding; default a new generator seeded
            with ``seed`` (or ``torch.initial_seed()``), so runs are reproducible.
        count_lost_updates: count, every step, the fraction of parameter elements whose
            update the master rounding lost (``Engine.lost_update_fraction`` and the
            history's ``lost_updates``). Default: only for recipes without master
            weights (fp16-pure), where it is the diagnosis; it costs a few percent.
        strict: a matmul-like call that runs unemulated inside ``autocast()`` outside
            any kept module raises :class:`mixprec.coverage.UnemulatedOpError` instead
            of warning once (:meth:`Engine.coverage` lists every call).
        example_inputs: inputs of one forward (a tensor, a tuple of positional arguments
            or a dict of keyword arguments), traced now to find the "first" and "last"
            layers. Without them the first forward under ``mp.autocast()`` is traced,
            with its own inputs, before it runs; until then the weights are untouched
            and ``mp.keep`` is None. Either way the trace runs in eval mode without
            gradients and changes nothing; both give the same engine, bit for bit.
        fp8_all_gather: on an FSDP2 model, all-gather each weight that its layer rounds
            to a current-scaled 8-bit format as 1-byte codes and one scale (amax
            MAX-reduced over the ranks first); the layers use the gathered values
            as they are, so training is bit-identical to the FP32 all-gather.
            :meth:`Engine.all_gather_bytes` reports the traffic. See
            :mod:`mixprec.distributed.fp8_all_gather`.

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
    if needs_trace(filters) and example_inputs is None:
        keep = None                    # traced at the first forward under autocast()
    else:
        if example_inputs is not None:
            split_example_inputs(example_inputs)       # a TypeError for a wrong kind
        keep = resolve_keep_high_precision(model, filters, example_inputs=example_inputs)
    device = next(iter(model.parameters()), torch.empty(0)).device
    backend = resolve_backend(backend or recipe.backend, recipe, device)
    if generator is None:
        generator = torch.Generator(device=device)
        generator.manual_seed(torch.initial_seed() if seed is None else seed)
    engine = Engine(model, optimizer, recipe, backend=backend, keep=keep, generator=generator,
                    count_lost_updates=count_lost_updates, filters=filters, strict=strict,
                    fp8_all_gather=fp8_all_gather)
    if example_inputs is not None and engine._reserve_hook is not None:
        engine.reserve_scalers(*split_example_inputs(example_inputs))
    return engine
