"""PyTorch Lightning: a precision plugin that trains under a mixprec recipe.

>>> import lightning.pytorch as pl
>>> from mixprec.integrations.lightning import MixprecPrecision
>>> trainer = pl.Trainer(plugins=[MixprecPrecision("fp8-hybrid")], max_steps=100)
>>> trainer.fit(lit_module)

Lightning's ``precision=`` argument takes only its own strings, so the plugin goes in
``plugins=[...]`` (the convention of Lightning's own ``MixedPrecision``,
``HalfPrecision`` and ``TransformerEnginePrecision``). ``mixprec.lightning.Precision``
is the same class.

The engine's stages (:mod:`mixprec.engine`) run in Lightning's hooks:

==========================  ===================================================
Lightning hook              engine stage
==========================  ===================================================
``connect``                 ``prepare(module, optimizer, recipe)``: rounds the
                            weights, builds the FP32 masters, rewires the optimizer
``forward_context``         ``engine.autocast()`` for train/val/test/predict steps
``pre_backward``            stage 1: records a non-finite loss, returns ``loss * S``
                            (``LightningModule.backward`` then runs its backward)
``optimizer_step``          closure (forward + backward), stage 2 unscale into the
                            master gradients, ``on_before_optimizer_step``,
                            clipping of the master gradients, stages 3-8
                            (``engine.step()``: skip on inf/NaN, step the masters,
                            round master -> weights, optimizer state, update S, next
                            Hadamard signs), then ``engine.zero_grad()``; logs
                            ``mixprec/loss_scale`` and ``mixprec/skipped_steps``
``state_dict``              ``engine.state_dict()`` (loss scale, masters, counters)
``teardown``                removes the engine's hooks from the module
==========================  ===================================================

``convert_module`` is left as is: the engine needs the optimizer too, and ``connect``
is the first hook that sees both. In ``on_before_optimizer_step`` the model's ``.grad``
still holds the scaled gradients; the unscaled FP32 gradients are the ``.grad`` of the
optimizer's parameters (the masters).
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from lightning.pytorch.plugins.precision import Precision
from lightning.pytorch.utilities import GradClipAlgorithmType
from torch import nn

from ..engine import Engine, KeepFilter, prepare
from ..recipe import Recipe, get_recipe
from . import _engine_ready, _load_when_ready

__all__ = ["MixprecPrecision"]


class MixprecPrecision(Precision):
    """Train a LightningModule under a mixprec recipe.

    Args:
        recipe: a preset name ("fp16-mixed", "fp8-hybrid", ...), a recipe string or a
            :class:`~mixprec.Recipe`; parsed here, so a bad name fails at construction.
        keep_high_precision: as in :func:`mixprec.prepare` (names are relative to the
            LightningModule, e.g. ``"net.0"``).
        backend: as in :func:`mixprec.prepare`.
        seed: seed of the stochastic-rounding generator (default: torch's initial seed).
        example_inputs: as in :func:`mixprec.prepare`: inputs of one forward of the
            LightningModule, traced to find the "first" and "last" layers. Without them
            the first forward of the LightningModule itself under the recipe is traced,
            so a ``training_step`` that calls only submodules needs them.
        monitor: a :class:`mixprec.NumericsMonitor` of the LightningModule, attached to
            the engine (see :meth:`mixprec.Engine.attach_monitor`).
        log_loss_scale: log ``mixprec/loss_scale`` (the scale the step's backward used)
            and ``mixprec/skipped_steps`` through ``LightningModule.log`` every step.

    The engine (:attr:`engine`) is built when Lightning connects the plugin (in
    ``Trainer.fit``); with several optimizers it raises ValueError. Evaluation without
    ``fit`` (``Trainer.validate/test/predict``) builds an engine whose optimizer never
    steps, so the forward pass still runs under the recipe.
    """

    # Lightning reads this string for dtype decisions (model-size estimates); the
    # emulated recipes keep every tensor in a float32 container.
    precision = "32-true"

    def __init__(self, recipe: Union[str, Recipe] = "fp16-mixed", *,
                 keep_high_precision: Union[KeepFilter, Sequence[KeepFilter], None] = None,
                 backend: Optional[str] = None, seed: Optional[int] = None,
                 example_inputs: Any = None, monitor: Optional[Any] = None,
                 log_loss_scale: bool = True) -> None:
        self.recipe = get_recipe(recipe)
        self._prepare_kwargs = {"keep_high_precision": keep_high_precision,
                                "backend": backend, "seed": seed,
                                "example_inputs": example_inputs}
        self.monitor = monitor
        self.log_loss_scale = log_loss_scale
        self.engine: Optional[Engine] = None
        self._pending_state: Optional[dict] = None

    # -- set-up ---------------------------------------------------------------------
    def connect(self, model: nn.Module, optimizers: list, lr_schedulers: list) -> tuple:
        """Build the engine over ``model`` and its one optimizer."""
        if len(optimizers) > 1:
            raise ValueError(f"MixprecPrecision supports one optimizer, got {len(optimizers)} "
                             f"({', '.join(type(o).__name__ for o in optimizers)}); return a "
                             f"single optimizer from configure_optimizers")
        if self.engine is not None:          # a second fit/validate on the same plugin
            self.engine.remove()
        if optimizers:
            optimizer = getattr(optimizers[0], "_optimizer", optimizers[0])
        else:
            # Evaluation only: an optimizer that never steps, so that the weights are
            # rounded to the recipe's storage and the forward runs under its policy.
            optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        self.engine = prepare(model, optimizer, self.recipe, **self._prepare_kwargs)
        if self.monitor is not None:
            self.engine.attach_monitor(self.monitor)
        if self._pending_state is not None:
            _load_when_ready(self.engine, model, self._pending_state)
            self._pending_state = None
        return model, optimizers, lr_schedulers

    def _require_engine(self) -> Engine:
        if self.engine is None:
            raise RuntimeError("MixprecPrecision: the engine is built when the Trainer "
                               "connects the plugin (Trainer.fit/validate/test/predict)")
        return self.engine

    @contextlib.contextmanager
    def forward_context(self) -> Iterator[None]:
        """The recipe's precision policy over every step's forward pass (and loss)."""
        if self.engine is None:
            yield
        else:
            with self.engine.autocast():
                yield

    # -- backward -------------------------------------------------------------------
    def pre_backward(self, tensor: torch.Tensor, module: Any) -> torch.Tensor:
        """Stage 1: record a non-finite loss and return ``loss * S`` for backward."""
        return super().pre_backward(self._require_engine().scale_loss(tensor), module)

    # -- step -----------------------------------------------------------------------
    def optimizer_step(self, optimizer: Any, model: Any, closure: Callable[[], Any],
                       **kwargs: Any) -> Any:
        """Closure, unscale, hooks and clipping on FP32 gradients, engine step, zero_grad."""
        engine = self._require_engine()
        closure_result = closure()
        # training_step returned None: Lightning skips backward, there is nothing to step
        if closure_result is None and getattr(model, "automatic_optimization", True):
            return closure_result
        engine.unscale_()                     # stage 2, before the user's hooks and clipping
        self._after_closure(model, optimizer)
        engine.step()                         # stages 3-8
        engine.zero_grad()                    # model and master gradients of this step
        if self.log_loss_scale and hasattr(model, "log"):
            last = engine.history[-1]
            model.log("mixprec/loss_scale", float(last["scale"]), on_step=True,
                      on_epoch=False, batch_size=1)
            model.log("mixprec/skipped_steps", float(engine.skipped_steps), on_step=True,
                      on_epoch=False, batch_size=1)
        return closure_result

    def clip_gradients(self, optimizer: Any, clip_val: Union[int, float] = 0.0,
                       gradient_clip_algorithm: GradClipAlgorithmType = GradClipAlgorithmType.NORM
                       ) -> None:
        """Clip the unscaled FP32 master gradients (by norm or by value)."""
        if clip_val <= 0:
            return
        engine = self._require_engine()
        if gradient_clip_algorithm == GradClipAlgorithmType.NORM:
            engine.clip_grad_norm_(float(clip_val))
        elif gradient_clip_algorithm == GradClipAlgorithmType.VALUE:
            engine.unscale_()
            torch.nn.utils.clip_grad_value_(engine.master_params, float(clip_val))
        else:
            raise ValueError(f"unknown gradient_clip_algorithm {gradient_clip_algorithm!r}; "
                             f"valid choices: 'norm', 'value'")

    # -- checkpoints ----------------------------------------------------------------
    def state_dict(self) -> dict:
        """The engine's state (loss scale, masters, optimizer, counters, generator); empty
        before the engine exists or has its master weights."""
        if self.engine is None or not _engine_ready(self.engine):
            return {}
        return self.engine.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the engine's state: kept until the engine exists, applied before the
        first forward computes when the engine waits for it to trace its keep rules."""
        if not state_dict:
            return
        if self.engine is None:
            self._pending_state = state_dict
        else:
            _load_when_ready(self.engine, self.engine.model, state_dict)

    def teardown(self) -> None:
        """Remove the engine's hooks from the module (its weights stay rounded)."""
        if self.engine is not None:
            self.engine.remove()

    @property
    def loss_scale(self) -> float:
        """The engine's current loss scale (NaN before the engine exists)."""
        return self.engine.scale if self.engine is not None else math.nan
