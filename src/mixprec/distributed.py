"""Cross-rank agreement for data-parallel and sharded training.

Every rank must skip the same steps (found-inf is OR-reduced) and use the same FP8
scales (amax is MAX-reduced).  Outside an initialised process group of two or more ranks
every function is the identity, so single-process code calls them unconditionally.
"""
from __future__ import annotations

import math
from typing import Union

import torch
from torch import Tensor

__all__ = ["is_distributed", "all_reduce_found_inf", "all_reduce_amax_"]


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
