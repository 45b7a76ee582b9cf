"""Recipes: which format, rounding and scaling each tensor role gets.

A :class:`Recipe` is a frozen description of a whole training configuration. Every field
is configuration only: the objects that act on it (loss scalers, scaling states, layer
policies) are built from it by the engine.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

__all__ = [
    "Role", "Rounding", "ScalingKind", "TensorSpec", "ScalingConfig", "AccumulationConfig",
    "LossScaleConfig", "Recipe", "DEFAULT_FP32_OPS",
]


class Role(str, enum.Enum):
    """Tensor roles of a training step."""
    WEIGHT = "weight"                    # weights as the forward pass sees them
    ACTIVATION = "activation"            # layer inputs in the forward pass
    GRAD_OUTPUT = "grad_output"          # activation gradients ("errors") in backward
    WEIGHT_GRAD = "weight_grad"          # weight gradients
    MASTER = "master"                    # the copy the optimizer updates
    OPTIMIZER_STATE = "optimizer_state"  # optimizer moments


class Rounding(str, enum.Enum):
    NEAREST = "nearest"          # round half to even
    STOCHASTIC = "stochastic"    # up with probability (x - lo) / (hi - lo)
    TOWARD_ZERO = "toward_zero"  # truncate the magnitude


class ScalingKind(str, enum.Enum):
    NONE = "none"          # quantize x directly
    CURRENT = "current"    # per-tensor scale from this tensor's amax
    DELAYED = "delayed"    # per-tensor scale from an amax history of earlier steps
    MX = "mx"              # OCP microscaling: one E8M0 scale per block


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor role is stored: ``format`` with ``rounding``, optionally scaled."""
    format: str = "fp32"
    rounding: Rounding = Rounding.NEAREST
    scaling: ScalingKind = ScalingKind.NONE
    saturate: bool = False

    @property
    def is_identity(self) -> bool:
        """True when the spec leaves float32 values unchanged."""
        return self.format == "fp32" and self.scaling is ScalingKind.NONE


@dataclass(frozen=True)
class ScalingConfig:
    """Knobs of per-tensor (current / delayed) and MX block scaling.

    Per-tensor: scale = fmt.max / amax / 2**margin, where amax is the tensor's own
    (current) or ``amax_algo`` over the last ``amax_history_len`` steps (delayed).
    MX: blocks of ``mx_block_size`` along the reduction dimension share one E8M0 scale,
    X = 2**(floor(log2(amax)) - emax_elem) ("ocp") or 2**ceil(log2(amax / max_elem)) ("ceil").
    """
    amax_history_len: int = 16
    amax_algo: str = "max"          # "max" | "most_recent"
    margin: int = 0
    mx_block_size: int = 32
    mx_scale_rule: str = "ocp"      # "ocp" | "ceil"


@dataclass(frozen=True)
class AccumulationConfig:
    """Precision of dot-product accumulation.

    Products are summed sequentially in ``format`` within chunks of ``chunk`` products
    (None: one chunk spanning the whole reduction), and chunk sums are added in
    ``across``. ``format="fp32"`` means ordinary FP32 accumulation (the fast path).
    """
    format: str = "fp32"
    chunk: Optional[int] = None
    across: str = "fp32"

    @property
    def is_fp32(self) -> bool:
        return self.format == "fp32" and self.across == "fp32"


@dataclass(frozen=True)
class LossScaleConfig:
    """Loss-scaling configuration; ``kind`` is "none", "static" or "dynamic".

    ``floor`` is the rising minimum of enhanced loss scaling: ((step, floor), ...), the
    floor in force at step s being the value of the largest step <= s.
    """
    kind: str = "none"
    init_scale: float = 2.0 ** 16
    growth_factor: float = 2.0
    backoff_factor: float = 0.5
    growth_interval: int = 2000
    hysteresis: int = 1
    min_scale: Optional[float] = None
    max_scale: Optional[float] = None
    floor: tuple = ()


# Ops that run in FP32 whatever the recipe (2018 paper: reductions in FP32), the same on
# every device: names of torch / torch.nn.functional callables.
DEFAULT_FP32_OPS: tuple = (
    "softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm", "instance_norm",
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "kl_div",
    "binary_cross_entropy", "binary_cross_entropy_with_logits", "logsumexp", "sum", "mean",
    "norm", "var", "std", "cumsum", "exp", "log", "pow",
)


@dataclass(frozen=True)
class Recipe:
    """A complete precision recipe. ``master=None`` means no master copy: the model's own
    low-precision weights are updated in place (the "fp16-pure" ablation)."""
    name: str = "fp32"
    weight: TensorSpec = TensorSpec()
    activation: TensorSpec = TensorSpec()
    grad_output: TensorSpec = TensorSpec()
    weight_grad: TensorSpec = TensorSpec()
    master: Optional[TensorSpec] = TensorSpec()
    optimizer_state: TensorSpec = TensorSpec()
    accumulation: AccumulationConfig = AccumulationConfig()
    loss_scale: LossScaleConfig = LossScaleConfig()
    scaling: ScalingConfig = ScalingConfig()
    # module filters kept in `high_precision`: "first", "last", "norm", or fnmatch
    # patterns on qualified module names
    keep_high_precision: tuple = ()
    high_precision: str = "fp32"
    fp32_ops: tuple = DEFAULT_FP32_OPS
    backend: str = "auto"           # "auto" | "emulated" | "native"
    max_consecutive_skips: int = 50
