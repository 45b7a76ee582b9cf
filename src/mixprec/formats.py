"""Floating-point format specifications: the one source of truth for every limit.

A format is sign + ``ebits`` exponent bits + ``mbits`` mantissa bits with an exponent
``bias``.  What the top of the code space means is the format's *convention*:

* ``ieee``   -- the all-ones exponent is reserved: mantissa 0 is inf, anything else NaN
               (fp32, bf16, fp16, OCP e5m2); with no mantissa bits (e5m0) there is no
               NaN code.
* ``fn``     -- finite + NaN: no inf; only the all-ones code S.1..1.1..1 is NaN, so the
               top binade holds normal numbers but its last mantissa code (OCP e4m3fn).
* ``fnuz``   -- finite + NaN, unsigned zero: no inf, no -0; the code 1000...0 is the
               single NaN (Graphcore/AMD e4m3fnuz, e5m2fnuz).
* ``finite`` -- every code is a number; no inf, no NaN (OCP MX FP6/FP4 elements).
* ``e8m0``   -- the MX scale: unsigned powers of two 2^(code - 127), 0xFF is NaN, no zero.

Names follow ml_dtypes: ``e{E}m{M}[b{bias}][ieee|fn|fnuz|fin]``.  The builtin names
(fp32 tf32 bf16 fp16 e5m2 e4m3 e4m3fnuz e5m2fnuz e3m2 e2m3 e2m1 e8m0) take precedence;
any other ``eXmY`` is IEEE-style unless a suffix says otherwise.
"""
from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field
from typing import Optional, Union

import torch

__all__ = ["Convention", "FloatFormat", "get_format", "list_formats", "FormatLike"]


class Convention(str, enum.Enum):
    IEEE = "ieee"
    FN = "fn"
    FNUZ = "fnuz"
    FINITE = "finite"
    E8M0 = "e8m0"


# Name suffix <-> convention: one table serves parsing and printing.
_SUFFIX = {Convention.IEEE: "ieee", Convention.FN: "fn", Convention.FNUZ: "fnuz",
           Convention.FINITE: "fin"}
_SUFFIX_TO_CONV = {v: k for k, v in _SUFFIX.items()}

# Largest exponent/mantissa widths the float32 kernels can represent exactly.
MAX_EBITS = 8
MAX_MBITS = 23


@dataclass(frozen=True)
class FloatFormat:
    """A binary floating-point format; every limit is derived from the bit layout.

    value(code) = (-1)^s * 2^(e - bias) * (1 + m / 2^mbits)   for e >= 1 (normal)
                = (-1)^s * 2^(1 - bias) * (m / 2^mbits)         for e == 0 (subnormal)
    """

    name: str
    ebits: int
    mbits: int
    bias: int
    convention: Convention = Convention.IEEE
    torch_dtype: Optional[torch.dtype] = field(default=None, compare=False, repr=False)
    description: str = field(default="", compare=False, repr=False)

    # -- derived layout ---------------------------------------------------------------
    @property
    def signed(self) -> bool:
        return self.convention is not Convention.E8M0

    @property
    def bits(self) -> int:
        return int(self.signed) + self.ebits + self.mbits

    @property
    def has_inf(self) -> bool:
        return self.convention is Convention.IEEE

    @property
    def has_nan(self) -> bool:
        # IEEE-style with no mantissa bits: the all-ones exponent is inf, and no code is left
        # for NaN (quantize still returns NaN for NaN input; encode cannot store it)
        if self.convention is Convention.IEEE and self.mbits == 0:
            return False
        return self.convention is not Convention.FINITE

    @property
    def has_negative_zero(self) -> bool:
        return self.convention in (Convention.IEEE, Convention.FN, Convention.FINITE)

    @property
    def has_zero(self) -> bool:
        return self.convention is not Convention.E8M0

    @property
    def has_subnormals(self) -> bool:
        return self.convention is not Convention.E8M0

    @property
    def nan_codes(self) -> str:
        """The NaN encoding in words (for tables and error messages)."""
        e, m = "1" * self.ebits, self.mbits
        return {
            Convention.IEEE: f"S.{e}.(non-zero mantissa)" if m else "none",
            Convention.FN: f"S.{e}.{'1' * m}" if m else f"S.{e}",
            Convention.FNUZ: "1." + "0" * (self.ebits + self.mbits) + " only",
            Convention.FINITE: "none",
            Convention.E8M0: "0xFF",
        }[self.convention]

    @property
    def emax(self) -> int:
        """Unbiased exponent of the largest finite binade."""
        top = (1 << self.ebits) - 1
        if self.convention is Convention.IEEE:
            top -= 1
        elif self.convention is Convention.FN and self.mbits == 0:
            top -= 1       # the top binade's only code, S.111..1, is NaN
        return top - self.bias

    @property
    def emin(self) -> int:
        """Unbiased exponent of the smallest normal binade."""
        return (0 if self.convention is Convention.E8M0 else 1) - self.bias

    @property
    def max(self) -> float:
        """Largest finite value."""
        m_codes = 1 << self.mbits
        top_mantissa = m_codes - 1
        if self.convention is Convention.FN and self.mbits > 0:
            top_mantissa -= 1          # S.1111.111 is NaN (mbits = 0: emax steps down instead)
        elif self.convention is Convention.E8M0:
            return 2.0 ** (self.emax - 1)   # 0xFF is NaN, so the top code is 0xFE
        return 2.0 ** self.emax * (1.0 + top_mantissa / m_codes)

    @property
    def min_normal(self) -> float:
        return 2.0 ** self.emin

    @property
    def min_subnormal(self) -> Optional[float]:
        if not self.has_subnormals:
            return None
        return 2.0 ** (self.emin - self.mbits)

    @property
    def eps(self) -> float:
        """Distance from 1.0 to the next larger representable value."""
        return 2.0 ** -self.mbits

    @property
    def storage(self) -> str:
        """What ``encode`` returns: a torch dtype name or uint8/int32 codes."""
        if self.torch_dtype is not None:
            return str(self.torch_dtype).replace("torch.", "")
        return "uint8 codes" if self.bits <= 8 else "int32 codes"

    def __str__(self) -> str:
        return self.name


FormatLike = Union[str, FloatFormat]


def _builtin(name, ebits, mbits, bias, conv, dtype_name, description):
    dtype = getattr(torch, dtype_name, None) if dtype_name else None
    return FloatFormat(name, ebits, mbits, bias, conv, dtype, description)


_BUILTINS = {f.name: f for f in [
    _builtin("fp32", 8, 23, 127, Convention.IEEE, "float32", "IEEE binary32"),
    _builtin("tf32", 8, 10, 127, Convention.IEEE, "float32", "NVIDIA TensorFloat-32 (compute only)"),
    _builtin("bf16", 8, 7, 127, Convention.IEEE, "bfloat16", "bfloat16"),
    _builtin("fp16", 5, 10, 15, Convention.IEEE, "float16", "IEEE binary16"),
    _builtin("e5m2", 5, 2, 15, Convention.IEEE, "float8_e5m2", "OCP FP8 E5M2"),
    _builtin("e4m3", 4, 3, 7, Convention.FN, "float8_e4m3fn", "OCP FP8 E4M3 (e4m3fn)"),
    _builtin("e4m3fnuz", 4, 3, 8, Convention.FNUZ, "float8_e4m3fnuz", "FP8 E4M3, unsigned zero"),
    _builtin("e5m2fnuz", 5, 2, 16, Convention.FNUZ, "float8_e5m2fnuz", "FP8 E5M2, unsigned zero"),
    _builtin("e3m2", 3, 2, 3, Convention.FINITE, None, "OCP MX FP6 E3M2"),
    _builtin("e2m3", 2, 3, 1, Convention.FINITE, None, "OCP MX FP6 E2M3"),
    _builtin("e2m1", 2, 1, 1, Convention.FINITE, None, "OCP MX FP4 E2M1"),
    _builtin("e8m0", 8, 0, 127, Convention.E8M0, "float8_e8m0fnu", "OCP MX scale E8M0"),
]}

_ALIASES = {
    "float32": "fp32", "fp32": "fp32", "float": "fp32",
    "bfloat16": "bf16", "float16": "fp16", "half": "fp16",
    "e4m3fn": "e4m3", "fp8_e4m3": "e4m3", "fp8_e5m2": "e5m2",
    "e8m0fnu": "e8m0", "fp6_e3m2": "e3m2", "fp6_e2m3": "e2m3", "fp4_e2m1": "e2m1",
    "e3m2fn": "e3m2", "e2m3fn": "e2m3", "e2m1fn": "e2m1",
}

_CUSTOM = re.compile(r"^e(\d+)m(\d+)(?:b(\d+))?(ieee|fnuz|fn|fin)?$")

_VALID_FORMS = (
    "a builtin name (" + ", ".join(_BUILTINS) + "), an alias (" + ", ".join(sorted(_ALIASES))
    + "), or a custom 'e<E>m<M>[b<bias>][ieee|fn|fnuz|fin]' with 2 <= E <= 8 "
    "(1 <= E for fn/fin) and 0 <= M <= 23"
)


def _default_bias(ebits: int, conv: Convention) -> int:
    # fnuz shifts the bias by one so the freed -0 code buys an extra binade at the bottom
    return (1 << (ebits - 1)) - (0 if conv is Convention.FNUZ else 1)


def _custom_name(ebits, mbits, bias, conv) -> str:
    base = f"e{ebits}m{mbits}"
    if bias != _default_bias(ebits, conv):
        base += f"b{bias}"
    plain = _BUILTINS.get(base)
    if conv is Convention.IEEE and plain is None:
        return base
    return base + _SUFFIX[conv]


def make_format(ebits: int, mbits: int, convention: Union[str, Convention] = "ieee",
                bias: Optional[int] = None) -> FloatFormat:
    """Build a custom format; raises ValueError naming the bad field."""
    try:
        conv = Convention(convention if not isinstance(convention, str) else
                          {"fin": "finite"}.get(convention, convention))
    except ValueError:
        raise ValueError(f"unknown convention {convention!r}; valid: ieee, fn, fnuz, finite") from None
    if conv is Convention.E8M0:
        raise ValueError("the e8m0 convention is reserved for the builtin 'e8m0' format")
    min_e = 2 if conv is Convention.IEEE else 1
    if not (min_e <= ebits <= MAX_EBITS):
        raise ValueError(f"exponent bits {ebits} out of range [{min_e}, {MAX_EBITS}] "
                         f"for convention {conv.value!r}")
    if not (0 <= mbits <= MAX_MBITS):
        raise ValueError(f"mantissa bits {mbits} out of range [0, {MAX_MBITS}]")
    if conv is Convention.FN and ebits == 1 and mbits == 0:
        raise ValueError("e1m0fn has no finite non-zero value")
    if bias is None:
        bias = _default_bias(ebits, conv)
    fmt = FloatFormat(_custom_name(ebits, mbits, bias, conv), ebits, mbits, bias, conv)
    # The float32 kernels need every value of the format to be a float32 value.
    if fmt.emax > 127 or fmt.emin - mbits < -149:
        raise ValueError(f"bias {bias} puts e{ebits}m{mbits} outside float32's range "
                         f"(exponents {fmt.emin - mbits}..{fmt.emax})")
    return fmt


def get_format(name: FormatLike) -> FloatFormat:
    """Return the FloatFormat for a name (or pass a FloatFormat through)."""
    if isinstance(name, FloatFormat):
        return name
    if isinstance(name, torch.dtype):
        for f in _BUILTINS.values():
            if f.torch_dtype == name:
                return f
        raise ValueError(f"no format for torch dtype {name}; valid forms: {_VALID_FORMS}")
    if not isinstance(name, str):
        raise ValueError(f"format must be a name or FloatFormat, got {name!r}; "
                         f"valid forms: {_VALID_FORMS}")
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key in _BUILTINS:
        return _BUILTINS[key]
    m = _CUSTOM.match(key)
    if m is None:
        raise ValueError(f"unknown format {name!r}; valid forms: {_VALID_FORMS}")
    ebits, mbits = int(m.group(1)), int(m.group(2))
    conv = _SUFFIX_TO_CONV.get(m.group(4) or "ieee")
    bias = int(m.group(3)) if m.group(3) is not None else None
    try:
        return make_format(ebits, mbits, conv, bias)
    except ValueError as exc:
        raise ValueError(f"impossible format {name!r}: {exc}; valid forms: {_VALID_FORMS}") from None


def list_formats() -> list[FloatFormat]:
    """The builtin formats, in table order."""
    return list(_BUILTINS.values())
