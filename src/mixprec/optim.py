"""Master weights: any torch.optim optimizer stepping a higher-precision copy of the model.

The user's optimizer object keeps working (param groups, weight decay, LR schedulers): the
parameters inside its ``param_groups`` are swapped, in place, for the *master* tensors, so
every ``optimizer.step()`` updates the masters. After each step:

    master  <- round(master, recipe.master)          (e.g. FP16 with stochastic rounding)
    weight  <- round(master, storage format)          (what the model computes with)
    state   <- round(state, recipe.optimizer_state)   (exp_avg, exp_avg_sq, momentum, ...)

``recipe.master = None`` ("fp16-pure") keeps no extra precision: the master *is* the
stored weight, rounded to the weight format after every update, so an update smaller
than half an ulp of the weight is lost; :attr:`MasterOptimizer.lost_update_fraction`
counts such elements (when ``count_lost_updates`` is on: the count costs a copy and two
comparisons of every parameter per step, a few percent of a small model's step).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch
from torch import nn

from .loss_scale import unscale_grads_
from .quant import quantize
from .recipe import Rounding, ScalingConfig, ScalingKind, TensorSpec
from .scaling import quantize_spec

__all__ = ["ParamSlot", "MasterOptimizer", "round_into_", "StateUnderflow",
           "OptimizerStateUnderflowWarning", "STATE_UNDERFLOW_WARN"]



def _is_dtensor(t: torch.Tensor) -> bool:
    """Whether ``t`` is a DTensor (an FSDP2 shard). torch.distributed.tensor is looked
    up, not imported: importing it costs about 1 s (sympy and the DTensor op tables), and
    a DTensor exists only once its module has been imported."""
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(t, module.DTensor)


# Unscaled formats whose round-to-nearest is exactly torch's cast to a native dtype.
_CAST_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# State entries that are counters, not per-element moments (never rounded).
_COUNTER_KEYS = frozenset({"step"})
# The engine warns (once per run) when more than this fraction of an optimizer moment's
# elements are zero in the state format while their gradients are not.
STATE_UNDERFLOW_WARN = 0.01


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's local shard of a DTensor (sharing its storage), else ``t`` itself."""
    return t.to_local() if _is_dtensor(t) else t


def _sum_over_shards(count: int, tensors: Sequence[torch.Tensor]) -> int:
    """A count made on this rank's shards, summed over the ranks holding the other shards
    (the mesh dimensions the first DTensor among ``tensors`` is sharded on), so that
    every rank reports the whole tensor's count. Plain tensors: ``count`` itself."""
    sharded = next((t for t in tensors if _is_dtensor(t)),
                   None)
    if sharded is None:
        return count
    total = torch.tensor([count], dtype=torch.int64, device=sharded.to_local().device)
    for dim, placement in enumerate(sharded.placements):
        if placement.is_shard():
            torch.distributed.all_reduce(total, group=sharded.device_mesh.get_group(dim))
    return int(total.item())


def round_into_(dst: torch.Tensor, src: torch.Tensor, spec: TensorSpec,
                cfg: ScalingConfig = ScalingConfig(),
                generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """dst <- round(src, spec), in place; ``dst`` may be ``src``.

    A destination in a native low-precision dtype (float16/bfloat16) is written by the
    dtype cast itself, which rounds to nearest-even.
    """
    with torch.no_grad():
        if _is_dtensor(dst):
            # An FSDP2 shard is rounded through its local tensor: the rounding is
            # element-wise, and kernels outside torch's dispatch need plain tensors.
            same = dst is src
            local = dst.to_local()
            round_into_(local, local if same else _local(src), spec, cfg, generator)
            return dst
        if dst.dtype != torch.float32 or spec.is_identity:
            return dst if dst is src else dst.copy_(src)
        cast = _CAST_DTYPES.get(spec.format)
        if cast is not None and spec.rounding is Rounding.NEAREST and not spec.saturate:
            # torch's IEEE cast is round-to-nearest-even with overflow to inf and
            # subnormals: bit-identical to quantize(), an order of magnitude faster
            return dst.copy_(src.to(cast))
        if spec.scaling is ScalingKind.NONE:
            return quantize(src, spec.format, rounding=spec.rounding.value,
                            saturate=spec.saturate, generator=generator, out=dst)
        return dst.copy_(quantize_spec(src, spec, cfg, generator=generator))


class OptimizerStateUnderflowWarning(UserWarning):
    """Optimizer moments rounded to zero in their storage format while their gradients
    are not zero: the optimizer no longer sees those gradients (an Adam update divides by
    sqrt(exp_avg_sq) + eps, so a zero second moment turns into a huge step)."""


@dataclass(frozen=True)
class StateUnderflow:
    """Optimizer-state elements that the state format rounded to zero where the gradient
    of that step is not zero, after one step:

        fraction[key] = #(round(state[key]) == 0 and grad != 0) / #(grad != 0)

    over every parameter; ``worst`` is the largest of them (the history's
    ``state_underflow``); ``params`` lists ``(parameter, key, fraction)``, worst first.
    """
    fraction: dict
    params: tuple

    @property
    def worst(self) -> float:
        return max(self.fraction.values(), default=0.0)


@dataclass
class ParamSlot:
    """One optimized parameter: the model's tensor and the master the optimizer updates.

    ``storage`` is the format the model's weight is stored in; ``keep`` the format the
    master is re-rounded to after every update (the recipe's master spec, or ``storage``
    when there is no master copy). ``master is model`` when no copy is needed.
    """
    name: str
    module_name: str
    module_type: str
    model: torch.Tensor
    master: torch.Tensor
    storage: TensorSpec
    keep: TensorSpec
    grad_buffer: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def shares_storage(self) -> bool:
        return self.master is self.model

    def describe(self) -> str:
        return f"'{self.name}' (module '{self.module_name}', {self.module_type})"


class MasterOptimizer:
    """Wrap ``optimizer`` so that it steps master copies of the model's parameters.

    Args:
        optimizer: the user's torch.optim optimizer; its params must be model params.
        slots: one :class:`ParamSlot` per optimizer parameter (see :meth:`make_slot`).
        optimizer_state: TensorSpec the optimizer's moment tensors are rounded to.
        scaling: scaling knobs used by scaled specs.
        generator: the randomness of stochastic rounding.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, slots: Sequence[ParamSlot], *,
                 optimizer_state: TensorSpec = TensorSpec(),
                 scaling: ScalingConfig = ScalingConfig(),
                 generator: Optional[torch.Generator] = None,
                 count_lost_updates: bool = True):
        self.optimizer = optimizer
        self.count_lost_updates = count_lost_updates
        self.slots = list(slots)
        self.optimizer_state = optimizer_state
        self.scaling = scaling
        self.generator = generator
        self.lost_update_fraction: Optional[float] = 0.0 if count_lost_updates else None
        self._numel = sum(s.master.numel() for s in self.slots) or 1
        self._swap_into_optimizer()

    # -- construction ---------------------------------------------------------------
    @staticmethod
    def make_slot(name: str, module: nn.Module, module_name: str, param: nn.Parameter, *,
                  storage: TensorSpec, master: Optional[TensorSpec], native: bool,
                  generator: Optional[torch.Generator] = None) -> ParamSlot:
        """A slot for ``param`` holding its *current* (full-precision) value as master.

        Build slots before the model's weights are rounded or converted: the master
        starts from the original FP32 values.
        """
        keep = master if master is not None else storage
        if master is None and not native and param.dtype == torch.float32:
            copy = param                      # the stored weight is the master
        else:
            copy = nn.Parameter(param.detach().to(torch.float32, copy=True))
        round_into_(copy.data, copy.data, keep, generator=generator)
        return ParamSlot(name, module_name, type(module).__name__, param, copy, storage, keep)

    def _swap_into_optimizer(self) -> None:
        """Replace model params by masters inside the optimizer, lists mutated in place
        (optimizers such as LBFGS hold on to the list object); move existing state."""
        by_id = {id(s.model): s for s in self.slots}
        for group in self.optimizer.param_groups:
            params = group["params"]
            for i, p in enumerate(params):
                slot = by_id.get(id(p))
                if slot is None or slot.shares_storage:
                    continue
                params[i] = slot.master
                if p in self.optimizer.state:
                    self.optimizer.state[slot.master] = self.optimizer.state.pop(p)

    # -- stage 2: unscale -----------------------------------------------------------
    def unscale_(self, scale: float) -> bool:
        """master.grad <- float32(model.grad) / scale for every slot; True if any is inf/NaN.

        FP32 model gradients are consumed in place (the master's gradient *is* the model's
        gradient tensor); low-precision ones are copied into a persistent FP32 buffer.
        """
        grads = []
        for s in self.slots:
            g = s.model.grad
            if g is None:
                if not s.shares_storage:
                    s.master.grad = None
                continue
            if not s.shares_storage:
                if g.dtype == torch.float32:
                    s.master.grad = g
                else:
                    if s.grad_buffer is None:
                        s.grad_buffer = torch.empty_like(s.master)
                    s.master.grad = s.grad_buffer.copy_(g)
            grads.append(s.master.grad)
        return bool(unscale_grads_(grads, scale))

    def first_nonfinite(self) -> Optional[ParamSlot]:
        """The first slot (model order) whose gradient holds inf or NaN, if any."""
        for s in self.slots:
            g = s.master.grad if s.master.grad is not None else s.model.grad
            if g is not None and not bool(torch.isfinite(g).all()):
                return s
        return None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """Clip the (unscaled, FP32) master gradients; returns their total norm."""
        grads = [s.master for s in self.slots if s.master.grad is not None]
        return nn.utils.clip_grad_norm_(grads, max_norm, norm_type=norm_type,
                                        error_if_nonfinite=False)

    # -- stage 4: step the master ---------------------------------------------------
    def step(self) -> Optional[float]:
        """Run the optimizer on the masters, then re-round each master to its ``keep``
        format. Returns the fraction of elements whose update was lost to that rounding
        (None when ``count_lost_updates`` is off):

            lost = #(updated != old) - #(round(updated) != old)

        (an unchanged element rounds to itself, so the second set lies in the first).
        """
        rounded = [s for s in self.slots if not s.keep.is_identity]
        count = self.count_lost_updates
        before = [s.master.detach().clone() if count else None for s in rounded]
        self.optimizer.step()
        lost = 0
        with torch.no_grad():
            for s, old in zip(rounded, before):
                if count:
                    lost += int(torch.count_nonzero(_local(s.master) != _local(old)))
                round_into_(s.master.data, s.master.data, s.keep, self.scaling, self.generator)
                if count:
                    lost -= int(torch.count_nonzero(_local(s.master) != _local(old)))
        if count:
            lost = _sum_over_shards(lost, [s.master for s in rounded])
        self.lost_update_fraction = lost / self._numel if count else None
        return self.lost_update_fraction

    # -- stage 5: round master -> model weights --------------------------------------
    def copy_to_model_(self) -> None:
        """weight <- round(master, storage) for every slot not sharing storage."""
        for s in self.slots:
            if not s.shares_storage:
                round_into_(s.model.data, s.master.data, s.storage, self.scaling, self.generator)

    # -- stage 6: optimizer state precision ------------------------------------------
    def round_optimizer_state_(self) -> Optional[StateUnderflow]:
        """Round per-element optimizer state (moments, momentum) to ``optimizer_state``.

        Returns the elements that rounding left at zero where the gradient is not zero
        (:class:`StateUnderflow`); None when the state is not rounded (FP32).
        """
        if self.optimizer_state.is_identity:
            return None
        dead: dict = {}          # key -> [zero where grad != 0, grad != 0]
        params = []
        for s in self.slots:
            grad = s.master.grad
            live = None if grad is None else grad != 0
            n_live = 0 if live is None else int(torch.count_nonzero(live))
            for key, value in self.optimizer.state.get(s.master, {}).items():
                if (key not in _COUNTER_KEYS and torch.is_tensor(value)
                        and value.is_floating_point() and value.shape == s.master.shape):
                    round_into_(value, value, self.optimizer_state, self.scaling, self.generator)
                    if n_live:
                        zero = int(torch.count_nonzero((value == 0) & live))
                        counts = dead.setdefault(key, [0, 0])
                        counts[0] += zero
                        counts[1] += n_live
                        if zero:
                            params.append((s.name, key, zero / n_live))
        params.sort(key=lambda t: -t[2])
        return StateUnderflow({k: z / n for k, (z, n) in dead.items()}, tuple(params))

    def zero_grad(self) -> None:
        for s in self.slots:
            s.model.grad = None
            if not s.shares_storage:
                s.master.grad = None

    # -- checkpoints -----------------------------------------------------------------
    def state_dict(self) -> dict:
        """Master values (a snapshot) in slot order, keyed by parameter name."""
        return {"names": [s.name for s in self.slots],
                "master": [s.master.detach().clone() for s in self.slots]}

    def load_state_dict(self, state: dict) -> None:
        names = [s.name for s in self.slots]
        if list(state["names"]) != names:
            raise ValueError(f"checkpoint master weights are for parameters {state['names']}, "
                             f"this model optimizes {names}")
        with torch.no_grad():
            for s, value in zip(self.slots, state["master"]):
                s.master.copy_(value)
        self.copy_to_model_()
