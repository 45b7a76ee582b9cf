"""Layer precision policies, per-layer state, and the stack of active layers.

A :class:`LayerPolicy` says how one layer's tensors are rounded (one TensorSpec per role,
plus accumulation and scaling knobs). :func:`attach` gives every selected module of a
model a policy and a :class:`LayerState`; forward hooks push ``(name, policy, state)``
on a thread-local stack while the module runs, so the innermost running layer is
``current_layer()``. :class:`mixprec.emulate.PrecisionMode` reads that stack to decide
how each matmul-like op is emulated.

This module also holds the FP32-op policy: which torch callables the names of
``Recipe.fp32_ops`` denote, and the rule for the dtype of their results.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass, fields, replace
from typing import (Callable, Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple,
                    Union)

import torch
import torch.nn.functional as F
from torch import nn

from .distributed.fsdp import is_fsdp
from .recipe import (BIAS_GRADS, AccumulationConfig, HadamardConfig, Recipe, Role,
                     ScalingConfig, ScalingKind, TensorSpec, get_recipe)
from .scaling import DelayedScaling
from .recompute import run_recomputed

__all__ = ["LayerPolicy", "LayerState", "Layer", "AttachHandle", "attach", "current_layer",
           "owner_layer", "parameter_of",
           "resolve_fp32_ops", "run_fp32", "LOSS_OPS", "SCALAR_REDUCTIONS"]

LAYER_ROLES = (Role.WEIGHT, Role.ACTIVATION, Role.GRAD_OUTPUT, Role.WEIGHT_GRAD)
_DELAYED = ScalingKind.DELAYED
# dtypes a scaled layer can write its output in (LayerPolicy.scaled_output)
_SCALED_OUTPUT = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class LayerPolicy:
    """How one layer computes: a TensorSpec per tensor role, accumulation and scaling.

    ``round_output``: a layer whose activation spec is unscaled (``scaling="none"``) stores
    its output in that format ("accumulate in FP32, store FP16"): rounded, and held in
    the narrowest of float16 / bfloat16 / float32 containing every value of the format
    (float16 for fp16 and the OCP FP8, FP6 and FP4 formats, bfloat16 for bf16), so
    activations that other ops save for backward take 16 bits, as on the hardware. Scaled formats (per-tensor, MX) have no
    scale for the output and keep it in the input's dtype, as FP8 GEMMs write high
    precision. ``round_output=False``: every output in the input's dtype, unrounded.

    ``attention_format``: the format matmul-like calls whose operands are all activations
    run in (:meth:`for_activations_only`), None for the layer's own specs.

    ``bias_grad``: "rounded" sums the rounded grad_output into the bias gradient, "hp"
    sums grad_output as it arrived (:attr:`Recipe.bias_grad`).

    ``scaled_output``: where a scaled layer writes its output — "fp32" (the input's
    dtype, the default) or "fp16"/"bf16" (a real 16-bit tensor, nearest rounding: an FP8
    GEMM writing BF16 as on FP8 hardware). :meth:`from_recipe` takes it from
    ``recipe.high_precision``.
    """
    weight: TensorSpec = TensorSpec()
    activation: TensorSpec = TensorSpec()
    grad_output: TensorSpec = TensorSpec()
    weight_grad: TensorSpec = TensorSpec()
    accumulation: AccumulationConfig = AccumulationConfig()
    scaling: ScalingConfig = ScalingConfig()
    round_output: bool = True
    scaled_output: str = "fp32"
    hadamard: HadamardConfig = HadamardConfig()
    attention_format: Optional[str] = None
    bias_grad: str = "rounded"

    def __post_init__(self):
        if self.bias_grad not in BIAS_GRADS:
            raise ValueError(f"LayerPolicy.bias_grad {self.bias_grad!r} is not one of "
                             f"{', '.join(BIAS_GRADS)}")
        if self.scaled_output not in _SCALED_OUTPUT:
            raise ValueError(f"LayerPolicy.scaled_output {self.scaled_output!r} is not one of "
                             f"{', '.join(_SCALED_OUTPUT)}")
        for f in fields(self):
            value = getattr(self, f.name)
            expected = {"accumulation": AccumulationConfig, "scaling": ScalingConfig,
                        "round_output": bool, "scaled_output": str,
                        "hadamard": HadamardConfig,
                        "attention_format": (str, type(None)),
                        "bias_grad": str}.get(f.name, TensorSpec)
            if not isinstance(value, expected):
                raise ValueError(f"LayerPolicy.{f.name} must be a "
                                 f"{getattr(expected, '__name__', 'str or None')}, got {value!r}")
        self.hadamard.check_operands({r.value: getattr(self, r.value) for r in LAYER_ROLES})
        if self.attention_format is not None:
            _attention_policy(self.attention_format)   # built now, outside any traced forward
        if self.scaling.block_gemm == "scaled":
            self._check_scaled_block_gemm()

    def _check_scaled_block_gemm(self) -> None:
        """scaling.block_gemm="scaled" multiplies block elements and rescales by tensor
        amaxes: every GEMM operand must be a block scheme with a tensor scale, all with one
        block length, and the GEMM accumulates in FP32 in its own order."""
        from .blocks.scheme import get_scheme  # blocks sits beside policy
        sizes = set()
        for role in ("weight", "activation", "grad_output"):
            spec = getattr(self, role)
            scheme = get_scheme(spec.scheme) if spec.scheme is not None else None
            if scheme is None or not scheme.tensor_scale:
                raise ValueError(f"scaling.block_gemm='scaled' needs {role} to be a block scheme "
                                 f"with a tensor scale (e.g. {role}.scheme=nvfp4), got "
                                 f"{role}.scheme={spec.scheme}; or set scaling.block_gemm="
                                 "dequantized")
            sizes.add(scheme.block_size)
        if len(sizes) > 1:
            raise ValueError(f"scaling.block_gemm='scaled' needs one block length for weight, "
                             f"activation and grad_output, got {sorted(sizes)}")
        if not self.accumulation.is_fp32:
            raise ValueError("scaling.block_gemm='scaled' sums the block products in FP32 in its "
                             f"own order; accumulation must be fp32, got "
                             f"{self.accumulation.describe()}")

    @classmethod
    def from_recipe(cls, recipe: Union[Recipe, str], high_precision: bool = False) -> "LayerPolicy":
        """The policy a recipe gives its ordinary layers, or its high-precision layers.

        ``high_precision=True``: every role in ``recipe.high_precision`` with nearest
        rounding and no scaling, FP32 accumulation ("fp32" gives the identity policy).

        >>> LayerPolicy.from_recipe("fp16-mixed").weight.format
        'fp16'
        """
        if isinstance(recipe, str):
            recipe = get_recipe(recipe)
        if not isinstance(recipe, Recipe):
            raise ValueError(f"recipe must be a Recipe or a recipe string, got {recipe!r}")
        if high_precision:
            spec = TensorSpec(recipe.high_precision)
            # a kept layer's GEMMs have no block operands: they compute as usual
            scaling = replace(recipe.scaling, block_gemm="dequantized")
            return cls(spec, spec, spec, spec, AccumulationConfig(), scaling,
                       bias_grad=recipe.bias_grad)
        out = recipe.high_precision if recipe.high_precision in _SCALED_OUTPUT else "fp32"
        attention = recipe.high_precision if recipe.attention == "high_precision" else None
        return cls(recipe.weight, recipe.activation, recipe.grad_output, recipe.weight_grad,
                   recipe.accumulation, recipe.scaling, scaled_output=out,
                   hadamard=recipe.hadamard, attention_format=attention,
                   bias_grad=recipe.bias_grad)

    def for_activations_only(self) -> "LayerPolicy":
        """The policy of a matmul-like call whose operands are all activations (attention):
        every role in ``attention_format`` (nearest, unscaled, FP32 accumulation) when it
        is set (``Recipe.attention="high_precision"``), else this policy."""
        return self if self.attention_format is None else _attention_policy(self.attention_format)

    @property
    def is_identity(self) -> bool:
        """True when the layer computes exactly as plain FP32 PyTorch."""
        return (self.weight.is_identity and self.activation.is_identity
                and self.grad_output.is_identity and self.weight_grad.is_identity
                and self.accumulation.is_fp32)

    @property
    def has_delayed(self) -> bool:
        """True when some role uses delayed scaling (a LayerState keeps its amax history)."""
        return (self.weight.scaling is _DELAYED or self.activation.scaling is _DELAYED
                or self.grad_output.scaling is _DELAYED or self.weight_grad.scaling is _DELAYED)

    @property
    def scaled_output_dtype(self) -> Optional[torch.dtype]:
        """The 16-bit dtype a scaled layer (per-tensor or MX activations) writes its
        output in, or None (the input's dtype)."""
        if self.activation.scaling is ScalingKind.NONE or not self.round_output:
            return None
        return _SCALED_OUTPUT[self.scaled_output]

    @property
    def scaled_block_gemm(self) -> bool:
        """True when linear GEMMs run in TransformerEngine's NVFP4 reference order
        (``scaling.block_gemm="scaled"``; the constructor checks that weight, activation
        and grad_output are block schemes with a tensor scale)."""
        return self.scaling.block_gemm == "scaled"

    @property
    def rounds_output(self) -> bool:
        spec = self.activation
        return self.round_output and not spec.is_identity and spec.scaling is ScalingKind.NONE

    def spec(self, role: Union[Role, str]) -> TensorSpec:
        """The TensorSpec of a layer role (weight, activation, grad_output, weight_grad)."""
        value = role.value if isinstance(role, Role) else role
        if value not in {r.value for r in LAYER_ROLES}:
            raise ValueError(f"unknown layer role {value!r}; valid choices: "
                             f"{', '.join(r.value for r in LAYER_ROLES)}")
        return getattr(self, value)


IDENTITY = LayerPolicy()


_ATTENTION_POLICIES: Dict[str, LayerPolicy] = {}


def _attention_policy(fmt: str) -> LayerPolicy:
    """The all-``fmt`` policy of attention's matmuls, built once per format when a policy
    naming it is made: a forward traced by torch.compile then reads it from this table
    (constructing it inside the graph would break it: Dynamo cannot build the default
    AccumulationConfig)."""
    policy = _ATTENTION_POLICIES.get(fmt)
    if policy is None:
        spec = TensorSpec(fmt)
        policy = _ATTENTION_POLICIES[fmt] = LayerPolicy(spec, spec, spec, spec)
    return policy

Observer = Callable[[str, str, torch.Tensor], None]


class LayerState:
    """Mutable per-layer state: delayed-scaling objects and an optional observer.

    Delayed scalers are created on first use, one per tensor *key*: the role, suffixed
    with the operand ("activation.rhs" for the right operand of a matmul) and with the
    index of the emulated call within the layer's forward when a layer makes several
    ("weight#1"), so every distinct tensor keeps its own amax history.

    ``on_tensor(layer_name, role, tensor)`` -- if set -- sees every activation, weight,
    grad_output and weight_grad the layer's emulated ops receive, detached and before
    rounding. With ``on_tensor=None`` observing costs one attribute test.
    """

    def __init__(self, name: str = "", on_tensor: Optional[Observer] = None):
        self.name = name
        self.on_tensor = on_tensor
        self.scalers: Dict[str, DelayedScaling] = {}
        self._calls = 0

    def begin_forward(self) -> None:
        """Restart the count of emulated calls (done when the layer's forward starts)."""
        self._calls = 0

    def next_slot(self) -> int:
        """Index of the next emulated call in this forward."""
        slot = self._calls
        self._calls += 1
        return slot

    def scaler(self, key: str, spec: TensorSpec, cfg: ScalingConfig) -> Optional[DelayedScaling]:
        """The DelayedScaling of ``key`` when ``spec`` uses delayed scaling, else None."""
        if spec.scaling is not ScalingKind.DELAYED:
            return None
        scaler = self.scalers.get(key)
        if scaler is None:
            _create_scalers(self.scalers, ((key, spec),), cfg)
            scaler = self.scalers[key]
        return scaler

    def reserve(self, uses: Sequence[Tuple[str, TensorSpec]], cfg: ScalingConfig) -> None:
        """Create the DelayedScaling of every ``(key, spec)`` with a delayed spec that has
        none yet, bound to the spec's format.

        Emulated ops reserve every tensor they will round, the backward's included,
        before they run: under torch.compile a scaler must exist before the graph that
        updates it is traced (one made inside a traced forward cannot be updated by the
        compiled backward), so a scaler first met while compiling is made eagerly, at a
        graph break. :meth:`mixprec.engine.Engine.reserve_scalers` makes them all before
        the first trace."""
        missing = [(key, spec) for key, spec in uses
                   if spec.scaling is ScalingKind.DELAYED and key not in self.scalers]
        if missing:
            _create_scalers(self.scalers, missing, cfg)

    def observe(self, role: str, tensor: torch.Tensor) -> None:
        if self.on_tensor is not None:
            self.on_tensor(self.name, role, tensor.detach())

    def state_dict(self) -> dict:
        return {key: s.state_dict() for key, s in self.scalers.items()}

    def load_state_dict(self, state: dict) -> None:
        for key, sd in state.items():
            scaler = self.scalers.get(key)
            if scaler is None:
                scaler = self.scalers[key] = DelayedScaling(sd["history_len"], sd["algo"],
                                                            sd["margin"])
            scaler.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"LayerState(name={self.name!r}, scalers={sorted(self.scalers)})"


@torch.compiler.disable
def _create_scalers(table: Dict[str, DelayedScaling], uses, cfg: ScalingConfig) -> None:
    # Eager even under torch.compile: tensors made inside a graph and mutated by its
    # backward are rejected by AOT autograd ("was invalid, but is output").
    for key, spec in uses:
        table[key] = DelayedScaling.from_config(cfg, spec.format)


def scaler_key(role: str, slot: int = 0, operand: str = "") -> str:
    """Key of a tensor in LayerState.scalers: role[.operand][#slot]."""
    key = role + (f".{operand}" if operand else "")
    return key if slot == 0 else f"{key}#{slot}"


# --------------------------------------------------------------------------------------
# The stack of running layers
# --------------------------------------------------------------------------------------
class Layer(NamedTuple):
    """A module under a policy: ``params`` holds the ids of every parameter the module
    holds (recursively), for attributing an op to the module that owns its weight;
    ``kept``: the module was kept in high precision by a rule."""
    name: str
    policy: LayerPolicy
    state: LayerState
    params: frozenset = frozenset()
    kept: bool = False


_local = threading.local()


def _stack() -> List[Layer]:
    stack = getattr(_local, "stack", None)
    if stack is None:
        stack = _local.stack = []
    return stack


def current_layer() -> Optional[Layer]:
    """The innermost attached layer whose forward is running on this thread, or None."""
    stack = getattr(_local, "stack", None)
    return stack[-1] if stack else None


def parameter_of(t: object) -> Optional[nn.Parameter]:
    """``t`` itself when it is an nn.Parameter, the Parameter it is a view of (``w.t()``,
    ``w.T``, ``w.view(...)``), else None."""
    if isinstance(t, nn.Parameter):
        return t
    base = getattr(t, "_base", None) if isinstance(t, torch.Tensor) else None
    return base if isinstance(base, nn.Parameter) else None


def owner_layer(weight: Optional[torch.Tensor]) -> Optional[Layer]:
    """The layer an op on ``weight`` is attributed to: the innermost running attached
    layer that holds the Parameter (``parameter_of(weight)``), else the innermost running
    layer, else None."""
    stack = getattr(_local, "stack", None)
    if not stack:
        return None
    param = parameter_of(weight)
    if param is not None:
        key = id(param)
        for layer in reversed(stack):
            if key in layer.params:
                return layer
    return stack[-1]


class AttachHandle:
    """What :func:`attach` returns: ``states`` (name -> LayerState), ``policies``
    (name -> LayerPolicy), ``remove()``, and a checkpointable ``state_dict()``."""

    def __init__(self):
        self.states: Dict[str, LayerState] = {}
        self.policies: Dict[str, LayerPolicy] = {}
        self._hooks: list = []

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def set_observer(self, on_tensor: Optional[Observer]) -> None:
        """Give every attached layer the same observer (None switches it off)."""
        for state in self.states.values():
            state.on_tensor = on_tensor

    def state_dict(self) -> dict:
        return {name: s.state_dict() for name, s in self.states.items() if s.scalers}

    def load_state_dict(self, state: dict) -> None:
        unknown = sorted(set(state) - set(self.states))
        if unknown:
            raise ValueError(f"layer states for unknown layers {unknown}; attached layers: "
                             f"{sorted(self.states)}")
        for name, sd in state.items():
            self.states[name].load_state_dict(sd)

    def __enter__(self) -> "AttachHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def attach(model: nn.Module,
           policy_for: Callable[[str, nn.Module], Optional[LayerPolicy]], *,
           kept: Iterable[str] = ()) -> AttachHandle:
    """Give the modules of ``model`` precision policies.

    ``policy_for(qualified_name, module)`` is asked once per module (the root is named
    ""); modules it gives a LayerPolicy get forward hooks that push
    ``(name, policy, state)`` while they run (popped also when forward raises). Ops run
    under :class:`~mixprec.emulate.PrecisionMode` use the policy of the layer that owns
    their weight operand (:func:`owner_layer`). Modules named in ``kept`` are reported
    as "kept by a rule" in the coverage report (:mod:`mixprec.coverage`).

    >>> handle = attach(model, lambda name, m: policy if isinstance(m, nn.Linear) else None)
    >>> handle.remove()
    """
    handle = AttachHandle()
    kept = frozenset(kept)
    # FSDP2 registers all-gathered parameters for a forward and sharded ones outside it:
    # the ids that attribute an op to its layer are then taken as the forward starts
    live = is_fsdp(model)
    for name, module in model.named_modules():
        policy = policy_for(name, module)
        if policy is None:
            continue
        if not isinstance(policy, LayerPolicy):
            raise ValueError(f"policy_for({name!r}, ...) returned {policy!r}; expected a "
                             f"LayerPolicy or None")
        state = LayerState(name)
        layer = Layer(name, policy, state, frozenset(id(p) for p in module.parameters()),
                      name in kept)
        handle.states[name], handle.policies[name] = state, policy
        handle._hooks.append(module.register_forward_pre_hook(_push_hook(layer, live)))
        handle._hooks.append(module.register_forward_hook(_pop_hook(layer), always_call=True))
    return handle


def _push_hook(layer: Layer, live: bool = False):
    def push(module, args):
        layer.state.begin_forward()
        running = layer
        if live:
            running = layer._replace(params=frozenset(id(p) for p in module.parameters()))
        _stack().append(running)
    return push


def _pop_hook(layer: Layer):
    # a layer on the stack is this one when it has the same state (the pushed tuple may
    # hold the parameter ids of this forward)
    def pop(module, args, output):
        stack = _stack()
        if stack and stack[-1].state is layer.state:
            stack.pop()
            return
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].state is layer.state:   # an inner forward raised before its hook ran
                del stack[i:]
                return
    return pop


# --------------------------------------------------------------------------------------
# FP32 ops
# --------------------------------------------------------------------------------------
# Results of these stay float32 whatever the input dtype (what CUDA autocast does for
# losses): a loss is a sum of many terms and the optimizer divides it by the loss scale.
LOSS_OPS = frozenset({
    "cross_entropy", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss",
    "kl_div", "binary_cross_entropy", "binary_cross_entropy_with_logits",
    "poisson_nll_loss", "gaussian_nll_loss", "ctc_loss", "soft_margin_loss",
    "multilabel_soft_margin_loss", "margin_ranking_loss", "hinge_embedding_loss",
    "cosine_embedding_loss", "triplet_margin_loss", "multi_margin_loss",
    "multilabel_margin_loss",
})
# Reductions whose 0-d results stay float32 (a scalar is usually a loss or a statistic).
SCALAR_REDUCTIONS = frozenset({
    "sum", "mean", "norm", "var", "std", "logsumexp", "prod", "nansum", "nanmean",
    "vector_norm", "amax", "amin",
})

# Ops that update their running-statistics arguments in place.
_UPDATES_STATS = frozenset({"batch_norm", "instance_norm"})

_NAMESPACES = (torch, F, torch.Tensor, torch.special, torch.linalg)
# Operator spellings that reach __torch_function__ as dunder methods.
_DUNDERS = {"pow": ("__pow__", "__rpow__")}


def resolve_fp32_ops(names: Iterable[str]) -> Dict[Callable, str]:
    """Map each name to the torch callables it denotes: ``torch.<name>``,
    ``torch.nn.functional.<name>``, ``Tensor.<name>`` (``x.<name>()``), ``torch.special``
    and ``torch.linalg`` functions of that name, and operators (``**`` for "pow").
    Returns {callable: name}; a name that denotes nothing raises ValueError."""
    table: Dict[Callable, str] = {}
    for name in names:
        if not isinstance(name, str) or not name:
            raise ValueError(f"fp32_ops entries must be op names, got {name!r}")
        found = [getattr(ns, name) for ns in _NAMESPACES if callable(getattr(ns, name, None))]
        found += [getattr(torch.Tensor, d) for d in _DUNDERS.get(name, ())]
        if not found:
            raise ValueError(f"unknown FP32 op {name!r}; valid choices: names of functions in "
                             f"torch, torch.nn.functional, torch.special, torch.linalg or of "
                             f"Tensor methods (e.g. softmax, layer_norm, cross_entropy, sum)")
        for fn in found:
            table[fn] = name
    return table


def _floating(values) -> list:
    out = []
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point():
                out.append(v)
        elif type(v) in (list, tuple):
            out.extend(_floating(v))
    return out


def _cast_result(out, dtype: torch.dtype):
    if isinstance(out, torch.Tensor):
        return out.to(dtype) if out.dtype == torch.float32 else out
    if type(out) in (list, tuple):
        return type(out)(_cast_result(o, dtype) for o in out)
    return out


def _keeps_fp32(name: str, out, kwargs: dict) -> bool:
    if name in LOSS_OPS or kwargs.get("dtype") is not None:
        return True
    return name in SCALAR_REDUCTIONS and isinstance(out, torch.Tensor) and out.dim() == 0


def _without_autocast(device_types: list, func: Callable, args: tuple, kwargs: dict):
    """func(*args, **kwargs) with autocast off on ``device_types`` (plain ``with``
    statements for the usual single device, which torch.compile traces)."""
    if not device_types:
        return func(*args, **kwargs)
    with torch.autocast(device_types[0], enabled=False):
        return _without_autocast(device_types[1:], func, args, kwargs)


def run_fp32(func: Callable, name: str, args: tuple, kwargs: dict):
    """Run ``func`` (the op called ``name``) in FP32, identically on every device.

    Rule: floating inputs narrower than float32 are upcast to float32, and the op runs
    with autocast disabled on the device types of its inputs (CPU autocast would leave
    softmax, layer_norm and sum in bf16; CUDA autocast forces FP32: we do the latter
    everywhere). Results are cast back to the widest floating input dtype, except that
    losses, reductions to a 0-d scalar and calls with an explicit ``dtype=`` keep the
    op's own dtype (float32); softmax and the normalisations return their input's dtype
    and save only 16-bit tensors for backward (:mod:`mixprec.recompute`). Inputs the op
    updates in place (batch-norm running statistics) are written back to the caller's
    tensors. Without narrow inputs or active autocast the op is called as is.
    """
    tensors = _floating(args) + _floating(kwargs.values())
    autocasting = {t.device.type for t in tensors if torch.is_autocast_enabled(t.device.type)}
    narrow = [t for t in tensors if t.dtype.itemsize < 4]
    if (not narrow and not autocasting) or "out" in kwargs:
        return func(*args, **kwargs)
    if narrow:
        out = run_recomputed(func, name, args, kwargs)   # saves 16-bit tensors, not FP32
        if out is not None:
            return out
    widest = functools.reduce(torch.promote_types, (t.dtype for t in tensors))
    copies: list = []

    def up(v):
        if isinstance(v, torch.Tensor):
            if v.is_floating_point() and v.dtype.itemsize < 4:
                c = v.to(torch.float32)
                # an inference tensor has no version counter: None, compared by op only
                copies.append((v, c, None if torch.compiler.is_compiling() or c.is_inference()
                               else c._version))
                return c
            return v
        if type(v) in (list, tuple):
            return type(v)(up(i) for i in v)
        return v

    up_args = tuple(up(a) for a in args)
    up_kwargs = {k: up(v) for k, v in kwargs.items()}
    out = _without_autocast(sorted(autocasting), func, up_args, up_kwargs)
    compiling = torch.compiler.is_compiling()
    for orig, copy, version in copies:
        # batch-norm kernels update running statistics without bumping version counters;
        # a traced graph has no version counters to compare (fp32 ops mutate nothing else)
        changed = not compiling and version is not None and copy._version != version
        if changed or (name in _UPDATES_STATS and not orig.requires_grad):
            with torch.no_grad():
                orig.copy_(copy)
    if _keeps_fp32(name, out, kwargs):
        return out
    return _cast_result(out, widest)
