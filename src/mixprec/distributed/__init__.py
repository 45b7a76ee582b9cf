"""Cross-rank agreement for data-parallel and sharded training.

Every rank must skip the same steps (found-inf is OR-reduced) and use the same FP8
scales (amax is MAX-reduced).  Outside an initialised process group of two or more ranks
every function is the identity, so single-process code calls them unconditionally.

Per-tensor amaxes (current and delayed scaling) are MAX-reduced over the world whenever
it has two or more ranks, so every rank derives the scale one process would derive from
the global batch.  That is one small all-reduce per scaled tensor, which every rank must
reach: code that quantizes on some ranks only (evaluation on rank 0) runs inside
:func:`local_amax`.

Submodules: :mod:`mixprec.distributed.fsdp` (FSDP2 models) and
:mod:`mixprec.distributed.checkpoint` (torch.distributed.checkpoint of an engine).
"""
from __future__ import annotations

import contextlib
import math
import threading
from typing import Iterator, Union

import torch
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_found_inf", "all_reduce_amax_", "reduce_amax_",
           "local_amax", "amax_reduction_enabled"]

_local = threading.local()


def _dist():
    return torch.distributed


def is_distributed(group=None) -> bool:
    """True when torch.distributed is available, initialised and ``group`` (default: the
    world) has more than one rank."""
    dist = _dist()
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _collective_device(device) -> torch.device:
    """Where a small buffer must live for the backend: the current GPU for NCCL."""
    if device is not None:
        return torch.device(device)
    if _dist().get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_found_inf(found_inf: Union[bool, Tensor], device=None, *,
                         group=None) -> bool:
    """Logical OR of ``found_inf`` over all ranks: MAX all-reduce of a 0/1 float32 tensor.

    Args:
        found_inf: this rank's flag (a bool, or a tensor whose non-zero means True).
        device: where the one-element buffer lives (default: the current GPU under
            NCCL, else the CPU).
        group: the process group (default: the world).
    Returns:
        True if any rank found inf/NaN.  Identity when not distributed.

    >>> all_reduce_found_inf(True)      # single process
    True
    """
    if not is_distributed(group):
        return bool(found_inf.item()) if isinstance(found_inf, Tensor) else bool(found_inf)
    dev = _collective_device(device)
    if isinstance(found_inf, Tensor):
        flag = (found_inf.detach().reshape(-1)[:1] != 0).to(dev, torch.float32)
    else:
        flag = torch.full((1,), 1.0 if found_inf else 0.0, device=dev)
    _dist().all_reduce(flag, op=_dist().ReduceOp.MAX, group=group)
    return bool(flag.item() > 0)


def all_reduce_amax_(amax: Tensor, *, group=None) -> Tensor:
    """Replace ``amax`` in place by its element-wise maximum over all ranks; return it.

    NaN propagates: an element that is NaN on any rank is NaN on every rank afterwards.
    A MAX all-reduce does not promise that (gloo keeps a NaN only from the rank whose
    operand it compares first: a NaN on rank 1 against 3.0 on rank 0 gives 3.0), so NaN
    is carried in a separate 0/1 flag reduced in the same collective:

        buf = [where(isnan(a), -inf, a), isnan(a)]      # float32 (float64 for float64)
        buf = all_reduce(buf, MAX)
        amax = where(flag > 0, NaN, value)

    FP16/BF16 amax values round-trip through float32 exactly.  Identity when not
    distributed.
    """
    if not isinstance(amax, Tensor) or not amax.is_floating_point():
        raise ValueError(f"amax must be a floating-point tensor, got "
                         f"{getattr(amax, 'dtype', type(amax).__name__)}")
    if not is_distributed(group) or amax.numel() == 0:
        return amax
    buf_dtype = torch.float64 if amax.dtype == torch.float64 else torch.float32
    flat = amax.detach().reshape(-1).to(buf_dtype)
    nan = torch.isnan(flat)
    buf = torch.cat([flat.masked_fill(nan, -math.inf), nan.to(buf_dtype)])
    _dist().all_reduce(buf, op=_dist().ReduceOp.MAX, group=group)
    value, any_nan = buf.split(flat.numel())
    value = value.masked_fill(any_nan > 0, math.nan)
    with torch.no_grad():
        amax.copy_(value.view(amax.shape))
    return amax


def amax_reduction_enabled() -> bool:
    """False inside :func:`local_amax` (this thread), else True."""
    return getattr(_local, "amax_reduction", True)


@contextlib.contextmanager
def local_amax() -> Iterator[None]:
    """Within the block, scaled formats use this rank's amax (no collective).

    For work that not every rank does (evaluation or logging on one rank): a collective
    reached by one rank only would wait for the others until the process group's
    timeout.
    """
    before = amax_reduction_enabled()
    _local.amax_reduction = False
    try:
        yield
    finally:
        _local.amax_reduction = before


def reduce_amax_(amax: Tensor) -> Tensor:
    """:func:`all_reduce_amax_` over the world when distributed and not inside
    :func:`local_amax`; else ``amax`` unchanged. Returns ``amax``."""
    if amax_reduction_enabled() and is_distributed():
        all_reduce_amax_(amax)
    return amax
