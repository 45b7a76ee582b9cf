"""torch.distributed.checkpoint (DCP) for a mixprec engine.

:class:`EngineState` is a DCP ``Stateful``: put it in the dict given to ``dcp.save`` /
``dcp.load`` and DCP calls its ``state_dict()`` and ``load_state_dict()``.

>>> import torch.distributed.checkpoint as dcp
>>> dcp.save({"train": EngineState(mp)}, checkpoint_id="ckpt/step100")
>>> dcp.load({"train": EngineState(mp)}, checkpoint_id="ckpt/step100")   # on resume

What is saved, and how DCP treats it:

    model   get_model_state_dict(model)          FSDP2: DTensor shards (resharded on load)
    master  the master weights, by parameter name  sharded like the parameters
    optim   get_optimizer_state_dict(masters, optimizer), keyed by parameter name
    engine  recipe, loss scaler, step counters and history, delayed-scaling amax
            histories (the layers' and those of calls outside them,
            ``Engine.outside_state``), the Hadamard sign stream: one torch.save blob
            (read back with weights_only=True), the same on every rank (found-inf and
            amax are reduced across ranks; the signs come from one seed and the step
            count), written once
    rng     every rank's stochastic-rounding generator state (gathered from all ranks
            into one blob, written once), so each rank resumes its own random stream

Master weights and optimizer state go through torch's ``get_*_state_dict`` /
``set_*_state_dict`` with a module holding the masters under the model's parameter names
(the optimizer steps the masters, not the model's parameters), so their keys are the
model's fully qualified names and DCP can reshard them: save on 2 ranks, load on 1.
Loading on more ranks than saved finds no generator state for the new ranks: every rank
raises the same ValueError (so none trains on alone), before the engine's own state is
restored; DCP has by then written the checkpoint's tensors into the model's.
"""
from __future__ import annotations

import copy
import io
from typing import Any, Dict

import torch
from torch import nn

__all__ = ["EngineState"]


def _masters_module(engine) -> nn.Module:
    """A module whose parameters are the engine's master weights, under the names of the
    model parameters they belong to (submodules created along the dotted path)."""
    root = nn.Module()
    for slot in engine._masters.slots:
        *path, leaf = slot.name.split(".")
        module = root
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, slot.master)
    return root


def _rank_and_world() -> tuple:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gathered_rng(engine) -> dict:
    """{"rank<r>": generator state of rank r} for every rank (an all-gather)."""
    state = engine.generator.get_state()
    rank, world = _rank_and_world()
    states = [state]
    if world > 1:
        states = [None] * world
        torch.distributed.all_gather_object(states, state)
    return {f"rank{r}": s for r, s in enumerate(states)}


def _pack(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _unpack(blob: bytes) -> Any:
    return torch.load(io.BytesIO(blob), weights_only=True)


class EngineState:
    """A DCP ``Stateful`` view of an :class:`mixprec.Engine` (model, masters, optimizer,
    scaler, counters, delayed-scaling histories, the stochastic-rounding stream).

    Loading restores everything a bit-identical resume needs; the model's weights are
    then re-derived from the loaded masters (``weight <- round(master)``), which gives
    the saved weights.
    """

    def __init__(self, engine):
        from ..engine import Engine
        if not isinstance(engine, Engine):
            raise TypeError(f"EngineState needs a mixprec Engine, got {type(engine).__name__}")
        self.engine = engine

    def state_dict(self) -> Dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                             get_optimizer_state_dict)
        eng = self.engine
        extras = copy.deepcopy(eng._extra_state())      # raises if the engine is not set up
        masters = _masters_module(eng)
        return {
            "model": get_model_state_dict(eng.model),
            "master": get_model_state_dict(masters),
            # on a fresh optimizer this creates its state (one step at lr 0 on zero
            # gradients), so that DCP has tensors to load into
            "optim": get_optimizer_state_dict(masters, eng.optimizer),
            "engine": _pack(extras),
            "rng": _pack(_gathered_rng(eng)),
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (set_model_state_dict,
                                                             set_optimizer_state_dict)
        eng = self.engine
        rank, world = _rank_and_world()
        rng = _unpack(state["rng"])
        missing = [r for r in range(world) if f"rank{r}" not in rng]
        if missing:      # the same blob on every rank: all of them raise
            raise ValueError(f"the checkpoint holds the stochastic-rounding generator states "
                             f"of {len(rng)} rank(s), this run has {world}: ranks {missing} "
                             f"have none; load on at most {len(rng)} rank(s)")
        masters = _masters_module(eng)
        extras = _unpack(state["engine"])
        eng._load_extra_state(extras)
        set_model_state_dict(eng.model, state["model"])
        set_model_state_dict(masters, state["master"])
        set_optimizer_state_dict(masters, eng.optimizer, state["optim"])
        eng.generator.set_state(rng[f"rank{rank}"])
        eng._masters.copy_to_model_()
