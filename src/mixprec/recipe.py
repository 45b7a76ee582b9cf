"""Recipes: which format, rounding and scaling each tensor role gets.

A :class:`Recipe` is a frozen description of a whole training configuration. Every field
is configuration only: the objects that act on it (loss scalers, scaling states, layer
policies) are built from it by the engine.
"""
from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, replace
from typing import Any, Callable, Optional, Union

from .formats import get_format
from .quant import Rounding

__all__ = [
    "Role", "Rounding", "ScalingKind", "TensorSpec", "ScalingConfig", "AccumulationConfig",
    "LossScaleConfig", "HadamardConfig", "Recipe", "DEFAULT_FP32_OPS", "PRESETS", "get_recipe", "list_presets",
]


class Role(str, enum.Enum):
    """Tensor roles of a training step."""
    WEIGHT = "weight"                    # weights as the forward pass sees them
    ACTIVATION = "activation"            # layer inputs in the forward pass
    GRAD_OUTPUT = "grad_output"          # activation gradients ("errors") in backward
    WEIGHT_GRAD = "weight_grad"          # weight gradients
    MASTER = "master"                    # the copy the optimizer updates
    OPTIMIZER_STATE = "optimizer_state"  # optimizer moments


class ScalingKind(str, enum.Enum):
    NONE = "none"          # quantize x directly
    CURRENT = "current"    # per-tensor scale from this tensor's amax
    DELAYED = "delayed"    # per-tensor scale from an amax history of earlier steps
    MX = "mx"              # OCP microscaling: one E8M0 scale per block
    BLOCK = "block"        # a block scheme (TensorSpec.scheme): NVFP4, blockwise FP8, ...
    AXISWISE = "axiswise"  # one scale per row along the consuming GEMM's reduction dim


def _enum(cls, value, what):
    try:
        return cls(value)
    except ValueError:
        valid = ", ".join(m.value for m in cls)
        raise ValueError(f"unknown {what} {value!r}; valid choices: {valid}") from None


def _choice(value, valid, what):
    if value not in valid:
        raise ValueError(f"unknown {what} {value!r}; valid choices: {', '.join(valid)}")
    return value


@dataclass(frozen=True)
class TensorSpec:
    """How one tensor role is stored: ``format`` with ``rounding``, optionally scaled.

    ``scheme`` names a block scheme (:func:`mixprec.get_scheme`: "nvfp4", "nvfp4-2d",
    "mxfp4", "fp8-block128", ...). With a scheme, ``format`` is the scheme's element
    format and ``scaling`` is "block", both set from it; ``rounding`` rounds the elements.
    """
    format: str = "fp32"
    rounding: Rounding = Rounding.NEAREST
    scaling: ScalingKind = ScalingKind.NONE
    saturate: bool = False
    scheme: Optional[str] = None

    def __post_init__(self):
        # Canonicalize at construction so equal specs compare equal ("float16" == "fp16").
        object.__setattr__(self, "format", get_format(self.format).name)
        object.__setattr__(self, "rounding", _enum(Rounding, self.rounding, "rounding"))
        object.__setattr__(self, "scaling", _enum(ScalingKind, self.scaling, "scaling"))
        if not isinstance(self.saturate, bool):
            raise ValueError(f"saturate must be a bool, got {self.saturate!r}")
        if self.scheme is not None:
            from .blocks.scheme import get_scheme, list_schemes  # blocks sits beside recipe
            if not isinstance(self.scheme, str):
                raise ValueError(f"scheme must be the name of a block scheme, got "
                                 f"{self.scheme!r}; valid: {', '.join(list_schemes())}")
            name = self.scheme.strip().lower()
            object.__setattr__(self, "scheme", name)
            object.__setattr__(self, "format", get_scheme(name).element.name)
            object.__setattr__(self, "scaling", ScalingKind.BLOCK)
        elif self.scaling is ScalingKind.BLOCK:
            valid = ", ".join(k.value for k in ScalingKind if k is not ScalingKind.BLOCK)
            raise ValueError(f"scaling 'block' needs a scheme (scheme='nvfp4', ...: it sets "
                             f"format and scaling); valid choices without one: {valid}")

    @property
    def is_identity(self) -> bool:
        """True when the spec leaves float32 values unchanged."""
        return self.format == "fp32" and self.scaling is ScalingKind.NONE


BLOCK_GEMMS = ("dequantized", "scaled")


@dataclass(frozen=True)
class ScalingConfig:
    """Knobs of per-tensor (current / delayed) and MX block scaling.

    Per-tensor and axiswise: scale = fmt.max / max(amax, amax_eps) / 2**margin, where
    amax is the tensor's own (current; axiswise: of each row along the GEMM's reduction
    dimension) or ``amax_algo`` over the last ``amax_history_len`` steps (delayed).
    ``amax_eps`` > 0 clamps a small or zero amax (torchao: 1e-12) instead of keeping the
    previous scale. ``pow2_scale`` rounds the scale down to a power of two: "floor"
    zeroes its mantissa bits (exact; TransformerEngine), "log2" takes
    2**floor(log2(scale)) with float32 log2 (torchao's evaluation, which rounds a scale
    just below a power of two up to it); "none" keeps it.
    MX: blocks of ``mx_block_size`` along the reduction dimension share one E8M0 scale,
    X = 2**(floor(log2(amax)) - emax_elem) ("ocp"), 2**ceil(log2(amax / max_elem))
    exactly ("ceil"; equal to cuBLAS's and TransformerEngine's round-up of the float32
    quotient), or ceil(log2(fl(amax / max_elem))) in float32 ("ceil-log2": torchao's RCEIL
    as it evaluates it, which differs from "ceil" where a quotient a few ulps above 2^k
    has its log2 rounded to k).
    ``block_gemm``: how a linear layer's GEMMs apply the scales of block schemes with a
    tensor scale (NVFP4). "dequantized": each operand becomes elements * (block scale *
    tensor decode scale) in FP32, then an FP32 GEMM. "scaled": TransformerEngine's NVFP4
    reference order (:func:`mixprec.blocks.block_scaled_mm`): the exact dot product of
    each k-element block pair times fl(s_a * s_b), summed over the blocks in order from
    zero, then times fl(amax_a * amax_b / (E_max^2 * S_max^2)); Hadamard-transformed
    operands stay in the transformed domain. It needs the weight, activation and
    grad_output specs to be such schemes, and FP32 accumulation (checked where a layer
    policy is built, :class:`mixprec.LayerPolicy`; kept layers compute as usual).
    """
    amax_history_len: int = 16
    amax_algo: str = "max"          # "max" | "most_recent"
    margin: int = 0
    mx_block_size: int = 32
    mx_scale_rule: str = "ocp"      # "ocp" | "ceil" | "ceil-log2"
    amax_eps: float = 0.0
    pow2_scale: str = "none"        # "none" | "floor" | "log2"
    block_gemm: str = "dequantized"  # "dequantized" | "scaled"

    def __post_init__(self):
        _choice(self.amax_algo, ("max", "most_recent"), "amax_algo")
        _choice(self.mx_scale_rule, ("ocp", "ceil", "ceil-log2"), "mx_scale_rule")
        _choice(self.pow2_scale, ("none", "floor", "log2"), "pow2_scale")
        _choice(self.block_gemm, BLOCK_GEMMS, "block_gemm")
        if not (isinstance(self.amax_eps, (int, float)) and 0.0 <= self.amax_eps < float("inf")):
            raise ValueError(f"amax_eps must be a finite float >= 0, got {self.amax_eps!r}")
        object.__setattr__(self, "amax_eps", float(self.amax_eps))
        if self.amax_history_len < 1:
            raise ValueError(f"amax_history_len must be >= 1, got {self.amax_history_len}")
        if self.mx_block_size < 1:
            raise ValueError(f"mx_block_size must be >= 1, got {self.mx_block_size}")


@dataclass(frozen=True)
class AccumulationConfig:
    """Precision of dot-product accumulation.

    ``mode="sequential"``: products are summed sequentially in ``format`` within chunks of
    ``chunk`` products (None: one chunk spanning the whole reduction), and chunk sums are
    added in ``across``. ``format="fp32"`` means ordinary FP32 accumulation (the fast path).

    ``mode="aligned"``: a model of a Hopper-class FP8 tensor core (:mod:`mixprec.accum`).
    Exact products are added ``group`` at a time into a partial sum of
    ``mantissa_bits + 1`` significant bits, every addend aligned to the largest exponent
    of the step and cut to the partial sum's last place (``align``: "truncate" toward
    zero or "round" to nearest-even); every ``promote`` products (None: never) the partial
    sum is added to an accumulator in ``across`` and restarts from zero. ``format`` and
    ``chunk`` belong to the sequential mode and must keep their defaults.
    """
    format: str = "fp32"
    chunk: Optional[int] = None
    across: str = "fp32"
    mode: str = "sequential"        # "sequential" | "aligned"
    mantissa_bits: int = 13         # aligned: stored mantissa bits of the partial sum
    align: str = "truncate"         # aligned: "truncate" | "round"
    group: int = 32                 # aligned: products aligned together per step
    promote: Optional[int] = 128    # aligned: promotion interval N_C (None: never)

    def __post_init__(self):
        object.__setattr__(self, "format", get_format(self.format).name)
        object.__setattr__(self, "across", get_format(self.across).name)
        if self.chunk is not None and self.chunk < 1:
            raise ValueError(f"accumulation chunk must be >= 1 or None, got {self.chunk}")
        _choice(self.mode, ("sequential", "aligned"), "accumulation mode")
        _choice(self.align, ("truncate", "round"), "accumulation align")
        if not isinstance(self.mantissa_bits, int) or not 1 <= self.mantissa_bits <= 23:
            # <= 23: a partial sum is then exact in float32, where promotion adds it
            raise ValueError(f"accumulation mantissa_bits must be an integer in 1..23, got "
                             f"{self.mantissa_bits!r}")
        if not isinstance(self.group, int) or self.group < 1:
            raise ValueError(f"accumulation group must be an integer >= 1, got {self.group!r}")
        if self.promote is not None and (not isinstance(self.promote, int) or self.promote < 1):
            raise ValueError(f"accumulation promote must be an integer >= 1 or None (never), "
                             f"got {self.promote!r}")
        if self.mode == "aligned" and (self.format != "fp32" or self.chunk is not None):
            raise ValueError(f"accumulation mode 'aligned' models its own accumulator: "
                             f"format={self.format!r} and chunk={self.chunk!r} apply to mode "
                             f"'sequential' only (valid with 'aligned': format=fp32, chunk=none; "
                             f"set mantissa_bits, align, group, promote, across)")

    @property
    def is_fp32(self) -> bool:
        return self.mode == "sequential" and self.format == "fp32" and self.across == "fp32"

    def describe(self) -> str:
        """A short human-readable account, for error messages and reports."""
        if self.mode == "aligned":
            every = "never" if self.promote is None else f"every {self.promote}"
            return (f"aligned accumulator of {self.mantissa_bits + 1} significant bits "
                    f"({self.align}, groups of {self.group}), promoted to {self.across} {every}")
        chunk = "" if self.chunk is None else f" in chunks of {self.chunk}, {self.across} across"
        return f"sequential {self.format} accumulation{chunk}"


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

    def __post_init__(self):
        _choice(self.kind, ("none", "static", "dynamic"), "loss scale kind")
        floor = tuple(sorted((int(k), float(v)) for k, v in self.floor))
        object.__setattr__(self, "floor", floor)

    def build(self):
        """The loss scaler this configuration describes."""
        from .loss_scale import from_config  # recipe sits above loss_scale
        if self.kind == "none":
            return from_config("none")
        if self.kind == "static":
            return from_config("static", scale=self.init_scale)
        return from_config(
            "dynamic", init_scale=self.init_scale, growth_factor=self.growth_factor,
            backoff_factor=self.backoff_factor, growth_interval=self.growth_interval,
            hysteresis=self.hysteresis, min_scale=self.min_scale, max_scale=self.max_scale,
            floor=dict(self.floor) or None)


HADAMARD_SIGN_MODES = ("te", "fixed", "none")
# The tensor roles of each GEMM of a layer (what a Hadamard transform of that GEMM touches).
GEMM_OPERANDS = {"fprop": ("activation", "weight"), "dgrad": ("grad_output", "weight"),
                 "wgrad": ("grad_output", "activation")}


@dataclass(frozen=True)
class HadamardConfig:
    """Random Hadamard transforms per GEMM of a layer (0: none; else 16, 32, 64 or 128).

    ``fprop`` (y = x w^T), ``dgrad`` (dx = g w), ``wgrad`` (dw = g^T x): both operands
    of that GEMM are transformed along its reduction dimension with the same signs before
    they are block-quantized, and transformed back after (the product equals the GEMM of
    the transformed operands, up to float32 rounding). It applies to the block-scaled
    operands (a scheme or MX); a GEMM with none raises ValueError when the layer policy
    is built (:meth:`check_operands`).
    ``signs``: "fixed" (one draw from ``seed`` per transform size, for the whole run),
    "te" (TransformerEngine's fixed NVFP4 vector; size 16 only) or "none" (all +1). The
    sign fields come first, so the printed form sets them before the sizes they allow.
    """
    signs: str = "fixed"
    seed: int = 0
    fprop: int = 0
    dgrad: int = 0
    wgrad: int = 0

    def __post_init__(self):
        for gemm in ("fprop", "dgrad", "wgrad"):
            n = getattr(self, gemm)
            if n not in (0, 16, 32, 64, 128):
                raise ValueError(f"hadamard.{gemm} {n!r} not supported; valid choices: "
                                 "0, 16, 32, 64, 128")
            if self.signs == "te" and n not in (0, 16):
                raise ValueError(f"hadamard.signs 'te' is TransformerEngine's 16-entry vector; "
                                 f"hadamard.{gemm}={n} needs hadamard.signs=fixed or none "
                                 "(set it first)")
        _choice(self.signs, HADAMARD_SIGN_MODES, "hadamard.signs")

    def size(self, gemm: str) -> int:
        """The transform size of a GEMM ("fprop", "dgrad", "wgrad"; "" -> 0)."""
        return getattr(self, gemm) if gemm else 0

    def check_operands(self, specs: dict) -> None:
        """Raise ValueError when a GEMM has a transform but no block-scaled operand
        (``specs``: role name -> TensorSpec): the transform would change nothing."""
        block_scaled = (ScalingKind.MX, ScalingKind.BLOCK)
        for gemm, roles in GEMM_OPERANDS.items():
            if getattr(self, gemm) and not any(specs[r].scaling in block_scaled for r in roles):
                raise ValueError(f"hadamard.{gemm}={getattr(self, gemm)} would change nothing: "
                                 f"neither of its operands ({', '.join(roles)}) is block-scaled; "
                                 "give one a scheme or MX scaling, or set it to 0")


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
    hadamard: HadamardConfig = HadamardConfig()
    # module filters kept in `high_precision`: "first", "last", "norm", or fnmatch
    # patterns on qualified module names
    keep_high_precision: tuple = ()
    high_precision: str = "fp32"
    fp32_ops: tuple = DEFAULT_FP32_OPS
    backend: str = "auto"           # "auto" | "emulated" | "native"
    max_consecutive_skips: int = 50
    # "high_precision": matmul-like calls whose operands are all activations (attention's
    # Q K^T and P V, scaled_dot_product_attention) run in `high_precision`, as
    # TransformerEngine keeps attention out of its FP8/FP4 recipes
    attention: str = "quantized"
    # the bias gradient: "rounded" sums the rounded grad_output (as the weight GEMM sees
    # it), "hp" sums grad_output as it arrived (torchao, TransformerEngine)
    bias_grad: str = "rounded"

    def __post_init__(self):
        object.__setattr__(self, "high_precision", get_format(self.high_precision).name)
        _choice(self.backend, BACKENDS, "backend")
        _choice(self.attention, ATTENTION_MODES, "attention")
        _choice(self.bias_grad, BIAS_GRADS, "bias_grad")
        object.__setattr__(self, "keep_high_precision", tuple(self.keep_high_precision))
        object.__setattr__(self, "fp32_ops", tuple(self.fp32_ops))
        if self.max_consecutive_skips < 1:
            raise ValueError(f"max_consecutive_skips must be >= 1, got {self.max_consecutive_skips}")

    def spec(self, role: Union[Role, str]) -> Optional[TensorSpec]:
        """The TensorSpec of a role."""
        return getattr(self, _enum(Role, role, "role").value)

    def __str__(self) -> str:
        return format_recipe(self)

    def short_str(self) -> str:
        """A compact label for run names and plot legends."""
        overrides = _overrides(self)
        if not overrides:
            return self.name
        return self.name + "[" + ",".join(f"{_short_key(k)}={v}" for k, v in overrides) + "]"


BACKENDS = ("auto", "emulated", "native")
ATTENTION_MODES = ("quantized", "high_precision")
BIAS_GRADS = ("rounded", "hp")


# --------------------------------------------------------------------------------------
# Presets (names are part of the public interface)
# --------------------------------------------------------------------------------------
def _same(fmt: str, **kw) -> dict:
    """weight, activation, grad_output and weight_grad all in one format."""
    spec = TensorSpec(fmt, **kw)
    return dict(weight=spec, activation=spec, grad_output=spec, weight_grad=spec)


def _fwd_bwd(fwd: TensorSpec, bwd: TensorSpec) -> dict:
    return dict(weight=fwd, activation=fwd, grad_output=bwd, weight_grad=bwd)


_NEAREST, _STOCH = Rounding.NEAREST, Rounding.STOCHASTIC
_DYNAMIC = LossScaleConfig(kind="dynamic")
# Enhanced loss scaling (Mellempudi et al. 2019): dynamic scaling whose minimum rises
# during training so spurious FP8 overflows cannot drive the scale down.  The paper's
# threshold values are not public; this schedule is ours (2^0, then 2^4 after 2000
# steps, 2^8 after 4000) and is overridable with loss_scale.floor=...
_ENHANCED = LossScaleConfig(kind="dynamic", floor=((0, 1.0), (2000, 16.0), (4000, 256.0)))


# FP8 and MX recipes run their high-precision side in BF16, as TransformerEngine and
# torchao do: scaled layers write BF16 outputs, kept layers compute in BF16, and the GEMM
# operands are saved in FP8 (or MX) storage; only FP32 master weights stay FP32.
_HIGH = "bf16"


def _mx(fwd: str, bwd: str) -> Recipe:
    return Recipe(name=f"mxfp{get_format(fwd).bits}",
                  **_fwd_bwd(TensorSpec(fwd, scaling=ScalingKind.MX),
                             TensorSpec(bwd, scaling=ScalingKind.MX)),
                  high_precision=_HIGH)


PRESETS: dict = {r.name: r for r in [
    Recipe(name="fp32", master=None),
    Recipe(name="fp16-mixed", **_same("fp16"), loss_scale=_DYNAMIC),
    Recipe(name="bf16-mixed", **_same("bf16")),
    # "Pure" FP16: FP16 weights updated in place, no master copy. The optimizer's moments
    # stay FP32: in FP16, Adam's second moment (1 - beta2) * g^2 flushes to zero for
    # |g| below about 2^-7.5 and the step becomes exp_avg / eps.
    Recipe(name="fp16-pure", **_same("fp16"), master=None, loss_scale=_DYNAMIC),
    Recipe(name="fp8-e5m2",
           **_fwd_bwd(TensorSpec("e5m2", _NEAREST), TensorSpec("e5m2", _STOCH)),
           master=TensorSpec("fp16", _STOCH), loss_scale=_ENHANCED,
           keep_high_precision=("first", "last", "norm"), high_precision="fp16"),
    Recipe(name="fp8-hybrid",
           **_fwd_bwd(TensorSpec("e4m3", scaling=ScalingKind.CURRENT, saturate=True),
                      TensorSpec("e5m2", scaling=ScalingKind.CURRENT, saturate=True)),
           keep_high_precision=("first", "last", "norm"), high_precision=_HIGH),
    _mx("e4m3", "e5m2"),
    _mx("e3m2", "e3m2"),
    _mx("e2m1", "e2m1"),
]}

# NVFP4 as TransformerEngine's NVFP4BlockScaling recipe: E2M1 with E4M3 block scales and
# an FP32 tensor scale, 16x16 weight tiles, stochastic rounding of the output gradients,
# a 16-point RHT with TE's signs on the operands of the weight-gradient GEMM, dW in high
# precision, BF16 outside the FP4 GEMMs and in attention.
PRESETS["nvfp4"] = Recipe(
    name="nvfp4", weight=TensorSpec(scheme="nvfp4-2d"), activation=TensorSpec(scheme="nvfp4"),
    grad_output=TensorSpec(rounding=_STOCH, scheme="nvfp4"),
    hadamard=HadamardConfig(signs="te", wgrad=16), high_precision="bf16",
    attention="high_precision")


def list_presets() -> list:
    return list(PRESETS)


# --------------------------------------------------------------------------------------
# String grammar:  preset[:key=value[,key=value...]]
#   keys are dotted field paths (weight.format, grad_output.rounding, loss_scale.kind,
#   accumulation.chunk, scaling.margin, backend, ...); "role=fmt" is short for
#   "role.format=fmt"; "grads.X" sets grad_output.X and weight_grad.X; "master=none"
#   drops the master copy.  Tuples are '+'-separated ("first+last"); the loss-scale
#   floor is "step:value/step:value".  print(parse(s)) is canonical and parse(print(r))
#   == r.
# --------------------------------------------------------------------------------------
_ROLES = tuple(r.value for r in Role)
_SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(TensorSpec))
_NESTED = {"accumulation": AccumulationConfig, "loss_scale": LossScaleConfig,
           "scaling": ScalingConfig, "hadamard": HadamardConfig}
_TOP = ("keep_high_precision", "high_precision", "fp32_ops", "backend",
        "max_consecutive_skips", "attention", "bias_grad")
_ALIASES = {"grads": ("grad_output", "weight_grad"), "grad": ("grad_output", "weight_grad")}
_SHORT = {"weight": "w", "activation": "a", "grad_output": "go", "weight_grad": "wg",
          "master": "m", "optimizer_state": "os", "accumulation": "acc", "loss_scale": "ls",
          "scaling": "sc", "format": "", "rounding": "r", "scaling_kind": "s",
          "hadamard": "rht"}


def _valid_keys() -> list:
    keys = [f"{r}[.{'|'.join(_SPEC_FIELDS)}]" for r in _ROLES]
    keys += [f"{n}.{f.name}" for n, cls in _NESTED.items() for f in dataclasses.fields(cls)]
    return keys + list(_TOP) + ["grads.<field>"]


def _parse_bool(text: str) -> bool:
    low = text.lower()
    if low in ("true", "1", "yes", "on"):
        return True
    if low in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"expected a boolean (true/false), got {text!r}")


def _parse_optional(conv: Callable) -> Callable:
    return lambda text: None if text.lower() == "none" else conv(text)


def _parse_floor(text: str) -> tuple:
    if text.lower() in ("none", ""):
        return ()
    try:
        return tuple((int(k), float(v)) for k, v in (p.split(":") for p in text.split("/")))
    except ValueError:
        raise ValueError(f"loss_scale.floor must look like 'step:value/step:value', "
                         f"got {text!r}") from None


def _parse_tuple(text: str) -> tuple:
    return () if text.lower() in ("none", "") else tuple(text.split("+"))


def _converter(owner: type, name: str) -> Callable:
    """How the text of a value becomes a field value, from the field's default."""
    special = {"floor": _parse_floor, "min_scale": _parse_optional(float),
               "scheme": _parse_optional(str),
               "max_scale": _parse_optional(float), "chunk": _parse_optional(int),
               "promote": lambda t: None if t.lower() in ("none", "never") else int(t),
               "keep_high_precision": _parse_tuple, "fp32_ops": _parse_tuple}
    if name in special:
        return special[name]
    default = {f.name: f.default for f in dataclasses.fields(owner)}[name]
    if isinstance(default, bool):
        return _parse_bool
    if isinstance(default, enum.Enum) or isinstance(default, str):
        return str
    return type(default)


def _set_spec(recipe: Recipe, role: str, field_name: Optional[str], text: str) -> Recipe:
    if role == "master" and field_name is None and text.lower() == "none":
        return replace(recipe, master=None)
    field_name = field_name or "format"
    if field_name not in _SPEC_FIELDS:
        raise ValueError(f"unknown field {field_name!r} of {role}; valid: {', '.join(_SPEC_FIELDS)}")
    spec = getattr(recipe, role) or TensorSpec()
    if spec.scheme is not None and field_name in ("format", "scaling"):
        raise ValueError(f"{role}.{field_name} is set by {role}.scheme={spec.scheme}; set "
                         f"{role}.scheme=none first")
    if field_name == "scheme" and text.lower() == "none" and spec.scheme is not None:
        # leaving a scheme: back to the unscaled element format
        return replace(recipe, **{role: TensorSpec(spec.format, spec.rounding)})
    value = _converter(TensorSpec, field_name)(text)
    return replace(recipe, **{role: replace(spec, **{field_name: value})})


def _apply(recipe: Recipe, key: str, text: str) -> Recipe:
    head, _, tail = key.partition(".")
    if head in _ALIASES:
        for role in _ALIASES[head]:
            recipe = _apply(recipe, f"{role}.{tail}" if tail else role, text)
        return recipe
    if head in _ROLES:
        return _set_spec(recipe, head, tail or None, text)
    if head in _NESTED and tail:
        cls = _NESTED[head]
        if tail not in {f.name for f in dataclasses.fields(cls)}:
            raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(_valid_keys())}")
        return replace(recipe, **{head: replace(getattr(recipe, head),
                                                **{tail: _converter(cls, tail)(text)})})
    if head == "loss_scale" and not tail:
        return replace(recipe, loss_scale=replace(recipe.loss_scale, kind=text))
    if head in _TOP and not tail:
        return replace(recipe, **{head: _converter(Recipe, head)(text)})
    raise ValueError(f"unknown key {key!r}; valid keys: {', '.join(_valid_keys())}")


def parse_recipe(text: str) -> Recipe:
    """Parse ``preset[:key=value,...]`` into a Recipe (see the grammar above)."""
    name, _, rest = text.strip().partition(":")
    name = name.strip()
    if name not in PRESETS:
        raise ValueError(f"unknown recipe {name!r}; valid presets: {', '.join(PRESETS)} "
                         f"(optionally followed by ':key=value,...')")
    recipe = PRESETS[name]
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq:
            raise ValueError(f"override {item!r} in recipe {text!r} is not of the form key=value")
        try:
            recipe = _apply(recipe, key.strip(), value.strip())
        except (TypeError, ValueError) as exc:
            raise ValueError(f"bad override {item!r} in recipe {text!r}: {exc}") from None
    return recipe


def _text(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, tuple):
        if value and isinstance(value[0], tuple):   # the floor schedule
            return "/".join(f"{k}:{v!r}" for k, v in value)
        return "+".join(value) if value else "none"
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _overrides(recipe: Recipe) -> list:
    """(key, text) pairs that turn the recipe's preset into the recipe, in field order."""
    base = PRESETS[recipe.name]
    out = []
    for f in dataclasses.fields(Recipe):
        if f.name == "name":
            continue
        mine, theirs = getattr(recipe, f.name), getattr(base, f.name)
        if mine == theirs:
            continue
        if f.name in _ROLES:
            if mine is None:
                out.append((f.name, "none"))
                continue
            ref = theirs if theirs is not None else TensorSpec()
            if theirs is None:   # re-creating a dropped master: start from the default spec
                out.append((f.name, mine.format))
            if ref.scheme is not None and mine.scheme is None:
                out.append((f"{f.name}.scheme", "none"))      # leave the preset's scheme
                ref = TensorSpec(ref.format, ref.rounding)
            # a scheme sets format and scaling: print it first, and not them
            fields_ = (("scheme",) + tuple(sf for sf in _SPEC_FIELDS
                                           if sf not in ("scheme", "format", "scaling"))
                       if mine.scheme is not None else _SPEC_FIELDS)
            for sf in fields_:
                if getattr(mine, sf) != getattr(ref, sf) and not (theirs is None and sf == "format"):
                    out.append((f"{f.name}.{sf}", _text(getattr(mine, sf))))
        elif f.name in _NESTED:
            for sf in dataclasses.fields(_NESTED[f.name]):
                if getattr(mine, sf.name) != getattr(theirs, sf.name):
                    out.append((f"{f.name}.{sf.name}", _text(getattr(mine, sf.name))))
        else:
            out.append((f.name, _text(mine)))
    return out


def format_recipe(recipe: Recipe) -> str:
    """The canonical string of a recipe: its preset and the overrides, in field order."""
    if recipe.name not in PRESETS:
        raise ValueError(f"recipe name {recipe.name!r} is not a preset; valid: {', '.join(PRESETS)}")
    overrides = _overrides(recipe)
    return recipe.name + (":" + ",".join(f"{k}={v}" for k, v in overrides) if overrides else "")


def _short_key(key: str) -> str:
    return ".".join(filter(None, (_SHORT.get(p, p) for p in key.split("."))))


def get_recipe(recipe: Union[str, Recipe], **overrides) -> Recipe:
    """A Recipe from a preset name, a recipe string or a Recipe; keyword overrides use the
    same keys as the string grammar with '__' for '.' (grad_output__rounding="nearest")."""
    if isinstance(recipe, Recipe):
        out = recipe
    elif isinstance(recipe, str):
        out = parse_recipe(recipe)
    else:
        raise ValueError(f"recipe must be a preset name, a recipe string or a Recipe, got "
                         f"{recipe!r}; valid presets: {', '.join(PRESETS)}")
    for key, value in overrides.items():
        out = _apply(out, key.replace("__", "."), _text(value))
    return out
