"""Scaling: per-tensor scales from amax (current and delayed) and OCP MX block scaling.

Per-tensor scaling is a chain of small pure functions::

    amax  = tensor_to_amax(x)                       # max |x|
    scale = amax_to_scale(amax, fmt, margin=m)      # fmt.max / amax / 2**m
    y     = quantize(x * scale, fmt) / scale        # quantize_scaled

Delayed scaling (TransformerEngine's recipe) quantizes the current step with the scale
derived from the amax history of *previous* steps, then records this step's amax.

MX block scaling (OCP Microscaling v1.0) gives every block of ``block_size`` consecutive
elements one power-of-two scale X (an E8M0 value) and stores the elements V/X in a narrow
element format.

``quantize_spec`` is the dispatcher every layer uses to apply a recipe's TensorSpec.
"""
from __future__ import annotations

import math
import struct
from typing import Optional, Tuple, Union

import numpy as np
import torch

from .formats import FloatFormat, FormatLike, get_format
from .blocks.quantize import _blocked_quantize, _from_blocks, quantize_blocked
from .blocks.scheme import BlockScheme, ScaleFormat, ScaleRule, get_scheme, scheme_along
from .quant import (_F32, _MODE_CODE, Rounding, _choice, _cquant, _draw_seed, _fast_path,
                    _layout_for, _plan, _tracing)
from .quant import quantize
from .recipe import ScalingConfig, ScalingKind, TensorSpec

__all__ = [
    "tensor_to_amax", "amax_to_scale", "quantize_scaled", "DelayedScaling", "quantize_mx",
    "quantize_spec", "quantize_axiswise", "config_scale_kwargs", "AMAX_ALGOS",
    "MX_SCALE_RULES", "MX_RULE", "POW2_RULES",
]

AMAX_ALGOS = ("max", "most_recent")
MX_SCALE_RULES = ("ocp", "ceil", "ceil-log2", "dither")
# each MX scale rule as the block quantizer's ScaleRule ("ocp" is its "floor")
MX_RULE = {"ocp": ScaleRule.FLOOR, "ceil": ScaleRule.CEIL,
           "ceil-log2": ScaleRule.CEIL_LOG2, "dither": ScaleRule.DITHER}
POW2_RULES = ("none", "floor", "log2")

_F32_MAX = torch.finfo(torch.float32).max          # 3.4028e38

ScaleLike = Union[torch.Tensor, float]


# --------------------------------------------------------------------------------------
# Per-tensor scaling
# --------------------------------------------------------------------------------------
def tensor_to_amax(x: torch.Tensor) -> torch.Tensor:
    """Return max |x| as a 0-d float32 tensor on x's device.

    NaN anywhere in x gives a NaN amax (torch.amax propagates NaN), inf gives inf; both
    are rejected by :func:`amax_to_scale`, which then keeps the previous scale. An empty
    tensor has amax 0.
    """
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    return x.detach().abs().amax().to(torch.float32)


def amax_to_scale(amax: ScaleLike, fmt: FormatLike, *, margin: float = 0,
                  prev_scale: Optional[ScaleLike] = None, eps: float = 0.0,
                  pow2: str = "none") -> torch.Tensor:
    """Return the factor that maps ``amax`` onto the format's largest value.

    eps == 0:
      scale = fmt.max / amax / 2**margin                   (float32, one rounding)
      if amax == 0 or amax is not finite: scale = prev_scale (1.0 if none)
    eps > 0 (torchao's clamp):
      scale = float32(fmt.max / max(amax, eps)) / 2**margin   (torchao's expression, in
              float64; the same float32 value as the float32 quotient wherever amax >=
              eps: its float64 error is far below any float32 quotient's distance from a
              rounding midpoint); a zero amax is clamped, a non-finite one keeps prev_scale
    scale = min(scale, float32 max)                        (a tiny amax must not give inf)
    pow2 = "floor": scale with its mantissa bits zeroed    (2**floor(log2 scale), exact)
         = "log2" : exp2(floor(log2(scale))) in float32    (torchao; a scale just below
                    a power of two may round up to it, through log2's rounding)

    ``amax`` may have any shape (one amax per row for axiswise scaling); the scale has
    its shape. Computed with tensor ops only, so no host synchronisation happens on a GPU.

    >>> amax_to_scale(torch.tensor(2.0), "e4m3")
    tensor(224.)
    """
    fmt = get_format(fmt)
    if pow2 not in POW2_RULES:
        raise ValueError(f"unknown pow2 rule {pow2!r}; valid choices: {', '.join(POW2_RULES)}")
    amax = torch.as_tensor(amax, dtype=torch.float32)
    device = amax.device
    if (_fast_path(True, amax) and amax.numel() == 1 and not amax.requires_grad
            and eps == 0 and pow2 == "none"):
        return _amax_to_scale_cpu(float(amax), fmt, margin, prev_scale)
    if eps > 0:
        raw = (fmt.max / torch.clamp(amax.to(torch.float64), min=float(eps))).to(torch.float32)
        usable = torch.isfinite(amax)
    else:
        # Divide first, then apply the power-of-two margin: the only rounding is the division.
        raw = torch.tensor(fmt.max, dtype=torch.float32, device=device) / amax
        usable = torch.isfinite(amax) & (amax > 0)
    raw = raw * (2.0 ** -float(margin))
    raw = torch.clamp(raw, max=_F32_MAX)
    if pow2 == "floor":
        raw = (raw.view(torch.int32) & 0x7F800000).view(torch.float32)
    elif pow2 == "log2":
        raw = torch.exp2(torch.floor(torch.log2(raw)))
    if prev_scale is None:
        prev = torch.ones((), dtype=torch.float32, device=device)
    else:
        prev = torch.as_tensor(prev_scale, dtype=torch.float32).to(device)
    return torch.where(usable, raw, prev).reshape(amax.shape)


def config_scale_kwargs(cfg: ScalingConfig) -> dict:
    """The :func:`amax_to_scale` keywords a ScalingConfig sets (margin, eps, pow2)."""
    return {"margin": cfg.margin, "eps": cfg.amax_eps, "pow2": cfg.pow2_scale}


def quantize_axiswise(x: torch.Tensor, fmt: FormatLike, *, axis: int = -1,
                      margin: float = 0, eps: float = 0.0, pow2: str = "none",
                      rounding: str = "nearest", saturate: bool = True,
                      generator: Optional[torch.Generator] = None) -> tuple:
    """Axiswise ("rowwise") scaling; returns ``(dequantized, scales)``.

    Every row along ``axis`` (the reduction dimension of the GEMM that consumes x) has
    its own scale:

        amax_r  = max |x_r| over axis
        scale_r = amax_to_scale(amax_r, fmt, margin=margin, eps=eps, pow2=pow2)
        y_r     = quantize(x_r * scale_r, fmt) / scale_r

    ``scales`` is float32, shaped like x with ``axis`` of length 1.
    """
    fmt = get_format(fmt)
    if x.dim() == 0:
        raise ValueError("quantize_axiswise needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of {x.dim()} dimensions")
    hp = x.detach().to(torch.float32)
    amax = hp.abs().amax(dim=axis, keepdim=True)
    scale = amax_to_scale(amax, fmt, margin=margin, eps=eps, pow2=pow2)
    lp = quantize(hp * scale, fmt, rounding=rounding, saturate=saturate, generator=generator)
    return (lp / scale).to(x.dtype), scale


def _amax_to_scale_cpu(amax: float, fmt: FloatFormat, margin: float, prev_scale) -> torch.Tensor:
    """amax_to_scale with numpy float32 scalars: the same float32 operations as the
    tensor ops (division, product with 2^-margin as float32, clamp), without a dozen
    tiny tensor ops per call (a CPU tensor costs no synchronisation to read)."""
    if not (math.isfinite(amax) and amax > 0):
        prev = 1.0 if prev_scale is None else prev_scale
        return torch.as_tensor(prev, dtype=torch.float32).reshape(()).clone()
    with np.errstate(over="ignore"):
        raw = np.float32(fmt.max) / np.float32(amax)
        raw = raw * np.float32(2.0 ** -float(margin))
    return torch.tensor(min(float(raw), _F32_MAX), dtype=torch.float32)


def quantize_scaled(x: torch.Tensor, fmt: FormatLike, scale: ScaleLike, *,
                    rounding: str = "nearest", saturate: bool = True,
                    generator: Optional[torch.Generator] = None,
                    seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Quantize with a per-tensor scale and return the dequantized values in x's dtype.

    y = quantize(x * scale, fmt) / scale, both products in float32.

    ``saturate=True`` clamps |x * scale| > fmt.max to fmt.max (what per-tensor FP8 recipes
    do: with a delayed scale a tensor may outgrow its history). For x in a narrower dtype
    than float32 (bf16, fp16) the dequantized value is rounded once more to that dtype.
    ``seed`` (0-d int64 tensor) replaces a draw from ``generator``, as in quantize.
    """
    fmt = get_format(fmt)
    scale = torch.as_tensor(scale, dtype=torch.float32).to(x.device)
    hp = x.detach().to(torch.float32)
    lp = quantize(hp * scale, fmt, rounding=rounding, saturate=saturate, generator=generator,
                  seed=seed)
    return (lp / scale).to(x.dtype)


def _check_algo(algo: str) -> str:
    if algo not in AMAX_ALGOS:
        raise ValueError(f"unknown amax algo {algo!r}; valid choices: {', '.join(AMAX_ALGOS)}")
    return algo


class DelayedScaling:
    """Per-tensor delayed scaling state: an amax history ring and the current scale.

    Update rule, one call of ``update(amax)`` per step in which the tensor was quantized::

        amax   = all_reduce_max(amax)                  # under torch.distributed
        history[pos] = amax;  pos = (pos + 1) % history_len
        a      = max(finite entries of history)        # algo="max"
               | amax                                  # algo="most_recent"
        scale  = amax_to_scale(a, fmt, margin, prev_scale=scale)

    The step quantizes with ``scale`` *before* calling ``update``, so step t uses the
    history of steps < t (the first step uses 1.0). A step without ``update`` (a module
    that did not run) changes nothing. Non-finite amaxes are stored but never produce a
    scale: "max" skips them, "most_recent" keeps the previous scale, so one overflowed
    step does not freeze the scale for ``history_len`` steps.

    The state is four tensors updated in place (history, 0-d int64 ``pos`` and ``count``,
    0-d float32 scale), never replaced, and ``update`` is torch ops only: torch.compile
    traces it, in the backward of an emulated layer too, as mutations of the same
    tensors every step (no Python state changes, no recompiles).

    ``fmt`` may be left None and bound on first use by :func:`quantize_spec`.
    """

    def __init__(self, history_len: int = 16, algo: str = "max", margin: float = 0,
                 fmt: Optional[FormatLike] = None, *, eps: float = 0.0, pow2: str = "none"):
        if isinstance(history_len, bool) or not isinstance(history_len, int) or history_len < 1:
            raise ValueError(f"history_len must be an int >= 1, got {history_len!r}")
        self.history_len = history_len
        self.algo = _check_algo(algo)
        self.margin = margin
        self.eps, self.pow2 = eps, pow2
        self.fmt: Optional[FloatFormat] = None if fmt is None else get_format(fmt)
        self._history = torch.zeros(history_len, dtype=torch.float32)
        self._scale = torch.ones((), dtype=torch.float32)
        self._pos = torch.zeros((), dtype=torch.int64)     # next slot to write
        self._count = torch.zeros((), dtype=torch.int64)   # recorded steps, at most history_len

    @classmethod
    def from_config(cls, cfg: ScalingConfig, fmt: Optional[FormatLike] = None) -> "DelayedScaling":
        return cls(cfg.amax_history_len, cfg.amax_algo, cfg.margin, fmt,
                   eps=cfg.amax_eps, pow2=cfg.pow2_scale)

    # -- reading -----------------------------------------------------------------------
    @property
    def scale(self) -> torch.Tensor:
        """The scale to quantize the next step with (0-d float32; a copy, which later
        updates leave unchanged)."""
        if _tracing(self._scale):
            return torch.ops.mixprec.scale_snapshot(self._scale)
        return self._scale.clone()

    @property
    def amax_history(self) -> torch.Tensor:
        """Recorded amaxes, oldest first (a copy; at most history_len of them)."""
        pos, count = int(self._pos), int(self._count)
        order = [(pos - count + i) % self.history_len for i in range(count)]
        return self._history[order].clone()

    def bind(self, fmt: FormatLike) -> FloatFormat:
        """Set the format on first use; a different format later is an error."""
        fmt = get_format(fmt)
        if self.fmt is None:
            self.fmt = fmt
        elif self.fmt != fmt:
            raise ValueError(f"DelayedScaling is bound to format {self.fmt.name!r}, "
                             f"cannot be used for {fmt.name!r}")
        return fmt

    # -- update ------------------------------------------------------------------------
    def update(self, amax: ScaleLike) -> torch.Tensor:
        """Record this step's amax and compute the scale for the next step; returns it
        (a copy)."""
        if self.fmt is None:
            raise ValueError("DelayedScaling has no format: pass fmt= or bind(fmt) first")
        amax = torch.as_tensor(amax, dtype=torch.float32).detach().reshape(()).clone()
        amax = _all_reduce_max(amax)
        if self._history.device != amax.device:
            self._move(amax.device)
        # in place, so a compiled graph mutates the tensors it was traced with
        self._history.index_put_((self._pos,), amax)
        self._pos.add_(1).remainder_(self.history_len)
        self._count.add_(1).clamp_(max=self.history_len)
        if self.algo == "max":
            # unused slots hold 0 and never win; non-finite entries are skipped
            finite = torch.where(torch.isfinite(self._history), self._history,
                                 torch.zeros_like(self._history))
            chosen = finite.amax()
        else:
            chosen = amax
        self._scale.copy_(amax_to_scale(chosen, self.fmt, margin=self.margin,
                                        prev_scale=self._scale, eps=self.eps, pow2=self.pow2))
        return self._scale.clone()

    def _move(self, device: torch.device) -> None:
        # the one replacement of the state tensors: on first use on another device
        self._history, self._scale, self._pos, self._count = (
            t.to(device) for t in (self._history, self._scale, self._pos, self._count))

    def reset(self) -> None:
        """Forget every recorded amax: an empty history and scale 1, as constructed."""
        self._history.zero_()
        self._scale.fill_(1.0)
        self._pos.zero_()
        self._count.zero_()

    # -- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"history_len": self.history_len, "algo": self.algo, "margin": self.margin,
                "eps": self.eps, "pow2": self.pow2,
                "fmt": None if self.fmt is None else self.fmt.name,
                "amax_history": self._history.clone(), "scale": self._scale.clone(),
                "pos": int(self._pos), "count": int(self._count)}

    def load_state_dict(self, state: dict) -> None:
        """Restore history, position and scale exactly, into this object's tensors. The
        history length must match; algo and margin are taken from the state (they shaped
        the stored scale). ``pos`` and ``count`` may be ints or 0-d tensors."""
        if state["history_len"] != self.history_len:
            raise ValueError(f"state has history_len {state['history_len']}, this "
                             f"DelayedScaling has {self.history_len}")
        if state["fmt"] is not None:
            self.bind(state["fmt"])
        self.algo = _check_algo(state["algo"])
        self.margin = state["margin"]
        # states saved before eps / pow2 existed had neither
        self.eps, self.pow2 = state.get("eps", 0.0), state.get("pow2", "none")
        self._history.copy_(state["amax_history"].detach().reshape(self.history_len))
        self._scale.copy_(state["scale"].detach().reshape(()))
        self._pos.fill_(int(state["pos"]))
        self._count.fill_(int(state["count"]))

    def __repr__(self) -> str:
        fmt = None if self.fmt is None else self.fmt.name
        return (f"DelayedScaling(history_len={self.history_len}, algo={self.algo!r}, "
                f"margin={self.margin}, fmt={fmt!r}, scale={float(self._scale):g})")


@torch.library.custom_op("mixprec::scale_snapshot", mutates_args=())
def _scale_snapshot(scale: torch.Tensor) -> torch.Tensor:
    """A copy of a delayed scale, as an operator the compiled graph keeps.

    Why not ``scale.clone()`` in a traced forward: AOT autograd's partitioner (torch
    2.13) may recompute a clone saved for backward from the graph input it copies, and
    the input is the scale that ``update`` then overwrites in place, so the compiled
    backward would dequantize with the next step's scale. An opaque operator's output
    is saved as computed."""
    return scale.clone()


@_scale_snapshot.register_fake
def _(scale: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(scale)


def _all_reduce_max(amax: torch.Tensor) -> torch.Tensor:
    """MAX-reduce amax across ranks so every rank derives the same scale."""
    # Imported here: distributed sits beside scaling in the layer map, and plain
    # single-process use should not pay for importing torch.distributed machinery.
    from .distributed import reduce_amax_
    return reduce_amax_(amax)


# --------------------------------------------------------------------------------------
# MX block scaling
# --------------------------------------------------------------------------------------
def quantize_mx(x: torch.Tensor, fmt: FormatLike, *, block_size: int = 32, axis: int = -1,
                scale_rule: str = "ocp", rounding: str = "nearest",
                generator: Optional[torch.Generator] = None,
                seed: Optional[torch.Tensor] = None,
                out: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> tuple:
    """OCP MX block quantization; returns ``(dequantized, scales)``.

    Each block of ``block_size`` consecutive elements along ``axis`` shares a scale

        ocp : X = 2^(floor(log2 amax) - emax_elem)    (emax_elem = fmt.emax: e4m3 8, e5m2 15)
        ceil: X = 2^ceil(log2(amax / max_elem))        (exact; never saturates)
        ceil-log2: X = 2^ceil(log2(fl32(amax / max_elem))) in float32  (torchao RCEIL)
        dither: X as ocp, the elements quantize(3/4 * V / X): |V/X| < 2^(emax_elem + 1),
                so |3/4 V/X| < 1.5 * 2^emax_elem <= max_elem and stochastic rounding
                never clips (Tseng et al. 2025)
        X clamped to E8M0's range [2^-127, 2^127]

    and stores quantize(V / X, fmt, saturate=True): under "ocp" an e4m3 V/X in (448, 512)
    becomes 448. The dequantized value is that times X (dither: times X * fl32(4/3),
    the BlockScheme "dither" rule), in x's dtype.

    Special blocks: an all-zero block reports X = 2^-127 (the formula's -inf exponent
    clamped to E8M0's minimum; OCP allows any) and stays zero. A block holding NaN or
    inf gets a NaN scale (E8M0's 0xFF) and dequantizes to all NaN. A length not divisible
    by ``block_size`` is padded with zeros, which change no amax and are dropped again.

    ``scales`` is float32, shaped like x with ``axis`` of length ceil(n / block_size).

    A shorthand for :func:`mixprec.quantize_blocked` with ``BlockScheme(fmt, (1,
    block_size), "e8m0", "floor" | "ceil", axis=axis)``: the same bits, returned as
    ``(quantize_blocked(...).dequantize(), block_scales)``. ``seed`` (0-d int64 tensor)
    replaces a draw from ``generator``, as in quantize.

    ``out``: a ``(dequantized, scales)`` pair of tensors to write into and return (shapes
    and dtypes as above, x's device), so repeated calls reuse their buffers; the C kernel
    writes float32 CPU results into them directly.
    """
    fmt = get_format(fmt)
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}")
    if scale_rule not in MX_SCALE_RULES:
        raise ValueError(f"unknown MX scale_rule {scale_rule!r}; valid choices: "
                         f"{', '.join(MX_SCALE_RULES)}")
    if x.dim() == 0:
        raise ValueError("quantize_mx needs a tensor with at least one dimension")
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of {x.dim()} dimensions")
    ax = axis % x.dim()
    if out is not None:
        _check_mx_out(out, x, ax, block_size)
    deq, scales, _ = _mx_parts(x, fmt, block_size, ax, scale_rule, rounding,
                               generator, seed=seed, out=out)
    if out is None:
        return deq, scales
    for dst, src in zip(out, (deq, scales)):
        if _tracing(src) or src.data_ptr() != dst.data_ptr():
            dst.copy_(src)
    return out


def _check_mx_out(out, x: torch.Tensor, ax: int, block_size: int) -> None:
    """out must be (dequantized like x, float32 scales with ceil(n / block) along ax)."""
    shape = list(x.shape)
    shape[ax] = -(-shape[ax] // block_size)
    want = ((tuple(x.shape), x.dtype), (tuple(shape), torch.float32))
    if (not isinstance(out, (tuple, list)) or len(out) != 2
            or not all(isinstance(t, torch.Tensor) for t in out)
            or any((tuple(t.shape), t.dtype) != w or t.device != x.device
                   for t, w in zip(out, want))):
        raise ValueError(f"out must be a (dequantized, scales) pair of tensors shaped "
                         f"{want[0][0]} ({x.dtype}) and {want[1][0]} (torch.float32) on "
                         f"{x.device}")


def _mx_parts(x: torch.Tensor, fmt: FloatFormat, block_size: int, ax: int, scale_rule: str,
              rounding: str, generator: Optional[torch.Generator], elements: bool = False,
              seed: Optional[torch.Tensor] = None, out: Optional[tuple] = None):
    """quantize_mx's (dequantized, scales) and, when ``elements``, the float32 element
    values V/X (0 in NaN-scaled blocks) that storage encodes; arguments already checked.
    CPU tensors take the C kernel (mixprec/_cquant.c, the same steps in one pass); the
    block quantizer's torch ops are the reference it reproduces, random stream included.
    ``out`` (checked): buffers the C kernel may write into directly."""
    hp = x.detach().to(torch.float32)
    mode = _choice(Rounding, rounding, "rounding")
    if (_fast_path(_cquant, hp)
            and scale_rule in ("ocp", "ceil") and _layout_for(torch.float32, fmt) is _F32):
        deq, scales, elems = _mx_parts_c(hp, fmt, block_size, ax, scale_rule, mode,
                                         generator, elements, seed, out)
        return deq.to(x.dtype), scales, elems
    # the MX setting of the general block quantizer ("ocp" is its "floor" rule)
    rule = MX_RULE[scale_rule]
    scheme = BlockScheme(fmt, (1, block_size), ScaleFormat.E8M0, rule, axis=ax)
    b = _blocked_quantize(hp, scheme, mode, generator, seed=seed)
    scales = b.scales.squeeze(b.geometry.reduce)
    if rule is ScaleRule.DITHER:
        # decode X * 4/3 as BlockQuantized.dequantize does: (X * fl32(4/3)), then times
        # the element; the element values are the quantized 3/4 V/X themselves
        values = (torch.nan_to_num(_from_blocks(b.elems, b.geometry), nan=0.0)
                  if elements else None)
        deq = _from_blocks(b.elems * (b.scales * b.tensor_scale), b.geometry)
        return deq.to(x.dtype), scales, values
    # A NaN scale turns its whole block into NaN through the product below.
    deq = _from_blocks(b.elems.mul_(b.scales), b.geometry)
    values = None
    if elements:
        n = deq.shape[ax]
        wide = scales.repeat_interleave(block_size, dim=ax).narrow(ax, 0, n)
        values = torch.where(torch.isnan(wide), torch.zeros_like(deq), deq / wide)
    return deq.to(x.dtype), scales, values


def _mx_parts_c(hp: torch.Tensor, fmt: FloatFormat, block: int, ax: int, scale_rule: str,
                mode: Rounding, generator: Optional[torch.Generator], elements: bool,
                seed_tensor: Optional[torch.Tensor] = None, out: Optional[tuple] = None):
    hp = hp.contiguous()
    shape = hp.shape
    outer, n, inner = math.prod(shape[:ax]), shape[ax], math.prod(shape[ax + 1:])
    n_blocks = -(-n // block)
    # a caller's buffers when the kernel can write them as they are (float32, contiguous,
    # not overlapping the input), else fresh ones that quantize_mx copies out
    usable = out is not None and all(t.dtype == torch.float32 and t.is_contiguous()
                                     for t in out) and not any(
        _overlaps(t, hp) for t in out)
    deq = out[0] if usable else torch.empty_like(hp)
    scales = out[1] if usable else torch.empty(*shape[:ax], n_blocks, *shape[ax + 1:],
                                               dtype=torch.float32)
    elems = torch.empty_like(hp) if elements else None
    p = _plan(fmt, _F32, True)
    seed = 0
    if mode is Rounding.STOCHASTIC:   # a given seed tensor replaces the draw, as in quantize
        seed = int(seed_tensor) if seed_tensor is not None else _draw_seed(generator)
    # max_elem's significand bits ("ceil" rule: amax's significand above them rounds up)
    top = fmt.max / 2.0 ** fmt.emax
    top_mbits = struct.unpack("<I", struct.pack("<f", top))[0] & 0x7FFFFF
    _cquant.mx_quantize(
        hp.data_ptr(), deq.data_ptr(), scales.data_ptr(),
        0 if elems is None else elems.data_ptr(), outer, n, inner, block, fmt.emax,
        int(scale_rule == "ceil"), top_mbits, _MODE_CODE[mode], seed & ((1 << 64) - 1),
        torch.get_num_threads(), p.s0, p.te, p.m0, p.m0_adj, p.unsigned_zero, p.max_bits,
        p.q_bits, p.inf_bits, p.nan_bits, p.ovf_bits, p.infin_bits)
    return deq, scales, elems


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the memory of two contiguous tensors intersects: the kernel's output must
    not alias its input (x given as its own out= takes a fresh buffer and a copy)."""
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


# --------------------------------------------------------------------------------------
# The dispatcher
# --------------------------------------------------------------------------------------
def quantize_spec(x: torch.Tensor, spec: TensorSpec, cfg: ScalingConfig, *,
                  state: Optional[DelayedScaling] = None, axis: int = -1,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Apply a TensorSpec to x and return the dequantized values in x's dtype.

    identity spec -> x itself (the same object)
    none          -> quantize(x, fmt, rounding, saturate)
    current       -> quantize_scaled(x, fmt, amax_to_scale(amax(x), fmt, margin=cfg.margin)),
                     amax MAX-reduced across ranks under torch.distributed
    delayed       -> quantize_scaled(x, fmt, state.scale); then state.update(amax(x))
    mx            -> quantize_mx(x, fmt, block_size=cfg.mx_block_size, axis=axis,
                                 scale_rule=cfg.mx_scale_rule)[0]  (always saturating)
    axiswise      -> quantize_axiswise(x, fmt, axis=axis, ...)[0]: one scale per row
    (per-tensor and axiswise scales take cfg.margin, cfg.amax_eps and cfg.pow2_scale)
    block         -> quantize_blocked(x, spec.scheme with its 1 x k blocks along axis)
                     .dequantize()

    No autograd: the result is detached; layers wrap this in their own autograd functions.

    >>> spec = TensorSpec("e4m3", scaling="current", saturate=True)
    >>> quantize_spec(torch.tensor([1.0, 0.3]), spec, ScalingConfig())
    tensor([1.0000, 0.2857])
    """
    if spec.is_identity:
        return x
    fmt = get_format(spec.format)
    rounding = spec.rounding.value
    kind = spec.scaling
    with torch.no_grad():
        if kind is ScalingKind.NONE:
            return quantize(x.detach(), fmt, rounding=rounding, saturate=spec.saturate,
                            generator=generator)
        if kind is ScalingKind.CURRENT:
            # the global amax: every rank scales as one process would on the whole batch
            scale = amax_to_scale(_all_reduce_max(tensor_to_amax(x)), fmt,
                                  **config_scale_kwargs(cfg))
            return quantize_scaled(x, fmt, scale, rounding=rounding, saturate=spec.saturate,
                                   generator=generator)
        if kind is ScalingKind.DELAYED:
            if state is None:
                raise ValueError("delayed scaling needs state=DelayedScaling(...); got None")
            state.bind(fmt)
            out = quantize_scaled(x, fmt, state.scale, rounding=rounding,
                                  saturate=spec.saturate, generator=generator)
            state.update(tensor_to_amax(x))
            return out
        if kind is ScalingKind.MX:
            return quantize_mx(x, fmt, block_size=cfg.mx_block_size, axis=axis,
                               scale_rule=cfg.mx_scale_rule, rounding=rounding,
                               generator=generator)[0]
        if kind is ScalingKind.AXISWISE:
            return quantize_axiswise(x, fmt, axis=axis, **config_scale_kwargs(cfg),
                                     rounding=rounding, saturate=spec.saturate,
                                     generator=generator)[0]
        if kind is ScalingKind.BLOCK:
            scheme = scheme_along(get_scheme(spec.scheme), axis)
            return quantize_blocked(x, scheme, rounding=rounding,
                                    generator=generator).dequantize()
    raise ValueError(f"unknown scaling {kind!r}; valid choices: "
                     f"{', '.join(k.value for k in ScalingKind)}")
