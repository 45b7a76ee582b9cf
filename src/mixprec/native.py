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

FP8 (recipes whose weight, activation and grad_output are per-tensor scaled E4M3/E5M2,
current or delayed, with FP32 accumulation: fp8-hybrid, te-current, te-delayed,
torchao-float8-tensorwise): the model is set up as on the emulated backend (FP32 master
and model weights, :class:`~mixprec.emulate.PrecisionMode`), and every linear layer runs
its three GEMMs on the FP8 codes mixprec's rounding computed, through
``torch._scaled_mm`` (:class:`ScaledMMGemms`)::

    fprop   y  = _scaled_mm(q_x,      q_w^T, 1/s_x, 1/s_w)     q = codes, s = scales
    dgrad   dX = _scaled_mm(q_g,      q_w,   1/s_g, 1/s_w)
    wgrad   dW = _scaled_mm(q_g^T,    q_x,   1/s_g, 1/s_x)

Rounding, scales, amax histories and the stochastic-rounding stream are the emulated
backend's, so only the GEMM differs: where the scales are applied (codes * (1/s) instead
of codes / s; the same numbers for power-of-two scales) and the summation order. Where
CUDA's ``_scaled_mm`` needs K and N multiples of 16, the codes are zero-padded up to them
and the result sliced back (exact: see :meth:`ScaledMMGemms.mm`), and the GEMM is counted
as padded in :meth:`mixprec.Engine.coverage`. A GEMM that ``_scaled_mm`` cannot take at
all (on CUDA: e5m2 x e5m2) runs emulated, with a :class:`NativeFallbackWarning` once per
(layer, GEMM) and a row in the coverage. Other matmul-like ops (matmul, addmm of a
Conv1D, convolutions, attention) stay emulated and are counted there as such.
Unscaled FP8 (fp8-e5m2) does not run natively: its GEMMs are e5m2 x e5m2, which
cuBLASLt has no kernel for. MX and block schemes need block scales, and emulated
accumulation is not what the hardware does: both raise a ValueError under
``backend="native"``.

:func:`fp8_linear_native` is a forward-only per-tensor-scaled E4M3 linear layer through
``torch._scaled_mm`` (which also runs on CPU in recent torch), for devices where
:func:`scaled_mm_available` says it works.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Collection, Dict, Iterator, Optional, Tuple

import torch
from torch import nn

from .layers import parameter_owners
from .recipe import BACKENDS, Recipe, Rounding, ScalingKind

__all__ = [
    "NATIVE_DTYPES", "cpu_has_bf16_dot", "resolve_backend", "native_dtype", "native_problems",
    "convert_parameters_",
    "keep_full_precision", "native_autocast", "scaled_mm_available", "fp8_linear_native",
    "SCALED_MM_DTYPES", "NATIVE_KINDS", "native_kind", "autocast_problems", "scaled_mm_problems",
    "scaled_mm_shape_problem", "scaled_mm_padded_shape", "ScaledMMGemms",
    "NativeFallbackWarning", "active_scaled_mm", "TF32Warning", "tf32_problems",
]

# Formats with a native torch storage dtype that torch.autocast computes in.
NATIVE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
# FP8 formats torch._scaled_mm multiplies, with their storage dtypes
SCALED_MM_DTYPES = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
# how the native backend runs a recipe: torch.autocast in fp16/bf16, or FP8 GEMMs
NATIVE_KINDS = ("autocast", "scaled_mm")
_ROLES = ("weight", "activation", "grad_output", "weight_grad")
_GEMM_ROLES = ("weight", "activation", "grad_output")      # the operands of the three GEMMs
_PER_TENSOR = (ScalingKind.CURRENT, ScalingKind.DELAYED)
E4M3_MAX = 448.0  # largest finite float8_e4m3fn


def native_problems(recipe: Recipe) -> list:
    """Why ``recipe`` cannot run natively (empty when it can): the reasons neither
    native kind applies, :func:`autocast_problems` then :func:`scaled_mm_problems`."""
    autocast, scaled = autocast_problems(recipe), scaled_mm_problems(recipe)
    if not autocast or not scaled:
        return []
    return ([f"autocast: {p}" for p in autocast]
            + [f"torch._scaled_mm: {p}" for p in scaled])


def native_kind(recipe: Recipe) -> str:
    """"autocast" (fp16/bf16) or "scaled_mm" (per-tensor FP8); ValueError if neither."""
    if not autocast_problems(recipe):
        return "autocast"
    if not scaled_mm_problems(recipe):
        return "scaled_mm"
    raise ValueError(f"recipe {recipe.short_str()!r} cannot run on the native backend: "
                     f"{'; '.join(native_problems(recipe))}; valid: backend='emulated'")


def scaled_mm_problems(policy) -> list:
    """Why the linear GEMMs of ``policy`` (a Recipe or a LayerPolicy) cannot run through
    ``torch._scaled_mm`` (empty when they can).

    They can when weight, activation and grad_output are E4M3 or E5M2 with one scale per
    tensor (current or delayed scaling; any rounding: it is mixprec's) and products
    accumulate in FP32. The weight gradient is rounded after the GEMM, so any format.
    """
    problems = []
    for role in _GEMM_ROLES:
        spec = getattr(policy, role)
        if spec.format not in SCALED_MM_DTYPES:
            problems.append(f"{role} format {spec.format!r} is not one of "
                            f"{', '.join(SCALED_MM_DTYPES)}")
        elif spec.scaling is ScalingKind.NONE:
            problems.append(f"{role} is unscaled {spec.format}: torch._scaled_mm multiplies "
                            f"per-tensor scaled operands (and an all-e5m2 recipe's GEMMs "
                            f"would be e5m2 x e5m2, which has no CUDA kernel)")
        elif spec.scaling not in _PER_TENSOR:
            problems.append(f"{role} uses {spec.scaling.value} scaling, not one scale per "
                            f"tensor (current or delayed)")
    if not policy.accumulation.is_fp32:
        problems.append(f"{policy.accumulation.describe()} is emulated only")
    return problems


def autocast_problems(recipe: Recipe) -> list:
    """Why ``recipe`` cannot run under torch.autocast (empty when it can).

    That needs one fp16 or bf16 format for weights, activations and gradients, no
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
    on CPUs with bf16 dot-product instructions (see :func:`cpu_has_bf16_dot`); native for
    per-tensor FP8 recipes on CUDA devices where ``torch._scaled_mm`` runs (compute
    capability 8.9 and up, :func:`scaled_mm_available`); everything else (MX, fp8-e5m2,
    fp16 on CPU, bf16 on CPUs without bf16 hardware, FP8 on CPU, where _scaled_mm is no
    faster than the emulated FP32 GEMM) emulated."""
    if requested not in BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; valid choices: {', '.join(BACKENDS)}")
    if requested != "auto":
        return requested
    if autocast_problems(recipe):
        return ("native" if not scaled_mm_problems(recipe) and device.type == "cuda"
                and scaled_mm_available(device) else "emulated")
    if device.type == "cuda":
        return "native"
    if device.type == "cpu" and recipe.weight.format == "bf16" and cpu_has_bf16_dot():
        return "native"
    return "emulated"


def native_dtype(recipe: Recipe) -> torch.dtype:
    """The torch dtype torch.autocast computes ``recipe`` in; ValueError if none."""
    problems = autocast_problems(recipe)
    if problems:
        raise ValueError(f"recipe {recipe.short_str()!r} cannot run under torch.autocast: "
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


class TF32Warning(UserWarning):
    """Emulated GEMMs or convolutions on CUDA may run in TF32 (10-bit mantissa inputs),
    not the FP32 the emulation assumes: the emulated results are not the recipe's."""


def tf32_problems(model: nn.Module) -> list:
    """Why float32 GEMMs of ``model`` on CUDA may not be FP32 (empty when they are).

    The emulation computes its GEMMs in float32 with FP32 accumulation; CUDA runs
    float32 matmuls in TF32 when ``torch.backends.cuda.matmul.allow_tf32`` (or
    ``torch.set_float32_matmul_precision("high")``), and cuDNN convolutions when
    ``torch.backends.cudnn.allow_tf32``, which torch turns on by default. TF32 rounds
    each input to 10 mantissa bits: fp16 values (11 bits) and scaled FP8 values change.
    """
    problems = []
    if torch.backends.cuda.matmul.allow_tf32:
        problems.append("torch.backends.cuda.matmul.allow_tf32 is True (matmuls in TF32); "
                        "set it to False, or torch.set_float32_matmul_precision('highest')")
    if torch.backends.cudnn.allow_tf32 and any(
            isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        problems.append("torch.backends.cudnn.allow_tf32 is True, torch's default "
                        "(convolutions in TF32); set it to False")
    return problems


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
    except (RuntimeError, AttributeError, TypeError, NotImplementedError, AssertionError):
        return False


def scaled_mm_available(device: Optional[torch.device | str] = None) -> bool:
    """Whether ``torch._scaled_mm`` runs an E4M3 GEMM on ``device`` (default: CPU); on
    CUDA that takes compute capability 8.9 or more (Ada, Hopper and later)."""
    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False
        if device.index is None:
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
    k, n = x.shape[-1], w.shape[0]
    if x.device.type == "cuda" and (k % _CUDA_MULTIPLE or n % _CUDA_MULTIPLE):
        # no padding here (ScaledMMGemms pads): name the shapes rather than let
        # torch's check say "divisible by 16" of operands the caller never made
        raise ValueError(f"fp8_linear_native on CUDA needs in_features and out_features "
                         f"multiples of {_CUDA_MULTIPLE}, got x {tuple(x.shape)} and w "
                         f"{tuple(w.shape)}; valid: the native backend "
                         f"(mixprec.prepare(..., backend='native')), which pads")
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


# --------------------------------------------------------------------------------------
# Native FP8 GEMMs of the emulated linear layers
# --------------------------------------------------------------------------------------
class NativeFallbackWarning(UserWarning):
    """A linear layer's GEMM could not run through ``torch._scaled_mm`` under the native
    backend and ran emulated (FP32 GEMM of the dequantized FP8 operands)."""


_FP8 = tuple(SCALED_MM_DTYPES.values())
GEMMS = ("fprop", "dgrad", "wgrad")


_CUDA_MULTIPLE = 16     # CUDA _scaled_mm (cuBLASLt, as torch checks): K and N multiples of 16


def scaled_mm_shape_problem(a: torch.Tensor, b: torch.Tensor, rules: str) -> str:
    """Why ``torch._scaled_mm(a, b)`` (a: M x K, b: K x N, per-tensor scales) is refused
    under ``rules`` ("cuda" or "cpu"); "" when it runs.

    Both: float8_e4m3fn / float8_e5m2 operands. CUDA (cuBLASLt, as torch checks): K and
    N multiples of 16 (M is free), and not e5m2 x e5m2. CPU takes every shape.
    :class:`ScaledMMGemms` pads the shapes (:func:`scaled_mm_padded_shape`), so only the
    dtype limits make it fall back.
    """
    (m, k), n = a.shape, b.shape[1]
    return _refusal(a.dtype, b.dtype, m, k, n, rules)


def _refusal(a_dtype: torch.dtype, b_dtype: torch.dtype, m: int, k: int, n: int,
             rules: str) -> str:
    if a_dtype not in _FP8 or b_dtype not in _FP8:
        return f"operands {a_dtype} x {b_dtype} are not float8_e4m3fn / float8_e5m2"
    if rules == "cuda":
        if a_dtype == b_dtype == torch.float8_e5m2:
            return "e5m2 x e5m2 has no CUDA kernel"
        if k % _CUDA_MULTIPLE or n % _CUDA_MULTIPLE:
            return f"(M, K, N) = ({m}, {k}, {n}): K and N must be multiples of 16 on CUDA"
    return ""


def scaled_mm_padded_shape(m: int, k: int, n: int, rules: str) -> Tuple[int, int, int]:
    """(M, K, N) of an M x K by K x N GEMM zero-padded to a shape ``torch._scaled_mm``
    takes under ``rules``: on CUDA K and N rounded up to multiples of 16 (M is free);
    on CPU the shape itself.

    >>> scaled_mm_padded_shape(33, 24, 40, "cuda")
    (33, 32, 48)
    """
    if rules not in ("cuda", "cpu"):
        raise ValueError(f"unknown scaled_mm rules {rules!r}; valid choices: cuda, cpu")
    if rules == "cpu":
        return m, k, n
    up = lambda d: -(-d // _CUDA_MULTIPLE) * _CUDA_MULTIPLE  # noqa: E731
    return m, up(k), up(n)


def _zero_padded(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """A row-major rows x cols tensor of t's FP8 codes, zero-filled beyond t (byte 0x00
    is +0 in float8_e4m3fn and float8_e5m2; the copy moves bytes, no float arithmetic)."""
    out = torch.zeros(rows, cols, dtype=torch.uint8, device=t.device)
    out[:t.shape[0], :t.shape[1]].copy_(t.view(torch.uint8))
    return out.view(t.dtype)


def _padding_note(k: int, n: int, pk: int, pn: int) -> str:
    """What a GEMM's coverage row says of its padding ("" where none)."""
    dims = [d for d, (was, now) in (("K", (k, pk)), ("N", (n, pn))) if was != now]
    return f"{' and '.join(dims)} zero-padded to multiples of {_CUDA_MULTIPLE}" if dims else ""


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """2-D ``t`` with strides (columns, 1), the layout CUDA's _scaled_mm checks (its
    operand a: stride[0] > stride[1] == 1; b is the transpose of such a tensor).

    ``.contiguous()`` alone is not enough: torch calls a 1 x K tensor contiguous whatever
    the stride of its size-1 dimension, so the wgrad operand g^T of a layer with one
    output feature (g: T x 1) stays a (1, 1)-strided view, which the check refuses
    ("self must be row_major, got stride (1, 1)"). Flattening and viewing back gives the
    canonical strides without copying the codes."""
    return t.contiguous().view(-1).view(t.shape)


_ACTIVE: list = []     # the ScaledMMGemms of the native backend's autocast(), innermost last


def active_scaled_mm() -> Optional["ScaledMMGemms"]:
    """The :class:`ScaledMMGemms` whose :meth:`~ScaledMMGemms.active` region is running."""
    return _ACTIVE[-1] if _ACTIVE else None


class ScaledMMGemms:
    """Runs linear layers' per-tensor FP8 GEMMs through ``torch._scaled_mm`` and counts them.

    ``rules``: whose shape and dtype limits apply (:func:`scaled_mm_shape_problem`),
    by default the device's ("cuda" for a CUDA device, else "cpu"). ``recorder``: a
    :class:`mixprec.coverage.CoverageRecorder` that counts every GEMM, native or not;
    a native GEMM whose operands were zero-padded (:func:`scaled_mm_padded_shape`) is
    counted with a note saying which dimensions. A GEMM that cannot run natively even
    padded returns None from :meth:`mm` (the caller computes it emulated), is counted
    with its reason and warned about once per (layer, GEMM).

    >>> gemms = ScaledMMGemms(torch.device("cuda"))
    >>> with gemms.active():       # what Engine.autocast() does under backend="native"
    ...     y = model(x)
    """

    def __init__(self, device: torch.device, recorder=None, *, rules: Optional[str] = None):
        self.device = torch.device(device)
        self.rules = rules or ("cuda" if self.device.type == "cuda" else "cpu")
        if self.rules not in ("cuda", "cpu"):
            raise ValueError(f"unknown scaled_mm rules {self.rules!r}; valid choices: cuda, cpu")
        self.recorder = recorder
        self._warned: set = set()
        self._policies: Dict[int, Tuple[object, bool]] = {}

    @contextlib.contextmanager
    def active(self) -> Iterator["ScaledMMGemms"]:
        """Linear layers that run forward in here take their GEMMs (forward and backward)
        from this object."""
        _ACTIVE.append(self)
        try:
            yield self
        finally:
            _ACTIVE.pop()

    def takes(self, policy) -> bool:
        """True when the layer policy's GEMM operands are per-tensor FP8 (see
        :func:`scaled_mm_problems`); layers kept in high precision are not."""
        entry = self._policies.get(id(policy))
        if entry is None:
            if torch.compiler.is_compiling():
                # no write while Dynamo traces (inside an autograd.Function it would
                # break the graph): the answer is a function of the policy alone
                return not scaled_mm_problems(policy)
            # the policy is kept alive with its answer: ids stay unique
            entry = self._policies[id(policy)] = (policy, not scaled_mm_problems(policy))
        return entry[1]

    def trace_linear(self, layer: str, policy, x_shape: torch.Size, out_features: int,
                     need_x: bool, need_w: bool) -> None:
        """Count (and warn about) the GEMMs of a linear layer that torch.compile traces,
        before its autograd.Function runs: Dynamo traces that function's forward and
        backward as a subgraph that may not write to objects outside it, so :meth:`mm`
        counts nothing while compiling. The paths are those :meth:`mm` takes, known from
        the operands' formats and shapes: fprop x W^T, dgrad g W (``need_x``), wgrad
        g^T x (``need_w``)."""
        fmt = lambda role: SCALED_MM_DTYPES[getattr(policy, role).format]  # noqa: E731
        x, w, g = fmt("activation"), fmt("weight"), fmt("grad_output")
        k, n = x_shape[-1], out_features
        m = 1
        for d in x_shape[:-1]:
            m = m * d
        gemms = [("fprop", x, w, (m, k, n))]
        gemms += [("dgrad", g, w, (m, n, k))] if need_x else []
        gemms += [("wgrad", g, x, (n, m, k))] if need_w else []
        for gemm, a, b, (gm, gk, gn) in gemms:
            padded = scaled_mm_padded_shape(gm, gk, gn, self.rules)
            self._count(layer, gemm, _refusal(a, b, *padded, self.rules), gk, gn, padded)

    def _count(self, layer: str, gemm: str, why: str, k: int, n: int,
               padded: Tuple[int, int, int]) -> None:
        """Count one GEMM: emulated for the reason ``why`` (and warned about), else native,
        with a note where its K x N, padded to ``padded``, grew."""
        if why:
            self.fallback(layer, gemm, why)
        elif self.recorder is not None:
            self.recorder.record_gemm(layer, gemm, "native",
                                      _padding_note(k, n, padded[1], padded[2]))

    def mm(self, a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
           b_scale: torch.Tensor, out_dtype: torch.dtype, *, layer: str,
           gemm: str) -> Optional[torch.Tensor]:
        """(a / a_scale) @ (b / b_scale) in ``out_dtype``, products of the FP8 codes a, b
        summed in FP32 by ``torch._scaled_mm(a, b, 1/a_scale, 1/b_scale)``; None (after
        counting and warning) when _scaled_mm cannot take the operands.

        a is made row-major and b column-major, as cuBLASLt needs (copies of 1-byte
        codes where they are not). The reciprocals are rounded once to float32. Shapes
        the rules refuse are zero-padded along K and N (:func:`scaled_mm_padded_shape`)
        and the M x N result sliced out of the padded one.
        """
        (m, k), n = a.shape, b.shape[1]
        pm, pk, pn = scaled_mm_padded_shape(m, k, n, self.rules)
        why = _refusal(a.dtype, b.dtype, pm, pk, pn, self.rules)
        # while torch.compile traces, :meth:`trace_linear` has counted and warned
        if not torch.compiler.is_compiling():
            self._count(layer, gemm, why, k, n, (pm, pk, pn))
        if why:
            return None
        padded = (pm, pk, pn) != (m, k, n)
        # Zero padding is exact. Along K both operands are padded (a's columns and b's
        # rows k >= K), so each extra product is (+0) * (+0) = +0, never 0 * inf or
        # 0 * NaN; adding +0 leaves every FP32 partial sum as it was, since a sum that
        # starts from an accumulator of +0 is never -0 (x + (+0) = x for every other
        # x; CPU _scaled_mm and matmul give +0, not -0, for a row of K >= 2 -0
        # products, and the tests check such a row; K = 1 is set right below). Along N
        # (b's columns n >= N) and M the extra dot products only fill output
        # rows and columns that are sliced off. The per-tensor scales multiply each kept
        # element as before, out_dtype rounds each kept FP32 result once as before, and
        # no bias goes into _scaled_mm (the caller adds it to the sliced result), so the
        # M x N block is bit for bit the unpadded GEMM's.
        # _row_major copies nothing where the codes are laid out so already; no
        # is_contiguous() test: traced by Dynamo (torch 2.13) inside the autograd.Function
        # with torch functions disabled, a metadata query drops PrecisionMode from the
        # rest of the traced frame (the next layers would trace as plain torch ops)
        # K = 1 padded: the unpadded GEMM's one product per element keeps its sign of
        # zero ((-x) * (+0) = -0, as CPU _scaled_mm and the emulated matmul give), but
        # the padded sum adds (+0) products to it and gives +0; the sign bits of the
        # codes (bit 7 in both FP8 formats) say where a zero result must be -0
        neg_zero = (((a.view(torch.uint8) ^ b.view(torch.uint8)) >= 128)
                    if k == 1 and pk != 1 else None)
        a = _zero_padded(a, pm, pk) if (pm, pk) != (m, k) else _row_major(a)
        b = (_zero_padded(b.t(), pn, pk) if (pk, pn) != (k, n) else _row_major(b.t())).t()
        inv_a = a_scale.to(torch.float32).reciprocal().reshape(())
        inv_b = b_scale.to(torch.float32).reciprocal().reshape(())
        # use_fast_accum=False: Hopper's fast mode keeps fewer accumulator bits than the
        # FP32 accumulation the recipe (and the emulation) asks for
        out = torch._scaled_mm(a, b, scale_a=inv_a, scale_b=inv_b, out_dtype=out_dtype,
                               use_fast_accum=False)
        if padded:
            # a contiguous M x N result, as the unpadded GEMM writes (the callers
            # reshape it, add the bias in place and hand it to autograd)
            out = out[:m, :n].contiguous()
        if neg_zero is not None:
            out = torch.where(neg_zero & (out == 0), -out, out)
        return out

    def fallback(self, layer: str, gemm: str, why: str) -> None:
        """Count (and warn once per (layer, GEMM) about) a GEMM computed emulated."""
        if self.recorder is not None:
            self.recorder.record_gemm(layer, gemm, "emulated", why)
        if (layer, gemm) not in self._warned:
            self._warned.add((layer, gemm))
            warnings.warn(f"native backend: the {gemm} GEMM of layer {layer or '(root)'!r} "
                          f"runs emulated (FP32 GEMM of the dequantized FP8 operands): "
                          f"torch._scaled_mm refuses it on {self.rules}: {why}",
                          NativeFallbackWarning, stacklevel=5)
