"""Reduced-precision accumulation: sums and matmuls whose running sum lives in a narrow format.

The 2018 mixed-precision recipe accumulates FP16 products in FP32. What that buys becomes
measurable by emulating narrower accumulators (Wang et al. 2018): a sequential FP16 sum of
10,000 x 0.1 stalls at 256, because once the running sum reaches 256 each 0.1 is below
half an FP16 ulp and vanishes ("swamping"); summing in chunks of 64 and adding the chunk
sums in FP32 recovers most of the accuracy.

Sequential mode (``AccumulationConfig(format, chunk, across)``), for terms t_0 .. t_{k-1}:

    for each chunk of ``chunk`` consecutive terms (None: a single chunk):
        s = round_format(t_first);  s = round_format(s + t) for every further t
    total = round_across(s_0);  total = round_across(total + s_c) for every further chunk

Every addition is rounded once, to nearest-even, exactly as a hardware adder of that
width would ("fp32" = ordinary float32 addition). Overflow follows the format's own
non-saturating convention (inf for fp16/bf16/e5m2, NaN for e4m3).

Aligned mode (``mode="aligned", mantissa_bits=m, align, group=g, promote=N_C, across``):
a model of Hopper-class FP8 tensor cores, whose accumulator keeps about 14 significant
bits (DeepSeek-V3), with DeepSeek-V3's promotion of partial sums to FP32 every N_C = 128
products. Products p_i = a_i * b_i are exact (float64 holds the product of two float32
values exactly). With E(v) = floor(log2|v|) (zeros take no part) and R = trunc (toward
zero, ``align="truncate"``) or round-half-even (``align="round"``):

    for each interval of N_C consecutive products (None: one interval of all k):
        s = 0
        for each group G of g consecutive products of the interval:
            E   = max(E(v) for v in {s} + G)              running maximum exponent
            u   = 2^(E - m)                               last place kept at that exponent
            t   = sum(u * R(v / u) for v in {s} + G)      aligned, cut, then added exactly
            s   = 2^(E(t) - m) * R(t / 2^(E(t) - m))      normalised to m + 1 bits
        acc = round_across(acc + s)                       promotion (acc starts at 0)

A small addend against a large running maximum loses every bit below u: with m = 13,
1 + 1.5 * 2^-14 gives 1 (truncate) or 1 + 2^-13 (round). The error grows with the number
of products summed since the last promotion; promoting every product (N_C = 1) is FP32
accumulation of the exact products. Sums (``sum_accum``) treat their terms as the
products. The group size of real hardware is not published; ``group`` defaults to 32,
the K of one FP8 WGMMA instruction.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from .formats import FloatFormat, get_format
from .quant import quantize
from .recipe import AccumulationConfig

__all__ = ["sum_accum", "matmul_accum"]

Rounder = Callable[[torch.Tensor], torch.Tensor]
TermFn = Callable[[slice], torch.Tensor]


def _round_to_odd_f32(hi: torch.Tensor, lo: torch.Tensor) -> torch.Tensor:
    """Float32 round-to-odd of the exact sum hi + lo, where hi = fl32(hi + lo).

    Rounding a sum first to float32 and then to a narrower format can round twice the
    same way and land on the wrong neighbour (double rounding). Rounding to *odd* in
    float32 first is harmless: round-to-odd at 24 bits followed by nearest-even at p <= 22
    bits equals a single nearest-even rounding (Boldo & Melquiond 2008). Round-to-odd:
    if the float32 sum was inexact and its last bit is even, step one ulp toward the
    exact value.
    """
    # lo.abs() > 0 is False for NaN: an overflowed hi (lo = inf - inf) is left alone
    inexact = (lo.abs() > 0) & ((hi.view(torch.int32) & 1) == 0)
    toward_exact = torch.nextafter(hi, torch.copysign(torch.full_like(hi, float("inf")), lo))
    return torch.where(inexact, toward_exact, hi)


def _two_sum(a: torch.Tensor, b: torch.Tensor) -> tuple:
    """hi + lo == a + b exactly, hi = fl32(a + b) (Knuth's TwoSum, no branches)."""
    hi = a + b
    b_virtual = hi - a
    a_virtual = hi - b_virtual
    lo = (a - a_virtual) + (b - b_virtual)
    return hi, lo


def _rounder(fmt: FloatFormat) -> Optional[Rounder]:
    """Nearest-even rounding of float32 values to fmt (None for float32 itself)."""
    if fmt.name == "fp32":
        return None
    if fmt.torch_dtype in (torch.float16, torch.bfloat16):
        # torch's own casts: IEEE nearest-even with overflow to inf, the semantics of
        # quantize(..., saturate=False) for these formats, and several times faster on
        # the small tensors of a k-step loop.
        dtype = fmt.torch_dtype
        return lambda v: v.to(dtype).to(torch.float32)
    return lambda v: quantize(v, fmt, rounding="nearest", saturate=False)


def _add(s: torch.Tensor, t: torch.Tensor, rnd: Optional[Rounder]) -> torch.Tensor:
    """round(s + t) with a single rounding of the exact sum."""
    if rnd is None:
        return s + t
    hi, lo = _two_sum(s, t)
    return rnd(_round_to_odd_f32(hi, lo))


def _first(t: torch.Tensor, rnd: Optional[Rounder]) -> torch.Tensor:
    return t.clone() if rnd is None else rnd(t)


def _accumulate(terms: torch.Tensor, rnd: Optional[Rounder]) -> torch.Tensor:
    """Sequential rounded sum of float32 ``terms`` along the last dim."""
    s = _first(terms[..., 0], rnd)
    for j in range(1, terms.shape[-1]):
        s = _add(s, terms[..., j], rnd)
    return s


def _chunked(term: TermFn, k: int, acc: AccumulationConfig) -> torch.Tensor:
    """Apply the chunk rule (sequential mode) to k >= 1 terms; ``term(positions)`` gives
    the terms at a (strided) slice of positions, stacked along a new last dim.

    Chunks are accumulated side by side: step j adds the j-th term of every full chunk at
    once, so the Python loop runs about chunk + k/chunk times instead of k, and at most
    one term per chunk is held in memory at a time.
    """
    if acc.mode == "aligned":
        return _aligned(term, k, acc)
    chunk = k if acc.chunk is None else min(acc.chunk, k)
    inner, across = _rounder(get_format(acc.format)), _rounder(get_format(acc.across))
    n_full, tail = divmod(k, chunk)
    parts = []
    if n_full:
        end = n_full * chunk
        s = _first(term(slice(0, end, chunk)), inner)
        for j in range(1, chunk):
            s = _add(s, term(slice(j, end, chunk)), inner)
        parts.append(s)
    if tail:   # the short last chunk, handled apart (padding would disturb signed zeros)
        base = n_full * chunk
        s = _first(term(slice(base, base + 1)), inner)
        for j in range(1, tail):
            s = _add(s, term(slice(base + j, base + j + 1)), inner)
        parts.append(s)
    return _accumulate(torch.cat(parts, dim=-1), across)


_EXP_FLOOR = -960     # exponents of an all-zero step: far below any float32 product


def _pow2(e: torch.Tensor) -> torch.Tensor:
    """2.0**e in float64 for integer e in the normal range, built from its bits (exact)."""
    return ((e.to(torch.int64) + 1023) << 52).view(torch.float64)


def _floor_log2(v: torch.Tensor) -> torch.Tensor:
    """floor(log2|v|) as int64; zeros (and non-finite values) give _EXP_FLOOR."""
    _, e = torch.frexp(v)           # v = f * 2^e with 0.5 <= |f| < 1
    return torch.where(torch.isfinite(v) & (v != 0), e.to(torch.int64) - 1,
                       torch.full_like(e, _EXP_FLOOR, dtype=torch.int64))


def _cut(v: torch.Tensor, place: torch.Tensor, align: str) -> torch.Tensor:
    """v / place cut to an integer (trunc or round-half-even); exact for power-of-two place."""
    q = v / place
    if align == "round":
        return torch.round(q)     # half to even
    # floor(|q|) with q's sign: torch.trunc on float64 is ~1000x slower here (torch 2.13 CPU)
    return torch.floor(q.abs()).copysign(q)


def _aligned_interval(products: Callable[[int, int], torch.Tensor], length: int,
                      acc: AccumulationConfig) -> torch.Tensor:
    """The partial sums s of the aligned rule over intervals of ``length`` products,
    side by side: ``products(j, n)`` gives products j .. j+n-1 of every interval, float64,
    shape [..., intervals, n]. Returns float64 [..., intervals]."""
    m, s = acc.mantissa_bits, None
    for j in range(0, length, acc.group):
        p = products(j, min(acc.group, length - j))
        v = p if s is None else torch.cat([s.unsqueeze(-1), p], dim=-1)
        e = _floor_log2(v).amax(dim=-1, keepdim=True)
        place = _pow2(e - m)
        # every addend is a multiple of place below 2^(m+1) * place: the integer sum is
        # exact in float64 for any group below 2^38 products
        t = _cut(v, place, acc.align).sum(dim=-1) * place.squeeze(-1)
        place_t = _pow2(_floor_log2(t) - m)
        s = _cut(t, place_t, acc.align) * place_t
    return s


def _aligned(term: TermFn, k: int, acc: AccumulationConfig) -> torch.Tensor:
    """The aligned rule (module docstring) over k >= 1 terms given by ``term`` (as for
    :func:`_chunked`); float32 result."""
    interval = k if acc.promote is None else min(acc.promote, k)
    n_full, tail = divmod(k, interval)
    parts = []
    if n_full:
        end = n_full * interval

        def full(j: int, n: int) -> torch.Tensor:
            # product j + i of interval c sits at position c * interval + j + i
            cols = [term(slice(j + i, end, interval)) for i in range(n)]
            return torch.stack(cols, dim=-1).to(torch.float64)
        parts.append(_aligned_interval(full, interval, acc))
    if tail:
        base = n_full * interval
        parts.append(_aligned_interval(
            lambda j, n: term(slice(base + j, base + j + n)).to(torch.float64).unsqueeze(-2),
            tail, acc))
    # m <= 23: every partial sum is exact in float32 (within its exponent range)
    return _accumulate(torch.cat(parts, dim=-1).to(torch.float32), _rounder(get_format(acc.across)))


def sum_accum(x: torch.Tensor, acc: AccumulationConfig, dim: int = -1) -> torch.Tensor:
    """Sum x along ``dim`` with the accumulator of ``acc`` (see the module docstring).

    The result has x's dtype (values are exact in acc.across). ``acc.is_fp32`` is the
    ordinary ``torch.sum``. The loop runs over the reduction index only, vectorized over
    every other dimension.

    >>> sum_accum(torch.full((10000,), 0.1).half().float(), AccumulationConfig("fp16"))
    tensor(256.)
    """
    if acc.is_fp32:
        return x.sum(dim=dim)
    terms = x.detach().to(torch.float32).movedim(dim, -1)
    if terms.shape[-1] == 0:
        return torch.zeros(terms.shape[:-1], dtype=x.dtype, device=x.device)
    return _chunked(lambda pos: terms[..., pos], terms.shape[-1], acc).to(x.dtype)


def matmul_accum(a: torch.Tensor, b: torch.Tensor, acc: AccumulationConfig) -> torch.Tensor:
    """a @ b with products formed in float32 and summed with the accumulator of ``acc``.

    Products are exact in float32 when the inputs are already low precision: two values
    with at most 12 significand bits (fp16, e5m2, e4m3, MX elements) multiply to at most
    24 bits, and fp16's exponent range squared (2^-48 .. 2^32) lies inside float32's.
    (bf16 products are exact too except at the far ends of the exponent range.) So the
    only roundings are the accumulator's, as in a hardware dot-product unit.

    In aligned mode products are formed in float64, exact for any float32 operands.

    Shapes follow torch.matmul: 1-D, 2-D and batched with broadcasting. The result has
    the promoted dtype of a and b. ``acc.is_fp32`` is plain ``torch.matmul``.
    """
    if acc.is_fp32:
        return torch.matmul(a, b)
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"matmul_accum needs tensors of at least 1 dimension, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    out_dtype = torch.result_type(a, b)
    a32 = a.detach().to(torch.float32)
    b32 = b.detach().to(torch.float32)
    squeeze_a, squeeze_b = a32.dim() == 1, b32.dim() == 1
    if squeeze_a:
        a32 = a32.unsqueeze(0)
    if squeeze_b:
        b32 = b32.unsqueeze(-1)
    if a32.shape[-1] != b32.shape[-2]:
        raise ValueError(f"matmul_accum: shapes {tuple(a.shape)} and {tuple(b.shape)} do not "
                         f"match in the reduction dimension")
    k = a32.shape[-1]
    if acc.mode == "aligned":
        # float64 products are exact for any float32 operands, not only low-precision ones
        a32, b32 = a32.to(torch.float64), b32.to(torch.float64)
        rows = a32.shape[-2]
        # bound the [..., rows, n, intervals, group] step tensors to about 2^22 elements
        # by running blocks of rows one after another
        per_row = max(1, b32.shape[-1] * min(k, acc.group * max(1, k // (acc.promote or k))))
        block = max(1, (1 << 22) // per_row)
        if rows > block and k > 0:
            out = torch.cat([matmul_accum(a32[..., r:r + block, :], b32, acc)
                             for r in range(0, rows, block)], dim=-2)
            if squeeze_b:
                out = out.squeeze(-1)
            if squeeze_a:
                out = out.squeeze(-2 if not squeeze_b else -1)
            return out.to(out_dtype)
    b_t = b32.transpose(-1, -2)

    def products(pos: slice) -> torch.Tensor:
        # [..., i, j, p] = a[..., i, p] * b[..., p, j] for the positions p in pos
        return a32[..., pos].unsqueeze(-2) * b_t[..., pos].unsqueeze(-3)

    if k == 0:
        out = products(slice(0, 0)).sum(-1)
    else:
        out = _chunked(products, k, acc)
    if squeeze_b:
        out = out.squeeze(-1)
    if squeeze_a:
        out = out.squeeze(-2 if not squeeze_b else -1)
    return out.to(out_dtype)
