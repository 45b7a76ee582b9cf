"""Conformance presets: recipes that compute what a named production stack computes.

Each preset is an ordinary :class:`~mixprec.recipe.Recipe`, registered in
:data:`mixprec.recipe.PRESETS` under the stack's name. Its tests hold one linear layer
(forward output, dX, dW, bias gradient) to the stack bit for bit, with zero tolerance:

* ``torchao-*`` against torchao itself (the version pinned in constraints.txt), run on CPU
  in its emulated modes;
* ``te-*`` against TransformerEngine's documented reference semantics, in hand-computed
  cases (TransformerEngine needs CUDA and is not installed).

What the stacks share, and what the presets therefore set, beside the formats:

    weight_grad = fp32, unscaled   dW = g'^T @ x' leaves the GEMM in high precision
    bias_grad   = "hp"             the bias gradient sums grad_output as it arrived
    master      = fp32, no loss scaling, no layer kept in high precision

``te-nvfp4`` also sets ``scaling.block_gemm="scaled"``: its linear GEMMs follow TE's
reference GEMM (block products times the block scales, summed over blocks, rescaled by the
tensor amaxes), see :func:`mixprec.blocks.block_scaled_mm`.

:data:`CONFORMANCE` lists, per preset, the stack and version, what is bit-identical and
the documented differences (the stack's quirks that a preset follows or leaves, and why).
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

from .recipe import (PRESETS, HadamardConfig, Recipe, Rounding, ScalingConfig, ScalingKind,
                     TensorSpec)

__all__ = ["ConformanceEntry", "CONFORMANCE", "CONFORMANCE_PRESETS", "TORCHAO_VERSION",
           "conformance_table"]

TORCHAO_VERSION = "0.18"
TORCHAO_AMAX_EPS = 1e-12        # torchao.float8.float8_utils.EPS
TE_AMAX_HISTORY = 1024          # DelayedScaling(amax_history_len=1024), TE's default

_CUR, _AXIS, _DELAYED, _MX = (ScalingKind.CURRENT, ScalingKind.AXISWISE, ScalingKind.DELAYED,
                              ScalingKind.MX)
_HP = TensorSpec()              # fp32, unscaled


def _gemm(weight: TensorSpec, activation: TensorSpec, grad_output: TensorSpec,
          scaling: ScalingConfig, name: str) -> Recipe:
    """A recipe with FP8 GEMM operands, high-precision dW and bias gradient."""
    return Recipe(name=name, weight=weight, activation=activation, grad_output=grad_output,
                  weight_grad=_HP, scaling=scaling, bias_grad="hp")


def _spec(fmt: str, kind: ScalingKind) -> TensorSpec:
    # every stack casts to FP8 with saturation (torchao to_fp8_saturated, TE satfinite)
    return TensorSpec(fmt, scaling=kind, saturate=True)


def _hybrid(kind: ScalingKind, scaling: ScalingConfig, name: str) -> Recipe:
    """E4M3 weights and activations, E5M2 gradients, one scale per tensor."""
    fwd, bwd = _spec("e4m3", kind), _spec("e5m2", kind)
    return _gemm(fwd, fwd, bwd, scaling, name)


def _all_e4m3(kind: ScalingKind, scaling: ScalingConfig, name: str) -> Recipe:
    spec = _spec("e4m3", kind)
    return _gemm(spec, spec, spec, scaling, name)


_TORCHAO_MXFP8 = ScalingConfig(mx_block_size=32, mx_scale_rule="ceil-log2")
_TE_MXFP8 = ScalingConfig(mx_block_size=32, mx_scale_rule="ceil")

CONFORMANCE_PRESETS: Tuple[Recipe, ...] = (
    # Float8LinearConfig(emulate=True): dynamic tensorwise scaling, amax clamped at 1e-12
    _hybrid(_CUR, ScalingConfig(amax_eps=TORCHAO_AMAX_EPS), "torchao-float8-tensorwise"),
    # Float8LinearConfig.from_recipe_name("rowwise"): E4M3 everywhere, one scale per row
    # along each GEMM's reduction dim, scales rounded down to powers of two by
    # exp2(floor(log2(scale)))
    _all_e4m3(_AXIS, ScalingConfig(amax_eps=TORCHAO_AMAX_EPS, pow2_scale="log2"),
              "torchao-float8-rowwise"),
    # MXFP8Linear (mx_mm, KernelPreference.EMULATED): E4M3 everywhere, RCEIL scales
    _all_e4m3(_MX, _TORCHAO_MXFP8, "torchao-mxfp8"),
    # TE DelayedScaling(fp8_format=Format.HYBRID, amax_history_len=1024,
    # amax_compute_algo="max", margin=0)
    _hybrid(_DELAYED, ScalingConfig(amax_history_len=TE_AMAX_HISTORY, amax_algo="max",
                                    margin=0), "te-delayed"),
    # TE Float8CurrentScaling(fp8_format=Format.HYBRID): amax_epsilon 0, no power-of-two
    _hybrid(_CUR, ScalingConfig(), "te-current"),
    # TE MXFP8BlockScaling(fp8_format=Format.E4M3): 1x32 blocks along the reduction dim,
    # E8M0 scales float_to_e8m0(amax / 448): the float32 quotient rounded up to a power
    # of two, which is the exact ceil(log2(amax / 448))
    _all_e4m3(_MX, _TE_MXFP8, "te-mxfp8"),
    # TE Float8BlockScaling (DeepSeek-V3): E4M3 everywhere, 1x128 blocks of activations
    # and gradients along each GEMM's reduction dim, 128x128 tiles of weights, scales
    # 448 / amax with the mantissa zeroed (power_2_scale)
    _gemm(TensorSpec(scheme="fp8-block128x128"), TensorSpec(scheme="fp8-block128"),
          TensorSpec(scheme="fp8-block128"), ScalingConfig(), "te-blockwise"),
    # TE NVFP4BlockScaling: E2M1 elements, E4M3 block decode scales and an FP32 tensor
    # scale per copy; 1x16 blocks of activations and gradients along each GEMM's reduction
    # dim, 16x16 weight tiles; the 16-point RHT with TE's sign vector on the wgrad operands
    # only (the columnwise copies of x and dy, amax taken after it); stochastic rounding
    # of the gradients; every GEMM in the reference order (NVFP4QuantizerRef.qgemm:
    # block products times s_x * s_w, summed over blocks, times amax_x * amax_w /
    # (6^2 * 448^2)); attention unquantized
    Recipe(name="te-nvfp4", weight=TensorSpec(scheme="nvfp4-2d"),
           activation=TensorSpec(scheme="nvfp4"),
           grad_output=TensorSpec(rounding=Rounding.STOCHASTIC, scheme="nvfp4"),
           weight_grad=_HP, scaling=ScalingConfig(block_gemm="scaled"),
           hadamard=HadamardConfig(signs="te", wgrad=16), attention="high_precision",
           bias_grad="hp"),
)


class ConformanceEntry(NamedTuple):
    """One row of the conformance table."""
    preset: str
    stack: str
    version: str
    identical: str          # what is bit-identical, and how it is tested
    differences: str        # documented differences, and why the preset keeps them


_TORCHAO_TESTED = "y, dX, dW, dbias: torchao run on CPU"
_TE_TESTED = "y, dX, dW, dbias: hand-computed cases"
_TE_VERSION = "docs; not run (CUDA only)"

CONFORMANCE: Tuple[ConformanceEntry, ...] = (
    ConformanceEntry(
        "torchao-float8-tensorwise", "torchao `Float8LinearConfig(emulate=True)`",
        TORCHAO_VERSION, _TORCHAO_TESTED,
        "none found; follows the amax clamp at 1e-12 (a zero tensor gets scale 4.48e14)"),
    ConformanceEntry(
        "torchao-float8-rowwise", 'torchao `Float8LinearConfig.from_recipe_name("rowwise")`',
        TORCHAO_VERSION, _TORCHAO_TESTED,
        "none found; follows exp2(floor(log2 s)) in float32, which rounds a scale just "
        "below 2^k up to 2^k"),
    ConformanceEntry(
        "torchao-mxfp8", "torchao `MXFP8Linear` (`mx_mm`, EMULATED, RCEIL)",
        TORCHAO_VERSION, _TORCHAO_TESTED,
        "blocks with amax <= 448·2^-127: torchao flushes them to 0, mixprec keeps V/2^-127 "
        "as E8M0 defines; follows RCEIL's float32 log2, which rounds a quotient a few "
        "ulps above 2^k down to k"),
    ConformanceEntry(
        "te-delayed", "TE `DelayedScaling` (HYBRID, history 1024, max, margin 0)",
        _TE_VERSION, _TE_TESTED, "none known (the first step runs at scale 1, TE's initial scale)"),
    ConformanceEntry(
        "te-current", "TE `Float8CurrentScaling` (HYBRID)", _TE_VERSION, _TE_TESTED,
        "none known"),
    ConformanceEntry(
        "te-mxfp8", "TE `MXFP8BlockScaling` (E4M3)", _TE_VERSION, _TE_TESTED,
        "a reduction length not a multiple of 32 is zero-padded (TE requires multiples)"),
    ConformanceEntry(
        "te-blockwise", "TE `Float8BlockScaling` (E4M3, power-of-two scales)", _TE_VERSION,
        _TE_TESTED + "; a layer against TE's formula", "none known; FP32 scales (power_2_scale "
        "off): the schemes fp8-block128-fp32 / fp8-block128x128-fp32"),
    ConformanceEntry(
        "te-nvfp4", "TE `NVFP4BlockScaling` (2-D weights, RHT on wgrad, SR gradients)",
        _TE_VERSION, "y, dX, dW, dbias: hand-computed cases against TE's reference "
        "(`NVFP4QuantizerRef`, its `qgemm`), gradients rounded to nearest as that reference "
        "does (`te-nvfp4:grad_output.rounding=nearest`); with SR, the neighbours and their "
        "probabilities",
        "SR bits come from mixprec's seeded stream, not TE's CUDA Philox stream (same "
        "neighbours and odds, other draws); the RHT's 16-term FP32 sums follow the CPU "
        "matmul's order (exact in the tested cases); the bias is added in FP32 after the "
        "alpha rescale (TE's reference GEMM takes none); a block holding inf gives NaN "
        "(TE clips it to 6); BF16 inputs are transformed in FP32 (TE's reference: in BF16)"),
)


def conformance_table() -> str:
    """The conformance table as Markdown (the README prints it)."""
    rows = ["| preset | stack | version | bit-identical | documented differences |",
            "|---|---|---|---|---|"]
    rows += [f"| `{e.preset}` | {e.stack} | {e.version} | {e.identical} | {e.differences} |"
             for e in CONFORMANCE]
    return "\n".join(rows)


for _recipe in CONFORMANCE_PRESETS:
    if _recipe.name in PRESETS:
        raise RuntimeError(f"preset {_recipe.name!r} is defined twice")
    PRESETS[_recipe.name] = _recipe
