"""The papers' claims as experiments: one function per claim, each giving a record.

Importing this package registers every claim; :data:`ORDER` fixes the report order.
"""
from __future__ import annotations

from . import fp8, frontier, numerics, out_of_reach, training  # noqa: F401  (registers the claims)
from .base import (RECORD_FIELDS, REGISTRY, Claim, Outcome, RunContext, Verdict,
                   run_claim)

__all__ = ["ORDER", "claims", "Claim", "Outcome", "RunContext", "Verdict", "run_claim",
           "RECORD_FIELDS", "REGISTRY", "VERDICTS"]

VERDICTS = tuple(v.value for v in Verdict)

# The brief's numbering: 1 fp16 underflow, 2 master weights, 3 loss scaling, 4 swamping,
# 5 FP32 reductions, 6 E5M2 scaling, 7 stochastic rounding, 8 scale floor, 9 MX,
# 10 BF16, 11 memory; then the block-scaled recipes of 2024-2025 (FP8 accumulation,
# the MXFP8 scale rule, RHT + SR for MXFP4, NVFP4 against MXFP4); then what cannot be
# run here.
ORDER = (
    "fp16-underflow", "master-weights", "loss-scaling", "swamping", "fp32-reductions",
    "e5m2-underflow", "e5m2-training", "stochastic-rounding", "stochastic-rounding-training",
    "scale-floor", "mx-vs-per-tensor", "bf16-range", "bf16-training", "activation-memory",
    "fp8-accumulation-promotion", "mxfp8-scale-rule", "rht-sr-mxfp4", "nvfp4-vs-mxfp4",
    "resnet50-imagenet", "imagenet-cnns", "ssd-detection", "faster-rcnn", "biglstm",
    "deepspeech2", "fp8-imagenet-wmt",
)


def claims(only=None) -> list:
    """The registered claims in report order; ``only`` a list of ids to keep (ValueError
    naming the valid ids for an unknown one)."""
    if set(ORDER) != set(REGISTRY):
        raise RuntimeError(f"claim order and registry disagree: {set(ORDER) ^ set(REGISTRY)}")
    if only:
        unknown = [i for i in only if i not in REGISTRY]
        if unknown:
            raise ValueError(f"unknown claim id(s) {', '.join(unknown)}; valid ids: "
                             f"{', '.join(ORDER)}")
        return [REGISTRY[i] for i in ORDER if i in set(only)]
    return [REGISTRY[i] for i in ORDER]
