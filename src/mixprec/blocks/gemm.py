"""A GEMM of two block-quantized operands in TransformerEngine's NVFP4 reference order.

For operands A (M x K) and B (N x K), both cut into blocks of k along K (1 x k blocks, or
k x k tiles, which give every row one scale per k columns), with elements a, b, block
decode scales s_a, s_b and tensor amaxes amax_A, amax_B (``BlockQuantized.amax``)::

    d_ij^(t) = sum_{l in block t} a_il * b_jl          exact in FP32 for E2M1 elements
                                                        (products k/4, |sum| <= 16 * 36)
    acc_ij   = 0;  for t = 0, 1, ...:  acc_ij = fl(acc_ij + fl(fl(s_a,it * s_b,jt) * d_ij^(t)))
    alpha    = fl(fl(amax_A * amax_B) / (E_max,A * S_max,A * E_max,B * S_max,B))
    C_ij     = fl(alpha * acc_ij)                       (K = 0: C = 0, alpha not applied)

This is ``NVFP4QuantizerRef.qgemm`` (TransformerEngine's reference of its FP4 tensor-core
GEMM) step by step; with E2M1 elements and E4M3 scales the block products and their
scale products are exact, so the roundings are the running FP32 sum over blocks, alpha,
and alpha times the sum. The tensor decode scales 1 / g_enc that quantization used do not
enter: alpha is computed from the amaxes (6^2 * 448^2 = 7225344, exact in FP32).
An operand quantized with a Hadamard transform stays in the transformed domain, as a
GEMM whose two operands carry the same transform needs no inverse.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .quantize import BlockQuantized, quantize_blocked  # noqa: F401 (the example)

__all__ = ["block_scaled_mm"]


def _operand(q: BlockQuantized, k_axis: int, name: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(elements R x (n_blocks * k), block scales R x n_blocks) with the reduction last."""
    e, s, scheme = q.elements, q.block_scales, q.scheme
    if e.dim() != 2:
        raise ValueError(f"block_scaled_mm takes 2-D operands; {name} has shape "
                         f"{tuple(e.shape)}")
    if k_axis not in (-2, -1, 0, 1):
        raise ValueError(f"{name}_axis must be 0, 1, -1 or -2, got {k_axis}")
    ax, k = k_axis % 2, scheme.block_size
    if scheme.is_2d:
        if ax == 0:
            e, s = e.t(), s.t()
        # a k x k tile gives each of its k rows the same scale per k columns
        s = s.repeat_interleave(k, dim=0)[: e.shape[0]]
    else:
        if scheme.axis % 2 != ax:
            raise ValueError(f"{name}'s 1x{k} blocks run along axis {scheme.axis}, not along "
                             f"the reduction axis {k_axis}")
        if ax == 0:
            e, s = e.t(), s.t()
    pad = s.shape[1] * k - e.shape[1]     # the blocks' zero padding, dropped by elements
    if pad:
        e = F.pad(e, (0, pad))
    return e.contiguous(), s.contiguous()


def block_scaled_mm(a: BlockQuantized, b: BlockQuantized, *, a_axis: int = -1,
                    b_axis: int = -1) -> torch.Tensor:
    """C = A B^T of two block-quantized 2-D operands, in the order of the module docstring.

    Args:
        a, b: results of :func:`~mixprec.blocks.quantize_blocked` whose schemes have a
            tensor scale (NVFP4) and one block length, blocked along the reduction axis.
        a_axis, b_axis: the reduction axis of each operand (C has a's other dimension as
            rows and b's as columns).

    Returns:
        float32 C of shape (a's other dim, b's other dim).

    >>> x = torch.zeros(1, 16); x[0, :2] = torch.tensor([6.0, 3.0])
    >>> w = torch.zeros(16, 16); w[0, :2] = torch.tensor([1.0, 0.5])
    >>> block_scaled_mm(quantize_blocked(x, "nvfp4"), quantize_blocked(w, "nvfp4-2d"))[0, 0]
    tensor(7.5000)
    """
    for name, q in (("a", a), ("b", b)):
        if not isinstance(q, BlockQuantized):
            raise TypeError(f"{name} must be a BlockQuantized, got {type(q).__name__}")
        if q.amax is None:
            raise ValueError(f"{name}'s scheme {q.scheme.short_str()!r} has no tensor scale; "
                             "block_scaled_mm rescales by the tensor amaxes (NVFP4 schemes)")
    if a.scheme.block_size != b.scheme.block_size:
        raise ValueError(f"block lengths differ: {a.scheme.block_size} and "
                         f"{b.scheme.block_size}")
    ea, sa = _operand(a, a_axis, "a")
    eb, sb = _operand(b, b_axis, "b")
    if ea.shape[1] != eb.shape[1]:
        raise ValueError(f"reduction lengths differ: {ea.shape[1]} and {eb.shape[1]} "
                         "(after padding to whole blocks)")
    k, n_blocks = a.scheme.block_size, sa.shape[1]
    acc = torch.zeros(ea.shape[0], eb.shape[0], dtype=torch.float32, device=ea.device)
    for t in range(n_blocks):
        cols = slice(t * k, (t + 1) * k)
        part = ea[:, cols] @ eb[:, cols].t()                    # exact block dot products
        acc.add_(torch.outer(sa[:, t], sb[:, t]).mul_(part))    # in block order, from 0
    if n_blocks == 0:
        return acc
    factor = (a.scheme.element.max * a.scheme.scale_max
              * b.scheme.element.max * b.scheme.scale_max)
    alpha = torch.div(a.amax.to(acc.device) * b.amax.to(acc.device), factor)
    return alpha * acc
