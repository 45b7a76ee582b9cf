"""Hugging Face ``Trainer``: train under a mixprec recipe with one extra argument.

>>> from mixprec.integrations.hf import MixprecTrainer
>>> trainer = MixprecTrainer(model=model, args=TrainingArguments("out", max_steps=100),
...                          train_dataset=ds, recipe="fp8-hybrid")
>>> trainer.train()
>>> trainer.state.log_history[-2]["loss_scale"]

``MixprecTrainer`` is a ``transformers.Trainer`` subclass, using the overrides the
Trainer documents ("subclass and override"); the engine's stages
(:mod:`mixprec.engine`) run where the Trainer's loop has them:

==================================  ==============================================
Trainer                             engine stage
==================================  ==============================================
``create_optimizer``                the Trainer's optimizer (or the one passed in
                                    ``optimizers=``), then ``prepare(model,
                                    optimizer, recipe)``; ``self.optimizer``
                                    becomes an :class:`EngineOptimizer`
``compute_loss_context_manager``    ``engine.autocast()`` (training and evaluation)
``training_step``                   forward and loss as the Trainer computes them,
                                    the same gradient-accumulation normalization,
                                    then ``engine.backward(loss)`` (stage 1)
``_clip_grad_norm``                 stage 2 and clipping of the FP32 master
                                    gradients (``max_grad_norm``); the logged
                                    ``grad_norm`` is the unscaled norm
``optimizer.step()``                stages 3-8 (skip on inf/NaN, step the masters,
                                    round master -> weights, optimizer state,
                                    update S, next Hadamard signs), then
                                    ``engine.zero_grad()``
``log``                             adds ``loss_scale`` (the scale the last step's
                                    backward used) and ``skipped_steps``
``optimizer.state_dict()``          ``engine.state_dict()``: checkpoints resume
                                    with the masters and the loss scale
==================================  ==============================================

The recipe is the precision: ``TrainingArguments(fp16=True)`` or ``bf16=True`` (torch
autocast) on top of it raises ValueError, as do DeepSpeed, FSDP and the LOMO optimizers,
which run their own backward or step. A skipped step still advances the learning-rate
schedule (the Trainer asks Accelerate, which knows only its own GradScaler).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Optional, Sequence, Union

import torch
from torch import nn
from transformers import Trainer

from ..engine import Engine, KeepFilter, prepare
from ..recipe import Recipe, get_recipe
from . import _engine_ready, _load_when_ready

__all__ = ["MixprecTrainer", "EngineOptimizer"]

_LOMO = ("lomo", "adalomo")


class EngineOptimizer(torch.optim.Optimizer):
    """The user's optimizer as the Trainer and Accelerate see it: ``step()`` runs the
    engine's stages 2-7 then ``engine.zero_grad()``; ``param_groups``, ``state`` and
    ``defaults`` are the wrapped optimizer's own (LR schedulers keep working);
    ``state_dict()`` is the engine's whole state.

    Like Accelerate's ``AcceleratedOptimizer`` it does not call
    ``torch.optim.Optimizer.__init__``: it holds no parameters of its own.
    """

    def __init__(self, engine: Engine) -> None:  # noqa: D107 -- see the class docstring
        self.engine = engine
        self.optimizer = engine.optimizer
        self.last_step_applied: Optional[bool] = None

    @property
    def param_groups(self) -> list:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, groups: list) -> None:
        self.optimizer.param_groups = groups

    @property
    def state(self) -> Any:
        return self.optimizer.state

    @state.setter
    def state(self, state: Any) -> None:
        self.optimizer.state = state

    @property
    def defaults(self) -> dict:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, defaults: dict) -> None:
        self.optimizer.defaults = defaults

    def add_param_group(self, param_group: dict) -> None:
        raise ValueError("parameters cannot be added after mixprec.prepare(); build the "
                         "optimizer with every parameter group first")

    def step(self, closure: Any = None) -> None:
        """Unscale, check finite, step or skip, round, update S; then zero the gradients."""
        if closure is not None:
            raise ValueError("EngineOptimizer.step() takes no closure: the backward pass "
                             "runs through engine.backward() before step()")
        self.last_step_applied = self.engine.step()
        self.engine.zero_grad()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.engine.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """The engine's state; the wrapped optimizer's own before the engine has master
        weights (its keep rules wait for the first forward to be traced)."""
        if not _engine_ready(self.engine):
            return self.optimizer.state_dict()
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """An engine state (from :meth:`state_dict`), applied before the next forward
        computes if the engine waits for its trace; or a plain optimizer state."""
        if "masters" in state_dict and "loss_scaler" in state_dict:
            _load_when_ready(self.engine, self.engine.model, state_dict)
        else:
            self.optimizer.load_state_dict(state_dict)

    def __repr__(self) -> str:
        return (f"EngineOptimizer({type(self.optimizer).__name__}, "
                f"recipe={self.engine.recipe.short_str()!r})")


class MixprecTrainer(Trainer):
    """A ``transformers.Trainer`` that trains under a mixprec recipe.

    Args:
        *args, **kwargs: the ``Trainer``'s own arguments.
        recipe: a preset name, a recipe string or a :class:`~mixprec.Recipe`.
        keep_high_precision, backend, seed, example_inputs: as in
            :func:`mixprec.prepare` (without ``example_inputs`` the keep rules "first"
            and "last" trace the first training forward).
        monitor: a :class:`mixprec.NumericsMonitor` of the model, attached to the
            engine once it exists.

    The engine (:attr:`engine`) exists from the first ``create_optimizer`` (at the
    start of ``train()``); an evaluation before it runs in plain FP32.
    """

    def __init__(self, *args: Any, recipe: Union[str, Recipe] = "fp16-mixed",
                 keep_high_precision: Union[KeepFilter, Sequence[KeepFilter], None] = None,
                 backend: Optional[str] = None, seed: Optional[int] = None,
                 example_inputs: Any = None, monitor: Optional[Any] = None,
                 **kwargs: Any) -> None:
        self.recipe = get_recipe(recipe)
        self._prepare_kwargs = {"keep_high_precision": keep_high_precision,
                                "backend": backend, "seed": seed,
                                "example_inputs": example_inputs}
        self.monitor = monitor
        self.engine: Optional[Engine] = None
        super().__init__(*args, **kwargs)
        if self.args.fp16 or self.args.bf16:
            raise ValueError(f"TrainingArguments(fp16={self.args.fp16}, bf16={self.args.bf16}) "
                             f"adds torch autocast on top of the recipe "
                             f"{self.recipe.short_str()!r}; valid: fp16=False and bf16=False "
                             f"(the recipe sets the precision)")
        if self.is_deepspeed_enabled or self.is_fsdp_enabled:
            raise ValueError("MixprecTrainer runs its own backward and optimizer step; "
                             "DeepSpeed and FSDP are not supported (valid: neither)")
        if str(getattr(self.args.optim, "value", self.args.optim)) in _LOMO:
            raise ValueError(f"optim={self.args.optim!r} fuses the step into backward; "
                             f"MixprecTrainer needs a torch.optim optimizer (e.g. adamw_torch)")

    # -- optimizer and engine ---------------------------------------------------------
    def create_optimizer(self, model: Optional[nn.Module] = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer, wrapped by the engine the first time."""
        optimizer = super().create_optimizer(model)
        if not isinstance(optimizer, EngineOptimizer):
            opt_model = self.model if model is None else model
            self.engine = prepare(opt_model, optimizer, self.recipe, **self._prepare_kwargs)
            if self.monitor is not None:
                self.engine.attach_monitor(self.monitor)
            self.optimizer = EngineOptimizer(self.engine)
        return self.optimizer

    def compute_loss_context_manager(self) -> contextlib.ExitStack:
        """The Trainer's context, plus the recipe's precision policy once the engine exists."""
        stack = super().compute_loss_context_manager()
        if self.engine is not None:
            stack.enter_context(self.engine.autocast())
        return stack

    # -- a training step ------------------------------------------------------------
    def training_step(self, model: nn.Module, inputs: dict,
                      num_items_in_batch: Optional[Union[torch.Tensor, int]] = None
                      ) -> torch.Tensor:
        """Forward and loss as ``Trainer.training_step``; backward through the engine."""
        if self.engine is None:
            raise RuntimeError("MixprecTrainer.training_step before create_optimizer(): "
                               "call train(), which builds the engine")
        model.train()
        inputs = self._prepare_inputs(inputs)
        with self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs, num_items_in_batch=num_items_in_batch)
        del inputs
        if self.args.n_gpu > 1:
            loss = loss.mean()
        # The Trainer's gradient-accumulation rule: a loss normalized by the model (over
        # num_items_in_batch) or by compute_loss_func is already per accumulated batch.
        scaled_for_ga = self.loss_is_scaled_for_ga
        if scaled_for_ga is None:
            scaled_for_ga = ((self.model_accepts_loss_kwargs and num_items_in_batch is not None)
                             or self.compute_loss_func is not None)
        if not scaled_for_ga:
            loss = loss / self.current_gradient_accumulation_steps
        # Accelerate's backward divides by its own accumulation count (1 under the Trainer)
        self.engine.backward(loss / self.accelerator.gradient_accumulation_steps)
        return loss.detach()

    def _clip_grad_norm(self, model: nn.Module) -> torch.Tensor:
        """Stage 2, then clip the FP32 master gradients; returns their unscaled norm."""
        return self.engine.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        if grad_norm is None:                 # no clipping: the unscaled norm, unclipped
            grad_norm = self.engine.clip_grad_norm_(math.inf)
        return grad_norm

    # -- logs -----------------------------------------------------------------------
    def log(self, logs: dict, start_time: Optional[float] = None) -> None:
        """The Trainer's logs, plus ``loss_scale`` and ``skipped_steps`` once training ran."""
        if self.engine is not None and self.engine.history:
            logs["loss_scale"] = float(self.engine.history[-1]["scale"])
            logs["skipped_steps"] = self.engine.skipped_steps
        super().log(logs, start_time)
