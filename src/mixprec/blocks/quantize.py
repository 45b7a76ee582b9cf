"""Block-scaled quantization: one algorithm for MX, NVFP4 and blockwise FP8.

Every step is one float32 operation (one rounding) as written; E_max is the element
format's largest value (e2m1 6, e4m3 448), S_max the scale format's (e4m3 448)::

    x      = hadamard(x)                        if scheme.hadamard (groups of n along axis,
                                                 the axis zero-padded to a multiple of n)
    blocks = x padded with zeros to whole blocks; amax_b = max |x| over each block
    tensor scale (tensor_scale=True, NVFP4):
        g_enc = min(S_max * E_max / amax(x), FLT_MAX);  g_enc = 1 where it is 0
        g_dec = 1 / g_enc                                      (else g_enc = g_dec = 1)
    block decode scale X and encode factor e, by scale format and rule:
        e8m0 floor   X = 2^clamp(floor(log2 amax_b) - emax_elem, -127, 127)    e = 1 / X
        e8m0 ceil    X = 2^clamp(ceil(log2(amax_b / E_max)), -127, 127)         e = 1 / X
        e8m0 ceil-log2  as ceil, log2 of fl(amax_b / E_max) in float32 (torchao) e = 1 / X
        e8m0 dither  X as floor                                                 e = 1 / X, then * 3/4
        e4m3 | ue5m3 amax   X = RNE_S(min(amax_b * (g_enc * (1 / E_max)), S_max))
                            e = min(1 / (X * g_dec), FLT_MAX)
        fp32 amax    e = min(E_max / amax_b, FLT_MAX), 1 where amax_b = 0      X = 1 / e
        pow2 amax    e as fp32 with its mantissa zeroed (a power of two)        X = 1 / e
    elements   = round(x * e) in the element format, saturating at +-E_max,
                 nearest (ties by scheme.ties), stochastic or toward zero
    dequantize = elements * (X * g_dec)          (dither: g_dec = 4/3, rounded to float32)

Special blocks: a block holding NaN or inf gets X = NaN and NaN elements (its amax is
not finite); an all-zero block keeps zero elements with X = 2^-127 (e8m0: the formula's
-inf exponent clamped), X = 0 (e4m3, ue5m3) or X = 1 (fp32, pow2). A length that is not a
multiple of the block is padded with zeros, which change no amax and are dropped again.

NVFP4 is ``e2m1``, 1x16 (16x16 for weights), ``e4m3`` block scales, rule ``amax`` and a
tensor scale: with S_max = 448 and E_max = 6 the lines above are TransformerEngine's
reference (``NVFP4QuantizerRef._quantize_blockwise_reference``) step by step: the encode
factor is a reciprocal and the elements are x times it (not x divided by X * g_dec), and
1/6 is a float32 constant folded into g_enc. Divergences, chosen and documented:

* a block holding inf: TE's reference clamps x * e to +-6, so inf becomes a finite
  6 * X * g_dec; here the block is NaN (overflow must stay visible to the loss scaler);
* -0.0 inputs: TE's reference encodes them as +0, here they stay -0 (equal values);
* TE's GEMM rescales by amax_x * amax_w / (6^2 * 448^2) instead of multiplying the two
  g_dec factors; ``dequantize`` uses g_dec, the factor the encode used, and
  :func:`mixprec.blocks.block_scaled_mm` (the GEMM of ``scaling.block_gemm="scaled"``)
  TE's rescale, from ``BlockQuantized.amax``.

The fp32 and pow2 rules are TransformerEngine's Float8 current/blockwise scale
(``scale = fp8_max / amax``, FLT_MAX for inf, mantissa zeroed for power-of-two scales,
1 for a zero amax; ``scale_inv = 1 / scale``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

import torch

from ..distributed import reduce_amax_
from ..formats import FloatFormat, make_format
from ..quant import Rounding, _choice, quantize
from .hadamard import TE_NVFP4_SIGNS, hadamard_transform, random_signs
from .scheme import BlockScheme, ScaleFormat, ScaleRule, SchemeLike, Ties, get_scheme

__all__ = ["BlockQuantized", "quantize_blocked"]

_F32_MAX = torch.finfo(torch.float32).max          # 3.4028e38
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127             # scales 2^-127 .. 2^127
_DITHER = 0.75                                     # elements from 3/4 * V / X ...
_DITHER_DECODE = 4.0 / 3.0                         # ... and 4/3 back (float32: 1.3333334)


# --------------------------------------------------------------------------------------
# Exact helpers (shared with scaling.quantize_mx)
# --------------------------------------------------------------------------------------
def _pow2(exponent: torch.Tensor) -> torch.Tensor:
    """2**exponent for integer exponents in [-127, 127], built from float32 bits (exact)."""
    biased = (exponent + 127).to(torch.int32)
    # 2^-127 is the float32 subnormal with only the top mantissa bit set (1 << 22)
    bits = torch.where(biased > 0, biased << 23, torch.full_like(biased, 1 << 22))
    return bits.view(torch.float32)


def _mx_exponent(amax: torch.Tensor, fmt: FloatFormat, ceil: bool) -> torch.Tensor:
    """Shared block exponent (int32) from block amaxes; undefined where amax is 0/non-finite.

    floor: floor(log2 amax) - emax_elem
    ceil : ceil(log2(amax / max_elem)) = the floor exponent, plus one when max_elem * X
           still lies below amax (comparing mantissas keeps this exact, no division).
    """
    mant, exp = torch.frexp(amax)          # amax = mant * 2^exp, mant in [0.5, 1)
    e_floor = exp.to(torch.int32) - 1      # floor(log2 amax), exact also for subnormals
    shared = e_floor - fmt.emax
    if ceil:
        top = fmt.max / 2.0 ** fmt.emax     # max_elem's mantissa in [1, 2): 1.75 for e4m3
        shared = shared + (2.0 * mant > top).to(torch.int32)
    return shared


def _apply_ties(src: torch.Tensor, q: torch.Tensor, fmt: FloatFormat, ties: Ties) -> torch.Tensor:
    """Move the ties of src that nearest-even rounded into q to the rule's neighbour.

    |v| is a tie when it lies exactly halfway between two neighbours: representable with
    one more mantissa bit (same exponent range) but not in fmt, and below fmt's max.
    Nearest-even picked one neighbour r; the other is 2|v| - r (exact: a format value).
    half-up keeps the larger magnitude, half-down the smaller; the sign is v's.
    """
    a = src.abs()
    wider = make_format(fmt.ebits, fmt.mbits + 1, fmt.convention, fmt.bias)
    tie = ((quantize(a, wider, rounding="toward_zero") == a)
           & (quantize(a, fmt, rounding="toward_zero") != a) & (a < fmt.max))
    if (not torch.compiler.is_compiling() and type(tie) is torch.Tensor
            and not bool(tie.any())):
        return q
    r = q.abs()
    other = 2.0 * a - r
    mag = torch.maximum(r, other) if ties is Ties.UP else torch.minimum(r, other)
    return torch.where(tie, torch.copysign(mag, src), q)


# --------------------------------------------------------------------------------------
# Block geometry
# --------------------------------------------------------------------------------------
class _Geometry(NamedTuple):
    shape: Tuple[int, ...]      # the input's shape
    padded: Tuple[int, ...]     # after zero padding
    blocked: Tuple[int, ...]    # the padded tensor viewed as blocks
    reduce: Tuple[int, ...]     # dims of `blocked` one block spans
    ax: int                     # 1x k: the blocked axis; k x k: -1


def _geometry(shape: Tuple[int, ...], scheme: BlockScheme) -> _Geometry:
    nd, k = len(shape), scheme.block_size
    if not scheme.is_2d:
        if not -nd <= scheme.axis < nd:
            raise ValueError(f"axis {scheme.axis} out of range for a tensor of {nd} dimensions")
        ax = scheme.axis % nd
        nb = -(-shape[ax] // k)
        padded = shape[:ax] + (nb * k,) + shape[ax + 1:]
        blocked = shape[:ax] + (nb, k) + shape[ax + 1:]
        return _Geometry(shape, padded, blocked, (ax + 1,), ax)
    if nd < 2:
        raise ValueError(f"{k}x{k} tiles need a tensor with at least two dimensions, "
                         f"got shape {tuple(shape)}")
    mb, nb = -(-shape[-2] // k), -(-shape[-1] // k)
    lead = shape[:-2]
    return _Geometry(shape, lead + (mb * k, nb * k), lead + (mb, k, nb, k),
                     (nd - 1, nd + 1), -1)


def _to_blocks(hp: torch.Tensor, g: _Geometry) -> torch.Tensor:
    pads = []
    for size, want in zip(reversed(g.shape), reversed(g.padded)):
        pads += [0, want - size]
    if any(pads):
        hp = torch.nn.functional.pad(hp, pads)
    # Blocks are cut in place ((..., n, rest) -> (..., n_blocks, k, rest)): no transpose,
    # so the data stays contiguous for any axis.
    return hp.reshape(g.blocked)


def _pad_axis(x: torch.Tensor, axis: int, multiple: int) -> torch.Tensor:
    """x zero-padded along ``axis`` to a multiple of ``multiple`` (the Hadamard size)."""
    if not -x.dim() <= axis < x.dim():
        raise ValueError(f"axis {axis} out of range for a tensor of {x.dim()} dimensions")
    ax = axis % x.dim()
    pad = -x.shape[ax] % multiple
    if not pad:
        return x
    return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1 - ax) + (0, pad))


def _from_blocks(blocked: torch.Tensor, g: _Geometry) -> torch.Tensor:
    out = blocked.reshape(g.padded)
    for d, (size, want) in enumerate(zip(g.shape, g.padded)):
        if size != want:
            out = out.narrow(d, 0, size)
    return out


# --------------------------------------------------------------------------------------
# The algorithm
# --------------------------------------------------------------------------------------
class _Blocked(NamedTuple):
    elems: torch.Tensor         # float32, blocked shape (padding included)
    scales: torch.Tensor        # float32 block decode scales, blocked shape, keepdim
    tensor_scale: torch.Tensor  # 0-d float32 decode scale
    geometry: _Geometry
    signs: Optional[torch.Tensor]
    amax: Optional[torch.Tensor] = None   # 0-d float32 tensor amax (tensor scale only)


def _ceil_log2_exponent(amax: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """ceil(log2(q)) of q = fl(amax / max_elem), log2 and ceil in float32 (torchao RCEIL);
    int32, clamped to E8M0's range; undefined where amax is 0 or not finite."""
    e = torch.ceil(torch.log2(amax / fmt.max))
    e = torch.nan_to_num(e, nan=0.0).clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    return e.to(torch.int32)


def _scale_e8m0(amax, scheme):
    """floor / ceil / ceil-log2 / dither: (X, e) as exact powers of two, X in [2^-127, 2^127]."""
    if scheme.scale_rule is ScaleRule.CEIL_LOG2:
        shared = _ceil_log2_exponent(amax, scheme.element)
    else:
        shared = _mx_exponent(amax, scheme.element, scheme.scale_rule is ScaleRule.CEIL)
    shared = torch.where(amax > 0, shared, torch.full_like(shared, E8M0_MIN_EXP))
    shared = shared.clamp(E8M0_MIN_EXP, E8M0_MAX_EXP)
    # 2^-e is exact in float32 (like dividing by X) unless V/X falls below 2^-126, far
    # under every element format's smallest subnormal.
    return _pow2(shared), _pow2(-shared)


def _scale_narrow(amax, scheme, g_enc, g_dec):
    """e4m3 / ue5m3 amax rule (NVFP4): X rounded to the scale format, e its reciprocal."""
    fmt = scheme.scale_format.float_format
    one_over_emax = torch.tensor(1.0 / scheme.element.max, dtype=torch.float32)
    mult = g_enc * one_over_emax.to(amax.device)          # float32(g_enc * fl(1/E_max))
    x = torch.clamp(amax * mult, max=_F32_MAX).clamp_(max=fmt.max)
    scales = quantize(x, fmt, saturate=True)              # nearest-even
    enc = torch.clamp(1.0 / (scales * g_dec), max=_F32_MAX)
    return scales, enc


def _scale_fp32(amax, scheme):
    """fp32 / pow2 amax rule (TE Float8 scales): e = E_max / amax, X = 1 / e."""
    emax = torch.tensor(scheme.element.max, dtype=torch.float32, device=amax.device)
    enc = torch.clamp(emax / amax, max=_F32_MAX)
    enc = torch.where(amax == 0, torch.ones_like(enc), enc)
    if scheme.scale_format is ScaleFormat.POW2:
        mant, exp = torch.frexp(enc)                      # mantissa zeroed: 2^floor(log2 e)
        enc = torch.ldexp(torch.ones_like(enc), exp - 1)
    return 1.0 / enc, enc


def _tensor_scales(hp: torch.Tensor, scheme: BlockScheme):
    """(g_enc, g_dec, amax) as 0-d float32 tensors (amax None without a tensor scale)."""
    one = torch.ones((), dtype=torch.float32, device=hp.device)
    if not scheme.tensor_scale:
        return one, one, None
    amax = hp.abs().amax() if hp.numel() else torch.zeros_like(one)
    # under torch.distributed the global amax, so every rank takes one process's scale
    amax = reduce_amax_(amax.to(torch.float32))
    num = torch.tensor(scheme.scale_max * scheme.element.max, dtype=torch.float32,
                       device=hp.device)                  # 448 * 6 = 2688, exact
    g_enc = torch.clamp(num / amax, max=_F32_MAX)         # amax 0 -> inf -> FLT_MAX
    g_enc = torch.where(g_enc == 0, one, g_enc)           # amax inf -> 0 -> 1
    return g_enc, 1.0 / g_enc, amax.reshape(())


def _resolve_signs(scheme: BlockScheme, signs, generator) -> Optional[torch.Tensor]:
    if scheme.hadamard is None:
        if signs is not None:
            raise ValueError("signs= given, but the scheme has no Hadamard transform")
        return None
    if signs is not None:
        return torch.as_tensor(signs, dtype=torch.float32)
    if scheme.hadamard_signs == "te":
        return torch.tensor(TE_NVFP4_SIGNS, dtype=torch.float32)
    if scheme.hadamard_signs == "random":
        return random_signs(scheme.hadamard, generator)
    return None


def _blocked_quantize(x: torch.Tensor, scheme: BlockScheme, mode: Rounding,
                      generator: Optional[torch.Generator], signs=None,
                      seed: Optional[torch.Tensor] = None) -> _Blocked:
    signs = _resolve_signs(scheme, signs, generator)
    hp = x.detach().to(torch.float32)
    if scheme.hadamard is not None:
        hp = hadamard_transform(_pad_axis(hp, scheme.axis, scheme.hadamard), scheme.hadamard,
                                signs=signs, axis=scheme.axis)
    g = _geometry(tuple(hp.shape), scheme)
    blocks = _to_blocks(hp, g)
    amax = blocks.abs().amax(dim=g.reduce, keepdim=True)   # NaN propagates
    special = ~torch.isfinite(amax)
    rule = scheme.scale_rule
    g_enc, g_dec, tensor_amax = _tensor_scales(hp, scheme)
    if scheme.scale_format is ScaleFormat.E8M0:
        scales, enc = _scale_e8m0(amax, scheme)
        if rule is ScaleRule.DITHER:
            g_dec = torch.tensor(_DITHER_DECODE, dtype=torch.float32, device=hp.device)
    elif scheme.scale_format in (ScaleFormat.E4M3, ScaleFormat.UE5M3):
        scales, enc = _scale_narrow(amax, scheme, g_enc, g_dec)
    else:
        scales, enc = _scale_fp32(amax, scheme)
    elems = blocks * enc
    if rule is ScaleRule.DITHER:
        elems.mul_(_DITHER)
    # float32 elements (23 mantissa bits) have no ties to move
    moves_ties = (scheme.ties is not Ties.EVEN and mode is Rounding.NEAREST
                  and scheme.element.mbits < 23)
    src = elems.clone() if moves_ties else None
    quantize(elems, scheme.element, rounding=mode, saturate=True, generator=generator,
             out=elems, seed=seed)
    if src is not None:
        elems = _apply_ties(src, elems, scheme.element, scheme.ties)
    # under torch.compile without the host test: a graph cannot branch on data
    if (torch.compiler.is_compiling() or type(special) is not torch.Tensor
            or bool(special.any())):
        nan = torch.tensor(float("nan"), dtype=torch.float32, device=hp.device)
        scales = torch.where(special, nan, scales)
        elems.masked_fill_(special, float("nan"))
    return _Blocked(elems, scales, g_dec.reshape(()), g, signs, tensor_amax)


# --------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------
class BlockQuantized:
    """The result of :func:`quantize_blocked`.

    Attributes:
        elements: float32, x's shape: the element values before scaling (E2M1: 0.5, 6, ...).
            With a Hadamard transform they are in the transformed domain, and ``axis`` is
            zero-padded to a multiple of the transform size (``shape`` is x's shape).
        block_scales: float32 block decode scales, each a value of the scale format.
            1 x k blocks: x's shape with ``axis`` shortened to ceil(n / k); k x k tiles:
            ``x.shape[:-2] + (ceil(M / k), ceil(N / k))``.
        tensor_scale: 0-d float32 decode scale (1 when the scheme has none; 4/3 for dither).
        amax: 0-d float32 amax of the tensor the tensor scale came from (after a Hadamard
            transform), None when the scheme has no tensor scale. TransformerEngine's
            NVFP4 GEMM rescales by amax_a * amax_b / (E_max^2 * S_max^2) rather than by
            the two decode scales (:func:`mixprec.blocks.gemm.block_scaled_mm`).
        scheme: the resolved BlockScheme. signs: the Hadamard signs used (None: none).
    """

    @classmethod
    def from_parts(cls, elements: torch.Tensor, block_scales: torch.Tensor,
                   tensor_scale: torch.Tensor, scheme: SchemeLike, *,
                   signs: Optional[torch.Tensor] = None, dtype: torch.dtype = torch.float32,
                   shape: Optional[Tuple[int, ...]] = None,
                   amax: Optional[torch.Tensor] = None) -> "BlockQuantized":
        """Rebuild a result from its parts (e.g. decoded from storage): the inverse of
        reading ``elements``, ``block_scales``, ``tensor_scale``, ``signs``, ``shape``
        (x's shape, when a Hadamard transform padded the elements) and ``amax``."""
        scheme = get_scheme(scheme)
        g = _geometry(tuple(elements.shape), scheme)
        blocked = _to_blocks(elements.to(torch.float32), g)
        keep = list(g.blocked)
        for d in g.reduce:
            keep[d] = 1
        scales = block_scales.to(torch.float32).reshape(keep)
        ts = torch.as_tensor(tensor_scale, dtype=torch.float32).reshape(())
        if amax is not None:
            amax = torch.as_tensor(amax, dtype=torch.float32).reshape(())
        return cls(_Blocked(blocked, scales, ts, g, signs, amax), scheme, dtype, shape)

    def __init__(self, blocked: _Blocked, scheme: BlockScheme, dtype: torch.dtype,
                 shape: Optional[Tuple[int, ...]] = None):
        self._blocked = blocked
        self.scheme = scheme
        self.dtype = dtype
        self.shape = tuple(blocked.geometry.shape if shape is None else shape)
        self.signs = blocked.signs
        self.tensor_scale = blocked.tensor_scale
        self.amax = blocked.amax
        self.elements = _from_blocks(blocked.elems, blocked.geometry)
        self.block_scales = blocked.scales.squeeze(blocked.geometry.reduce)

    def dequantize(self, *, rotated: bool = False) -> torch.Tensor:
        """elements * (block_scale * tensor_scale), in the input's dtype.

        With a Hadamard transform the values are mapped back to x's domain (the inverse
        transform, in float32) unless ``rotated=True``, which returns the transformed
        values a GEMM with identically transformed operands consumes.
        """
        b = self._blocked
        decode = b.scales * b.tensor_scale if self.scheme.tensor_scale or \
            self.scheme.scale_rule is ScaleRule.DITHER else b.scales
        out = _from_blocks(b.elems * decode, b.geometry)
        if self.scheme.hadamard is not None and not rotated:
            out = hadamard_transform(out, self.scheme.hadamard, signs=self.signs,
                                     axis=self.scheme.axis, inverse=True)
            ax = self.scheme.axis % out.dim()
            out = out.narrow(ax, 0, self.shape[ax])    # drop the transform's zero padding
        return out.to(self.dtype)

    def __repr__(self) -> str:
        return (f"BlockQuantized(scheme={self.scheme.short_str()!r}, "
                f"shape={tuple(self.elements.shape)}, blocks={tuple(self.block_scales.shape)}, "
                f"tensor_scale={float(self.tensor_scale):g})")


def quantize_blocked(x: torch.Tensor, scheme: SchemeLike, *,
                     rounding: Union[str, Rounding] = "nearest",
                     generator: Optional[torch.Generator] = None,
                     signs: Optional[torch.Tensor] = None) -> BlockQuantized:
    """Quantize x with a block-scaled scheme (the algorithm of the module docstring).

    Args:
        x: float32, bfloat16, float16 or float64 tensor (worked on in float32).
        scheme: a BlockScheme or a name: nvfp4, nvfp4-2d, mxfp8, mxfp6, mxfp4,
            fp8-block128, fp8-block128x128.
        rounding: element rounding: "nearest" (ties by ``scheme.ties``), "stochastic"
            or "toward_zero". Scales always round as their rule says.
        generator: source of stochastic rounding and of "random" Hadamard signs.
        signs: explicit Hadamard signs (+-1, length ``scheme.hadamard``), e.g. from a
            :class:`~mixprec.blocks.hadamard.HadamardSigns`; overrides the scheme's.

    >>> q = quantize_blocked(torch.tensor([[6.0, 0.75, -2.5] + [0.0] * 13]), "nvfp4")
    >>> q.elements[0, :3].tolist(), q.block_scales.tolist()
    ([6.0, 1.0, -2.0], [[448.0]])
    """
    scheme = get_scheme(scheme)
    mode = _choice(Rounding, rounding, "rounding")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"x must be a floating-point torch.Tensor, got "
                         f"{getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() == 0:
        raise ValueError("quantize_blocked needs a tensor with at least one dimension")
    return BlockQuantized(_blocked_quantize(x, scheme, mode, generator, signs), scheme, x.dtype,
                          tuple(x.shape))
