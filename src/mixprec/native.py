"""The fast path: real float16/bfloat16 parameters, torch.autocast, native FP8 GEMMs.

Where the emulated backend rounds float32 tensors to a format's values, the native backend
stores them in the hardware dtype and lets torch's kernels compute:

* parameters are converted to ``torch.float16``/``torch.bfloat16`` storage (the engine
  keeps FP32 master weights);
* ``torch.autocast(device_type, dtype)`` runs GEMMs in that dtype with FP32 accumulation;
* emulate's :class:`~mixprec.emulate.PrecisionMode` runs, on top, in FP32-ops-only mode,
  so softmax, norms, reductions and losses compute in FP32 on every device (CPU autocast
  alone leaves them in bf16);
* modules kept in high precision keep FP32 parameters and run with autocast disabled.

FP8: :func:`fp8_linear_native` is a per-tensor-scaled E4M3 linear layer through
``torch._scaled_mm`` (which also runs on CPU in recent torch), for devices where
:func:`scaled_mm_available` says it works.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Collection, Iterator, Optional

import torch
from torch import nn

from .layers import parameter_owners
from .recipe import BACKENDS, Recipe, Rounding, ScalingKind

__all__ = [
    "NATIVE_DTYPES", "cpu_has_bf16_dot", "resolve_backend", "native_dtype", "native_problems",
    "convert_parameters_",
    "keep_full_precision", "native_autocast", "scaled_mm_available", "fp8_linear_native",
]

# Formats with a native torch storage dtype that torch.autocast computes in.
NATIVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
_ROLES = ("weight", "activation", "grad_output", "weight_grad")
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def native_problems(recipe: Recipe) -> list:
    """Why ``recipe`` cannot run natively (empty when it can).

    Native means: one fp16 or bf16 format for weights, activations and gradients, no
    per-tensor/MX scaling, round-to-nearest (the hardware cast), FP32 accumulation.
    """
    problems = []
    formats = {getattr(recipe, r).format for r in _ROLES}
    if len(formats) != 1 or not formats <= set(NATIVE_DTYPES):
        problems.append(f"weight/activation/gradient formats {sorted(formats)} are not one of "
                        f"{sorted(NATIVE_DTYPES)}")
    for role in _ROLES:
        spec = getattr(recipe, role)
        if spec.scaling is not ScalingKind.NONE:
            problems.append(f"{role} uses {spec.scaling.value} scaling")
        if spec.rounding is not Rounding.NEAREST:
            problems.append(f"{role} uses {spec.rounding.value} rounding")
    if not recipe.accumulation.is_fp32:
        problems.append(f"{recipe.accumulation.describe()} is emulated only")
    if recipe.high_precision not in ("fp32",) + tuple(NATIVE_DTYPES):
        problems.append(f"high_precision {recipe.high_precision!r} has no native dtype")
    return problems


def cpu_has_bf16_dot() -> bool:
    """True when this CPU has bfloat16 dot-product instructions (AVX512-BF16 or AMX), the
    only CPUs where torch's bf16 GEMMs are faster than its float32 ones. Elsewhere (AVX2
    machines) they run a conversion loop that is many times slower than float32."""
    cpu = torch.cpu
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(cpu, name, lambda: False)() for name in probes)


def resolve_backend(requested: str, recipe: Recipe, device: torch.device) -> str:
    """"emulated" or "native". "auto": native for fp16/bf16 recipes on CUDA, and for bf16
    on CPUs with bf16 dot-product instructions (see :func:`cpu_has_bf16_dot`); everything
    else (FP8, MX, fp16 on CPU, bf16 on CPUs without bf16 hardware) emulated."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; valid choices: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if native_problems(recipe):
        return "emulated"
    if device.type == "cuda":
        return "native"
    if device.type == "cpu" and recipe.weight.format == "bf16" and cpu_has_bf16_dot():
        return "native"
    return "emulated"


def native_dtype(recipe: Recipe) -> torch.dtype:
    """The torch dtype the native backend computes ``recipe`` in; ValueError if none."""
    problems = native_problems(recipe)
    if problems:
        raise ValueError(f"recipe {recipe.short_str()!r} cannot run on the native backend: "
                         f"{'; '.join(problems)}; valid: backend='emulated'")
    return NATIVE_DTYPES[recipe.weight.format]


def convert_parameters_(model: nn.Module, dtype: torch.dtype, keep: Collection[str] = (),
                        keep_dtype: torch.dtype = torch.float32) -> None:
    """Store every parameter in ``dtype`` (modules named in ``keep``: ``keep_dtype``).

    Buffers (batch-norm running statistics) stay as they are: the FP32-ops policy
    computes normalisation in FP32. A parameter owned by several modules (tied
    embeddings) is converted once, to ``keep_dtype`` when any of them is kept.
    """
    owners = parameter_owners(model)
    with torch.no_grad():
        for p in model.parameters():
            target = keep_dtype if any(n in keep for n in owners[id(p)]) else dtype
            if p.is_floating_point() and p.dtype != target:
                p.data = p.data.to(target)


def keep_full_precision(model: nn.Module, keep: Collection[str], device_type: str) -> list:
    """Run each module named in ``keep`` with autocast disabled and FP32 inputs.

    Returns the hook handles (``handle.remove()`` undoes it). Nested kept modules are
    only wrapped at their outermost level.
    """
    handles = []
    for name, module in model.named_modules():
        parent = name.rpartition(".")[0]
        if name not in keep or (name and parent in keep):
            continue
        regions: list = []

        def enter(mod, args, _regions=regions):
            region = torch.autocast(device_type, enabled=False)
            region.__enter__()
            _regions.append(region)
            return tuple(a.float() if torch.is_tensor(a) and a.is_floating_point() else a
                         for a in args)

        def leave(mod, args, output, _regions=regions):
            _regions.pop().__exit__(None, None, None)
            return output

        handles.append(module.register_forward_pre_hook(enter))
        handles.append(module.register_forward_hook(leave, always_call=True))
    return handles


@contextlib.contextmanager
def native_autocast(device_type: str, dtype: torch.dtype,
                    fp32_ops: Collection[str]) -> Iterator[None]:
    """torch.autocast(device_type, dtype) with ``fp32_ops`` forced to FP32 on every device."""
    from .emulate import PrecisionMode  # emulate sits beside native; only its FP32-op policy is used
    with torch.autocast(device_type, dtype=dtype), PrecisionMode(fp32_ops=tuple(fp32_ops)):
        yield


# --------------------------------------------------------------------------------------
# Native FP8 GEMM
# --------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def _scaled_mm_works(device: str) -> bool:
    try:
        a = torch.ones(16, 16, device=device).to(torch.float8_e4m3fn)
        one = torch.ones((), device=device)
        out = torch._scaled_mm(a, a.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
        return bool((out == 16).all())
    except (RuntimeError, AttributeError, TypeError, NotImplementedError):
        return False


def scaled_mm_available(device: Optional[torch.device | str] = None) -> bool:
    """Whether ``torch._scaled_mm`` runs an E4M3 GEMM on ``device`` (default: CPU)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return _scaled_mm_works(str(device))


def _to_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Saturating cast of x * scale to float8_e4m3fn (NaN stays NaN)."""
    return (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)


def fp8_linear_native(x: torch.Tensor, w: torch.Tensor, x_scale: torch.Tensor | float,
                      w_scale: torch.Tensor | float,
                      bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """y = (e4m3(x * x_scale) @ e4m3(w * w_scale)^T) / (x_scale * w_scale) [+ bias].

    Scales follow :mod:`mixprec.scaling` (multiply before the saturating cast; e.g.
    ``amax_to_scale(tensor_to_amax(x), "e4m3")``); products accumulate in FP32 in the
    GEMM and the result is FP32. ``x`` may have leading batch dimensions; ``w`` is
    (out_features, in_features) as in ``nn.Linear``. Forward only (no autograd).
    """
    if not scaled_mm_available(x.device):
        raise RuntimeError(f"torch._scaled_mm does not run on {x.device}; use the emulated "
                           f"FP8 path (mixprec.emulate.qlinear)")
    x_scale = torch.as_tensor(x_scale, dtype=torch.float32, device=x.device)
    w_scale = torch.as_tensor(w_scale, dtype=torch.float32, device=x.device)
    lead = x.shape[:-1]
    x2 = _to_e4m3(x.reshape(-1, x.shape[-1]), x_scale)
    w8 = _to_e4m3(w, w_scale)
    # _scaled_mm multiplies by its scales: pass the reciprocals to dequantize.
    y = torch._scaled_mm(x2, w8.t(), scale_a=x_scale.reciprocal(), scale_b=w_scale.reciprocal(),
                         out_dtype=torch.float32)
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*lead, w.shape[0])
