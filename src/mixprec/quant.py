"""Round tensors to any FloatFormat, bit-exactly, and convert to and from storage codes.

Rounding works on the bit pattern of a float32 (or float64) working copy.  With a = |x|
read as an integer, field = a >> MW (MW = 23 or 52), sig = significand with implicit bit:

    shift = (MW - mbits) + max(0, te - max(field, 1))     te = biased exponent of 2^emin
    low   = sig mod 2^shift                               the bits the format drops
    q     = a - low + up * 2^shift                        (shift <= MW; else 0 or Q)

    nearest      up = low > 2^(shift-1), or low == 2^(shift-1) and the kept code is odd
    stochastic   up = r < low / 2^shift, r uniform     ->  P(up) = low / 2^shift, exactly
    toward_zero  up = 0

The carry of a - low + 2^shift walks into the exponent field by itself, so one formula
covers normals, subnormals and the step from one to the other.  Rounding happens before
the overflow test (e4m3: 460 -> 448, 464 -> 448, 465 -> NaN).  Then, by convention:

    rounded > max    saturate: +-max;  else inf (ieee), NaN (fn, fnuz), +-max (finite)
    +-inf            saturate: +-max, but NaN for fnuz (ONNX Cast);  else as above
    NaN              NaN (also for the finite formats, which have no NaN code)
    -0               -0, or +0 where the format has no negative zero (fnuz)

e8m0 (powers of two 2^-127 .. 2^127, no zero) rounds to nearest by one rule over its
whole range, 2^-127 included: x in [2^k, 2^(k+1)) goes up when x >= 1.5 * 2^k (the linear
midpoint, ties away from zero), so (2^-127, 1.5 * 2^-127) -> 2^-127 and
[1.5 * 2^-127, 2^-126) -> 2^-126; everything in (0, 2^-127] clamps to 2^-127 (no zero);
zero, negatives, NaN -> NaN.  This is ml_dtypes' float8_e8m0fnu from 0.7 on.  torch's
float8_e8m0fnu cast (2.13) differs in two places: it sends all of (2^-127, 2^-126) to
2^-126, and it sends 0 to 2^-127 instead of NaN.  Toward zero and stochastic rounding
clamp values below 2^-127 to 2^-127.  e8m0 always takes the torch path (scale tensors
are small).

The uniform r of element i (flat index in row-major order) is built from SplitMix64
streams of a 64-bit seed drawn from ``generator`` (or torch's default generator): 31 bits
decide whenever they can, 63 more where they tie (see mixprec.ops).  The C kernel
(mixprec/_cquant.c) and the pure-torch path compute the same bits, so both give
identical results on any layout and device.

Float64 inputs are rounded once, directly (torch and ml_dtypes cast float64 via float32,
which double-rounds).  bfloat16/float16 inputs are widened to float32 exactly; a result
is returned in the input's dtype, which rounds only values the input dtype cannot hold
(e.g. fp16's max 65504 from a bfloat16 input under saturation).
"""
from __future__ import annotations

import enum
import functools
import math
import struct
from dataclasses import dataclass
from typing import Optional, Union

import torch

from . import ops as _ops
from .formats import Convention, FloatFormat, FormatLike, get_format

try:  # the optional C extension; the torch path gives identical results without it
    from . import _cquant
except ImportError:  # pragma: no cover - depends on the build
    _cquant = None

__all__ = ["Rounding", "Backend", "quantize", "encode", "decode", "has_c_extension"]


class Rounding(str, enum.Enum):
    NEAREST = "nearest"          # round half to even
    STOCHASTIC = "stochastic"    # up with probability (x - lo) / (hi - lo)
    TOWARD_ZERO = "toward_zero"  # truncate the magnitude


class Backend(str, enum.Enum):
    AUTO = "auto"    # C for CPU tensors when the extension is built, else torch
    C = "c"          # mixprec._cquant (CPU only)
    TORCH = "torch"  # integer torch ops: any device


_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
_MODE_CODE = {Rounding.NEAREST: 0, Rounding.STOCHASTIC: 1, Rounding.TOWARD_ZERO: 2}


def has_c_extension() -> bool:
    """Whether the C kernel was built (``pip install -e .`` with a C compiler)."""
    return _cquant is not None


def _choice(enum_cls, value, what):
    try:
        return enum_cls(value.value if isinstance(value, enum.Enum) else value)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in enum_cls)
        raise ValueError(f"unknown {what} {value!r}; valid: {valid}") from None


# -- working layouts and kernel plans --------------------------------------------------
@dataclass(frozen=True)
class _Layout:
    """The float type the kernel works in: float32 or float64 bits as signed ints."""
    dtype: torch.dtype
    int_dtype: torch.dtype
    mw: int        # mantissa bits
    ew: int        # exponent bits
    bw: int        # exponent bias
    pack: str      # struct code

    def bits_of(self, value: float) -> int:
        """The bit pattern of an exactly representable value."""
        if self.pack == "f":
            return struct.unpack("<I", struct.pack("<f", value))[0]
        return struct.unpack("<Q", struct.pack("<d", value))[0]


_F32 = _Layout(torch.float32, torch.int32, 23, 8, 127, "f")
_F64 = _Layout(torch.float64, torch.int64, 52, 11, 1023, "d")


@dataclass(frozen=True)
class _Plan:
    """Kernel parameters derived from (ebits, mbits, bias, convention) and a layout."""
    s0: int              # MW - mbits: bits dropped in the format's normal range
    te: int              # biased working exponent of the format's smallest normal
    m0: int              # 1 when mbits == 0: ties then look at the exponent's parity
    m0_adj: int          # (bias - working bias) mod 2: exponent parity offset
    unsigned_zero: int   # 1 for fnuz: no -0, unsigned NaN
    max_bits: int        # |max| in the working layout
    q_bits: int          # smallest subnormal 2^(emin - mbits)
    inf_bits: int
    nan_bits: int
    ovf_bits: int        # result for a finite value that rounds above max
    infin_bits: int      # result for +-inf


def _max_code(fmt: FloatFormat) -> int:
    """Magnitude code (exponent << mbits | mantissa) of the largest finite value."""
    top = (1 << (fmt.ebits + fmt.mbits)) - 1
    if fmt.convention is Convention.IEEE:      # the all-ones exponent is inf/NaN
        return top - (1 << fmt.mbits)
    if fmt.convention is Convention.FN:        # only the all-ones code is NaN
        return top - 1
    return top                                 # fnuz, finite: every magnitude is finite


def _magnitude_value(fmt: FloatFormat, code: int) -> float:
    """value = m * 2^(emin - M) (e == 0) or (2^M + m) * 2^(e - bias - M), exactly."""
    e, m = code >> fmt.mbits, code & ((1 << fmt.mbits) - 1)
    if e == 0:
        return math.ldexp(m, 1 - fmt.bias - fmt.mbits)
    return math.ldexp((1 << fmt.mbits) + m, e - fmt.bias - fmt.mbits)


@functools.lru_cache(maxsize=256)
def _plan(fmt: FloatFormat, lay: _Layout, saturate: bool) -> _Plan:
    emin = 1 - fmt.bias
    max_bits = lay.bits_of(_magnitude_value(fmt, _max_code(fmt)))
    inf_bits = ((1 << lay.ew) - 1) << lay.mw
    nan_bits = inf_bits | (1 << (lay.mw - 1))
    if fmt.has_inf:
        ovf = infin = inf_bits
    elif fmt.has_nan:
        ovf = infin = nan_bits
    else:
        ovf = infin = max_bits
    if saturate:   # ONNX Cast(saturate=1): fnuz turns inf into NaN, everything else max
        ovf, infin = max_bits, (nan_bits if fmt.convention is Convention.FNUZ else max_bits)
    return _Plan(
        s0=lay.mw - fmt.mbits, te=emin + lay.bw, m0=int(fmt.mbits == 0),
        m0_adj=(fmt.bias - lay.bw) & 1, unsigned_zero=int(not fmt.has_negative_zero),
        max_bits=max_bits, q_bits=lay.bits_of(math.ldexp(1.0, emin - fmt.mbits)),
        inf_bits=inf_bits, nan_bits=nan_bits, ovf_bits=ovf, infin_bits=infin)


def _layout_for(dtype: torch.dtype, fmt: FloatFormat) -> _Layout:
    # float32 bits work while the format's normals are float32 normals (te >= 1);
    # formats reaching below 2^-126 with normals are rounded in float64 instead.
    if dtype == torch.float64 or 1 - fmt.bias < -126:
        return _F64
    return _F32


# -- the two kernels ----------------------------------------------------------------------
# The torch kernel and the random bits live in mixprec.ops as torch.library operators
# (torch.ops.mixprec.round_bits / round_e8m0), so torch.compile traces and fuses them.
def _plan_list(p: _Plan, lay: _Layout) -> list:
    """The plan as round_bits' int[] argument: [layout, *_Plan fields]."""
    return [int(lay is _F64)] + [getattr(p, f) for f in _ops.PLAN_FIELDS]


def _round_c(src: torch.Tensor, dst: torch.Tensor, p: _Plan, lay: _Layout,
             mode: Rounding, seed: int) -> None:
    """The same algorithm in mixprec/_cquant.c, on contiguous CPU buffers."""
    _cquant.round_bits(
        src.data_ptr(), dst.data_ptr(), src.numel(), int(lay is _F64), _MODE_CODE[mode],
        seed & ((1 << 64) - 1), torch.get_num_threads(), p.s0, p.te, p.m0, p.m0_adj,
        p.unsigned_zero, p.max_bits, p.q_bits, p.inf_bits, p.nan_bits, p.ovf_bits,
        p.infin_bits)


# -- public API ---------------------------------------------------------------------------
def _check_input(x, name: str = "x") -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _INPUT_DTYPES:
        valid = ", ".join(str(d) for d in _INPUT_DTYPES)
        raise ValueError(f"{name} has dtype {x.dtype}; valid: {valid}")


def _draw_seed(generator: Optional[torch.Generator]) -> int:
    """One 64-bit seed from ``generator`` as a Python int, for the eager C kernels: the
    same draw as :func:`mixprec.ops.draw_seed` (default: torch's generator)."""
    return int(_ops.draw_seed(generator, torch.empty(())))


def _tracing(x: torch.Tensor) -> bool:
    """True while torch.compile traces (Dynamo, or AOT autograd's fake/functional tensors):
    no data pointers then, so the C kernel cannot run and the operators are used."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def _fast_path(kernel, *tensors: torch.Tensor, cpu: bool = True) -> bool:
    """True where an eager shortcut may run on ``tensors``: the C module it calls is
    there (``kernel`` is the caller's ``_cquant``, None when the extension is not built;
    True for a shortcut in Python), torch.compile is not tracing and every tensor is a
    plain one (traced tensors have no data pointers or host values: the torch operators
    run instead, with the same bits), on the CPU unless ``cpu=False``. The one guard of
    the C kernels, host-side scale arithmetic and in-place buffer reuse."""
    if kernel is None:
        return False
    return all(not _tracing(t) and (not cpu or t.device.type == "cpu") for t in tensors)


def _quantize_work(x: torch.Tensor, fmt: FloatFormat, mode: Rounding, saturate: bool,
                   generator, backend: Backend, dst: Optional[torch.Tensor] = None,
                   seed: Optional[torch.Tensor] = None):
    """Round x into its working layout; returns (values in float32/float64, layout)."""
    x = x.detach()
    lay = _layout_for(x.dtype, fmt)
    if mode is Rounding.STOCHASTIC and seed is None:
        seed = _ops.draw_seed(generator, x)
    if backend is Backend.C and (_cquant is None or x.device.type != "cpu"):
        raise ValueError(f"backend 'c' needs the built extension and a CPU tensor "
                         f"(extension built: {_cquant is not None}, device: {x.device})")
    use_c = backend is not Backend.TORCH and _fast_path(_cquant, x)
    code = _MODE_CODE[mode]
    if fmt.convention is Convention.E8M0:
        return _ops.round_e8m0(x, code, saturate, seed).to(lay.dtype), lay
    xw = x.to(lay.dtype).contiguous()   # the random bits follow the row-major index
    if not use_c:
        # under Dynamo the cache wrapper is traced through anyway; call the function itself
        plan = (_plan.__wrapped__ if torch.compiler.is_compiling() else _plan)(fmt, lay, saturate)
        return _ops.round_bits(xw, _plan_list(plan, lay), code, seed), lay
    if dst is None or dst.dtype != lay.dtype or not dst.is_contiguous():
        dst = torch.empty_like(xw, memory_format=torch.contiguous_format)
    if xw.numel():
        _round_c(xw, dst, _plan(fmt, lay, saturate), lay, mode,
                 0 if seed is None else int(seed))
    return dst, lay


def quantize(x: torch.Tensor, fmt: FormatLike, *, rounding: Union[str, Rounding] = "nearest",
             saturate: bool = False, generator: Optional[torch.Generator] = None,
             out: Optional[torch.Tensor] = None,
             backend: Union[str, Backend] = "auto",
             seed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Round x to the nearest (or a stochastic) value of ``fmt``; same dtype, shape, device.

    Args:
        x: float32, float64, bfloat16 or float16 tensor (no autograd: wrap it if needed).
        fmt: a format name ("e4m3", "e5m2", "e3m4", "e6m9", ...) or FloatFormat.
        rounding: "nearest" (half to even), "stochastic" or "toward_zero".
        saturate: finite overflow and +-inf become +-max (fnuz: inf becomes NaN).
        generator: source of the stochastic seed (default: torch's default generator).
        out: a tensor of x's shape, dtype and device to write into (may be x itself).
        backend: "auto", "c" (CPU kernel) or "torch" (integer torch ops): same results.
            Under torch.compile "auto" takes the torch operators, which compile.
        seed: a 0-d int64 tensor to use instead of drawing one from ``generator``
            (:func:`mixprec.ops.draw_seed`); the same seed gives the same bits.

    >>> quantize(torch.tensor([460.0, 465.0, 1e-4]), "e4m3")
    tensor([448.,  nan,   0.])
    """
    fmt = get_format(fmt)
    mode = _choice(Rounding, rounding, "rounding")
    backend = _choice(Backend, backend, "backend")
    _check_input(x)
    if out is not None and (not isinstance(out, torch.Tensor) or out.shape != x.shape
                            or out.dtype != x.dtype or out.device != x.device):
        raise ValueError("out must be a tensor of x's shape, dtype and device "
                         f"({tuple(x.shape)}, {x.dtype}, {x.device})")
    direct = out if out is not None and out.dtype in (torch.float32, torch.float64) else None
    y, _ = _quantize_work(x, fmt, mode, saturate, generator, backend, dst=direct, seed=seed)
    y = y.to(x.dtype).view(x.shape)
    if out is None:
        return y
    if _tracing(y) or y.data_ptr() != out.data_ptr():
        out.copy_(y)
    return out


# -- storage codes ------------------------------------------------------------------------
def _code_dtype(fmt: FloatFormat) -> torch.dtype:
    if fmt.torch_dtype is not None:
        return fmt.torch_dtype
    return torch.uint8 if fmt.bits <= 8 else torch.int32


def _nan_code(fmt: FloatFormat) -> Optional[int]:
    """The code quantize's NaN encodes to (None where the format has no NaN code)."""
    e_ones, width = ((1 << fmt.ebits) - 1) << fmt.mbits, fmt.ebits + fmt.mbits
    if fmt.convention is Convention.IEEE:
        return e_ones | (1 << (fmt.mbits - 1)) if fmt.mbits else None
    if fmt.convention is Convention.FN:
        return (1 << width) - 1
    if fmt.convention is Convention.FNUZ:
        return 1 << width          # the "negative zero" code
    return None


def _values_to_codes(q: torch.Tensor, fmt: FloatFormat, lay: _Layout,
                     backend: Backend) -> torch.Tensor:
    """code = s << (E+M) | e << M | m for values already representable in fmt."""
    nan_code, width = _nan_code(fmt), fmt.ebits + fmt.mbits
    if nan_code is None:
        message = f"format {fmt.name!r} has no NaN code, and the input holds NaN"
        if _tracing(q):   # no host branch in a graph: the check runs as an op
            torch._assert_async(~torch.isnan(q).any(), message)
        elif bool(torch.isnan(q).any()):
            raise ValueError(message)
    s0, te = lay.mw - fmt.mbits, 1 - fmt.bias + lay.bw
    inf_bits = ((1 << lay.ew) - 1) << lay.mw
    inf_code = ((1 << fmt.ebits) - 1) << fmt.mbits if fmt.has_inf else 0
    out_dtype = _code_dtype(fmt)
    if backend is not Backend.TORCH and _fast_path(_cquant, q):
        q = q.contiguous()
        out = torch.empty(q.shape, dtype=out_dtype)
        _cquant.encode_codes(q.data_ptr(), out.data_ptr(), q.numel(), int(lay is _F64),
                             int(out_dtype == torch.int32), torch.get_num_threads(), s0, te,
                             fmt.mbits, width, inf_bits, inf_code, nan_code or 0)
        return out
    bits = q.view(lay.int_dtype).long()
    a = bits & ((1 << (lay.ew + lay.mw)) - 1)
    field = a >> lay.mw
    normal = ((field - te + 1) << fmt.mbits) | ((a & ((1 << lay.mw) - 1)) >> s0)
    # below 2^emin: the code is the count k of smallest subnormals, k = sig >> shift
    sig = torch.where(field > 0, (a & ((1 << lay.mw) - 1)) | (1 << lay.mw), a)
    shift = ((te - field.clamp(min=1)).clamp(min=0) + s0).clamp(max=lay.mw + 1)
    mag = torch.where(field >= te, normal, sig >> shift)
    mag = torch.where(a == inf_bits, inf_code, mag)
    code = mag | ((bits < 0).long() << width)
    code = torch.where(a > inf_bits, nan_code or 0, code)
    return code.to(out_dtype)


def encode(x: torch.Tensor, fmt: FormatLike, *, rounding: Union[str, Rounding] = "nearest",
           saturate: bool = False, generator: Optional[torch.Generator] = None,
           backend: Union[str, Backend] = "auto") -> torch.Tensor:
    """Round x to ``fmt`` and return it in fmt's storage: decode(encode(x)) == quantize(x).

    Storage: fmt.torch_dtype where torch has one (float16, bfloat16, float8_e5m2,
    float8_e4m3fn, float8_e4m3fnuz, float8_e5m2fnuz, float8_e8m0fnu; tf32 -> float32),
    else uint8 codes (<= 8 bits) or int32 codes, code = s << (E+M) | e << M | m
    (32-bit formats wrap into int32's sign).  Formats without a NaN code raise
    ValueError on NaN input.

    >>> encode(torch.tensor([1.5, -6.0]), "e2m1")
    tensor([ 3, 15], dtype=torch.uint8)
    """
    fmt = get_format(fmt)
    mode = _choice(Rounding, rounding, "rounding")
    _check_input(x)
    # round in the working layout, never via x's own dtype (bf16 cannot hold fp16's max)
    backend = _choice(Backend, backend, "backend")
    q, lay = _quantize_work(x, fmt, mode, saturate, generator, backend)
    q = q.view(x.shape)
    if fmt.torch_dtype is not None:
        return q.to(fmt.torch_dtype)   # exact: every value of q is representable
    return _values_to_codes(q, fmt, lay, backend)


def _codes_to_values(codes: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """float64 values of codes: (-1)^s * ldexp(m or 2^M + m, max(e, 1) - bias - M)."""
    c = codes.long() & ((1 << fmt.bits) - 1)
    width = fmt.ebits + fmt.mbits
    mag = c & ((1 << width) - 1)
    e, m = mag >> fmt.mbits, mag & ((1 << fmt.mbits) - 1)
    mant = torch.where(e > 0, m + (1 << fmt.mbits), m).double()
    v = torch.ldexp(mant, (e.clamp(min=1) - fmt.bias - fmt.mbits).double())
    v = torch.where((c >> width) > 0, -v, v)
    if fmt.convention is Convention.IEEE:
        top = e == (1 << fmt.ebits) - 1
        v = torch.where(top, torch.where(m == 0, v.sign() * math.inf, math.nan), v)
    elif fmt.convention is Convention.FN:
        v = torch.where(mag == (1 << width) - 1, math.nan, v)
    elif fmt.convention is Convention.FNUZ:
        v = torch.where(c == 1 << width, math.nan, v)
    return v


@functools.lru_cache(maxsize=64)
def _code_table(fmt: FloatFormat) -> torch.Tensor:
    return _codes_to_values(torch.arange(1 << fmt.bits), fmt)


def decode(codes: torch.Tensor, fmt: FormatLike, dtype: torch.dtype = torch.float32
           ) -> torch.Tensor:
    """Values of ``encode``'s output as ``dtype`` (exact when dtype can hold them).

    >>> decode(torch.tensor([3, 15], dtype=torch.uint8), "e2m1")
    tensor([ 1.5000, -6.0000])
    """
    fmt = get_format(fmt)
    if not isinstance(codes, torch.Tensor):
        raise ValueError(f"codes must be a torch.Tensor, got {type(codes).__name__}")
    if dtype not in _INPUT_DTYPES:
        valid = ", ".join(str(d) for d in _INPUT_DTYPES)
        raise ValueError(f"dtype {dtype} not supported; valid: {valid}")
    want = _code_dtype(fmt)
    if fmt.torch_dtype is not None:
        if codes.dtype != want:
            raise ValueError(f"codes for {fmt.name!r} must have dtype {want}, got {codes.dtype}")
        return codes.to(dtype)
    if codes.dtype.is_floating_point or codes.dtype.is_complex or codes.dtype == torch.bool:
        raise ValueError(f"codes for {fmt.name!r} must be integer ({want}), got {codes.dtype}")
    if fmt.bits > 8:
        return _codes_to_values(codes, fmt).to(dtype)
    if _tracing(codes):   # no host branch in a graph: the check runs as an op
        torch._assert_async(((codes >= 0) & (codes < 1 << fmt.bits)).all(),
                            f"codes for {fmt.name!r} must lie in [0, {1 << fmt.bits})")
    elif codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= 1 << fmt.bits):
        raise ValueError(f"codes for {fmt.name!r} must lie in [0, {1 << fmt.bits}), got "
                         f"[{int(codes.min())}, {int(codes.max())}]")
    table = _code_table(fmt).to(device=codes.device, dtype=dtype)
    return table[codes.long()]
