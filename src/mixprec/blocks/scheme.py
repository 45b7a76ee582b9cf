"""Block-scaling schemes as data: one frozen ``BlockScheme`` covers MX, NVFP4 and blockwise FP8.

A scheme answers five questions, each a field::

    block         (1, k): k consecutive elements along ``axis`` share a scale
                  (k, k): k x k tiles over the last two dimensions share a scale
    element       the element format (e2m1, e3m2, e4m3, e5m2, ...)
    scale         format of the block scales and the rule that picks them
                    e8m0  + floor   X = 2^(floor(log2 amax) - emax_elem)       (OCP MX)
                    e8m0  + ceil    X = 2^ceil(log2(amax / max_elem))           (RCEIL)
                    e8m0  + dither  X as floor; elements from 3/4 * V / X       (SR without clipping)
                    e4m3 | ue5m3 + amax   X = RNE(amax / max_elem)               (NVFP4)
                    fp32  + amax   X = 1 / (max_elem / amax)                    (FP32 scales)
                    pow2  + amax   X = 1 / 2^floor(log2(max_elem / amax))       (TE blockwise FP8)
    tensor_scale  an FP32 per-tensor scale in front of narrow (e4m3, ue5m3) block scales
    ties          how elements exactly halfway between two values round:
                  nearest-even, half-up (away from zero), half-down (toward zero)
    hadamard      an optional random Hadamard transform of size 16..128 along ``axis``,
                  applied before any amax is taken, with signs "te" (TransformerEngine's
                  fixed NVFP4 vector), "random" (drawn per call) or "none"

Named schemes (``get_scheme``): nvfp4 (1x16), nvfp4-2d (16x16), mxfp8, mxfp6, mxfp4
(1x32, OCP floor rule), mxfp8-dither, mxfp6-dither, mxfp4-dither (the same with the
dither rule, for stochastic rounding), fp8-block128 (1x128) and fp8-block128x128 (power-of-two FP32
scales, as TransformerEngine's Float8BlockScaling), and fp8-block128-fp32 /
fp8-block128x128-fp32 with plain FP32 scales. The algorithm that turns a scheme into
numbers is in :mod:`mixprec.blocks.quantize`.

UE5M3 is taken to be an unsigned 8-bit float with 5 exponent bits (bias 15), 3 mantissa
bits, subnormals and no inf, its all-ones code NaN: the positive values of ``e5m3fn``
(largest 114688, smallest 2^-17). No primary specification of UE5M3 was at hand.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, replace
from typing import Optional, Tuple, Union

from ..formats import FloatFormat, get_format

__all__ = ["ScaleFormat", "ScaleRule", "Ties", "BlockScheme", "SchemeLike", "get_scheme",
           "list_schemes", "scheme_along", "HADAMARD_SIZES", "HADAMARD_SIGNS"]

HADAMARD_SIZES = (16, 32, 64, 128)
HADAMARD_SIGNS = ("te", "random", "none")


class ScaleFormat(str, enum.Enum):
    E8M0 = "e8m0"      # powers of two 2^-127 .. 2^127 (OCP MX)
    E4M3 = "e4m3"      # OCP E4M3 (e4m3fn), positive values only (NVFP4)
    UE5M3 = "ue5m3"    # unsigned E5M3, the positive values of e5m3fn
    FP32 = "fp32"      # any float32
    POW2 = "pow2"      # float32 powers of two

    @property
    def float_format(self) -> Optional[FloatFormat]:
        """The FloatFormat whose positive values the scales take (None: fp32 / pow2)."""
        return {ScaleFormat.E8M0: get_format("e8m0"), ScaleFormat.E4M3: get_format("e4m3"),
                ScaleFormat.UE5M3: get_format("e5m3fn")}.get(self)


class ScaleRule(str, enum.Enum):
    FLOOR = "floor"    # OCP MX v1.0
    CEIL = "ceil"      # round the scale up: never saturates (torchao RCEIL, TE MXFP8)
    AMAX = "amax"      # amax / max_elem rounded to the scale format (NVFP4, blockwise FP8)
    DITHER = "dither"  # floor scale, elements scaled by 3/4 so stochastic rounding never clips
    # ceil(log2(fl(amax / max_elem))) with float32 log2, as torchao's RCEIL evaluates it:
    # "ceil" except where log2 rounds a quotient a few ulps above 2^k to k
    CEIL_LOG2 = "ceil-log2"


class Ties(str, enum.Enum):
    EVEN = "nearest-even"    # IEEE default; TransformerEngine
    UP = "half-up"           # magnitude rounds up: ties away from zero
    DOWN = "half-down"       # magnitude rounds down: ties toward zero


_RULE_ALIASES = {"ocp": "floor", "rceil": "ceil", "nvfp4": "amax"}
_TIE_ALIASES = {"even": "nearest-even", "up": "half-up", "down": "half-down"}
_POW2_RULES = (ScaleRule.FLOOR, ScaleRule.CEIL, ScaleRule.CEIL_LOG2, ScaleRule.DITHER)


def _enum(cls, value, what: str, aliases: dict):
    if isinstance(value, cls):
        return value
    key = value.value if isinstance(value, enum.Enum) else value
    if isinstance(key, str):
        key = aliases.get(key.strip().lower(), key.strip().lower())
    try:
        return cls(key)
    except ValueError:
        valid = ", ".join(repr(m.value) for m in cls)
        extra = f" (aliases: {', '.join(aliases)})" if aliases else ""
        raise ValueError(f"unknown {what} {value!r}; valid choices: {valid}{extra}") from None


@dataclass(frozen=True)
class BlockScheme:
    """How a tensor is cut into blocks, scaled and rounded; see the module docstring.

    Strings are resolved once, in the constructor: ``element`` becomes a FloatFormat,
    ``scale_format``, ``scale_rule`` and ``ties`` become enums, ``block`` a tuple. Bad
    values and combinations raise ValueError naming the valid choices.

    >>> BlockScheme("e2m1", block=(1, 16), scale_format="e4m3", scale_rule="amax",
    ...             tensor_scale=True) == get_scheme("nvfp4")
    True
    """

    element: Union[FloatFormat, str] = "e4m3"
    block: Tuple[int, int] = (1, 32)
    scale_format: Union[ScaleFormat, str] = ScaleFormat.E8M0
    scale_rule: Union[ScaleRule, str] = ScaleRule.FLOOR
    tensor_scale: bool = False
    ties: Union[Ties, str] = Ties.EVEN
    axis: int = -1
    hadamard: Optional[int] = None
    hadamard_signs: str = "none"

    def __post_init__(self):
        set_ = lambda k, v: object.__setattr__(self, k, v)  # noqa: E731 (frozen)
        fmt = get_format(self.element)
        if not fmt.signed:
            raise ValueError(f"element format {fmt.name!r} cannot be a block element "
                             "(it has no sign and no zero)")
        set_("element", fmt)
        block = self.block
        if (not isinstance(block, (tuple, list)) or len(block) != 2
                or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in block)
                or block[0] not in (1, block[1])):
            raise ValueError(f"block must be (1, k) or (k, k) with k >= 1, got {block!r}")
        set_("block", (int(block[0]), int(block[1])))
        sfmt = _enum(ScaleFormat, self.scale_format, "scale format", {"ue8m0": "e8m0",
                                                                      "ue4m3": "e4m3"})
        rule = _enum(ScaleRule, self.scale_rule, "scale rule", _RULE_ALIASES)
        set_("scale_format", sfmt)
        set_("scale_rule", rule)
        set_("ties", _enum(Ties, self.ties, "tie rule", _TIE_ALIASES))
        if rule in _POW2_RULES and sfmt is not ScaleFormat.E8M0:
            raise ValueError(f"scale rule {rule.value!r} computes E8M0 scales; scale format "
                             f"{sfmt.value!r} needs scale rule 'amax' (valid pairs: e8m0 with "
                             "floor/ceil/dither; e4m3, ue5m3, fp32, pow2 with amax)")
        if rule is ScaleRule.AMAX and sfmt is ScaleFormat.E8M0:
            raise ValueError("scale format 'e8m0' takes scale rule floor, ceil or dither, "
                             "not 'amax' (valid pairs: e8m0 with floor/ceil/dither; e4m3, "
                             "ue5m3, fp32, pow2 with amax)")
        if self.tensor_scale and sfmt not in (ScaleFormat.E4M3, ScaleFormat.UE5M3):
            raise ValueError(f"tensor_scale=True needs narrow block scales (scale format "
                             f"'e4m3' or 'ue5m3'), got {sfmt.value!r}")
        if isinstance(self.axis, bool) or not isinstance(self.axis, int):
            raise ValueError(f"axis must be an int, got {self.axis!r}")
        if self.block[0] > 1 and self.axis not in (-1, -2):
            raise ValueError(f"(k, k) tiles cover the last two dimensions; axis must be -1 "
                             f"or -2, got {self.axis}")
        if self.hadamard is not None and self.hadamard not in HADAMARD_SIZES:
            raise ValueError(f"hadamard size {self.hadamard!r} not supported; valid choices: "
                             f"None, {', '.join(map(str, HADAMARD_SIZES))}")
        if self.hadamard_signs not in HADAMARD_SIGNS:
            raise ValueError(f"unknown hadamard_signs {self.hadamard_signs!r}; valid choices: "
                             f"{', '.join(HADAMARD_SIGNS)}")
        if self.hadamard_signs == "te" and self.hadamard not in (None, 16):
            raise ValueError(f"hadamard_signs='te' is TransformerEngine's 16-entry vector; "
                             f"it needs hadamard=16, got {self.hadamard}")

    # -- derived ------------------------------------------------------------------------
    @property
    def block_size(self) -> int:
        """Elements along the blocked axis (k)."""
        return self.block[1]

    @property
    def is_2d(self) -> bool:
        return self.block[0] > 1

    @property
    def scale_max(self) -> float:
        """Largest block scale the scale format holds (fp32/pow2: float32's max)."""
        fmt = self.scale_format.float_format
        return fmt.max if fmt is not None else 3.4028234663852886e38

    def with_(self, **changes) -> "BlockScheme":
        """A copy with some fields changed (validated like the constructor)."""
        return replace(self, **changes)

    def short_str(self) -> str:
        """A compact label for run names and legends: the scheme's name or its fields."""
        for name, s in _SCHEMES.items():
            if s == self:
                return name
        parts = [self.element.name, "x".join(map(str, self.block)), self.scale_format.value,
                 self.scale_rule.value]
        if self.tensor_scale:
            parts.append("ts")
        if self.ties is not Ties.EVEN:
            parts.append(self.ties.value)
        if self.axis != -1:
            parts.append(f"axis{self.axis}")
        if self.hadamard:
            parts.append(f"rht{self.hadamard}" + ("" if self.hadamard_signs == "none"
                                                  else f"-{self.hadamard_signs}"))
        return "-".join(parts)


SchemeLike = Union[str, BlockScheme]

_SCHEMES = {
    # NVFP4 (TransformerEngine NVFP4BlockScaling): E2M1, E4M3 block scales, FP32 tensor scale
    "nvfp4": BlockScheme("e2m1", (1, 16), ScaleFormat.E4M3, ScaleRule.AMAX, tensor_scale=True),
    "nvfp4-2d": BlockScheme("e2m1", (16, 16), ScaleFormat.E4M3, ScaleRule.AMAX, tensor_scale=True),
    # OCP MX v1.0: 32-element blocks, E8M0 scales, the spec's floor rule
    "mxfp8": BlockScheme("e4m3", (1, 32), ScaleFormat.E8M0, ScaleRule.FLOOR),
    "mxfp6": BlockScheme("e3m2", (1, 32), ScaleFormat.E8M0, ScaleRule.FLOOR),
    "mxfp4": BlockScheme("e2m1", (1, 32), ScaleFormat.E8M0, ScaleRule.FLOOR),
    # the same blocks for stochastic rounding (Tseng et al. 2025): OCP scales, elements
    # from 3/4 * V / X so that SR never rounds past the largest element
    "mxfp8-dither": BlockScheme("e4m3", (1, 32), ScaleFormat.E8M0, ScaleRule.DITHER),
    "mxfp6-dither": BlockScheme("e3m2", (1, 32), ScaleFormat.E8M0, ScaleRule.DITHER),
    "mxfp4-dither": BlockScheme("e2m1", (1, 32), ScaleFormat.E8M0, ScaleRule.DITHER),
    # Blockwise FP8 (TE Float8BlockScaling, DeepSeek-V3 tiles): power-of-two FP32 scales
    "fp8-block128": BlockScheme("e4m3", (1, 128), ScaleFormat.POW2, ScaleRule.AMAX),
    "fp8-block128x128": BlockScheme("e4m3", (128, 128), ScaleFormat.POW2, ScaleRule.AMAX),
    # the same with FP32 scales 448 / amax (Float8BlockScaling with power_2_scale off)
    "fp8-block128-fp32": BlockScheme("e4m3", (1, 128), ScaleFormat.FP32, ScaleRule.AMAX),
    "fp8-block128x128-fp32": BlockScheme("e4m3", (128, 128), ScaleFormat.FP32,
                                         ScaleRule.AMAX),
}


def get_scheme(scheme: SchemeLike) -> BlockScheme:
    """Return the BlockScheme for a name, or pass a BlockScheme through.

    >>> get_scheme("mxfp4").block
    (1, 32)
    """
    if isinstance(scheme, BlockScheme):
        return scheme
    if isinstance(scheme, str):
        key = scheme.strip().lower()
        if key in _SCHEMES:
            return _SCHEMES[key]
    raise ValueError(f"unknown block scheme {scheme!r}; valid choices: a BlockScheme or one "
                     f"of {', '.join(_SCHEMES)}")


def scheme_along(scheme: BlockScheme, axis: int) -> BlockScheme:
    """The scheme with its 1 x k blocks along ``axis`` (k x k tiles: unchanged, they cover
    the last two dimensions whichever of them is the reduction axis)."""
    if scheme.is_2d or scheme.axis == axis:
        return scheme
    return scheme.with_(axis=axis)


def list_schemes() -> dict:
    """The named schemes, {name: BlockScheme}."""
    return dict(_SCHEMES)
