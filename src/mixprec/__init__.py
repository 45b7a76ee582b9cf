"""mixprec: reduced-precision training for PyTorch, bit-exact on any CPU.

Numerics: :func:`get_format`, :func:`quantize`, :func:`encode`/:func:`decode`,
:func:`quantize_mx`, per-tensor scaling and reduced-precision accumulation. Block-scaled
formats (MX, NVFP4, blockwise FP8): :func:`quantize_blocked` with a :class:`BlockScheme`;
random Hadamard transforms: :func:`hadamard_transform`.
Training: :func:`prepare` wraps a model and optimizer in an :class:`Engine` that runs a
:class:`Recipe` (a preset name such as ``"fp16-mixed"`` or ``"fp8-e5m2"``, with
``key=value`` overrides). Diagnostics: :class:`NumericsMonitor`.
"""
from .formats import Convention, FloatFormat, get_format, list_formats, make_format
from .quant import Rounding, decode, encode, has_c_extension, quantize
from .ops import compile_options
from .scaling import DelayedScaling, amax_to_scale, quantize_mx, quantize_scaled, tensor_to_amax
from .blocks import (BlockQuantized, BlockScheme, HadamardSigns, ScaleFormat, ScaleRule,
                     SignStream, Ties, block_scaled_mm, get_scheme, hadamard_matrix,
                     hadamard_transform, list_schemes, quantize_blocked)
from .accum import matmul_accum, sum_accum
from .loss_scale import DynamicLossScale, LossScale, NoOpLossScale, StaticLossScale
from .recipe import (PRESETS, AccumulationConfig, HadamardConfig, LossScaleConfig, Recipe, Role,
                     ScalingConfig, ScalingKind, TensorSpec, get_recipe, list_presets)
from .conformance import CONFORMANCE, ConformanceEntry
from .policy import LayerPolicy, attach
from .emulate import PrecisionMode, SharedScalerWarning, outside_layer
from .engine import Engine, NonFiniteError, prepare
from .monitor import NumericsMonitor
from .coverage import Coverage, CoverageRow, CoverageWarning, UnemulatedOpError
from .layers import is_gemm_layer

__version__ = "0.1.0"

__all__ = [
    # formats and numerics
    "Convention", "FloatFormat", "get_format", "list_formats", "make_format",
    "Rounding", "quantize", "encode", "decode", "has_c_extension",
    "tensor_to_amax", "amax_to_scale", "quantize_scaled", "DelayedScaling", "quantize_mx",
    "sum_accum", "matmul_accum",
    # block-scaled formats
    "BlockScheme", "ScaleFormat", "ScaleRule", "Ties", "get_scheme", "list_schemes",
    "quantize_blocked", "BlockQuantized", "hadamard_transform", "hadamard_matrix",
    "HadamardSigns", "SignStream", "block_scaled_mm",
    # loss scaling
    "LossScale", "NoOpLossScale", "StaticLossScale", "DynamicLossScale",
    # recipes
    "Recipe", "Role", "TensorSpec", "ScalingKind", "ScalingConfig", "AccumulationConfig",
    "LossScaleConfig", "HadamardConfig", "PRESETS", "get_recipe", "list_presets",
    "CONFORMANCE", "ConformanceEntry",
    # training
    "prepare", "Engine", "NonFiniteError", "LayerPolicy", "attach", "PrecisionMode",
    "outside_layer", "SharedScalerWarning",
    "compile_options",
    # diagnostics
    "NumericsMonitor", "Coverage", "CoverageRow", "CoverageWarning", "UnemulatedOpError",
    "is_gemm_layer",
]
