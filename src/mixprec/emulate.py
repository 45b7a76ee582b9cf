"""Emulated reduced-precision layers: what low-precision hardware computes, on any device.

Public functions ``qlinear``, ``qconv``, ``qmatmul``, ``qembedding`` and
``qscaled_dot_product_attention`` compute their torch counterparts under a
:class:`~mixprec.policy.LayerPolicy` (rules in :mod:`mixprec.qfunc`).
:class:`PrecisionMode` routes a model's own calls of those ops to them, with the policy
of the layer registered by :func:`~mixprec.policy.attach` that owns the weight operand,
through the one dispatch function of :mod:`mixprec.dispatch` (which also emulates
addmm / baddbmm / addbmm / mv / addmv, tensordot, einsum, conv-transpose, bilinear and
embedding_bag), and runs the recipe's FP32 ops in FP32
(:func:`~mixprec.policy.run_fp32`), the same on every device.

>>> handle = attach(model, lambda name, m: LayerPolicy.from_recipe("fp8-e5m2"))
>>> with PrecisionMode():
...     loss = F.cross_entropy(model(x), y)
"""
from __future__ import annotations

import math
import sys
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .policy import (AttachHandle, Layer, LayerPolicy, LayerState, attach, current_layer,
                     resolve_fp32_ops, run_fp32, scaler_key)
from .formats import get_format
from .blocks import SignStream
from .qfunc import (_ACTIVATIONS, CONV_FUNCS, GemmSpec, OpContext, QBilinear, QConv,
                    QConvTranspose, QEmbedding, QEmbeddingBag, QLinear, QMatmul,
                    _native_gemms)
from .coverage import OUTSIDE, CoverageRecorder
from .recipe import DEFAULT_FP32_OPS
from .shared import relu as _shared_relu
from .shared import tag_output

__all__ = ["LayerPolicy", "LayerState", "AttachHandle", "attach", "current_layer",
           "qlinear", "qconv", "qmatmul", "qembedding", "qscaled_dot_product_attention",
           "PrecisionMode", "SharedScalerWarning", "outside_layer", "run_fp32"]


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------
def _needs(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _check_policy(policy: Any) -> LayerPolicy:
    if not isinstance(policy, LayerPolicy):
        raise ValueError(f"policy must be a LayerPolicy, got {policy!r}")
    return policy


# Delayed scalers are reserved before each op runs (OpContext.reserve): the roles it
# rounds in forward, grad_output when backward will run, a weight_grad per operand.
_XW = (("activation", ""), ("weight", ""))


def _wgrads(need_w: bool, need_b: bool) -> tuple:
    return ("",) * need_w + ("bias",) * need_b


def _tagged(y: torch.Tensor, c: OpContext) -> torch.Tensor:
    """Tag an output rounded to the activation format with that format (mixprec.shared)."""
    if c.policy.rounds_output:
        tag_output(y, get_format(c.policy.activation.format))
    return y


def _linear(x, weight, bias, c: OpContext) -> torch.Tensor:
    need_x, need_w, need_b = _needs(x), _needs(weight), _needs(bias)
    c.reserve(_XW, need_x or need_w or need_b, _wgrads(need_w, need_b))
    if torch.compiler.is_compiling():
        gemms = _native_gemms(c)
        if gemms is not None:
            # counted here, outside the autograd.Function (see ScaledMMGemms.trace_linear)
            gemms.trace_linear(c.state.name if c.state is not None else "", c.policy,
                               x.shape, weight.shape[0], need_x, need_w)
    return _tagged(QLinear.apply(x, weight, bias, c, need_x, need_w), c)


def qlinear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            policy: LayerPolicy, state: Optional[LayerState] = None,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` as hardware of ``policy``'s formats computes it.

    >>> y = qlinear(x, w, b, LayerPolicy.from_recipe("fp16-mixed"))
    """
    if _check_policy(policy).is_identity:
        return F.linear(x, weight, bias)
    return _linear(x, weight, bias, OpContext(policy, state, generator, 0))


def _conv_padding(padding, weight, stride, dilation, nd: int):
    """Integer padding for 'valid'/'same', plus the extra right padding 'same' needs when
    the total d * (k - 1) is odd (torch puts the odd element at the end)."""
    if not isinstance(padding, str):
        return padding, None
    if padding == "valid":
        return 0, None
    if padding != "same":
        raise ValueError(f"unknown padding {padding!r}; valid choices: 'valid', 'same', "
                         f"or integers")
    strides = [stride] * nd if isinstance(stride, int) else list(stride)
    if any(s != 1 for s in strides):
        raise ValueError(f"padding='same' needs stride 1, got stride={stride!r}")
    dil = [dilation] * nd if isinstance(dilation, int) else list(dilation)
    total = [d * (k - 1) for d, k in zip(dil, weight.shape[2:])]
    extra = [t % 2 for t in total]
    pad = None
    if any(extra):
        pad = [p for e in reversed(extra) for p in (0, e)]
    return tuple(t // 2 for t in total), pad


def _conv(x, weight, bias, stride, padding, dilation, groups, c: OpContext) -> torch.Tensor:
    nd = weight.dim() - 2
    if nd not in CONV_FUNCS:
        raise ValueError(f"qconv supports 1-, 2- and 3-d convolutions; got a weight of "
                         f"shape {tuple(weight.shape)}")
    acc = c.policy.accumulation
    if not acc.is_fp32:
        raise ValueError(f"emulated accumulation ({acc.describe()}) is implemented for "
                         f"linear and matmul only; "
                         f"convolutions accumulate in FP32 (valid: accumulation.mode=sequential, "
                         f"accumulation.format=fp32)")
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    padding, extra = _conv_padding(padding, weight, stride, dilation, nd)
    if extra is not None:
        x = F.pad(x, extra)
    need_x, need_w, need_b = _needs(x), _needs(weight), _needs(bias)
    c.reserve(_XW, need_x or need_w or need_b, _wgrads(need_w, need_b))
    y = QConv.apply(x, weight, bias, (stride, padding, dilation, groups), c, need_x, need_w)
    return _tagged(y.squeeze(0) if unbatched else y, c)


def qconv(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
          stride, padding, dilation, groups: int, policy: LayerPolicy,
          state: Optional[LayerState] = None,
          generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``F.conv1d/conv2d/conv3d`` (chosen by weight.dim()) under ``policy``; any stride,
    padding (ints, 'valid', 'same'), dilation and groups. FP32 accumulation only."""
    if _check_policy(policy).is_identity:
        return CONV_FUNCS[weight.dim() - 2](x, weight, bias, stride, padding, dilation, groups)
    return _conv(x, weight, bias, stride, padding, dilation, groups,
                 OpContext(policy, state, generator, 0))


def _matmul(a, b, c: OpContext, spec: GemmSpec = _ACTIVATIONS, addend=None) -> torch.Tensor:
    """alpha * (a @ b) + beta * addend with torch.matmul's 1-D rules: a vector operand
    gets a unit dimension for the product, removed from the result."""
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"matmul needs tensors of at least 1 dimension, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    if addend is not None and spec.beta == 0.0:
        addend = None    # torch ignores the input when beta == 0 (NaN and inf included)
    if addend is not None and vec_b and addend.dim() >= 1:
        addend = addend.unsqueeze(-1)
    (ra, rb), need_a, need_b, need_add = spec.roles, _needs(a), _needs(b), _needs(addend)
    c.reserve(((ra, ""), (rb, "rhs" if ra == rb else "")), need_a or need_b or need_add,
              ("",) * (need_a and ra == "weight")
              + (("rhs" if ra == "weight" else ""),) * (need_b and rb == "weight")
              + ("bias",) * (need_add and spec.addend_param))
    y = QMatmul.apply(a.unsqueeze(0) if vec_a else a, b.unsqueeze(-1) if vec_b else b,
                      addend, c, spec, need_a, need_b)
    if vec_b:
        y = y.squeeze(-1)
    return _tagged(y.squeeze(-1 if vec_b else -2) if vec_a else y, c)


def qmatmul(a: torch.Tensor, b: torch.Tensor, policy: LayerPolicy,
            state: Optional[LayerState] = None,
            generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """``torch.matmul(a, b)`` (1-D, 2-D, batched, broadcast) under ``policy``; both
    operands are rounded as activations, their gradients come from rounded grad_output."""
    if _check_policy(policy).is_identity:
        return torch.matmul(a, b)
    return _matmul(a, b, OpContext(policy, state, generator, 0))


def _conv_transpose(x, weight, bias, stride, padding, output_padding, groups, dilation,
                    c: OpContext) -> torch.Tensor:
    nd = weight.dim() - 2
    if nd not in CONV_FUNCS:
        raise ValueError(f"conv_transpose supports 1-, 2- and 3-d convolutions; got a "
                         f"weight of shape {tuple(weight.shape)}")
    if not c.policy.accumulation.is_fp32:
        raise ValueError(f"emulated accumulation ({c.policy.accumulation.describe()}) "
                         f"is implemented for linear and matmul only; transposed "
                         f"convolutions accumulate in FP32 (valid: accumulation.mode=sequential, "
                         f"accumulation.format=fp32)")
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    need_x, need_w, need_b = _needs(x), _needs(weight), _needs(bias)
    c.reserve(_XW, need_x or need_w or need_b, _wgrads(need_w, need_b))
    y = QConvTranspose.apply(x, weight, bias, (stride, padding, output_padding, groups, dilation),
                             c, need_x, need_w)
    return _tagged(y.squeeze(0) if unbatched else y, c)


def _bilinear(x1, x2, weight, bias, c: OpContext) -> torch.Tensor:
    lead = x1.shape[:-1]
    needs = (_needs(x1), _needs(x2), _needs(weight))
    need_b = _needs(bias)
    c.reserve((("activation", ""), ("activation", "rhs"), ("weight", "")),
              any(needs) or need_b, _wgrads(needs[2], need_b))
    y = QBilinear.apply(x1.reshape(-1, x1.shape[-1]), x2.reshape(-1, x2.shape[-1]), weight,
                        bias, c, needs)
    return _tagged(y.reshape(*lead, weight.shape[0]), c)


def _embedding_bag(indices, weight, offsets, max_norm, norm_type, scale_grad_by_freq, mode,
                   sparse, per_sample_weights, include_last_offset, padding_idx,
                   c: OpContext) -> torch.Tensor:
    if sparse:
        raise ValueError("sparse=True is not supported by the emulated embedding_bag "
                         "(valid: sparse=False)")
    if max_norm is not None:   # F.embedding_bag renormalizes the looked-up rows in place
        with torch.no_grad():
            torch.embedding_renorm_(weight, indices.contiguous(), max_norm, norm_type)
    options = (scale_grad_by_freq, mode, include_last_offset, padding_idx)
    need_w = _needs(weight)
    c.reserve((("activation", ""),), need_w or _needs(per_sample_weights), _wgrads(need_w, False))
    return QEmbeddingBag.apply(indices, weight, offsets, per_sample_weights, options, c)


def _embedding(indices, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
               sparse, c: OpContext) -> torch.Tensor:
    if sparse:
        raise ValueError("sparse=True is not supported by the emulated embedding "
                         "(valid: sparse=False)")
    n = weight.shape[0]
    if padding_idx is None:
        padding_idx = -1
    else:
        if not -n <= padding_idx < n:
            raise ValueError(f"padding_idx {padding_idx} out of range [{-n}, {n})")
        padding_idx = padding_idx % n
    if max_norm is not None:   # F.embedding renormalizes the looked-up rows in place
        with torch.no_grad():
            torch.embedding_renorm_(weight, indices.contiguous(), max_norm, norm_type)
    need_w = _needs(weight)
    c.reserve((("activation", ""),), need_w, _wgrads(need_w, False))
    return QEmbedding.apply(indices, weight, padding_idx, scale_grad_by_freq, c)


def qembedding(indices: torch.Tensor, weight: torch.Tensor, policy: LayerPolicy,
               state: Optional[LayerState] = None, generator: Optional[torch.Generator] = None,
               *, padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
               norm_type: float = 2.0, scale_grad_by_freq: bool = False,
               sparse: bool = False) -> torch.Tensor:
    """``F.embedding``: the lookup is exact, the output is rounded as an activation and
    the (dense) weight gradient, built from the rounded grad_output, as a weight_grad."""
    if _check_policy(policy).is_identity:
        return F.embedding(indices, weight, padding_idx, max_norm, norm_type,
                           scale_grad_by_freq, sparse)
    return _embedding(indices, weight, padding_idx, max_norm, norm_type, scale_grad_by_freq,
                      sparse, OpContext(policy, state, generator, 0))


def _sdpa(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa,
          c_scores: OpContext, c_out: OpContext) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v with both products emulated, scores in FP32."""
    if is_causal and attn_mask is not None:
        raise ValueError("scaled_dot_product_attention: give either attn_mask or "
                         "is_causal=True, not both")
    if enable_gqa and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = _matmul(q, k.transpose(-2, -1), c_scores).to(torch.float32) * scale
    L, S = q.size(-2), k.size(-2)
    if is_causal:
        attn_mask = torch.ones(L, S, dtype=torch.bool, device=q.device).tril()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    attn = run_fp32(torch.softmax, "softmax", (scores, -1), {})
    if dropout_p > 0.0:
        attn = F.dropout(attn, dropout_p, training=True)
    out = _matmul(attn, v, c_out)   # the FP32 probabilities are rounded once, per policy
    keep = c_out.policy.rounds_output or c_out.policy.scaled_output_dtype is not None
    return out if keep else out.to(q.dtype)


def qscaled_dot_product_attention(query, key, value, policy: LayerPolicy,
                                  state: Optional[LayerState] = None,
                                  generator: Optional[torch.Generator] = None, *,
                                  attn_mask=None, dropout_p: float = 0.0,
                                  is_causal: bool = False, scale: Optional[float] = None,
                                  enable_gqa: bool = False) -> torch.Tensor:
    """``F.scaled_dot_product_attention`` decomposed as qmatmul, FP32 softmax, qmatmul."""
    if _check_policy(policy).is_identity:
        return F.scaled_dot_product_attention(query, key, value, attn_mask, dropout_p,
                                              is_causal, scale=scale, enable_gqa=enable_gqa)
    return _sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                 OpContext(policy, state, generator, 0), OpContext(policy, state, generator, 1))


# --------------------------------------------------------------------------------------
# PrecisionMode
# --------------------------------------------------------------------------------------
# Non-in-place ReLU spellings: run as mixprec.shared.QReLU on tagged activations.
_RELUS = (F.relu, torch.relu, torch.Tensor.relu)


def _route_relu(args: tuple, kwargs: dict):
    if len(args) > 2 or any(k not in ("input", "inplace") for k in kwargs):
        return None
    x = args[0] if args else kwargs.get("input")
    inplace = args[1] if len(args) > 1 else kwargs.get("inplace", False)
    if inplace or not isinstance(x, torch.Tensor):
        return None
    return _shared_relu(x)



def _replay_codes() -> frozenset:
    """Code objects of ``torch.ops.higher_order.autograd_function_apply``'s eager
    implementation (its inner autograd.Function's forward and backward), which run the
    graphs Dynamo traced from an autograd.Function.

    Why: Dynamo traces an emulated layer's autograd.Function with this mode inlined, so
    its graph already holds the emulated ops; a backend that replays those graphs as
    torch calls (``backend="eager"``, ``torch._dynamo.explain``) runs them while the
    mode is still on the stack, and emulating them again would round twice."""
    try:
        from torch._functorch.autograd_function import AutogradFunctionApply
    except ImportError:              # a torch without the operator: nothing to recognise
        return frozenset()
    found, todo = set(), list(AutogradFunctionApply.__call__.__code__.co_consts)
    while todo:
        c = todo.pop()
        if hasattr(c, "co_consts"):
            if c.co_name in ("forward", "backward"):
                found.add(c)
            todo.extend(c.co_consts)
    return frozenset(found)


_REPLAY_CODES = _replay_codes()
# Frames between __torch_function__ and the replaying forward: the FX interpreter's
# run / run_node / call_function, then at most torch's Python wrappers (F.relu,
# handle_torch_function, an operator packet's __call__).
_REPLAY_DEPTH = 10


def _replayed() -> bool:
    """Whether the intercepted call comes from a replayed Dynamo graph of an
    autograd.Function (see :func:`_replay_codes`): its ops were emulated when traced."""
    if not _REPLAY_CODES:
        return False
    frame = sys._getframe(2)
    for _ in range(_REPLAY_DEPTH):
        if frame is None:
            return False
        if frame.f_code in _REPLAY_CODES:
            return True
        frame = frame.f_back
    return False


# Every scaler key an emulated op can use at slot 0 (OpContext.reserve, OpContext.round):
# the forward operands (the right one suffixed "rhs" when both have one role: matmul,
# bilinear), grad_output, and a weight_grad per weight operand ("rhs" for the second
# weight of a matmul of two weights, "bias" for a bias or a parameter addend).
_ONE_SLOT_KEYS = (("activation", ""), ("activation", "rhs"), ("weight", ""), ("weight", "rhs"),
                  ("grad_output", ""), ("weight_grad", ""), ("weight_grad", "rhs"),
                  ("weight_grad", "bias"))


class SharedScalerWarning(UserWarning):
    """Several matmul-like calls outside every attached module rounded with delayed
    scaling under one :class:`PrecisionMode`: they share one scaler per role."""


class _OneSlotState(LayerState):
    """State for ops outside every attached layer: one scaler per role, shared by them
    all (there is no forward boundary at which to restart a per-call count). ``delayed``:
    the policy scales some tensor by delayed scaling; a second call under one
    PrecisionMode (counted from :meth:`begin_forward`, which the mode calls) then warns
    once, with :class:`SharedScalerWarning`: the calls put their amaxes into one history
    and each uses the scale the one before it left."""

    def __init__(self, name: str = "", delayed: bool = False):
        super().__init__(name)
        self.delayed = delayed
        self._warned = False

    def next_slot(self) -> int:
        if self.delayed and not self._warned and not torch.compiler.is_compiling():
            self._calls += 1
            if self._calls > 1:
                self._warned = True
                warnings.warn(
                    "several matmul-like calls outside every attached module round with "
                    "delayed scaling under one autocast(): they share one delayed scaler "
                    "per role, so their amaxes go into one history and each call uses the "
                    "scale the call before it left. Make these calls inside a module of "
                    "the model (each attached module keeps its own scalers), or use a "
                    "recipe with current scaling", SharedScalerWarning, stacklevel=2)
        return 0

    def reserve_all(self, policy: LayerPolicy) -> None:
        """Make the delayed scaler of every key an outside call of ``policy`` can round
        (:data:`_ONE_SLOT_KEYS`; activations-only calls use
        ``policy.for_activations_only()``), so that none is first made while
        torch.compile traces the call. Scalers that exist are left as they are."""
        act = policy.for_activations_only()
        for p in (policy,) if act is policy else (policy, act):
            if p.has_delayed:
                self.reserve([(scaler_key(role, 0, operand), getattr(p, role))
                              for role, operand in _ONE_SLOT_KEYS], p.scaling)


def outside_layer(policy: LayerPolicy) -> Layer:
    """A Layer for matmul-like calls outside every attached module under ``policy``:
    named :data:`mixprec.coverage.OUTSIDE`, with one delayed scaler per tensor key shared
    by all such calls. Give it to :class:`PrecisionMode` (``default_layer=``) each time
    one is entered, so the scalers keep their amax histories from one step to the next
    (:meth:`mixprec.engine.Engine.autocast` does).

    >>> layer = outside_layer(LayerPolicy.from_recipe("te-delayed"))
    >>> with PrecisionMode(default_layer=layer):
    ...     y = x @ w
    """
    policy = _check_policy(policy)
    delayed = policy.has_delayed or policy.for_activations_only().has_delayed
    return Layer(OUTSIDE, policy, _OneSlotState(OUTSIDE, delayed))


class PrecisionMode(TorchFunctionMode):
    """While active, matmul-like ops are emulated and ``fp32_ops`` run in FP32.

    Every matmul-like call goes through :func:`mixprec.dispatch.dispatch`: F.linear,
    addmm / mm / bmm / baddbmm / addbmm / matmul / ``@`` / mv / addmv, tensordot and
    einsum contractions, conv and conv-transpose 1/2/3d, F.bilinear, embedding and
    embedding_bag, and F.scaled_dot_product_attention (qmatmul, FP32 softmax, qmatmul),
    in function and Tensor-method spellings. Each uses the policy of the layer that
    owns its weight operand (:func:`mixprec.policy.owner_layer`; registered by
    :func:`attach`), else ``default_policy``; with no policy or the identity policy the
    plain op runs in the widest dtype of its operands. Calls outside every attached
    layer keep their delayed scalers in ``default_layer`` (made by :func:`outside_layer`;
    its policy is then the default policy): pass the same one to every PrecisionMode of
    a training run, as the engine does. Without it each PrecisionMode makes a fresh one
    for ``default_policy``, whose amax histories start empty. ``recorder`` (a
    :class:`mixprec.coverage.CoverageRecorder`, default a new one) counts what each call
    did; ``strict=True`` makes an unrecognised call raise instead of warning.
    Ops named in ``fp32_ops`` follow :func:`mixprec.policy.run_fp32`. ReLU of an
    output that an emulated layer rounded to its activation format saves that output
    once, in the format's own storage, for itself and the next layer
    (:mod:`mixprec.shared`). Stochastic rounding draws from ``generator``; GEMMs of a
    policy with ``hadamard.signs="redraw"`` take the current signs of ``signs`` (a
    :class:`mixprec.blocks.SignStream`, which the engine advances every step).

    >>> with PrecisionMode(default_policy=LayerPolicy.from_recipe("bf16-mixed")) as mode:
    ...     y = model(x)
    >>> print(mode.recorder.coverage())
    """

    def __init__(self, fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
                 default_policy: Optional[LayerPolicy] = None,
                 generator: Optional[torch.Generator] = None, *,
                 recorder: Optional[CoverageRecorder] = None, strict: bool = False,
                 signs: Optional[SignStream] = None, default_layer: Optional[Layer] = None):
        super().__init__()
        if default_policy is not None:
            _check_policy(default_policy)
        if default_layer is not None:
            if not isinstance(default_layer, Layer):
                raise TypeError(f"default_layer must be a Layer made by outside_layer(policy) "
                                f"or None, got {default_layer!r}")
            if default_policy is not None and default_policy != default_layer.policy:
                raise ValueError(f"default_policy {default_policy!r} differs from the policy of "
                                 f"default_layer {default_layer.policy!r}; give one of them, or "
                                 f"the same policy to both")
            default_policy = default_layer.policy
        self.fp32_ops = tuple(fp32_ops)
        self.default_policy = default_policy
        self.generator = generator
        self.signs = signs
        self.recorder = recorder if recorder is not None else CoverageRecorder(strict=strict)
        self.fp32 = resolve_fp32_ops(self.fp32_ops)
        self.default = default_layer
        if default_layer is None and default_policy is not None:
            self.default = outside_layer(default_policy)
        if self.default is not None:
            self.default.state.begin_forward()   # counts this mode's outside calls
        # taken now for mixprec.dispatch: under torch.compile, id() of these objects
        # reached through this mode fails in a frame resumed after a graph break
        self.default_policy_ids = (None, None) if self.default is None else (
            id(self.default.policy), id(self.default.policy.for_activations_only()))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        # Dynamo inlines this method (is_compiling() is constant True there); at run time
        # a replayed graph of an emulated layer holds ops emulated already: run them plain.
        # Only calls this mode would change are checked (the frame walk costs time).
        if (not torch.compiler.is_compiling()
                and (func in _ROUTES or func in self.fp32 or func in _RELUS) and _replayed()):
            return func(*args, **kwargs)
        out = _dispatch(self, func, args, kwargs)
        if out is not NOT_MATMUL:
            return out
        name = self.fp32.get(func)
        if name is not None:
            return run_fp32(func, name, args, kwargs)
        if func in _RELUS:
            out = _route_relu(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)


# The door (imported last: it builds on this module's primitives).
from .dispatch import _ROUTES, NOT_MATMUL, dispatch as _dispatch  # noqa: E402
