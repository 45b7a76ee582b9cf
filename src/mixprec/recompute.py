"""FP32 normalisation, softmax and cross-entropy that keep only 16-bit tensors for backward.

The FP32-ops policy (:func:`mixprec.policy.run_fp32`) computes softmax and the
normalisations in FP32 when their input is float16/bfloat16. Done naively, the op saves
its FP32 copy of the input (or its FP32 output) for backward, so a mixed-precision model
with batch-norm or attention keeps FP32 activations after all. Here the op runs under a
custom autograd function that saves the 16-bit input instead and, in backward, upcasts
it again and recomputes the FP32 op before differentiating it. The upcast is exact and
the recomputation runs the same kernel on the same values, so forward values and every
gradient are bit-identical to the naive FP32 path; the price is one extra forward of the
op in backward, the gain that saved activations are 16-bit like in the 2018 paper
(FP32 statistics, FP16 storage).

Running statistics: batch-norm/instance-norm update them once, in forward. When batch
statistics are used the recomputation passes no running statistics (the output depends
on the batch only); in evaluation mode the running statistics are saved for backward.

The normalised output is returned in the input's dtype, softmax's too; cross-entropy's
loss stays float32 (the loss scale divides it later), and it too saves only its 16-bit
logits. Double backward through these ops is not supported (``create_graph=True``
raises).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

__all__ = ["RECOMPUTED_OPS", "run_recomputed"]

_NARROW = (torch.float16, torch.bfloat16)
# F.<name> -> the flag argument that says batch statistics are used (None: no statistics)
_STATS_FLAG = {"batch_norm": "training", "instance_norm": "use_input_stats"}
RECOMPUTED_OPS = frozenset({"batch_norm", "instance_norm", "layer_norm", "group_norm",
                            "softmax", "log_softmax", "cross_entropy"})
_SIGNATURES = {name: inspect.signature(getattr(F, name)) for name in RECOMPUTED_OPS}
# Results that stay float32 (a loss is divided by the loss scale later)
_FP32_RESULT = frozenset({"cross_entropy"})
# torch.softmax(x, dim, dtype=None) and x.softmax(dim, dtype=None): the same op as
# F.softmax, whose third positional parameter differs (_stacklevel)
_TORCH_SPELLINGS = {torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
                    torch.log_softmax: "log_softmax", torch.Tensor.log_softmax: "log_softmax"}


def _fp32(v):
    if isinstance(v, torch.Tensor) and v.is_floating_point() and v.dtype in _NARROW:
        return v.float()
    return v


def _call_fp32(func: Callable, arguments: dict, device_type: str) -> tuple:
    """``func(**up)`` with autocast off, ``up`` being ``arguments`` with narrow floating
    tensors upcast; returns (result, up)."""
    up = {k: _fp32(v) for k, v in arguments.items()}
    off = (torch.autocast(device_type, enabled=False)
           if torch.is_autocast_enabled(device_type) else contextlib.nullcontext())
    with off:
        return func(**up), up


class _RecomputedFP32(torch.autograd.Function):
    """forward(ctx, op, x, *tensors): ``op`` knows how to rebuild the call from them."""

    @staticmethod
    def forward(ctx, op: "_Op", x: torch.Tensor, *tensors):
        ctx.op = op
        out = op.forward(x, tensors)
        ctx.save_for_backward(x, *op.for_backward(tensors))
        return out if op.name in _FP32_RESULT else out.to(x.dtype)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        op: _Op = ctx.op
        x, *kept = ctx.saved_tensors
        with torch.enable_grad():
            x32 = x.detach().float().requires_grad_(ctx.needs_input_grad[1])
            leaves = [t.detach().requires_grad_(need) if t is not None else None
                      for t, need in zip(kept, ctx.needs_input_grad[2:])]
            out = op.recompute(x32, leaves)
            wanted = [t for t in [x32, *leaves] if t is not None and t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out.to(out.dtype))
                         if wanted else ())
        result = [None, next(grads) if x32.requires_grad else None]
        result += [next(grads) if t is not None and t.requires_grad else None for t in leaves]
        return tuple(result)


class _Op:
    """One call of a recomputed op, its arguments split into the input ``x``, the tensors
    autograd sees (weight, bias, running statistics) and the rest (kept as given)."""

    def __init__(self, func: Callable, name: str, arguments: dict):
        self.func, self.name = func, name
        self.tensor_keys = [k for k, v in arguments.items()
                            if k != "input" and isinstance(v, torch.Tensor)]
        self.static = {k: v for k, v in arguments.items()
                       if k != "input" and k not in self.tensor_keys}
        flag = _STATS_FLAG.get(name)
        self.batch_stats = flag is not None and bool(arguments.get(flag))

    def _arguments(self, x, tensors) -> dict:
        return {"input": x, **self.static, **dict(zip(self.tensor_keys, tensors))}

    def forward(self, x, tensors) -> torch.Tensor:
        arguments = self._arguments(x, tensors)
        out, up = _call_fp32(self.func, arguments, x.device.type)
        for key in ("running_mean", "running_var"):   # narrow statistics updated on a copy
            orig = arguments.get(key)
            if isinstance(orig, torch.Tensor) and up[key] is not orig and self.batch_stats:
                orig.copy_(up[key])
        return out

    def for_backward(self, tensors) -> list:
        # with batch statistics the running statistics play no part in the output
        return [None if self.batch_stats and k.startswith("running_") else t
                for k, t in zip(self.tensor_keys, tensors)]

    def recompute(self, x32, leaves) -> torch.Tensor:
        return _call_fp32(self.func, self._arguments(x32, leaves), x32.device.type)[0]


def run_recomputed(func: Callable, name: str, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
    """Run ``F.<name>`` in FP32 saving 16-bit tensors for backward, or return None when
    this call is not one the recomputation handles (the caller then runs it plainly):
    not a recomputed op, an input that is not float16/bfloat16, no gradient needed,
    an explicit ``dtype=``, or arguments that do not bind to the functional signature.
    Under torch.compile too: the compiled graph decides what backward keeps, and its
    ``torch.autograd.grad`` inside a backward would break the graph."""
    if name not in RECOMPUTED_OPS or torch.compiler.is_compiling():
        return None
    if _TORCH_SPELLINGS.get(func) == name:
        names = ("input", "dim", "dtype")
        if len(args) > len(names) or set(kwargs) - set(names[len(args):]):
            return None
        args, kwargs, func = (), {**dict(zip(names, args)), **kwargs}, getattr(F, name)
    elif func is not getattr(F, name, None):
        return None
    try:
        bound = _SIGNATURES[name].bind(*args, **kwargs)
    except TypeError:
        return None
    bound.apply_defaults()
    arguments = dict(bound.arguments)
    x = arguments.get("input")
    if not isinstance(x, torch.Tensor) or x.dtype not in _NARROW or arguments.get("dtype"):
        return None
    op = _Op(func, name, arguments)
    tensors = [arguments[k] for k in op.tensor_keys]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in [x, *tensors]):
        return None
    return _RecomputedFP32.apply(op, x, *tensors)
