"""Autograd functions of emulated low-precision ops, and the storage of their saved tensors.

Every emulated GEMM-like op follows one rule (the 2018 mixed-precision recipe)::

    forward   y  = store( round_act(x) @ round_w(w)^T + bias ), products summed in FP32
    backward  g' = round_grad(dL/dy)
              dx = g' @ w_saved          dw = round_wgrad(g'^T @ x_saved)
              db = round_wgrad(sum g')

``round_*`` apply the layer's TensorSpecs through :func:`mixprec.scaling.quantize_spec`
(none / current / delayed / MX scaling); products are exact in FP32 and summed in FP32,
or with the emulated accumulator of ``policy.accumulation`` (:func:`mixprec.accum.matmul_accum`)
in all three GEMMs of linear and matmul. ``store`` rounds the output to the activation
format when that format is unscaled ("accumulate in FP32, store FP16") and returns it in
the narrowest float dtype holding the format (:func:`container_dtype`: float16 for fp16
and e5m2, bfloat16 for bf16); otherwise the output keeps the input's dtype. The bias is
added in FP32, as stored. Gradients come back in the dtypes of their tensors; the
gradient of a float16 output therefore reaches ``round_grad`` already in float16, as it
would from the next layer's half-precision GEMM on the hardware.

MX blocks lie along the reduction dimension of the GEMM that consumes the tensor, so a
tensor used by two GEMMs is quantized twice from high precision (as MX hardware
pipelines keep a "row-wise" and a "column-wise" copy):

    op              forward (x, w)          saved for dw / dx       grad for dx / dw
    linear          x: last, w: in          x: tokens, w: out       g: out / tokens
    matmul          a: -1, b: -2            a: -2, b: -1            g: -1 / -2
    conv            x, w: C_in (dim 1)      x: batch, w: C_out      g: C_out / batch
    conv_transpose  x: C_in (1), w: C_in (0)  x: batch, w: C_out (1)  g: C_out / batch
    bilinear        every operand once, along its last axis, for both passes

QMatmul serves the whole matmul family (mm, bmm, matmul, mv, the addmm family, and the
tensordot / einsum contractions of :mod:`mixprec.dispatch`): each operand is rounded in
its role (an ``nn.Parameter`` operand as a weight, with a weight gradient), and
``y = alpha * (a @ b) + beta * addend`` with the addend added in FP32 before the output
is stored.

Block schemes (``TensorSpec.scheme``: NVFP4, blockwise FP8, ...) are quantized twice the
same way, through :func:`mixprec.quantize_blocked`; 1 x k blocks lie along the same axes as
MX blocks; k x k tiles cover the two GEMM dimensions whichever is the reduction (for
a convolution weight: C_out x C_in at every kernel position). With
``policy.hadamard`` a GEMM's block-scaled operands (MX or a scheme; fprop: x, w; dgrad:
g, w; wgrad: g, x) are transformed along its reduction axis with shared signs,
quantized, and transformed back.

With ``scaling.block_gemm="scaled"`` (TransformerEngine's NVFP4 reference order) a linear
layer keeps its block-scheme operands quantized instead: each GEMM is
:func:`mixprec.blocks.block_scaled_mm` of the two copies (block products times the block
scales, summed over blocks in order, times alpha from the tensor amaxes), in the
Hadamard-transformed domain where the GEMM has a transform, and the copies saved for
backward keep their elements, block scales and tensor amax. The other GEMM-like ops
keep the dequantized order and warn once (TransformerEngine's recipe covers linear
layers only).

For convolutions the reduction runs over C_in*kh*kw; blocks cover consecutive input
channels at one kernel position (the channel-innermost im2col layout), so a block
never mixes kernel positions; C_in / groups should be a multiple of the block size.

Tensors saved for backward are stored in the real low-precision storage: the format's
torch dtype (float16, bfloat16, float8_e5m2, float8_e4m3fn, ...) or ``quant.encode``
codes, with the float32 per-tensor scale or the E8M0 block scales beside them. The
high-precision inputs are not kept.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from . import quant
from .accum import matmul_accum, sum_accum
from .distributed import reduce_amax_
from .distributed.fp8_all_gather import gathered_scale
from .formats import FloatFormat, get_format
from .native import active_scaled_mm
from .policy import LayerPolicy, LayerState, scaler_key
from .quant import quantize
from .recipe import AccumulationConfig, ScalingConfig, ScalingKind, TensorSpec
from .blocks import (BlockQuantized, BlockScheme, TE_NVFP4_SIGNS, fixed_signs, get_scheme,
                     scheme_along)
from .blocks import block_scaled_mm, quantize_blocked
from .scaling import (MX_RULE, DelayedScaling, _mx_parts, amax_to_scale, config_scale_kwargs,
                      quantize_mx, quantize_spec, tensor_to_amax)
from .shared import _FLOAT8, codes_to_float32, shared_operand

__all__ = ["OpContext", "GemmSpec", "QLinear", "QConv", "QConvTranspose", "QMatmul",
           "QBilinear", "QEmbedding", "QEmbeddingBag", "CONV_FUNCS", "container_dtype"]

_E8M0 = get_format("e8m0")
_MX = ScalingKind.MX
_BLOCK = ScalingKind.BLOCK
_TWO_COPIES = (ScalingKind.MX, ScalingKind.BLOCK)   # blocks along each GEMM's reduction axis
# Scalings whose scales run along the consuming GEMM's reduction dimension: a tensor used
# by two GEMMs is quantized once per GEMM, from high precision.
_PER_GEMM = _TWO_COPIES + (ScalingKind.AXISWISE,)


# --------------------------------------------------------------------------------------
# Rounding and low-precision storage
# --------------------------------------------------------------------------------------
# A packed tensor is (kind, fmt, axis, block, tensors); kinds: "raw" (float, as is),
# "values" (format values), "scaled" (per-tensor codes + scale), "mx" (codes + E8M0 scales),
# "block" (element codes, scale codes, tensor scale, Hadamard signs; fmt holds the
# BlockScheme and the tensor's shape), "requant" (a wider tensor saved by its producer; fmt holds the unscaled TensorSpec that
# backward applies to it again, see mixprec.shared).
Pack = Tuple[str, Optional[FloatFormat], int, int, Tuple[torch.Tensor, ...]]


# E8M0 and float32 share the exponent bias 127, so a scale 2^e's E8M0 code is its float32
# exponent field (2^-127, the float32 subnormal 0x00400000, has field 0 = code 0; NaN has
# 0xFF). Compiled code carries E8M0 scales as these uint8 codes: Inductor generates no
# code for torch.float8_e8m0fnu tensors (KeyError in its C++ and Triton type tables).
_E8M0_NAN_BITS = 0x7F800001    # torch's float8_e8m0fnu 0xFF cast to float32


def _e8m0_to_codes(scales: torch.Tensor) -> torch.Tensor:
    """E8M0 scales (float32 powers of two in [2^-127, 2^127], or NaN) -> uint8 codes,
    ``code = (bits(X) >> 23) & 0xFF``: the bits of ``X.to(torch.float8_e8m0fnu)``."""
    return ((scales.to(torch.float32).view(torch.int32) >> 23) & 0xFF).to(torch.uint8)


def _e8m0_codes_to_float32(codes: torch.Tensor) -> torch.Tensor:
    """uint8 E8M0 codes -> float32 with the bits of torch's cast: code << 23 (2^(code -
    127)), except code 0 -> 0x00400000 (2^-127) and 0xFF -> NaN."""
    c = codes.to(torch.int32)
    bits = torch.where(c == 0, torch.full_like(c, 0x00400000),
                       torch.where(c == 0xFF, torch.full_like(c, _E8M0_NAN_BITS), c << 23))
    return bits.view(torch.float32)


def _to_storage(values: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    # The cast is exact: values are already representable in fmt.
    if fmt is _E8M0 and quant._tracing(values):
        return _e8m0_to_codes(values)
    if fmt.torch_dtype is not None:
        return values.to(fmt.torch_dtype)
    if not fmt.has_nan:
        # No NaN code (MX FP6/FP4 elements): a NaN input already made the forward output
        # NaN; the stored copy holds 0 there.
        values = torch.where(torch.isnan(values), torch.zeros_like(values), values)
    if values.dtype == torch.float32 and quant._layout_for(values.dtype, fmt) is quant._F32:
        # quant.encode's codes without its rounding step, which changes no value here
        return quant._values_to_codes(values, fmt, quant._F32, quant.Backend.AUTO)
    return quant.encode(values, fmt)


def _widen(t: torch.Tensor) -> torch.Tensor:
    """``t.to(torch.float32)``, bit for bit; float8 dtypes through a table of torch's
    own 256 values (:func:`mixprec.shared.codes_to_float32`), faster than the cast."""
    if t.dtype in _FLOAT8:
        return codes_to_float32(t)
    return t.to(torch.float32)


def _from_storage(stored: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    if fmt is _E8M0 and stored.dtype == torch.uint8:   # stored while compiled
        return _e8m0_codes_to_float32(stored)
    if fmt.torch_dtype is not None:
        return _widen(stored)
    if stored.dtype == torch.uint8 and fmt.bits <= 8:
        # quant.decode's values of every code, looked up in one pass
        return codes_to_float32(stored, quant._code_table(fmt).to(torch.float32))
    return quant.decode(stored, fmt, dtype=torch.float32)


_CONTAINERS = ((torch.float16, get_format("fp16")), (torch.bfloat16, get_format("bf16")))


def container_dtype(fmt: FloatFormat) -> torch.dtype:
    """The narrowest torch dtype with arithmetic that holds every value of ``fmt``."""
    for dtype, wide in _CONTAINERS:
        if (fmt.mbits <= wide.mbits and fmt.emax <= wide.emax
                and fmt.emin - fmt.mbits >= wide.emin - wide.mbits):
            return dtype
    return torch.float32


def _expand_blocks(scales: torch.Tensor, axis: int, block: int, n: int) -> torch.Tensor:
    return scales.repeat_interleave(block, dim=axis).narrow(axis, 0, n)


# torch dtypes whose cast from float32 is IEEE nearest-even with overflow to inf:
# quantize's non-saturating nearest rounding, bit for bit (e5m2: checked on every float16
# and on float32 rounding midpoints in the tests).
_CAST_DTYPES = (torch.float16, torch.bfloat16, torch.float8_e5m2)


def _cast_rounds(spec: TensorSpec, fmt: FloatFormat) -> bool:
    """True when torch's own cast to fmt's dtype is the spec's rounding."""
    return (fmt.torch_dtype in _CAST_DTYPES and not spec.saturate
            and spec.rounding.value == "nearest")


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x.to(dtype); to float8 through float32 (exact from 16 bits, faster on CPU)."""
    if dtype.itemsize == 1 and x.dtype != torch.float32:
        x = x.to(torch.float32)
    return x.to(dtype)


def _round(x: torch.Tensor, spec: TensorSpec, cfg: ScalingConfig,
           scaler: Optional[DelayedScaling], axis: int, generator: Optional[torch.Generator],
           pack: bool = False, hadamard: Tuple[int, Optional[torch.Tensor]] = (0, None),
           dequantize: bool = True) -> Tuple[Optional[torch.Tensor], Optional[Pack]]:
    """Round ``x`` (any float dtype) per ``spec``; return (float32 values, pack or None).

    Same values as ``quantize_spec(x, spec, cfg, state=scaler, axis=axis)``; per-tensor
    scaling is spelled out here because storage needs the codes quantize(x * scale) and
    the scale, not only their quotient. An unscaled spec whose storage dtype is x's own
    dtype (fp16 activations arriving in float16) stores x itself, without a copy.
    ``dequantize=False`` with ``pack``: a per-tensor scaled spec returns (None, pack),
    the codes and scale without the quotient codes / scale (the native FP8 GEMMs take
    the codes; :func:`_unpack` gives the same values bit for bit where needed); other
    specs return their values as usual.
    """
    if spec.is_identity:
        return x.to(torch.float32), (("raw", None, axis, 0, (x,)) if pack else None)
    fmt = get_format(spec.format)
    if spec.scaling is ScalingKind.NONE:
        if x.dtype == fmt.torch_dtype and not spec.saturate:
            lp = x                          # already fmt's values, whatever the rounding
        elif _cast_rounds(spec, fmt) and x.dtype != torch.float64:   # float64 casts twice
            lp = _cast(x, fmt.torch_dtype)
        else:
            values = quantize_spec(x.to(torch.float32), spec, cfg, generator=generator)
            return values, (("values", fmt, axis, 0, (_to_storage(values, fmt),))
                            if pack else None)
        return _widen(lp), (("values", fmt, axis, 0, (lp,)) if pack else None)
    x_in = x
    if spec.scaling is _BLOCK:
        return _round_block(x.to(torch.float32), get_scheme(spec.scheme), spec, axis,
                            generator, pack, hadamard)
    if spec.scaling is _MX and (hadamard[0] or cfg.mx_scale_rule == "dither"):
        # MX with a Hadamard transform, or with dither's 4/3 decode factor (which the
        # "mx" pack of codes and E8M0 scales has no slot for): the same MX setting of
        # the block quantizer, stored as a block pack
        scheme = BlockScheme(fmt, (1, cfg.mx_block_size), "e8m0", MX_RULE[cfg.mx_scale_rule])
        return _round_block(x.to(torch.float32), scheme, spec, axis, generator, pack,
                            hadamard)
    if spec.scaling is _MX:
        x = x.to(torch.float32)
        block = cfg.mx_block_size
        if not pack:
            return quantize_mx(x, fmt, block_size=block, axis=axis,
                               scale_rule=cfg.mx_scale_rule, rounding=spec.rounding.value,
                               generator=generator)[0], None
        # the element values V/X come with the quantization (0 in NaN-scaled blocks,
        # whose NaN is kept in the scale)
        values, scales, elems = _mx_parts(x, fmt, block, axis % x.dim(), cfg.mx_scale_rule,
                                          spec.rounding.value, generator, elements=True)
        codes = (_to_storage(elems, fmt), _to_storage(scales, _E8M0))
        return values, ("mx", fmt, axis, block, codes)
    # max |x| is the same value read in x's own dtype (widening is exact and monotone)
    amax = None
    if spec.scaling is ScalingKind.AXISWISE:
        # quantize_axiswise spelled out: one scale per row along the reduction axis
        scale = amax_to_scale(x.abs().amax(dim=axis, keepdim=True), fmt,
                              **config_scale_kwargs(cfg))
    elif spec.scaling is ScalingKind.CURRENT:
        scale = gathered_scale(x, spec, cfg)
        if scale is not None:
            # an FP8 all-gather already rounded x with this scale (the full weight's);
            # rounding again from max|x| could pick a scale one ulp off. The codes to
            # save: x * scale is within 2 float32 ulps of its code q = x_full-rounded,
            # far inside q's rounding interval, so rounding it again gives q exactly
            lp = None
            if pack:
                lp = quantize(x * scale, fmt, rounding="nearest", saturate=spec.saturate)
            return x, (("scaled", fmt, axis, 0, (_to_storage(lp, fmt), scale)) if pack
                       else None)
        # the global amax: every rank scales as one process would on the whole batch
        scale = amax_to_scale(reduce_amax_(tensor_to_amax(x)), fmt,
                              **config_scale_kwargs(cfg))
    elif scaler is None:
        raise ValueError("delayed scaling needs a LayerState: pass state=LayerState() "
                         "or run the layer under attach()")
    else:
        scaler.bind(fmt)
        scale = scaler.scale.to(x.device)         # a copy: update() writes in place
        amax = tensor_to_amax(x)
    dequantize = dequantize or not pack
    fused = _scaled_round_c(x_in, scale, fmt, spec, generator, pack, dequantize)
    if fused is not None:
        values, lp = fused
    else:
        # x * scale, rounded and divided again in one buffer (a float32 copy of a
        # narrower x is ours to overwrite): every fresh 4 MiB buffer costs page faults
        x = x.to(torch.float32)
        lp = x.mul_(scale) if x is not x_in else x * scale
        quantize(lp, fmt, rounding=spec.rounding.value, saturate=spec.saturate,
                 generator=generator, out=lp)
        stored = _to_storage(lp, fmt) if pack else None
        values, lp = (lp.div_(scale) if dequantize else None), stored
    if scaler is not None:
        scaler.update(amax)
    if pack and fused is not None:
        lp = _to_storage(lp, fmt)
    return values, (("scaled", fmt, axis, 0, (lp, scale)) if pack else None)


def _scaled_round_c(x: torch.Tensor, scale: torch.Tensor, fmt: FloatFormat, spec: TensorSpec,
                    generator: Optional[torch.Generator], keep_lp: bool,
                    dequantize: bool = True):
    """(quantize(x * scale) / scale or None, quantize(x * scale) or None) from the C
    kernel in one pass over x (float32 or bfloat16 on CPU), the same products, roundings,
    random stream and quotients as the tensor ops; None where it does not apply. The
    quotients are skipped when not ``dequantize`` (and ``keep_lp``), where the built
    kernel can (``SCALED_ROUND_SKIPS_VALUES``)."""
    if (not quant._fast_path(quant._cquant, x, scale)
            or x.dtype not in (torch.float32, torch.bfloat16) or scale.numel() != 1
            or fmt.convention.name == "E8M0"
            or quant._layout_for(torch.float32, fmt) is not quant._F32):
        return None
    x = x.detach().contiguous()   # the random bits follow the row-major index
    mode = quant._choice(quant.Rounding, spec.rounding.value, "rounding")
    seed = quant._draw_seed(generator) if mode is quant.Rounding.STOCHASTIC else 0
    p = quant._plan(fmt, quant._F32, spec.saturate)
    skip = (keep_lp and not dequantize
            and getattr(quant._cquant, "SCALED_ROUND_SKIPS_VALUES", 0))
    values = None if skip else torch.empty(x.shape, dtype=torch.float32)
    lp = torch.empty(x.shape, dtype=torch.float32) if keep_lp else None
    sbits = int(scale.reshape(()).to(torch.float32).view(torch.int32)) & 0xFFFFFFFF
    quant._cquant.scaled_round(
        x.data_ptr(), 0 if lp is None else lp.data_ptr(),
        0 if values is None else values.data_ptr(), x.numel(),
        int(x.dtype == torch.bfloat16), sbits, quant._MODE_CODE[mode],
        seed & ((1 << 64) - 1), torch.get_num_threads(), p.s0, p.te, p.m0, p.m0_adj,
        p.unsigned_zero, p.max_bits, p.q_bits, p.inf_bits, p.nan_bits, p.ovf_bits,
        p.infin_bits)
    return (values if dequantize else None), lp


def _round_block(x: torch.Tensor, scheme: BlockScheme, spec: TensorSpec, axis: int,
                 generator: Optional[torch.Generator], pack: bool,
                 hadamard: Tuple[int, Optional[torch.Tensor]]):
    """quantize_blocked along ``axis`` with ``scheme`` (the spec's, or its MX setting),
    with the GEMM's Hadamard transform (size, signs) when it has one; dequantized in x's
    domain."""
    # k x k tiles span the two GEMM dimensions: the last two of a linear or matmul
    # operand; of a convolution's (dims 0 and 1, channels, reduction axis 0 or 1) those
    # two, at every kernel position or pixel, so they are moved last for quantizing.
    moved = scheme.is_2d and x.dim() > 2 and axis % x.dim() in (0, 1)
    if moved:
        x, axis = x.movedim((0, 1), (-2, -1)), axis % x.dim() - 2
    scheme = scheme_along(scheme, axis)
    size, signs = hadamard
    if size:
        scheme = scheme.with_(axis=axis if not scheme.is_2d else
                              (-1 if axis % x.dim() == x.dim() - 1 else -2),
                              hadamard=size, hadamard_signs="none")
    q = quantize_blocked(x, scheme, rounding=spec.rounding.value, generator=generator,
                         signs=signs if size else None)
    values = q.dequantize()
    if moved:
        values = values.movedim((-2, -1), (0, 1))
    if not pack:
        return values, None
    scale_fmt = scheme.scale_format.float_format
    scales = q.block_scales if scale_fmt is None else _to_storage(q.block_scales, scale_fmt)
    no_signs = torch.empty(0)
    codes = (_to_storage(q.elements, scheme.element), scales, q.tensor_scale,
             no_signs if q.signs is None else q.signs)
    # the pack's block slot says whether the stored layout has dims 0, 1 moved last; the
    # format slot holds the scheme and x's shape (a Hadamard transform pads the elements)
    return values, ("block", (scheme, q.shape), axis, int(moved), codes)


def _block_operand(x: torch.Tensor, spec: TensorSpec, axis: int,
                   generator: Optional[torch.Generator], pack: bool,
                   hadamard: Tuple[int, Optional[torch.Tensor]]):
    """(BlockQuantized, pack or None): a 2-D GEMM operand quantized with its block scheme
    along ``axis`` (the GEMM's reduction axis) and the GEMM's Hadamard transform, kept
    quantized for :func:`block_scaled_mm` (``scaling.block_gemm="scaled"``)."""
    scheme = scheme_along(get_scheme(spec.scheme), axis)
    size, signs = hadamard
    if size:
        scheme = scheme.with_(axis=axis if not scheme.is_2d else
                              (-1 if axis % x.dim() == x.dim() - 1 else -2),
                              hadamard=size, hadamard_signs="none")
    q = quantize_blocked(x.to(torch.float32), scheme, rounding=spec.rounding.value,
                         generator=generator, signs=signs if size else None)
    if not pack:
        return q, None
    codes = (_to_storage(q.elements, scheme.element),
             _to_storage(q.block_scales, scheme.scale_format.float_format), q.tensor_scale,
             torch.empty(0) if q.signs is None else q.signs, q.amax)
    return q, ("bq", (scheme, q.shape), axis, 0, codes)


def _warn_dequantized(c: "OpContext", op: str) -> None:
    """Say that scaling.block_gemm="scaled" does not reach this op (Python's warning
    filters show it once per op kind by default)."""
    if c.policy.scaled_block_gemm:
        warnings.warn(f"scaling.block_gemm='scaled' applies to linear layers; {op} computes "
                      "with dequantized block operands (elements * block scale * tensor "
                      "decode scale, then an FP32 GEMM)", stacklevel=3)


def _unpack(pack: Pack):
    kind, fmt, axis, block, tensors = pack
    if kind == "bq":
        (scheme, shape), (elems, scales, tensor_scale, signs, amax) = fmt, tensors
        return BlockQuantized.from_parts(
            _from_storage(elems, scheme.element),
            _from_storage(scales, scheme.scale_format.float_format), tensor_scale, scheme,
            shape=shape, signs=signs if signs.numel() else None, amax=amax)
    if kind == "block":
        (scheme, shape), (elems, scales, tensor_scale, signs) = fmt, tensors
        scale_fmt = scheme.scale_format.float_format
        if scale_fmt is not None:
            scales = _from_storage(scales, scale_fmt)
        q = BlockQuantized.from_parts(_from_storage(elems, scheme.element), scales,
                                      tensor_scale, scheme, shape=shape,
                                      signs=signs if signs.numel() else None)
        return q.dequantize().movedim((-2, -1), (0, 1)) if block else q.dequantize()
    if kind == "raw":
        return _widen(tensors[0])
    if kind == "values":
        return _from_storage(tensors[0], fmt)
    if kind == "scaled":
        values = _from_storage(tensors[0], fmt)
        return values.div_(tensors[1]) if _fresh(values, tensors[0]) else values / tensors[1]
    if kind == "requant":
        return _round(tensors[0], fmt, ScalingConfig(), None, axis, None)[0]
    elems = _from_storage(tensors[0], fmt)
    scales = _from_storage(tensors[1], _E8M0)
    ax, n = axis % elems.dim(), elems.shape[axis]
    if n % block == 0 and _fresh(elems, tensors[0]):
        # blocks as a dimension of their own: the scales broadcast over it, in place
        blocks = elems.view(*elems.shape[:ax], n // block, block, *elems.shape[ax + 1:])
        blocks.mul_(scales.unsqueeze(ax + 1))
        return elems
    return elems * _expand_blocks(scales, axis, block, n)


def _fresh(t: torch.Tensor, stored: torch.Tensor) -> bool:
    """True when ``t`` (decoded from ``stored``) is a new contiguous buffer we may overwrite
    (never while compiling: traced tensors have no storage to compare, and Inductor
    reuses buffers by itself)."""
    if not quant._fast_path(True, t, cpu=False):
        return False
    return t.data_ptr() != stored.data_ptr() and t.is_contiguous()


def _save(ctx, *packs: Optional[Pack]) -> None:
    """save_for_backward only the stored (low-precision) tensors."""
    ctx.pack_meta = [None if p is None else (p[:4], len(p[4])) for p in packs]
    ctx.save_for_backward(*[t for p in packs if p is not None for t in p[4]])


def _load_packs(ctx) -> list:
    """The packs :func:`_save` stored, as stored (codes, not values; :func:`_load`
    gives their values)."""
    tensors, out, i = ctx.saved_tensors, [], 0
    for meta in ctx.pack_meta:
        if meta is None:
            out.append(None)
            continue
        head, n = meta
        out.append(head + (tuple(tensors[i:i + n]),))
        i += n
    return out


def _load(ctx) -> list:
    """The values of the packs :func:`_save` stored (None where none was)."""
    return [None if p is None else _unpack(p) for p in _load_packs(ctx)]


@contextlib.contextmanager
def _exact(device_type: str):
    """Plain FP32 arithmetic: no torch-function modes (ours included), no autocast."""
    with torch._C.DisableTorchFunction():
        if torch.is_autocast_enabled(device_type):
            with torch.autocast(device_type, enabled=False):
                yield
        else:
            yield


class OpContext:
    """What an emulated op needs besides its tensors.

    ``signs``: the Hadamard signs of the current optimizer step, {size: signs} from the
    engine's :class:`~mixprec.blocks.SignStream` (``hadamard.signs=redraw``), taken when
    the op runs forward and kept for its backward, so both passes use the same M."""
    __slots__ = ("policy", "state", "generator", "slot", "signs")

    def __init__(self, policy: LayerPolicy, state: Optional[LayerState],
                 generator: Optional[torch.Generator], slot: int,
                 signs: Optional[dict] = None):
        self.policy, self.state, self.generator, self.slot = policy, state, generator, slot
        self.signs = signs

    def round(self, x, role: str, axis: int, operand: str = "", pack: bool = False,
              gemm: str = "", dequantize: bool = True):
        """``gemm`` ("fprop", "dgrad", "wgrad") names the GEMM the copy feeds, for the
        policy's per-GEMM Hadamard transform of block-scheme roles; ``dequantize``: see
        :func:`_round`."""
        spec = getattr(self.policy, role)
        scaler = None if self.state is None else self.state.scaler(
            scaler_key(role, self.slot, operand), spec, self.policy.scaling)
        return _round(x, spec, self.policy.scaling, scaler, axis, self.generator, pack,
                      self._hadamard(spec, gemm), dequantize)

    def reserve(self, forward: Tuple[Tuple[str, str], ...], grads: bool,
                weight_grads: Tuple[str, ...] = ()) -> None:
        """Create before the op runs the delayed-scaling state of every tensor it rounds:
        the ``forward`` (role, operand) pairs, and when ``grads`` (backward will run)
        grad_output and a weight_grad per operand in ``weight_grads`` ("", "bias",
        "rhs"). The backward then only updates scalers that exist, which torch.compile
        traces (:meth:`mixprec.policy.LayerState.reserve`)."""
        if self.state is None or not self.policy.has_delayed:
            return
        uses = list(forward)
        if grads:
            uses.append(("grad_output", ""))
            uses.extend(("weight_grad", operand) for operand in weight_grads)
        self.state.reserve([(scaler_key(role, self.slot, operand), getattr(self.policy, role))
                            for role, operand in uses], self.policy.scaling)

    def block_operand(self, x, role: str, axis: int, gemm: str, pack: bool = False):
        """(BlockQuantized, pack or None) of a block-scheme role for ``gemm``, kept
        quantized (``scaling.block_gemm="scaled"``)."""
        spec = getattr(self.policy, role)
        return _block_operand(x, spec, axis, self.generator, pack, self._hadamard(spec, gemm))

    def _hadamard(self, spec: TensorSpec, gemm: str) -> Tuple[int, Optional[torch.Tensor]]:
        cfg = self.policy.hadamard
        size = cfg.size(gemm) if spec.scaling in _TWO_COPIES else 0
        if not size or cfg.signs == "none":
            return size, None
        if cfg.signs == "te":
            return size, torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
        if cfg.signs == "redraw":
            if self.signs is None or size not in self.signs:
                raise ValueError(
                    f"hadamard.signs='redraw' takes this step's signs from the engine's "
                    f"sign stream, and this op has none for size {size}: run the model under "
                    f"mixprec.prepare(...).autocast(), or give PrecisionMode a "
                    f"signs=SignStream(({size},), seed=...) that you advance every step; "
                    f"valid fixed alternatives: hadamard.signs=fixed, te, none")
            return size, self.signs[size]
        return size, fixed_signs(size, cfg.seed)

    def observe(self, role: str, x: torch.Tensor) -> None:
        if self.state is not None:
            self.state.observe(role, x)

    def is_mx(self, role: str) -> bool:
        """True when the role is block-scaled (MX or a block scheme): one copy per GEMM."""
        return getattr(self.policy, role).scaling in _TWO_COPIES

    def per_gemm(self, role: str) -> bool:
        """True when the role's scales follow the consuming GEMM's reduction axis (MX
        blocks, axiswise rows), so each GEMM quantizes it afresh from high precision."""
        return getattr(self.policy, role).scaling in _PER_GEMM

    def bias_source(self, g_rounded: torch.Tensor, g_hp: torch.Tensor) -> torch.Tensor:
        """What the bias gradient sums: the rounded grad_output, or (``bias_grad="hp"``)
        grad_output as it arrived, in float32."""
        return g_hp.to(torch.float32) if self.policy.bias_grad == "hp" else g_rounded

    def store_output(self, y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The float32 result as the layer stores it: rounded to an unscaled activation
        format and held in the narrowest float dtype containing that format (float16
        for fp16 and the 8-bit and narrower formats, bfloat16 for bf16); a scaled layer
        writes ``policy.scaled_output_dtype`` where set; else ``dtype``."""
        if not self.policy.rounds_output:
            return y.to(self.policy.scaled_output_dtype or dtype)
        spec = self.policy.activation
        fmt = get_format(spec.format)
        if _cast_rounds(spec, fmt) and fmt.torch_dtype.itemsize == 2:
            return y.to(fmt.torch_dtype)
        y = quantize_spec(y, spec, self.policy.scaling, generator=self.generator)
        return y.to(container_dtype(fmt))

    def operands(self, x, role, fwd_axis, bwd_axis, keep, operand="", source=None,
                 dequantize=True):
        """Forward copy of x and, when ``keep``, the pack saved for backward (MX: a second
        quantization along the backward GEMM's reduction axis).

        An activation whose producer already saved its values (``source``: the tensor
        as the op received it, x a reshape of it) is stored as that saved tensor
        (:func:`mixprec.shared.shared_operand`). ``dequantize=False``: the forward copy
        is None where the pack holds per-tensor codes (see :func:`_round`)."""
        if role == "activation":
            spec = self.policy.activation
            share = shared_operand(x if source is None else source, spec)
            how, stored = share if share is not None else (None, None)
            if how == "exact":
                pack = ("raw", None, fwd_axis, 0, (stored.reshape(x.shape),))
                return x.to(torch.float32), (pack if keep else None)
            if how == "requantize" and keep:
                xq = self.round(x, role, fwd_axis, operand)[0]
                return xq, ("requant", spec, fwd_axis, 0, (x,))
        mx = self.per_gemm(role)
        xq, pack = self.round(x, role, fwd_axis, operand, pack=keep and not mx, gemm="fprop",
                              dequantize=dequantize)
        if keep and mx:
            # the saved copy of an activation feeds dW (wgrad), that of a weight (or of a
            # matmul's right operand) dX (dgrad)
            gemm = "wgrad" if role == "activation" and operand != "rhs" else "dgrad"
            pack = self.round(x, role, bwd_axis, operand, pack=True, gemm=gemm)[1]
        return xq, pack

    def grads(self, g, row_axis, col_axis, need_row, need_col):
        """grad_output rounded for dX (blocks along ``row_axis``) and dW (``col_axis``);
        unscaled and per-tensor specs round once and share the result."""
        if not self.per_gemm("grad_output"):
            gq = self.round(g, "grad_output", row_axis)[0]
            return gq, gq
        row = self.round(g, "grad_output", row_axis, gemm="dgrad")[0] if need_row else None
        col = self.round(g, "grad_output", col_axis, gemm="wgrad")[0] if need_col else None
        return row, col

    def weight_grad(self, dw, axis, operand=""):
        self.observe("weight_grad", dw)
        return self.round(dw, "weight_grad", axis, operand)[0]


def _mm(a, b, acc: AccumulationConfig):
    return torch.matmul(a, b) if acc.is_fp32 else matmul_accum(a, b, acc)


def _sum(x, acc: AccumulationConfig, dim: int):
    return x.sum(dim) if acc.is_fp32 else sum_accum(x, acc, dim=dim)


# --------------------------------------------------------------------------------------
# Autograd functions
# --------------------------------------------------------------------------------------
class QLinear(torch.autograd.Function):
    """F.linear emulated (the module docstring's rule). Under the native backend's FP8
    GEMMs (:func:`mixprec.native.active_scaled_mm`, a layer whose policy is per-tensor
    FP8) the three GEMMs take the rounded operands' FP8 codes and scales through
    ``torch._scaled_mm`` (:func:`_native_mm`); rounding and everything else is the same."""

    @staticmethod
    def forward(ctx, x, weight, bias, c: OpContext, need_x: bool, need_w: bool):
        native = _native_gemms(c)
        with _exact(x.device.type):
            c.observe("activation", x)
            c.observe("weight", weight)
            x2 = x.reshape(-1, x.shape[-1])
            if c.policy.scaled_block_gemm:
                # TE NVFP4: y from the rowwise copies; x's columnwise (wgrad) copy and
                # w's dgrad copy are saved, each quantized from high precision
                qx = c.block_operand(x2, "activation", -1, "fprop")[0]
                qw = c.block_operand(weight, "weight", -1, "fprop")[0]
                x_pack = c.block_operand(x2, "activation", 0, "wgrad", True)[1] if need_w \
                    else None
                w_pack = c.block_operand(weight, "weight", 0, "dgrad", True)[1] if need_x \
                    else None
                y = block_scaled_mm(qx, qw, a_axis=-1, b_axis=-1)
            else:
                # native FP8: both packs (the FP8 codes and scales) feed the GEMM, and
                # the dequantized copies are not computed (the packs are the same bits
                # either way: dequantizing divides the codes after they are made)
                packed = native is not None
                xq, x_pack = c.operands(x2, "activation", -1, 0, keep=need_w or packed,
                                        source=x, dequantize=not packed)
                wq, w_pack = c.operands(weight, "weight", -1, 0, keep=need_x or packed,
                                        dequantize=not packed)
                y = None
                if packed:
                    y = _native_mm(native, c, "fprop", x_pack, False, w_pack, True,
                                   _native_out_dtype(c, x.dtype, bias))
                    if y is None:    # emulated after all: the values of the codes
                        xq = _unpack(x_pack) if xq is None else xq
                        wq = _unpack(w_pack) if wq is None else wq
                    x_pack, w_pack = (x_pack if need_w else None), (w_pack if need_x else None)
                if y is None:
                    y = _mm(xq, wq.t(), c.policy.accumulation)
            if bias is not None:
                y = y.add_(bias.to(torch.float32))   # y is the GEMM's fresh result
            y = c.store_output(y, x.dtype)
        _save(ctx, x_pack, w_pack)
        ctx.c, ctx.x_shape, ctx.native = c, x.shape, native
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, g):
        c, acc = ctx.c, ctx.c.policy.accumulation
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        dx = dw = db = None
        with _exact(g.device.type):
            c.observe("grad_output", g)
            g2 = g.reshape(-1, g.shape[-1])
            if ctx.native is not None:    # the GEMMs take the saved codes, not values
                return _native_linear_backward(ctx, c, g2)
            x_saved, w_saved = _load(ctx)
            if c.policy.scaled_block_gemm:
                return _scaled_linear_backward(ctx, c, g2, x_saved, w_saved)
            g_row, g_col = c.grads(g2, -1, 0, need_x, need_w or need_b)
            if need_x:
                dx = _mm(g_row, w_saved, acc).reshape(ctx.x_shape).to(ctx.dtypes[0])
            if need_w:
                dw = c.weight_grad(_mm(g_col.t(), x_saved, acc), -1).to(ctx.dtypes[1])
            if need_b:
                db = _sum(c.bias_source(g_col, g2), acc, 0)
                db = c.weight_grad(db, -1, "bias").to(ctx.dtypes[2])
        return dx, dw, db, None, None, None


def _scaled_linear_backward(ctx, c: OpContext, g2: torch.Tensor, qx: BlockQuantized,
                            qw: BlockQuantized):
    """QLinear's backward under scaling.block_gemm="scaled" (TE NVFP4 reference order):
    dX = g_row (blocks along out) x w's dgrad copy, dW = g_col (blocks along the tokens,
    with the wgrad transform) x x's wgrad copy, both by block_scaled_mm."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    dx = dw = db = None
    if need_x:
        qg = c.block_operand(g2, "grad_output", -1, "dgrad")[0]
        dx = block_scaled_mm(qg, qw, a_axis=-1, b_axis=0)
        dx = dx.reshape(ctx.x_shape).to(ctx.dtypes[0])
    rounded_bias = need_b and c.policy.bias_grad == "rounded"
    qg_col = (c.block_operand(g2, "grad_output", 0, "wgrad")[0]
              if need_w or rounded_bias else None)
    if need_w:
        dw = c.weight_grad(block_scaled_mm(qg_col, qx, a_axis=0, b_axis=0), -1)
        dw = dw.to(ctx.dtypes[1])
    if need_b:
        db = c.bias_source(qg_col.dequantize() if rounded_bias else None, g2).sum(0)
        db = c.weight_grad(db, -1, "bias").to(ctx.dtypes[2])
    return dx, dw, db, None, None, None


# --------------------------------------------------------------------------------------
# Native FP8 GEMMs of QLinear (backend="native", per-tensor FP8 recipes)
# --------------------------------------------------------------------------------------
_NATIVE_OUT = (torch.float32, torch.bfloat16, torch.float16)   # _scaled_mm's out dtypes


def _native_gemms(c: OpContext):
    """The active :class:`mixprec.native.ScaledMMGemms` when this layer's GEMMs run
    through ``torch._scaled_mm`` (its policy is per-tensor FP8), else None."""
    gemms = active_scaled_mm()
    if gemms is None or not gemms.takes(c.policy):
        return None
    return gemms


def _native_out_dtype(c: OpContext, dtype: torch.dtype, bias) -> torch.dtype:
    """The dtype fprop's _scaled_mm writes: the stored output dtype when nothing follows
    the GEMM (no bias, no output rounding), float32 otherwise. The GEMM's FP32 result
    rounded once to bf16/fp16 is what ``.to()`` of the float32 result gives."""
    if bias is None and not c.policy.rounds_output:
        out = c.policy.scaled_output_dtype or dtype
        if out in _NATIVE_OUT:
            return out
    return torch.float32


def _native_mm(native, c: OpContext, gemm: str, a_pack: Pack, a_t: bool, b_pack: Pack,
               b_t: bool, out_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """op(a) @ op(b) (op: transpose where ``*_t``) of two per-tensor packs ("scaled":
    FP8 codes and the scale that made them) through ``torch._scaled_mm``; None when it
    cannot run (the caller computes the GEMM emulated; counted and warned)."""
    layer = c.state.name if c.state is not None else ""
    if a_pack[0] != "scaled" or b_pack[0] != "scaled":
        native.fallback(layer, gemm, f"operands stored as {a_pack[0]!r} and {b_pack[0]!r}, "
                                     f"not per-tensor FP8 codes")
        return None
    (a, sa), (b, sb) = a_pack[4], b_pack[4]
    return native.mm(a.t() if a_t else a, sa, b.t() if b_t else b, sb, out_dtype,
                     layer=layer, gemm=gemm)


def _native_linear_backward(ctx, c: OpContext, g2: torch.Tensor):
    """QLinear's backward with native FP8 GEMMs: grad_output is rounded once (as
    :meth:`OpContext.grads` does for per-tensor specs), keeping its codes, then
    dX = g @ W (dgrad) and dW = g^T @ x (wgrad) through ``torch._scaled_mm``; the bias
    gradient, the weight-gradient rounding and the output dtypes are the emulated ones."""
    need_x, need_w, need_b = ctx.needs_input_grad[:3]
    acc, native = c.policy.accumulation, ctx.native
    dx = dw = db = None
    x_pack, w_pack = _load_packs(ctx)
    # the dequantized grad_output only where the rounded bias gradient sums it
    rounded_bias = need_b and c.policy.bias_grad != "hp"
    gq, g_pack = c.round(g2, "grad_output", -1, pack=True, dequantize=rounded_bias)
    if need_x:
        out = ctx.dtypes[0] if ctx.dtypes[0] in _NATIVE_OUT else torch.float32
        dx = _native_mm(native, c, "dgrad", g_pack, False, w_pack, False, out)
        if dx is None:
            gq = _unpack(g_pack) if gq is None else gq
            dx = _mm(gq, _unpack(w_pack), acc)
        dx = dx.reshape(ctx.x_shape).to(ctx.dtypes[0])
    if need_w:
        dw = _native_mm(native, c, "wgrad", g_pack, True, x_pack, False, torch.float32)
        if dw is None:
            gq = _unpack(g_pack) if gq is None else gq
            dw = _mm(gq.t(), _unpack(x_pack), acc)
        dw = c.weight_grad(dw, -1).to(ctx.dtypes[1])
    if need_b:
        db = _sum(c.bias_source(gq, g2), acc, 0)
        db = c.weight_grad(db, -1, "bias").to(ctx.dtypes[2])
    return dx, dw, db, None, None, None


CONV_FUNCS = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_INPUT = {1: torch.nn.grad.conv1d_input, 2: torch.nn.grad.conv2d_input,
               3: torch.nn.grad.conv3d_input}
_CONV_WEIGHT = {1: torch.nn.grad.conv1d_weight, 2: torch.nn.grad.conv2d_weight,
                3: torch.nn.grad.conv3d_weight}


class QConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, geometry, c: OpContext, need_x: bool, need_w: bool):
        nd = weight.dim() - 2
        _warn_dequantized(c, "convolution")
        with _exact(x.device.type):
            c.observe("activation", x)
            c.observe("weight", weight)
            xq, x_pack = c.operands(x, "activation", 1, 0, keep=need_w)
            wq, w_pack = c.operands(weight, "weight", 1, 0, keep=need_x)
            b32 = None if bias is None else bias.to(torch.float32)
            y = c.store_output(CONV_FUNCS[nd](xq, wq, b32, *geometry), x.dtype)
        _save(ctx, x_pack, w_pack)
        ctx.c, ctx.geometry, ctx.shapes = c, geometry, (x.shape, weight.shape)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        (x_shape, w_shape), nd = ctx.shapes, len(ctx.shapes[1]) - 2
        dx = dw = db = None
        with _exact(g.device.type):
            x_saved, w_saved = _load(ctx)
            c.observe("grad_output", g)
            g_row, g_col = c.grads(g, 1, 0, need_x, need_w or need_b)
            if need_x:
                dx = _CONV_INPUT[nd](x_shape, w_saved, g_row, *ctx.geometry).to(ctx.dtypes[0])
            if need_w:
                dw = _CONV_WEIGHT[nd](x_saved, w_shape, g_col, *ctx.geometry)
                dw = c.weight_grad(dw, 1).to(ctx.dtypes[1])
            if need_b:
                dims = [0] + list(range(2, g_col.dim()))
                db = c.bias_source(g_col, g).sum(dims)
                db = c.weight_grad(db, -1, "bias").to(ctx.dtypes[2])
        return dx, dw, db, None, None, None, None


class GemmSpec(NamedTuple):
    """How :class:`QMatmul` treats its operands: the tensor role of each ("activation" or
    "weight"), and ``y = alpha * (a @ b) + beta * addend`` (the addmm family).
    ``addend_param``: the addend is a parameter (a bias), so its gradient is rounded as
    a weight gradient."""
    roles: Tuple[str, str] = ("activation", "activation")
    alpha: float = 1.0
    beta: float = 1.0
    addend_param: bool = False


_ACTIVATIONS = GemmSpec()


class QMatmul(torch.autograd.Function):
    """y = alpha * (a @ b) + beta * addend, for a, b of at least 2 dims (batch dims
    broadcast); each operand is rounded in its role (``GemmSpec.roles``), the addend is
    added in FP32 before the output is stored. A weight operand's gradient is rounded
    as a weight gradient, along the forward reduction axis (as QLinear's)."""

    @staticmethod
    def forward(ctx, a, b, addend, c: OpContext, spec: GemmSpec, need_a: bool, need_b: bool):
        ra, rb = spec.roles
        _warn_dequantized(c, "matmul")
        with _exact(a.device.type):
            c.observe(ra, a)
            c.observe(rb, b)
            aq, a_pack = c.operands(a, ra, -1, -2, keep=need_b)
            bq, b_pack = c.operands(b, rb, -2, -1, keep=need_a,
                                    operand="rhs" if ra == rb else "")
            y = _mm(aq, bq, c.policy.accumulation)
            if spec.alpha != 1.0:
                y = y * spec.alpha
            if addend is not None:
                add = addend.to(torch.float32)
                y = y + (add if spec.beta == 1.0 else spec.beta * add)
            acts = [t.dtype for t, r in ((a, ra), (b, rb)) if r == "activation"] or [a.dtype]
            y = c.store_output(y, functools.reduce(torch.promote_types, acts))
        _save(ctx, a_pack, b_pack)
        ctx.c, ctx.spec, ctx.dtypes = c, spec, (a.dtype, b.dtype)
        ctx.shapes = (a.shape, b.shape, None if addend is None else addend.shape)
        ctx.add_dtype = None if addend is None else addend.dtype
        return y

    @staticmethod
    def backward(ctx, g):
        c, spec, acc = ctx.c, ctx.spec, ctx.c.policy.accumulation
        need_a, need_b, need_add = ctx.needs_input_grad[:3]
        da = db = dadd = None
        with _exact(g.device.type):
            a_saved, b_saved = _load(ctx)
            c.observe("grad_output", g)
            g_row, g_col = c.grads(g, -1, -2, need_a, need_b or need_add)
            if need_a:
                da = _scaled(_mm(g_row, b_saved.transpose(-1, -2), acc), spec.alpha)
                da = da.sum_to_size(ctx.shapes[0])
                if spec.roles[0] == "weight":
                    da = c.weight_grad(da, -1)
                da = da.to(ctx.dtypes[0])
            if need_b:
                db = _scaled(_mm(a_saved.transpose(-1, -2), g_col, acc), spec.alpha)
                db = db.sum_to_size(ctx.shapes[1])
                if spec.roles[1] == "weight":
                    db = c.weight_grad(db, -2, "rhs" if spec.roles[0] == "weight" else "")
                db = db.to(ctx.dtypes[1])
            if need_add:
                dadd = _scaled(c.bias_source(g_col, g), spec.beta).sum_to_size(ctx.shapes[2])
                if spec.addend_param:
                    dadd = c.weight_grad(dadd, -1, "bias")
                dadd = dadd.to(ctx.add_dtype)
        return da, db, dadd, None, None, None, None


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    return x if factor == 1.0 else x * factor


_CONV_TRANSPOSE_FUNCS = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


class QConvTranspose(torch.autograd.Function):
    """conv_transpose(x, w) under the policy. With conv the adjoint of conv_transpose
    (same stride, padding, dilation, groups):

        y  = conv_transpose(round_act(x), round_w(w)) + bias
        dx = conv(g', w_saved)                        (reduces over C_out)
        dw = round_wgrad(conv_weight(input=g', grad_output=x_saved))   (over batch, space)

    Weights are (C_in, C_out / groups, k...): MX blocks run along C_in (dim 0) forward and
    along C_out (dim 1) in the copy saved for dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, geometry, c: OpContext, need_x: bool, need_w: bool):
        nd = weight.dim() - 2
        stride, padding, output_padding, groups, dilation = geometry
        _warn_dequantized(c, "transposed convolution")
        with _exact(x.device.type):
            c.observe("activation", x)
            c.observe("weight", weight)
            xq, x_pack = c.operands(x, "activation", 1, 0, keep=need_w)
            wq, w_pack = c.operands(weight, "weight", 0, 1, keep=need_x)
            b32 = None if bias is None else bias.to(torch.float32)
            y = _CONV_TRANSPOSE_FUNCS[nd](xq, wq, b32, stride, padding, output_padding,
                                          groups, dilation)
            y = c.store_output(y, x.dtype)
        _save(ctx, x_pack, w_pack)
        ctx.c, ctx.geometry, ctx.shapes = c, geometry, (x.shape, weight.shape)
        ctx.dtypes = (x.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        need_x, need_w, need_b = ctx.needs_input_grad[:3]
        stride, padding, _, groups, dilation = ctx.geometry
        (x_shape, w_shape), nd = ctx.shapes, len(ctx.shapes[1]) - 2
        dx = dw = db = None
        with _exact(g.device.type):
            x_saved, w_saved = _load(ctx)
            c.observe("grad_output", g)
            g_row, g_col = c.grads(g, 1, 0, need_x, need_w or need_b)
            if need_x:
                dx = CONV_FUNCS[nd](g_row, w_saved, None, stride, padding, dilation, groups)
                dx = dx.to(ctx.dtypes[0])
            if need_w:
                dw = _CONV_WEIGHT[nd](g_col, w_shape, x_saved, stride, padding, dilation, groups)
                dw = c.weight_grad(dw, 0).to(ctx.dtypes[1])
            if need_b:
                dims = [0] + list(range(2, g_col.dim()))
                db = c.bias_source(g_col, g).sum(dims)
                db = c.weight_grad(db, -1, "bias").to(ctx.dtypes[2])
        return dx, dw, db, None, None, None, None


def _grads_of(fn, inputs: list, needs: list, g: torch.Tensor) -> list:
    """Gradients of ``fn(*inputs)`` (FP32, torch's own backward) with respect to the
    inputs whose ``needs`` flag is set; None for the others."""
    with torch.enable_grad():
        leaves = [None if t is None else t.detach().requires_grad_(bool(n))
                  for t, n in zip(inputs, needs)]
        wanted = [t for t, n in zip(leaves, needs) if n]
        grads = iter(torch.autograd.grad(fn(*leaves), wanted, g)) if wanted else iter(())
    return [next(grads) if n else None for n in needs]


class QBilinear(torch.autograd.Function):
    """y_k = round_act(x1)^T round_w(W_k) round_act(x2) + b_k, FP32 arithmetic. The
    backward applies torch's FP32 bilinear backward to the saved rounded operands and the
    rounded grad_output; every operand is rounded once, along its last axis."""

    @staticmethod
    def forward(ctx, x1, x2, weight, bias, c: OpContext, needs: tuple):
        need1, need2, need_w = needs
        _warn_dequantized(c, "bilinear")
        with _exact(x1.device.type):
            c.observe("activation", x1)
            c.observe("activation", x2)
            c.observe("weight", weight)
            q1, p1 = c.operands(x1, "activation", -1, -1, keep=need2 or need_w)
            q2, p2 = c.operands(x2, "activation", -1, -1, keep=need1 or need_w, operand="rhs")
            wq, pw = c.operands(weight, "weight", -1, -1, keep=need1 or need2)
            b32 = None if bias is None else bias.to(torch.float32)
            y = c.store_output(F.bilinear(q1, q2, wq, b32), x1.dtype)
        _save(ctx, p1, p2, pw)
        ctx.c = c
        ctx.dtypes = (x1.dtype, x2.dtype, weight.dtype, None if bias is None else bias.dtype)
        return y

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        needs = list(ctx.needs_input_grad[:4])
        with _exact(g.device.type):
            s1, s2, sw = _load(ctx)
            c.observe("grad_output", g)
            gq = c.round(g, "grad_output", -1)[0]
            d1, d2, dw = _grads_of(F.bilinear, [s1, s2, sw], needs[:3], gq)
            if dw is not None:
                dw = c.weight_grad(dw, -1).to(ctx.dtypes[2])
            db = None
            if needs[3]:
                db = c.weight_grad(c.bias_source(gq, g).sum(0), -1, "bias").to(ctx.dtypes[3])
        return (None if d1 is None else d1.to(ctx.dtypes[0]),
                None if d2 is None else d2.to(ctx.dtypes[1]), dw, db, None, None)


class QEmbedding(torch.autograd.Function):
    @staticmethod
    def forward(ctx, indices, weight, padding_idx: int, scale_grad_by_freq: bool, c: OpContext):
        with _exact(weight.device.type):
            c.observe("weight", weight)
            y = F.embedding(indices, weight)   # a lookup: exact
            c.observe("activation", y)
            # rounding again in store_output changes no value: only the dtype is chosen
            y = c.store_output(c.round(y, "activation", -1)[0], weight.dtype)
        ctx.save_for_backward(indices)
        ctx.c, ctx.n, ctx.dtype = c, weight.shape[0], weight.dtype
        ctx.padding_idx, ctx.scale_grad_by_freq = padding_idx, scale_grad_by_freq
        return y

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        dw = None
        if ctx.needs_input_grad[1]:
            (indices,) = ctx.saved_tensors
            with _exact(g.device.type):
                c.observe("grad_output", g)
                gq = c.round(g, "grad_output", -1)[0]
                dw = torch.ops.aten.embedding_dense_backward(
                    gq, indices, ctx.n, ctx.padding_idx, ctx.scale_grad_by_freq)
                dw = c.weight_grad(dw, -1).to(ctx.dtype)
        return None, dw, None, None, None


class QEmbeddingBag(torch.autograd.Function):
    """``F.embedding_bag``: rows looked up exactly, bags reduced (sum / mean / max, with
    per-sample weights) in FP32, the output rounded as an activation; the weight gradient
    is torch's FP32 embedding_bag backward of the rounded grad_output, rounded as a
    weight gradient."""

    @staticmethod
    def forward(ctx, indices, weight, offsets, per_sample_weights, options: tuple,
                c: OpContext):
        with _exact(weight.device.type):
            c.observe("weight", weight)
            w32 = weight.to(torch.float32)
            psw = None if per_sample_weights is None else per_sample_weights.to(torch.float32)
            y = _bag(options)(indices, w32, offsets, psw)
            c.observe("activation", y)
            y = c.store_output(c.round(y, "activation", -1)[0], weight.dtype)
        ctx.save_for_backward(indices, weight, offsets, per_sample_weights)
        ctx.c, ctx.options = c, options
        return y

    @staticmethod
    def backward(ctx, g):
        c = ctx.c
        need_w, need_psw = ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        indices, weight, offsets, psw = ctx.saved_tensors
        dw = dpsw = None
        with _exact(g.device.type):
            c.observe("grad_output", g)
            gq = c.round(g, "grad_output", -1)[0]
            bag = _bag(ctx.options)
            p32 = None if psw is None else psw.to(torch.float32)
            dw, dpsw = _grads_of(lambda w, p: bag(indices, w, offsets, p),
                                 [weight.to(torch.float32), p32], [need_w, need_psw], gq)
            if dw is not None:
                dw = c.weight_grad(dw, -1).to(weight.dtype)
            if dpsw is not None:
                dpsw = dpsw.to(psw.dtype)
        return None, dw, None, dpsw, None, None


def _bag(options: tuple):
    """F.embedding_bag with ``options`` = (scale_grad_by_freq, mode, include_last_offset,
    padding_idx) bound; max_norm is applied by the caller, sparse is not supported."""
    scale_grad_by_freq, mode, include_last_offset, padding_idx = options

    def bag(indices, weight, offsets, per_sample_weights):
        return F.embedding_bag(indices, weight, offsets, None, 2.0, scale_grad_by_freq, mode,
                               False, per_sample_weights, include_last_offset, padding_idx)
    return bag
