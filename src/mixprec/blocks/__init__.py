"""Block-scaled formats: one ``BlockScheme`` for MX, NVFP4 and blockwise FP8, the
quantizer that runs it, and random Hadamard transforms.

``scheme``    BlockScheme, named schemes (nvfp4, nvfp4-2d, mxfp8/6/4, fp8-block128[x128])
``quantize``  quantize_blocked -> BlockQuantized (elements, block_scales, tensor_scale)
``hadamard``  blockwise random Hadamard transforms and their sign sources
``gemm``      block_scaled_mm: a GEMM of block-quantized operands in TransformerEngine's
              NVFP4 reference order
"""
from .scheme import (HADAMARD_SIGNS, HADAMARD_SIZES, BlockScheme, ScaleFormat, ScaleRule,
                     SchemeLike, Ties, get_scheme, list_schemes, scheme_along)
from .hadamard import (TE_NVFP4_SIGNS, HadamardSigns, fixed_signs, hadamard_matrix,
                       hadamard_transform, random_signs)
from .quantize import BlockQuantized, quantize_blocked
from .gemm import block_scaled_mm

__all__ = [
    "BlockScheme", "ScaleFormat", "ScaleRule", "Ties", "SchemeLike", "get_scheme",
    "list_schemes", "scheme_along", "HADAMARD_SIZES", "HADAMARD_SIGNS",
    "BlockQuantized", "quantize_blocked", "block_scaled_mm",
    "TE_NVFP4_SIGNS", "HadamardSigns", "fixed_signs", "hadamard_matrix", "hadamard_transform",
    "random_signs",
]
