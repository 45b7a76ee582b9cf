"""Which modules are GEMM layers, by structure or by tracing one forward pass.

A GEMM layer owns a weight that a matmul-like op consumes. Two ways to find them:

- :func:`is_gemm_layer` (structure, no forward): nn.Linear, nn.Bilinear, convolutions
  and transposed convolutions, and any other module holding a direct parameter named
  ``weight`` with at least 2 dimensions that is not an embedding table (nn.Embedding,
  nn.EmbeddingBag) -- so transformers' ``Conv1D`` (a (in, out) weight used by
  ``torch.addmm``) counts, and normalisation layers (1-D weights) do not.
- :func:`trace_gemm_layers` (execution): run one forward under the dispatcher and list
  the modules that owned the weight operand of a matmul-like call, in execution order
  (the same attribution the coverage report uses).
"""
from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

from .coverage import CoverageRecorder
from .policy import LayerPolicy, attach

__all__ = ["is_gemm_layer", "trace_gemm_layers"]

_GEMM_CLASSES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)
_TABLES = (nn.Embedding, nn.EmbeddingBag)


def is_gemm_layer(module: nn.Module) -> bool:
    """True for a module whose own ``weight`` feeds a GEMM (rule in the module docstring).

    >>> is_gemm_layer(nn.Linear(4, 4)), is_gemm_layer(nn.LayerNorm(4))
    (True, False)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"is_gemm_layer expects an nn.Module, got {type(module).__name__}")
    if isinstance(module, _GEMM_CLASSES):
        return True
    if isinstance(module, _TABLES):
        return False
    weight = module._parameters.get("weight")
    return isinstance(weight, torch.Tensor) and weight.dim() >= 2


def trace_gemm_layers(model: nn.Module, *args, **kwargs) -> Tuple[str, ...]:
    """Qualified names of the modules that owned the weight operand of a matmul-like
    call during one forward ``model(*args, **kwargs)`` (no gradients, FP32), in the
    order of their first call; embeddings included.

    >>> trace_gemm_layers(gpt2, input_ids)[-1]
    'lm_head'
    """
    from .emulate import PrecisionMode     # emulate builds on this package's lower layers
    recorder = CoverageRecorder()
    identity = LayerPolicy()
    with attach(model, lambda n, m: identity), PrecisionMode(recorder=recorder), \
            torch.no_grad():
        model(*args, **kwargs)
    return recorder.coverage().gemm_layers()
