"""Activations saved once: outputs that remember their format and their saved copy.

An emulated layer that rounds its output to an unscaled activation format (see
:attr:`mixprec.policy.LayerPolicy.round_output`) returns it in a 16-bit container
(float16 for fp16 and e5m2, bfloat16 for bf16) and tags it with that format. Under
:class:`~mixprec.emulate.PrecisionMode` a ReLU of a tagged tensor runs :class:`QReLU`,
which saves its output for backward in the narrowest storage that holds it exactly
(``float8_e5m2`` codes for an e5m2 activation: ReLU maps format values to format
values) and tags its result with that saved tensor. The next emulated layer, which
would otherwise save its own low-precision copy of the same values, saves that tensor
instead (:func:`shared_operand`): one stored activation per ReLU/GEMM pair, as on
hardware that keeps FP8 activations, instead of a 16-bit copy plus an 8-bit copy.
A ReLU of any other float16/bfloat16 tensor that needs a gradient (a 16-bit activation,
the BF16 output of a scaled FP8 or MX layer) saves only its 1-bit mask
(:func:`relu_mask`): the next layer saves its operand in its own format anyway (an
FP8 copy for an FP8 GEMM, the tensor itself for a 16-bit one), so a 16-bit copy kept
for ReLU alone would double what is stored.

A tag records the tensor's version counter; any in-place change of the tensor (or of a
view sharing its storage) makes it stale and it is then ignored. Values, gradients and
the random stream are the same with and without sharing: a saved tensor is reused only
where it holds exactly the values the layer would store, or where the layer's rounding
is deterministic and can be applied again in backward.

The same holds for the model's own inputs. A layer whose activation operand is a tensor
the caller passed to the model (the data batch of the first layer; registered for the
duration of the forward by :func:`caller_inputs`, which the engine's model hooks enter)
saves that tensor, not a rounded copy of it, when its rounding is deterministic and
unscaled, and rounds it again in backward: the caller holds the batch through the step
anyway, so the saved copy costs no memory of its own (as torch's FP32 layers save their
input). Modifying such an input in place before backward then raises autograd's error
about a saved tensor modified in place, exactly as under plain torch.

:func:`sharing_disabled` turns the mechanism off (every layer stores its own copy).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Iterator, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .formats import FloatFormat, get_format
from .quant import Rounding, _fast_path, _tracing
from .recipe import ScalingKind, TensorSpec

try:  # the optional C extension (mask packing); the torch path gives the same bits
    from . import _cquant
except ImportError:  # pragma: no cover - depends on the build
    _cquant = None

__all__ = ["Tag", "tag_output", "get_tag", "QReLU", "sharing_enabled", "sharing_disabled",
           "caller_inputs", "enter_caller_inputs", "exit_caller_inputs", "shared_operand", "relu_mask", "masked_grad", "codes_to_float32"]

_ATTR = "_mixprec_tag"
_local = threading.local()

# Code ranges of the OCP float8 dtypes, as uint8: codes 0x01..0x7F are positive (or
# +inf, +NaN); codes at or above this bound are negative NaNs.
_NEG_NAN_FROM = {torch.float8_e5m2: 0xFD, torch.float8_e4m3fn: 0xFF}


class Tag(NamedTuple):
    """What a tensor's values are: members of ``fmt``; ``stored``: a tensor saved for
    backward holding exactly those values (None: not saved by anyone); ``version``: the
    tensor's version counter when tagged."""
    fmt: FloatFormat
    stored: Optional[torch.Tensor]
    version: int


def sharing_enabled() -> bool:
    """Whether outputs are tagged and saved tensors shared. Off while torch.compile
    traces: a tag is a Python attribute compared with a version counter, which a graph
    cannot hold; values and gradients are the same either way (module docstring)."""
    return getattr(_local, "enabled", True) and not torch.compiler.is_compiling()


@contextlib.contextmanager
def sharing_disabled() -> Iterator[None]:
    """Within the block no output is tagged and no saved tensor is shared."""
    before = sharing_enabled()
    _local.enabled = False
    try:
        yield
    finally:
        _local.enabled = before


@contextlib.contextmanager
def caller_inputs(tensors: Iterable[torch.Tensor]) -> Iterator[None]:
    """Within the block, ``tensors`` (the arguments of a model call) count as held by the
    caller: an emulated layer may save one of them, or a view of one, instead of its own
    rounded copy (see :func:`shared_operand`). Blocks nest (one per model call)."""
    enter_caller_inputs(tensors)
    try:
        yield
    finally:
        exit_caller_inputs()


def enter_caller_inputs(tensors: Iterable[torch.Tensor]) -> None:
    """Open a :func:`caller_inputs` block; :func:`exit_caller_inputs` closes it (for a
    model's forward pre-hook and forward hook)."""
    stack = _local.__dict__.setdefault("inputs", [])
    stack.append(tuple(t for t in tensors if isinstance(t, torch.Tensor) and t.numel()))


def exit_caller_inputs() -> None:
    """Close the innermost :func:`caller_inputs` block (none open: nothing to do, as when
    a forward pre-hook before the opening one raised; a frame missing only makes layers
    copy, values never depend on it)."""
    stack = getattr(_local, "inputs", None)
    if stack:
        stack.pop()


def _held_by_caller(x: torch.Tensor) -> bool:
    """True when x shares its storage with a tensor registered by :func:`caller_inputs`.
    The registered tensors are alive for the whole block, so their storages cannot be
    reused by another tensor in it."""
    stack = getattr(_local, "inputs", None)
    if not stack or not x.numel():
        return False
    ptr = x.untyped_storage().data_ptr()
    return any(t.device == x.device and t.untyped_storage().data_ptr() == ptr
               for frame in stack for t in frame)


def tag_output(t: torch.Tensor, fmt: FloatFormat,
               stored: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Record that ``t`` holds values of ``fmt`` (and that ``stored`` is saved with them).

    Inference tensors (``torch.inference_mode``) stay untagged: they have no version
    counter, and nothing is saved for backward there to share."""
    if sharing_enabled() and not torch.compiler.is_compiling() and not t.is_inference():
        setattr(t, _ATTR, Tag(fmt, stored, t._version))
    return t


def get_tag(t: torch.Tensor) -> Optional[Tag]:
    """The tensor's tag, or None when it has none, is stale, or sharing is disabled."""
    if not sharing_enabled():
        return None
    tag = getattr(t, _ATTR, None)
    if tag is None or tag.version != t._version:
        return None
    return tag


def _narrow_copy(y: torch.Tensor, fmt: FloatFormat) -> torch.Tensor:
    """``y`` (values of fmt) in fmt's own torch dtype when that is an OCP float8 dtype
    narrower than y's, else ``y`` itself. The cast is exact."""
    dtype = fmt.torch_dtype
    if dtype in _NEG_NAN_FROM and dtype.itemsize < y.dtype.itemsize:
        # float16 -> float8 goes through float32: same result, several times faster on CPU
        return y.to(torch.float32).to(dtype)
    return y


def e5m2_as_float16(t: torch.Tensor) -> torch.Tensor:
    """A ``float8_e5m2`` tensor as float16 with the same values (NaN where it is NaN).

    An E5M2 code is the upper byte of the float16 with the same value (same sign, exponent
    bias and inf/NaN codes), so the conversion is a byte shift; torch's own float8 cast is
    several times slower on CPU. Widened to float32 the result is bit for bit
    ``t.to(torch.float32)`` (torch's float16 cast differs only in quieting the two
    signalling NaN codes, which the float32 widening quiets too).
    """
    return (t.view(torch.uint8).to(torch.int16) << 8).view(torch.float16)


# Bits of +inf in float16 and bfloat16: magnitudes above it are NaN.
_INF_BITS = {torch.float16: 0x7C00, torch.bfloat16: 0x7F80}


def relu_mask(y: torch.Tensor) -> torch.Tensor:
    """The mask of ReLU's backward for a float16/bfloat16 ``y``, packed 8 elements a byte:
    bit ``i & 7`` of byte ``i >> 3`` (flat row-major index i) is set where ``not y <= 0``
    (y positive or NaN), the elements where torch's ``threshold_backward(g, y, 0)`` passes
    the gradient. One sixteenth of y's bytes."""
    n = y.numel()
    y = y.contiguous()
    out = torch.empty((n + 7) // 8, dtype=torch.uint8, device=y.device)
    if _fast_path(_cquant, y):
        _cquant.relu_mask(y.data_ptr(), out.data_ptr(), n, _INF_BITS[y.dtype],
                          torch.get_num_threads())
        return out
    keep = (~(y.reshape(-1) <= 0)).to(torch.uint8)
    keep = F.pad(keep, (0, out.numel() * 8 - n)).view(-1, 8)
    weights = torch.tensor([1 << k for k in range(8)], dtype=torch.uint8, device=y.device)
    return (keep * weights).sum(1, dtype=torch.uint8)


def masked_grad(g: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``g`` where the packed ``mask`` (see :func:`relu_mask`) is set, +0 elsewhere."""
    n = g.numel()
    g = g.contiguous()
    if _fast_path(_cquant, g, mask) and g.element_size() in (2, 4):
        out = torch.empty_like(g)
        _cquant.masked_grad(mask.data_ptr(), g.data_ptr(), out.data_ptr(), n,
                            g.element_size(), torch.get_num_threads())
        return out
    shifts = torch.arange(8, dtype=torch.uint8, device=g.device)
    keep = ((mask.unsqueeze(1) >> shifts) & 1).view(-1)[:n].view(g.shape).bool()
    return torch.where(keep, g, g.new_zeros(()))


_FLOAT8 = (torch.float8_e5m2, torch.float8_e4m3fn, torch.float8_e5m2fnuz,
           torch.float8_e4m3fnuz)


def _float8_table(dtype: torch.dtype) -> torch.Tensor:
    """The float32 bit patterns of all 256 codes of ``dtype``, from torch's own cast."""
    table = _TABLES.get(dtype)
    if table is None:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        table = _TABLES[dtype] = codes.view(dtype).to(torch.float32).view(torch.int32)
    return table


_TABLES: dict = {}


def codes_to_float32(t: torch.Tensor, table: Optional[torch.Tensor] = None) -> torch.Tensor:
    """An 8-bit tensor widened to float32 through a 256-entry table of float32 values
    (default: a float8 dtype's own, built by torch's cast, so the result is bit for bit
    ``t.to(torch.float32)``; uint8 codes need ``table``). On CPU the C kernel reads the
    table, several times faster than torch's float8 casts; elsewhere torch indexes it."""
    if table is None:
        if _tracing(t):   # compiled: torch's own cast, the same bits, fused by Inductor
            return t.to(torch.float32)
        table = _float8_table(t.dtype)
    table = table.view(torch.int32)
    if _fast_path(_cquant, t, table):
        src = t.contiguous().view(torch.uint8)
        out = torch.empty(t.shape, dtype=torch.float32)
        _cquant.lut_decode(src.data_ptr(), out.data_ptr(), src.numel(), table.data_ptr(),
                           torch.get_num_threads())
        return out
    idx = t.view(torch.uint8).long()
    return table.to(t.device)[idx].view(torch.float32)


class QReLU(torch.autograd.Function):
    """``torch.relu`` of a float16/bfloat16 tensor (of ``fmt`` values, when fmt is given)
    that saves as little as backward needs. Where fmt has an OCP float8 dtype the output
    is saved in it, exactly, and the result is tagged with that saved tensor, which the
    next emulated layer reuses (see module docstring). Otherwise only the 1-bit mask of
    :func:`relu_mask` is saved (the next layer stores its own copy of the output, in its
    own format). Backward is torch's: the gradient where the output is > 0 or NaN, +0
    elsewhere (a -0 output masks the gradient too)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, fmt: Optional[FloatFormat]):
        with torch._C.DisableTorchFunction():
            y = torch.relu(x)
            stored = y if fmt is None else _narrow_copy(y, fmt)
            if stored.dtype in _NEG_NAN_FROM or y.dtype not in _INF_BITS:
                ctx.save_for_backward(stored)
                ctx.packed = False
                return y if fmt is None else tag_output(y, fmt, stored)
            ctx.save_for_backward(relu_mask(y))
            ctx.packed = True
        return y if fmt is None else tag_output(y, fmt)

    @staticmethod
    def backward(ctx, g):
        (stored,) = ctx.saved_tensors
        with torch._C.DisableTorchFunction():
            if ctx.packed:
                return masked_grad(g, stored), None
            if stored.dtype == torch.float8_e5m2 and g.dtype == torch.float16:
                stored = e5m2_as_float16(stored)
            if stored.dtype not in _NEG_NAN_FROM:
                return torch.ops.aten.threshold_backward(g, stored, 0), None
            codes = stored.view(torch.uint8)
            # output > 0 or NaN: codes 0x01..0x7F (uint8 wraps 0 - 1 to 0xFF), negative NaNs
            keep = ((codes - 1) < 0x7F) | (codes >= _NEG_NAN_FROM[stored.dtype])
            return torch.where(keep, g, g.new_zeros(())), None


def relu(x: torch.Tensor) -> Optional[torch.Tensor]:
    """:class:`QReLU` of ``x`` when ``x`` needs a gradient and either carries a valid tag
    or is a float16/bfloat16 tensor (whose mask is packed); else None (the caller runs
    torch's relu)."""
    if not (x.requires_grad and torch.is_grad_enabled()):
        return None
    tag = get_tag(x)
    if tag is None and x.dtype not in _INF_BITS:
        return None
    return QReLU.apply(x, None if tag is None else tag.fmt)


_DETERMINISTIC = (Rounding.NEAREST, Rounding.TOWARD_ZERO)


def shared_operand(x: torch.Tensor, spec: TensorSpec) -> Optional[tuple]:
    """How an emulated layer stores its activation operand ``x`` (rounded per ``spec``)
    without a copy of its own, or None when it must make one. Two cases (three reasons):

    ``("exact", stored)``: x's values are already ``spec``'s values (its tag names the
    spec's format, or x is held in the format's own dtype) and ``stored``, saved by the
    producer, holds them exactly. The layer computes with ``x`` as float32.

    ``("requantize", x)``: the producer saved x itself, in a wider format, or x is (a view
    of) a model input the caller holds (:func:`caller_inputs`), and ``spec`` rounds
    deterministically: the layer saves x (no new storage) and backward rounds it again,
    giving the forward's values.

    Only unscaled, non-saturating specs qualify (scaled and MX specs need their scales;
    saturation would change infinities); stochastic rounding never does (it would
    change the random stream).
    """
    if (not sharing_enabled() or spec.is_identity or spec.scaling is not ScalingKind.NONE
            or spec.saturate or spec.rounding not in _DETERMINISTIC):
        return None
    tag = get_tag(x)
    if tag is None or tag.stored is None:
        if (x.is_floating_point() and x.dtype != get_format(spec.format).torch_dtype
                and _held_by_caller(x)):
            return "requantize", x
        return None
    fmt = get_format(spec.format)
    if tag.fmt == fmt or x.dtype == fmt.torch_dtype:
        return "exact", tag.stored
    if tag.stored is x:
        return "requantize", x
    return None
