"""FP8 all-gather of FSDP2 weights (``prepare(..., fp8_all_gather=True)``).

FSDP2 all-gathers each weight before its module's forward and again before its backward.
For a weight whose layer rounds it to a per-tensor, current-scaled 1-byte FP8 format
(fp8-hybrid, torchao-float8-tensorwise, te-current), the rounding is moved before the
all-gather, through FSDP2's extension hooks on the sharded local tensor:

    pre-all-gather (each rank, its shard w_r):
        amax  = MAX over ranks of max|w_r|             (one all-reduce, 8 bytes)
        scale = amax_to_scale(amax, fmt, margin, eps, pow2)   (the layer's rule)
        codes = to_fp8(quantize(w_r * scale, fmt))     (1 byte each; gathered)
    post-all-gather (every rank, all codes):
        w     = float32(codes) / scale                 (float32, the parameter's dtype)

amax is a max, order-free, so it equals the full weight's amax, and every element is
rounded by itself: ``w`` is bit for bit the ``quantize(w * scale) / scale`` the layer
computes from the FP32-gathered weight. The layer then takes ``w`` as already rounded
(:func:`gathered_scale` finds its scale): no second amax all-reduce and no second
rounding pass in its forward. Rounding ``w`` again would give the same bits (its amax
is fl(M / scale) and fl(M / fl(M / fl(M / a))) = fl(M / a) for float32, checked for
every mantissa), but only while ``w * scale`` stays clear of float32's subnormals.

Only nearest rounding is supported (stochastic rounding of the shards would draw from
each rank's generator); delayed-scaled weights (te-delayed) take their scale from the
layer's history and are gathered in full precision, with a warning.

Bytes: every all-gather of a hooked weight moves world x shard bytes of codes instead of
world x shard x itemsize (4 for float32), plus one 8-byte amax all-reduce:
:meth:`FP8AllGather.bytes` counts both and the full-precision equivalent.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..formats import FloatFormat, get_format
from ..layers import is_gemm_layer
from ..quant import quantize
from ..recipe import ScalingConfig, ScalingKind, TensorSpec
from ..scaling import amax_to_scale, config_scale_kwargs, tensor_to_amax
from . import all_reduce_amax_
from .fsdp import fsdp_modules

__all__ = ["FP8AllGather", "gathered_scale"]

_AMAX_BYTES = 8           # all_reduce_amax_ sends [value, nan-flag] as two float32


class _Gathered(NamedTuple):
    tensor: "weakref.ref"  # the unsharded tensor written by the post-all-gather hook
    version: int           # its version counter right after the write
    scale: torch.Tensor
    key: tuple             # (format name, saturate, margin, eps, pow2)


# storage address of an unsharded weight -> how it was rounded. An entry is valid only
# while its tensor is alive, still owns that storage and was not written since.
_GATHERED: Dict[int, _Gathered] = {}
_lock = threading.Lock()


def _key(spec: TensorSpec, cfg: ScalingConfig) -> tuple:
    return (get_format(spec.format).name, spec.saturate, cfg.margin, cfg.amax_eps,
            cfg.pow2_scale)


def gathered_scale(x: torch.Tensor, spec: TensorSpec, cfg: ScalingConfig
                   ) -> Optional[torch.Tensor]:
    """The scale ``x`` was rounded with before an FP8 all-gather, or None.

    Not None only when ``x`` is the live unsharded weight a post-all-gather hook wrote
    (same storage, unchanged since) and ``spec``/``cfg`` round it as the hook did; ``x``
    then already equals ``quantize(x_full * scale) / scale``.
    """
    if not _GATHERED or x.numel() == 0:
        return None
    entry = _GATHERED.get(x.untyped_storage().data_ptr())
    if entry is None:
        return None
    t = entry.tensor()
    if (t is None or t.untyped_storage().nbytes() == 0 or t._version != entry.version
            or t.untyped_storage().data_ptr() != x.untyped_storage().data_ptr()
            or x._version != entry.version or x.shape != t.shape
            or entry.key != _key(spec, cfg)):
        return None
    return entry.scale


def _register(t: torch.Tensor, scale: torch.Tensor, key: tuple,
              previous: Optional[int]) -> int:
    """Record how ``t`` was rounded; drop this weight's entry of the previous all-gather
    (its storage is freed in between and may come back elsewhere). Returns the key."""
    ptr = t.untyped_storage().data_ptr()
    with _lock:
        if previous is not None and previous != ptr:
            _GATHERED.pop(previous, None)
        _GATHERED[ptr] = _Gathered(weakref.ref(t), t._version, scale, key)
    return ptr


class _Hooks:
    """The two FSDP2 extension hooks of one sharded weight (set on its local tensor)."""

    def __init__(self, owner: "FP8AllGather", fsdp_param, spec: TensorSpec,
                 cfg: ScalingConfig):
        self.owner, self.fsdp_param = owner, fsdp_param
        self.fmt: FloatFormat = get_format(spec.format)
        self.spec, self.cfg, self.key = spec, cfg, _key(spec, cfg)
        self.ptr: Optional[int] = None       # this weight's key in _GATHERED

    def pre(self, mesh, outer_size, outer_stride, module, mp_policy):
        local = self.fsdp_param._sharded_local_tensor
        hp = local.detach().to(torch.float32)
        # every rank must reach this all-reduce, as it reaches the all-gather that
        # follows: local_amax() does not apply
        amax = all_reduce_amax_(tensor_to_amax(hp), group=mesh.get_group())
        scale = amax_to_scale(amax, self.fmt, **config_scale_kwargs(self.cfg))
        lp = quantize(hp * scale, self.fmt, rounding="nearest", saturate=self.spec.saturate)
        codes = lp.to(self.fmt.torch_dtype).view(torch.uint8)
        padded = self.fsdp_param.padded_sharded_param_size
        if codes.shape != padded:
            # uneven sharding: FSDP needs every rank's input at the padded shard size
            codes = F.pad(codes.reshape(codes.shape[0], -1),
                          (0, 0, 0, padded[0] - codes.shape[0])).reshape(padded)
        world = mesh.size()
        self.owner._count(codes.numel() * world,
                          codes.numel() * world * local.element_size())
        return (codes,), (scale,)

    def post(self, outputs: Tuple[torch.Tensor, ...], metadata: tuple,
             param_dtype: torch.dtype, *, out: Optional[torch.Tensor] = None):
        (codes,), (scale,) = outputs, metadata
        values = codes.view(self.fmt.torch_dtype).to(torch.float32) / scale
        values = values.to(param_dtype)
        if out is not None:
            with torch.no_grad():      # values hold the padded shards: out is their head
                out.copy_(values.reshape(-1)[:out.numel()].view(out.shape))
            self.ptr = _register(out, scale, self.key, self.ptr)
            return None
        self.ptr = _register(values, scale, self.key, self.ptr)
        return values, (values,)


class FP8AllGather:
    """FP8 all-gather of the eligible weights of an FSDP2 model; see the module docstring.

    Built by the engine once its layer policies are fixed. ``policies`` maps module
    names to LayerPolicy (``AttachHandle.policies``).
    """

    def __init__(self, model: nn.Module, policies: dict):
        self._bytes = {"gathers": 0, "fp8_bytes": 0, "amax_bytes": 0, "full_bytes": 0}
        self._installed: List[Tuple[object, torch.Tensor]] = []
        self.params: List[str] = []
        names = {id(m): n for n, m in model.named_modules()}
        skipped = []
        for module in fsdp_modules(model):
            module.reshard()           # hooks are installed on sharded parameters only
            # FSDP2 keeps its parameters per group; no public accessor in torch 2.13
            for fsdp_param in (fp for group in module._get_fsdp_state()._fsdp_param_groups
                               for fp in group.fsdp_params):
                info = fsdp_param._module_info
                owner = names.get(id(info.module), "?")
                policy = policies.get(owner)
                if (info.param_name != "weight" or policy is None
                        or not is_gemm_layer(info.module)):
                    continue
                spec, cfg = policy.weight, policy.scaling
                fmt = None if spec.is_identity else get_format(spec.format)
                if fmt is None or fmt.torch_dtype is None or fmt.torch_dtype.itemsize != 1:
                    continue        # not an 8-bit weight (kept layers, FP16/BF16, ...)
                full = f"{owner}.weight" if owner else "weight"
                if spec.scaling is not ScalingKind.CURRENT or spec.rounding.value != "nearest":
                    skipped.append(f"{full} ({spec.scaling.value} scaling, "
                                   f"{spec.rounding.value} rounding)")
                    continue
                self._install(fsdp_param, _Hooks(self, fsdp_param, spec, cfg))
                self.params.append(full)
        if skipped:
            warnings.warn("fp8_all_gather: these FP8 weights are all-gathered in full "
                          "precision (only current-scaled, nearest-rounded weights are "
                          "gathered in FP8): " + ", ".join(skipped), stacklevel=3)
        if not self.params:
            raise ValueError("fp8_all_gather=True: no weight of this model is rounded to "
                             "a current-scaled 8-bit format with nearest rounding; valid "
                             "recipes: fp8-hybrid, torchao-float8-tensorwise, te-current")

    def _install(self, fsdp_param, hooks: _Hooks) -> None:
        local = fsdp_param._sharded_local_tensor
        local.fsdp_pre_all_gather = hooks.pre
        local.fsdp_post_all_gather = hooks.post
        # FSDP reads the hooks at init and sizes its output buffers at the first
        # all-gather (the trace, in full precision): start both afresh
        fsdp_param._init_extensions()
        fsdp_param.all_gather_outputs = []
        if hasattr(fsdp_param, "_unsharded_param"):
            del fsdp_param._unsharded_param
        self._installed.append((fsdp_param, local))

    def _count(self, fp8_bytes: int, full_bytes: int) -> None:
        b = self._bytes
        b["gathers"] += 1
        b["fp8_bytes"] += fp8_bytes
        b["amax_bytes"] += _AMAX_BYTES
        b["full_bytes"] += full_bytes

    def bytes(self) -> dict:
        """All-gather traffic of the FP8-gathered weights on this rank, since set-up.

        ``gathers``: all-gathers of such a weight; ``fp8_bytes``: their outputs (world x
        padded shard, 1 byte per element); ``amax_bytes``: the amax all-reduces (8 bytes
        each); ``full_bytes``: the same all-gathers in the parameter's dtype;
        ``ratio`` = (fp8_bytes + amax_bytes) / full_bytes.
        """
        b = dict(self._bytes)
        b["ratio"] = ((b["fp8_bytes"] + b["amax_bytes"]) / b["full_bytes"]
                      if b["full_bytes"] else float("nan"))
        return b
