"""FSDP2 models (``torch.distributed.fsdp.fully_shard``) under a mixprec engine.

What the engine relies on, and where it comes from:

- Parameters are ``DTensor`` shards. A master weight is made from the parameter
  (``param.detach().to(float32)``), so it is a DTensor with the same mesh and placements,
  and the optimizer's state, created from the master, is sharded the same way.
- FSDP all-gathers the full weight before a wrapped module's forward and again before its
  backward. An emulated layer therefore rounds (and, for scaled formats, takes the amax
  of) the full, unsharded weight, once per all-gather, identically on every rank.
  Element-wise rounding of the stored weight (master -> model, stage 5 of a step) acts
  on each shard; an element's result does not depend on its neighbours, so it equals
  rounding the full tensor. Stochastic rounding draws from each rank's own generator,
  so it does not reproduce a single process's random stream.
- Gradients are reduce-scattered. By default FSDP averages them: each rank's gradient
  of its local mean loss is a world-size multiple of its share of the global-batch
  gradient, and it is that multiple which the emulated backward rounds (and which
  overflows FP16 first). :func:`sum_gradient_reduction_` makes the reduce-scatter a
  plain sum; the engine then scales the loss by ``S / world`` instead of ``S``, so each
  rank rounds the gradient that one process would compute for its part of the batch:

      per rank:  g_r = d(loss_r * S / world)/dw        (world a power of two: exact)
      shard:     g   = sum_r g_r                       (reduce-scatter, SUM)
      unscale:   g / S
"""
from __future__ import annotations

from typing import List

from torch import nn

__all__ = ["fsdp_modules", "is_fsdp", "data_parallel_size", "sum_gradient_reduction_",
           "shard_model_"]


def _fsdp_module_type():
    from torch.distributed.fsdp import FSDPModule
    return FSDPModule


def fsdp_modules(model: nn.Module) -> List[nn.Module]:
    """The modules of ``model`` (itself included) that ``fully_shard`` was applied to."""
    kind = _fsdp_module_type()
    return [m for m in model.modules() if isinstance(m, kind)]


def is_fsdp(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or to one of its submodules."""
    return bool(fsdp_modules(model))


def data_parallel_size(model: nn.Module) -> int:
    """The number of ranks FSDP reduces ``model``'s gradients over (1 without FSDP).

    Read from each parameter group's device mesh (the FSDP mesh, or replicate x shard
    for HSDP); every group must agree.
    """
    sizes = set()
    for module in fsdp_modules(model):
        # FSDP2 keeps its mesh per parameter group; there is no public accessor in torch 2.13
        for group in module._get_fsdp_state()._fsdp_param_groups:
            sizes.add(int(group.mesh_info.mesh.size()))
    if len(sizes) > 1:
        raise ValueError(f"FSDP parameter groups of this model reduce over different numbers "
                         f"of ranks {sorted(sizes)}; mixprec needs one data-parallel size")
    return sizes.pop() if sizes else 1


def sum_gradient_reduction_(model: nn.Module) -> int:
    """Make every FSDP module of ``model`` reduce-scatter gradients as a plain sum.

    Sets ``set_gradient_divide_factor(1.0)`` and ``set_force_sum_reduction_for_comms(True)``
    (SUM collectives, no pre/post division, which FP16 reductions would otherwise split
    as ~sqrt(world) before and after). The caller divides the loss by the returned
    data-parallel size instead. Returns that size (1: nothing to do).
    """
    world = data_parallel_size(model)
    if world > 1:
        for module in fsdp_modules(model):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return world


def shard_model_(model: nn.Module) -> nn.Module:
    """``fully_shard`` every block of the outermost ``nn.ModuleList``s of ``model``, then
    ``model`` itself (the usual FSDP2 layout: one all-gather per Transformer block, the
    rest with the root); returns ``model``, the same object.

    A parameter held by two modules (a language model's tied embedding and output
    layer) must fall in one FSDP group: it does when both sit outside the blocks, as in
    the built-in models and Hugging Face causal LMs. Otherwise ValueError names it.

    Every rank calls this on the same model, in an initialised process group.
    """
    from torch.distributed.fsdp import fully_shard
    blocks, group_of = [], {}          # id(module) -> index of its block (absent: root)
    for module in model.modules():
        if id(module) in group_of or not isinstance(module, nn.ModuleList):
            continue
        for block in module:
            if any(True for _ in block.parameters()):
                for m in block.modules():
                    group_of[id(m)] = len(blocks)
                blocks.append(block)
    holder = {}                        # id(parameter) -> (group, qualified name)
    for name, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            group = group_of.get(id(module))
            if id(p) in holder and holder[id(p)][0] != group:
                raise ValueError(f"cannot shard the model block by block: {holder[id(p)][1]} "
                                 f"and {full} are one parameter in two groups; apply "
                                 f"fully_shard yourself so that they share one")
            holder.setdefault(id(p), (group, full))
    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model
