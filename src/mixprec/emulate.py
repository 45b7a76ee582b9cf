"""Emulated reduced-precision layers: what low-precision hardware computes, on any device.

Public functions ``qlinear``, ``qconv``, ``qmatmul``, ``qembedding`` and
``qscaled_dot_product_attention`` compute their torch counterparts under a
:class:`~mixprec.policy.LayerPolicy` (rules in :mod:`mixprec.qfunc`).
:class:`PrecisionMode` routes a model's own calls of those ops to them, with the policy
of the innermost layer registered by :func:`~mixprec.policy.attach`, and runs the
recipe's FP32 ops in FP32 (:func:`~mixprec.policy.run_fp32`), the same on every device.

>>> handle = attach(model, lambda name, m: LayerPolicy.from_recipe("fp8-e5m2"))
>>> with PrecisionMode():
...     loss = F.cross_entropy(model(x), y)
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Any, Optional, Sequence

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from .policy import (AttachHandle, Layer, LayerPolicy, LayerState, attach, current_layer,
                     resolve_fp32_ops, run_fp32)
from .formats import get_format
from .ops import generator_id
from .qfunc import CONV_FUNCS, OpContext, QConv, QEmbedding, QLinear, QMatmul
from .recipe import DEFAULT_FP32_OPS
from .shared import relu as _shared_relu
from .shared import tag_output

__all__ = ["LayerPolicy", "LayerState", "AttachHandle", "attach", "current_layer",
           "qlinear", "qconv", "qmatmul", "qembedding", "qscaled_dot_product_attention",
           "PrecisionMode", "run_fp32"]


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------
def _needs(t: Optional[torch.Tensor]) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _check_policy(policy: Any) -> LayerPolicy:
    if not isinstance(policy, LayerPolicy):
        raise ValueError(f"policy must be a LayerPolicy, got {policy!r}")
    return policy


def _tagged(y: torch.Tensor, c: OpContext) -> torch.Tensor:
    """Tag an output rounded to the activation format with that format (mixprec.shared)."""
    if c.policy.rounds_output:
        tag_output(y, get_format(c.policy.activation.format))
    return y


def _linear(x, weight, bias, c: OpContext) -> torch.Tensor:
    return _tagged(QLinear.apply(x, weight, bias, c, _needs(x), _needs(weight)), c)


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
        raise ValueError(f"emulated accumulation (format={acc.format!r}, across="
                         f"{acc.across!r}) is implemented for linear and matmul only; "
                         f"convolutions accumulate in FP32 (valid: accumulation.format=fp32)")
    unbatched = x.dim() == nd + 1
    if unbatched:
        x = x.unsqueeze(0)
    padding, extra = _conv_padding(padding, weight, stride, dilation, nd)
    if extra is not None:
        x = F.pad(x, extra)
    y = QConv.apply(x, weight, bias, (stride, padding, dilation, groups), c,
                    _needs(x), _needs(weight))
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


def _matmul(a, b, c: OpContext) -> torch.Tensor:
    if a.dim() == 0 or b.dim() == 0:
        raise ValueError(f"matmul needs tensors of at least 1 dimension, got shapes "
                         f"{tuple(a.shape)} and {tuple(b.shape)}")
    vec_a, vec_b = a.dim() == 1, b.dim() == 1
    y = QMatmul.apply(a.unsqueeze(0) if vec_a else a, b.unsqueeze(-1) if vec_b else b,
                      c, _needs(a), _needs(b))
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
_PLAIN = object()   # a route's answer for "call the op as is"


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict):
    """Positional + keyword arguments as a list in ``names`` order; None if an unknown
    keyword (such as out=) is present."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    values = list(args)
    for n in names[len(args):]:
        values.append(kwargs.get(n, defaults.get(n)))
    return values


def _all_floating(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)


def _route_linear(layer: Layer, gen, args, kwargs):
    bound = _bind(args, kwargs, ("input", "weight", "bias"), {})
    if bound is None or not _all_floating(*bound[:2]):
        return _PLAIN
    return _linear(*bound, OpContext(layer.policy, layer.state, gen, layer.state.next_slot()))


def _route_conv(layer: Layer, gen, args, kwargs):
    bound = _bind(args, kwargs, ("input", "weight", "bias", "stride", "padding", "dilation",
                                 "groups"), {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if bound is None or not _all_floating(*bound[:2]):
        return _PLAIN
    return _conv(*bound, OpContext(layer.policy, layer.state, gen, layer.state.next_slot()))


def _route_matmul(layer: Layer, gen, args, kwargs, swap=False, batched=False):
    bound = _bind(args, kwargs, ("input", "mat2" if batched else "other"), {})
    if bound is None or not _all_floating(*bound):
        return _PLAIN
    a, b = reversed(bound) if swap else bound
    if batched and (a.dim() != 3 or b.dim() != 3):
        return _PLAIN          # torch.bmm raises its own error
    return _matmul(a, b, OpContext(layer.policy, layer.state, gen, layer.state.next_slot()))


def _route_embedding(layer: Layer, gen, args, kwargs):
    bound = _bind(args, kwargs, ("input", "weight", "padding_idx", "max_norm", "norm_type",
                                 "scale_grad_by_freq", "sparse"),
                  {"norm_type": 2.0, "scale_grad_by_freq": False, "sparse": False})
    if bound is None or not _all_floating(bound[1]):
        return _PLAIN
    return _embedding(*bound, OpContext(layer.policy, layer.state, gen, layer.state.next_slot()))


def _route_sdpa(layer: Layer, gen, args, kwargs):
    bound = _bind(args, kwargs, ("query", "key", "value", "attn_mask", "dropout_p",
                                 "is_causal", "scale", "enable_gqa"),
                  {"dropout_p": 0.0, "is_causal": False, "enable_gqa": False})
    if bound is None or not _all_floating(*bound[:3]):
        return _PLAIN
    slot = layer.state.next_slot()
    layer.state.next_slot()
    return _sdpa(*bound, OpContext(layer.policy, layer.state, gen, slot),
                 OpContext(layer.policy, layer.state, gen, slot + 1))


_ROUTES = {
    F.linear: _route_linear,
    F.conv1d: _route_conv, F.conv2d: _route_conv, F.conv3d: _route_conv,
    torch.matmul: _route_matmul, torch.Tensor.matmul: _route_matmul,
    torch.Tensor.__matmul__: _route_matmul,
    torch.Tensor.__rmatmul__: functools.partial(_route_matmul, swap=True),
    torch.bmm: functools.partial(_route_matmul, batched=True),
    torch.Tensor.bmm: functools.partial(_route_matmul, batched=True),
    F.embedding: _route_embedding,
    F.scaled_dot_product_attention: _route_sdpa,
}


# Ops that run torch's own kernels under PrecisionMode even when a policy is active:
# composite functions whose inner linears and matmuls PrecisionMode cannot see.
_OPAQUE = {f for f in (
    getattr(F, "multi_head_attention_forward", None), getattr(F, "bilinear", None),
    getattr(F, "conv_transpose1d", None), getattr(F, "conv_transpose2d", None),
    getattr(F, "conv_transpose3d", None), getattr(torch, "lstm", None),
    getattr(torch, "gru", None), getattr(torch, "rnn_tanh", None),
    getattr(torch, "rnn_relu", None), getattr(torch, "_transformer_encoder_layer_fwd", None),
    getattr(torch, "_native_multi_head_attention", None)) if f is not None}
_warned: set = set()

# Non-in-place ReLU spellings: run as mixprec.shared.QReLU on tagged activations.
_RELUS = (F.relu, torch.relu, torch.Tensor.relu)


def _route_relu(args: tuple, kwargs: dict):
    bound = _bind(args, kwargs, ("input", "inplace"), {"inplace": False})
    if bound is None or bound[1] or not isinstance(bound[0], torch.Tensor):
        return None
    return _shared_relu(bound[0])


def _warn_opaque(func) -> None:
    name = getattr(func, "__name__", repr(func))
    if name not in _warned:
        _warned.add(name)
        warnings.warn(f"{name} is not emulated by PrecisionMode: it runs torch's own kernel "
                      f"in the widest dtype of its inputs", stacklevel=3)


def _floating_dtypes(values, into: set) -> set:
    for v in values:
        if isinstance(v, torch.Tensor):
            if v.is_floating_point():
                into.add(v.dtype)
        elif type(v) in (list, tuple):
            _floating_dtypes(v, into)
    return into


def _cast_floating(v, dtype: torch.dtype):
    if isinstance(v, torch.Tensor):
        return v.to(dtype) if v.is_floating_point() else v
    if type(v) in (list, tuple):
        return type(v)(_cast_floating(i, dtype) for i in v)
    return v


def _common_dtype(args: tuple, kwargs: dict) -> tuple:
    """Floating operands in one dtype (the widest): an FP32 layer may receive activations
    that an emulated layer stored in float16 or bfloat16."""
    dtypes = _floating_dtypes(kwargs.values(), _floating_dtypes(args, set()))
    if len(dtypes) < 2:
        return args, kwargs
    wide = functools.reduce(torch.promote_types, dtypes)
    return (tuple(_cast_floating(a, wide) for a in args),
            {k: _cast_floating(v, wide) for k, v in kwargs.items()})


class _OneSlotState(LayerState):
    """State for ops outside every attached layer: one scaler per role, shared by them
    all (there is no forward boundary at which to restart a per-call count)."""

    def next_slot(self) -> int:
        return 0


class PrecisionMode(TorchFunctionMode):
    """While active, matmul-like ops are emulated and ``fp32_ops`` run in FP32.

    Routed: F.linear, F.conv1d/2d/3d, torch.matmul / Tensor.matmul / ``@`` /
    torch.bmm, F.embedding and F.scaled_dot_product_attention (decomposed into qmatmul,
    FP32 softmax and qmatmul). Each uses the policy of the innermost running layer
    registered by :func:`attach`, else ``default_policy``; with no policy or the
    identity policy the plain op runs (no overhead beyond the dispatch).
    Ops named in ``fp32_ops`` follow :func:`mixprec.policy.run_fp32`. ReLU of an
    output that an emulated layer rounded to its activation format saves that output
    once, in the format's own storage, for itself and the next layer
    (:mod:`mixprec.shared`). Stochastic rounding draws from ``generator``.

    >>> with PrecisionMode(default_policy=LayerPolicy.from_recipe("bf16-mixed")):
    ...     y = model(x)
    """

    def __init__(self, fp32_ops: Sequence[str] = DEFAULT_FP32_OPS,
                 default_policy: Optional[LayerPolicy] = None,
                 generator: Optional[torch.Generator] = None):
        super().__init__()
        if default_policy is not None:
            _check_policy(default_policy)
        self.fp32_ops = tuple(fp32_ops)
        self.default_policy = default_policy
        self.generator = generator
        generator_id(generator)   # named now, not while a compiled graph is traced
        self._fp32 = resolve_fp32_ops(self.fp32_ops)
        self._default = None if default_policy is None else Layer(
            "", default_policy, _OneSlotState(""))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        route = _ROUTES.get(func)
        if route is not None or func in _OPAQUE:
            layer = current_layer() or self._default
            if layer is None:
                return func(*args, **kwargs)
            if not layer.policy.is_identity:
                if route is None:
                    _warn_opaque(func)
                else:
                    out = route(layer, self.generator, args, kwargs)
                    if out is not _PLAIN:
                        return out
            args, kwargs = _common_dtype(args, kwargs)
            return func(*args, **kwargs)
        name = self._fp32.get(func)
        if name is not None:
            return run_fp32(func, name, args, kwargs)
        if func in _RELUS:
            out = _route_relu(args, kwargs)
            if out is not None:
                return out
        return func(*args, **kwargs)
