"""Rounding as torch operators: ``torch.ops.mixprec.*``, traced by torch.compile.

Registered in the ``mixprec`` namespace with :mod:`torch.library`:

    round_bits(x, plan, mode, seed)        the rounding kernel of mixprec.quant on the
                                           float32/float64 working copy x
    round_e8m0(x, mode, saturate, seed)    the e8m0 rule of mixprec.quant
    quantize(x, fmt, rounding, saturate, seed)            mixprec.quantize
    quantize_scaled(x, fmt, scale, rounding, saturate, seed)  mixprec.quantize_scaled
    quantize_mx(x, fmt, block_size, axis, scale_rule, rounding, seed) -> (values, scales)
    tie_break(tie, thr, seed)              round_bits' second random word, where ties

Every op but tie_break is a CompositeImplicitAutograd definition in integer torch ops
(and one float32 addition, exact by construction, for nearest rounding below a format's
smallest normal), with no data-dependent control flow, so Dynamo puts it into the graph
as one call and AOT autograd decomposes it into elementwise ops that Inductor fuses
(C++/OpenMP on CPU, Triton on CUDA); tie_break has a lowering of its own that fuses alike. The same definitions run eagerly on every device; the Python
functions of :mod:`mixprec.quant` take the C kernel instead for plain CPU tensors
outside tracing. Both give the same bits.

Stochastic rounding takes its randomness as ``seed``, a 0-d int64 tensor, not as a
``torch.Generator`` (no schema type holds one): ``draw_seed(like, generator_id)``, an
opaque custom op, draws it from the generator that :func:`generator_id` names, so a
compiled graph consumes the generator's own stream as eager code does.
Element i (flat row-major index) then reads the SplitMix64 counter stream of that seed:

    A_i = word (i mod 2) of splitmix(seed, floor(i / 2)) >> 1        (31 bits)
    B_i = splitmix(seed ^ SEED_B, i) >> 1                           (63 bits, for ties)

exactly as the C kernel does.  The float32 kernel reads B only where A ties, through
``mixprec::tie_break``, whose Inductor lowering branches around the hash in every vector
of elements without a tie (the C kernel's blocks do the same); the float64 kernel
computes both words for every element and selects B where A ties.
"""
from __future__ import annotations

import sys
import weakref
from typing import List, Optional, Tuple

import torch
from torch import Tensor
from torch._library.effects import EffectType as _EffectType

__all__ = ["compile_options", "draw_seed", "generator_id", "round_bits", "round_e8m0", "splitmix64", "stochastic_up",
           "PLAN_FIELDS"]

# plan = [layout (0: float32 bits, 1: float64 bits), *_Plan fields in this order]
PLAN_FIELDS = ("s0", "te", "m0", "m0_adj", "unsigned_zero", "max_bits", "q_bits",
               "inf_bits", "nan_bits", "ovf_bits", "infin_bits")
_LAYOUTS = {0: (torch.float32, torch.int32, 23, 8), 1: (torch.float64, torch.int64, 52, 11)}
_NEAREST, _STOCHASTIC, _TOWARD_ZERO = 0, 1, 2


def _signed64(v: int) -> int:
    return v - (1 << 64) if v >= 1 << 63 else v


GOLDEN, MIX1, MIX2, SEED_B = (_signed64(c) for c in (
    0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD1B54A32D192ED03))


_generator_ids: "weakref.WeakKeyDictionary[torch.Generator, int]" = weakref.WeakKeyDictionary()
_generators: dict = {}   # id -> weakref of the generator


def _assume_constant_result(fn):
    """``torch.compiler.assume_constant_result(fn)`` without importing torch._dynamo
    (about 1 s, which ``import mixprec`` would pay): that decorator only sets this
    attribute, which Dynamo reads when it meets a call of ``fn`` (tests/test_import.py
    checks that torch's decorator still does exactly this)."""
    fn._dynamo_marked_constant = True
    return fn


# Evaluated for real while Dynamo traces (the result becomes a constant of the graph), so
# a generator first seen inside a compiled region is registered before the graph runs.
@_assume_constant_result
def generator_id(generator: Optional[torch.Generator]) -> int:
    """A small int naming ``generator`` in draw_seed's schema (0: torch's default CPU
    generator); generators are held weakly."""
    if generator is None:
        return 0
    gid = _generator_ids.get(generator)
    if gid is None:
        gid = _generator_ids[generator] = len(_generators) + 1
        _generators[gid] = weakref.ref(generator)
    return gid


def _generator(gid: int) -> torch.Generator:
    if gid == 0:
        return torch.default_generator
    generator = _generators[gid]()
    if generator is None:
        raise ValueError(f"generator {gid} no longer exists; pass a live torch.Generator")
    return generator


def _draw(like: Tensor, generator: torch.Generator) -> Tensor:
    seed = torch.randint(-(1 << 63), (1 << 63) - 1, (), dtype=torch.int64,
                         generator=generator, device=generator.device)
    return seed.to(like.device)


# Tagged nondeterministic_seeded: graphs never merge two draws (CSE) nor recompute one in
# backward; each call advances the generator exactly as the eager draw does.
@torch.library.custom_op("mixprec::draw_seed", mutates_args=(),
                         tags=(torch.Tag.nondeterministic_seeded,))
def _draw_seed_op(like: Tensor, generator: int) -> Tensor:
    return _draw(like, _generator(generator))


@_draw_seed_op.register_fake
def _(like: Tensor, generator: int) -> Tensor:
    return torch.empty((), dtype=torch.int64, device=like.device)


# Ordered effect: AOT autograd threads an effect token through every draw (forward and
# backward alike), so no graph pass runs two draws in another order than eager code;
# otherwise two draws with no data between them (a layer's weight- and bias-gradient
# seeds) are independent nodes, and each tensor could get the other's stream. Torch's
# compile caches do not store graphs with effect tokens: a graph that draws seeds is
# compiled again in each process.
_draw_seed_op.register_effect(_EffectType.ORDERED)


def draw_seed(generator: Optional[torch.Generator], like: Tensor) -> Tensor:
    """One 64-bit seed from ``generator`` as a 0-d int64 tensor on ``like``'s device:
    ``torch.ops.mixprec.draw_seed`` while torch.compile traces, so the compiled graph
    draws from the generator's own stream in the eager order (None: torch's default CPU
    generator); eagerly the same draw without the dispatcher."""
    if torch.compiler.is_compiling() or type(like) is not torch.Tensor:
        return torch.ops.mixprec.draw_seed(like, generator_id(generator))
    return _draw(like, torch.default_generator if generator is None else generator)


def _lshr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(seed, k: Tensor) -> Tensor:
    """SplitMix64 output k+1 from state seed: z = seed + (k+1)*golden, two mixing rounds
    (int64 arithmetic wraps modulo 2^64; ``seed`` an int or a 0-d int64 tensor)."""
    # (k + 1) * golden + seed with golden folded into the seed: one vector op less
    if isinstance(seed, int):
        start = _signed64((seed + GOLDEN) & ((1 << 64) - 1))
    else:
        start = seed + GOLDEN
    z = k * GOLDEN + start
    z = (z ^ _lshr(z, 30)) * MIX1
    z = (z ^ _lshr(z, 27)) * MIX2
    return z ^ _lshr(z, 31)


def stochastic_up(low: Tensor, shift: Tensor, seed: Tensor) -> Tensor:
    """up = r < low / 2^shift with r = 0.(A_i)(B_i) (module docstring); int64 inputs of
    one shape, flat index i in row-major order. Branch-free: B is computed everywhere."""
    i = torch.arange(low.numel(), device=low.device, dtype=torch.int64).view(low.shape)
    # (seed & 0) makes the counter a value rather than an index expression: Inductor
    # folds arithmetic on indices exactly, in unbounded integers, and the SplitMix
    # products must wrap modulo 2^64 instead.
    i = i ^ (seed & 0)
    pair = splitmix64(seed, i >> 1)
    a = torch.where((i & 1) == 1, _lshr(pair, 32), pair & 0xFFFFFFFF) >> 1
    s = shift - 31
    top = torch.where(s <= 0, low << (-s).clamp(min=0), low >> s.clamp(0, 63))
    tie = (s > 0) & (a == top)
    # ties only: the 63 bits of the fraction after the first 31 against B_i
    rem = low & ((torch.ones_like(s) << s.clamp(0, 62)) - 1)
    thr = torch.where(s <= 63, rem << (63 - s).clamp(min=0), rem >> (s - 63).clamp(0, 63))
    b = _lshr(splitmix64(seed ^ SEED_B, i), 1)
    return torch.where(tie, b < thr, a < top)


# B_i where A_i ties, as an operator of its own so that Inductor can compute it apart:
# its lowering (_register_tie_break_lowering) puts the hash under ops.masked(tie), which
# the C++ backend emits as a branch around it in every vector of elements without a tie
# (a tie has probability 2^-31), as the C kernel skips its blocks without one.  Eagerly
# (and on backends without the lowering) B is computed for every element: no host sync.
@torch.library.custom_op("mixprec::tie_break", mutates_args=())
def _tie_break_op(tie: Tensor, thr: Tensor, seed: Tensor) -> Tensor:
    """up_i = tie_i and B_i < thr_i, B_i = splitmix(seed ^ SEED_B, i) >> 1 (63 bits), for
    the flat row-major index i; tie bool, thr int64, both contiguous of one shape."""
    i = torch.arange(tie.numel(), device=tie.device, dtype=torch.int64).view(tie.shape)
    b = _lshr(splitmix64(seed.to(tie.device) ^ SEED_B, i), 1)
    return tie & (b < thr)


@_tie_break_op.register_fake
def _(tie: Tensor, thr: Tensor, seed: Tensor) -> Tensor:
    # Inductor is loaded when it compiles: only then is the lowering worth registering
    # (importing Inductor's lowerings takes seconds)
    if "torch._inductor.lowering" in sys.modules:
        _register_tie_break_lowering()
    return torch.empty_like(tie, memory_format=torch.contiguous_format)


_tie_break_lowered = False


def _register_tie_break_lowering() -> None:
    """Lower mixprec::tie_break into a pointwise Inductor kernel fused with its inputs, the
    hash under ops.masked(tie): computed only where some element of a vector ties."""
    global _tie_break_lowered
    if _tie_break_lowered:
        return
    _tie_break_lowered = True
    try:
        from torch._inductor import ir
        from torch._inductor.lowering import register_lowering
        from torch._inductor.virtualized import ops as iops
    except ImportError:   # Inductor's internals moved: it calls the operator (same bits)
        return

    def const(v: int):
        return iops.constant(v, torch.int64)

    def lshr(z, k: int):
        return iops.bitwise_and(iops.bitwise_right_shift(z, const(k)), const((1 << (64 - k)) - 1))

    @register_lowering(torch.ops.mixprec.tie_break.default, type_promotion_kind=None)
    def _lower_tie_break(tie, thr, seed):
        sizes = list(tie.get_size())
        strides = ir.FlexibleLayout.contiguous_strides(sizes)
        tie_at, thr_at, seed_at = tie.make_loader(), thr.make_loader(), seed.make_loader()

        def inner_fn(index):
            def b_below_thr():
                flat = sum((i * st for i, st in zip(index, strides)), 0)
                sd = seed_at([])
                # (seed & 0): a value, not an index expression (see _word_a)
                k = iops.bitwise_xor(iops.index_expr(flat, torch.int64),
                                     iops.bitwise_and(sd, const(0)))
                z = iops.add(iops.mul(k, const(GOLDEN)),
                             iops.add(iops.bitwise_xor(sd, const(SEED_B)), const(GOLDEN)))
                z = iops.mul(iops.bitwise_xor(z, lshr(z, 30)), const(MIX1))
                z = iops.mul(iops.bitwise_xor(z, lshr(z, 27)), const(MIX2))
                z = iops.bitwise_xor(z, lshr(z, 31))
                return iops.lt(lshr(z, 1), thr_at(index))
            return iops.masked(tie_at(index), b_below_thr, False)

        return ir.Pointwise.create(device=tie.get_device(), dtype=torch.bool,
                                   inner_fn=inner_fn, ranges=sizes)


def _fast_f32(plan: List[int]) -> bool:
    """Whether :func:`_round_f32` takes ``plan``: float32 bits, a format with mantissa
    bits that drops some of float32's (s0 >= 1) and a finite max; unless its subnormals
    are float32's (te == 1), a smallest subnormal q >= 2^-125 (so flushing float32
    subnormals to zero changes nothing) with q * 2^23 a float32 (the float addition of
    the nearest rule)."""
    layout, s0, te, m0 = plan[:4]
    max_bits, q_bits, inf_bits = plan[6], plan[7], plan[8]
    q_field = q_bits >> 23
    return (layout == 0 and not m0 and s0 >= 1 and max_bits < inf_bits
            and (te == 1 or 2 <= q_field <= 254 - 23))


def _word_a(shape, seed: Tensor, device) -> Tuple[Tensor, Tensor]:
    """(A, i): A_i of the module docstring as int32, word (i mod 2) of
    splitmix(seed, i >> 1) shifted right once (31 bits), and the flat row-major index i."""
    numel = 1
    for d in shape:
        numel *= d
    i = torch.arange(numel, device=device, dtype=torch.int64).view(shape)
    # (seed & 0) makes the counter a value rather than an index expression: Inductor
    # folds arithmetic on indices exactly, in unbounded integers, and the SplitMix
    # products must wrap modulo 2^64 instead.
    i = i ^ (seed & 0)
    pair = splitmix64(seed, i >> 1)
    # word (i mod 2) in the low 32 bits, which int64 -> int32 keeps; then a logical >> 1
    word = (pair >> ((i & 1) << 5)).to(torch.int32)
    return (word >> 1) & 0x7FFFFFFF, i


def _round_f32(x: Tensor, plan: List[int], mode: int, seed: Optional[Tensor]) -> Tensor:
    """_round_bits for float32 bits under :func:`_fast_f32` plans, in int32 lanes with
    the shift taken as s0 wherever it can be (every |x| >= 2^emin; the whole range when
    te == 1, the formats whose subnormals are float32's).

        nearest, |x| >= 2^emin   r = (a + 2^(s0-1) - 1 + ((a >> s0) & 1)) & -2^s0
        nearest, |x| <  2^emin   r = (|x| + M) - M in float32, M = q * 2^23: the sum lies
                                 in [M, 2M), whose spacing is q, and float addition rounds
                                 to nearest-even; M / q is even, so ties go to even k * q
        stochastic               up = A < top, top = low * 2^(31 - shift) (shift <= 31), and
                                 where shift > 31 and A == top: B < thr (tie_break; only
                                 formats with te + s0 - 1 > 31 reach such shifts)
    Results, overflow and specials as in _round_bits; the same bits.
    """
    s0, te, _, _, unsigned_zero, max_bits, q_bits, inf_bits, nan_bits, ovf, infin = plan[1:]
    bits = x.contiguous().view(torch.int32)
    a = bits & 0x7FFFFFFF
    sign = bits ^ a
    if mode == _NEAREST:
        half = 1 << (s0 - 1)
        r = (a + (half - 1) + ((a >> s0) & 1)) & -(1 << s0)
        if te > 1:
            big = float(2.0 ** ((q_bits >> 23) - 127 + 23))   # M = q * 2^23
            sub = ((x.abs() + big) - big).view(torch.int32)
            r = torch.where(a < (te << 23), sub, r)
    elif mode == _STOCHASTIC:
        if seed is None:
            raise ValueError("stochastic rounding needs a seed tensor (mixprec.ops.draw_seed)")
        seed = seed.to(x.device)
        word, i = _word_a(a.shape, seed, x.device)
        if te == 1:
            low = a & ((1 << s0) - 1)
            up = (word < (low << (31 - s0))).to(torch.int32)
            r = a - low + (up << s0)
        else:
            e = (a >> 23).clamp(min=1)
            shift = (te + s0 - e).clamp(min=s0)
            sh = shift.clamp(max=24)
            sig = a - ((e - 1) << 23)          # with the implicit bit; a for subnormals
            low = sig & ((1 << sh) - 1)
            top = (low << (31 - shift).clamp(min=0)) >> (shift - 31).clamp(0, 31)
            up = word < top
            if te + s0 - 1 > 31:   # some shift exceeds 31: B decides where A ties
                s = shift - 31
                tie = (s > 0) & (word == top)
                rem = (low & ((1 << s.clamp(0, 24)) - 1)).long()
                s = s.long()
                thr = torch.where(s <= 63, rem << (63 - s).clamp(0, 63),
                                  rem >> (s - 63).clamp(0, 63))
                up = torch.where(tie, torch.ops.mixprec.tie_break(tie, thr, seed), up)
            up = up.to(torch.int32)
            r = torch.where(shift <= 23, a - low + (up << sh), up * q_bits)
    else:
        r = a & -(1 << s0)
        if te > 1:
            e = (a >> 23).clamp(min=1)
            shift = (te + s0 - e).clamp(s0, 24)
            r = torch.where(shift <= 23, a & -(1 << shift), 0)
    r = torch.where(r > max_bits, ovf, r)
    if infin != ovf:
        r = torch.where(a == inf_bits, infin, r)
    r = torch.where(a > inf_bits, nan_bits, r)
    if unsigned_zero:
        sign = torch.where((r == 0) | (r == nan_bits), 0, sign)
    return (r | sign).view(torch.float32)


def _round_bits(x: Tensor, plan: List[int], mode: int, seed: Optional[Tensor] = None) -> Tensor:
    """mixprec.quant's rounding formula on the bits of x (float32 or float64)."""
    if _fast_f32(plan):
        return _round_f32(x, plan, mode, seed)
    dtype, int_dtype, mw, ew = _LAYOUTS[plan[0]]
    s0, te, m0, m0_adj, unsigned_zero, max_bits, q_bits, inf_bits, nan_bits, ovf, infin = plan[1:]
    bits = x.contiguous().view(int_dtype)
    mmask = (1 << mw) - 1
    a = bits & ((1 << (ew + mw)) - 1)
    sign = bits ^ a
    field = a >> mw
    shift = (te - field.clamp(min=1)).clamp(min=0) + s0
    sh = shift.clamp(max=mw + 1)
    sig = torch.where(field > 0, (a & mmask) | (mmask + 1), a)
    full = torch.ones_like(sh) << sh
    low = sig & (full - 1)
    if mode == _NEAREST:
        lsb = (sig >> sh) & 1
        if m0:   # no mantissa bits: the kept code's parity is the exponent's
            lsb = torch.where(shift == s0, (field + m0_adj) & 1, lsb)
        twice = low << 1
        # shift > MW + 1: the value is below Q / 2 (sh is clamped, so say it)
        up = ((twice > full) | ((twice == full) & (lsb == 1))) & (shift <= mw + 1)
    elif mode == _STOCHASTIC:
        if seed is None:
            raise ValueError("stochastic rounding needs a seed tensor (mixprec.ops.draw_seed)")
        up = stochastic_up(low.long(), shift.long(), seed.to(x.device))
    else:
        up = torch.zeros_like(a, dtype=torch.bool)
    up = up.to(a.dtype)
    r = torch.where(shift <= mw, a - low + (up << sh), up * q_bits)
    r = torch.where(r > max_bits, ovf, r)
    r = torch.where(a == inf_bits, infin, r)
    r = torch.where(a > inf_bits, nan_bits, r)
    if unsigned_zero:
        sign = torch.where((r == 0) | (r == nan_bits), 0, sign)
    return (r | sign).view(dtype)


def _round_e8m0(x: Tensor, mode: int, saturate: bool, seed: Optional[Tensor] = None) -> Tensor:
    """mixprec.quant's e8m0 rule on float64 bits (all its values are normal there)."""
    bits = x.to(torch.float64).contiguous().view(torch.int64)
    lo, top = 0x3800000000000000, 0x47E0000000000000            # 2^-127, 2^127
    inf, nan, mmask = 0x7FF0000000000000, 0x7FF8000000000000, (1 << 52) - 1
    a = bits & ((1 << 63) - 1)
    if mode == _NEAREST:   # up from the binade's 1.5 point (ties away); floor 2^-127
        r = torch.clamp_min((a + (1 << 51)) & ~mmask, lo)
    elif mode == _STOCHASTIC:
        if seed is None:
            raise ValueError("stochastic rounding needs a seed tensor (mixprec.ops.draw_seed)")
        up = stochastic_up(a & mmask, torch.full_like(a, 52), seed.to(x.device))
        r = torch.where(a < lo, lo, (a & ~mmask) + (up.long() << 52))
    else:
        r = torch.where(a < lo, lo, a & ~mmask)
    big = top if saturate else nan
    r = torch.where(r > top, big, r)
    r = torch.where(a == inf, big, r)
    r = torch.where((a > inf) | (a == 0) | (bits < 0), nan, r)
    return r.view(torch.float64)


# --------------------------------------------------------------------------------------
# Registration
# --------------------------------------------------------------------------------------
_lib = torch.library.Library("mixprec", "DEF")
_lib.define("round_bits(Tensor x, int[] plan, int mode, Tensor? seed=None) -> Tensor")
_lib.define("round_e8m0(Tensor x, int mode, bool saturate, Tensor? seed=None) -> Tensor")
_lib.define("quantize(Tensor x, str fmt, str rounding='nearest', bool saturate=False, "
            "Tensor? seed=None) -> Tensor")
_lib.define("quantize_scaled(Tensor x, str fmt, Tensor scale, str rounding='nearest', "
            "bool saturate=True, Tensor? seed=None) -> Tensor")
_lib.define("quantize_mx(Tensor x, str fmt, int block_size=32, int axis=-1, "
            "str scale_rule='ocp', str rounding='nearest', Tensor? seed=None) "
            "-> (Tensor, Tensor)")

_COMPOSITE = "CompositeImplicitAutograd"
_lib.impl("round_bits", _round_bits, _COMPOSITE)
_lib.impl("round_e8m0", _round_e8m0, _COMPOSITE)


# The dispatcher leaves out trailing arguments equal to their schema default.
def _quantize(x: Tensor, fmt: str, rounding: str = "nearest", saturate: bool = False,
              seed: Optional[Tensor] = None) -> Tensor:
    from .quant import quantize   # quant imports this module
    return quantize(x, fmt, rounding=rounding, saturate=saturate, seed=seed)


def _quantize_scaled(x: Tensor, fmt: str, scale: Tensor, rounding: str = "nearest",
                     saturate: bool = True, seed: Optional[Tensor] = None) -> Tensor:
    from .scaling import quantize_scaled
    return quantize_scaled(x, fmt, scale, rounding=rounding, saturate=saturate, seed=seed)


def _quantize_mx(x: Tensor, fmt: str, block_size: int = 32, axis: int = -1,
                 scale_rule: str = "ocp", rounding: str = "nearest",
                 seed: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    from .scaling import quantize_mx
    return quantize_mx(x, fmt, block_size=block_size, axis=axis, scale_rule=scale_rule,
                       rounding=rounding, seed=seed)


_lib.impl("quantize", _quantize, _COMPOSITE)
_lib.impl("quantize_scaled", _quantize_scaled, _COMPOSITE)
_lib.impl("quantize_mx", _quantize_mx, _COMPOSITE)


def round_bits(x: Tensor, plan: List[int], mode: int, seed: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.mixprec.round_bits``: x (float32/float64) rounded by ``plan``."""
    return torch.ops.mixprec.round_bits(x, plan, mode, seed)


def round_e8m0(x: Tensor, mode: int, saturate: bool, seed: Optional[Tensor] = None) -> Tensor:
    """``torch.ops.mixprec.round_e8m0``: x rounded to e8m0, as float64."""
    return torch.ops.mixprec.round_e8m0(x, mode, saturate, seed)


def compile_options() -> dict:
    """Inductor options under which a compiled model rounds like eager PyTorch:
    ``torch.compile(model, options=mixprec.compile_options())``.

    ``emulate_precision_casts``: Inductor otherwise keeps a float16/bfloat16 value that
    one fused kernel produces and consumes in float32, skipping the rounding that the
    eager cast performs (a layer's float16 output or gradient, for instance).

    ``post_grad_custom_pre_pass``: a pass that changes nothing, whose ``uuid()`` is a hash
    of mixprec's sources. Torch's compile caches (AOT autograd's, Inductor's FX graph
    cache, on disk across processes) key a graph on Dynamo's graph, where a mixprec
    operator is one opaque call: without mixprec's code in the key, a new version of
    mixprec would be served the kernels compiled from the old operators.

    ``reorder_for_peak_memory`` off: Inductor's reordering for peak memory ignores the
    effect tokens that order the stochastic-rounding seed draws (:func:`draw_seed`), and
    ran a layer's bias-gradient draw before its weight-gradient draw, so each gradient
    was rounded with the other's random stream. Inductor then keeps the graph's order
    (its other reorderings respect the tokens); the peak memory of a compiled graph may
    be higher.
    """
    return {"emulate_precision_casts": True, "reorder_for_peak_memory": False,
            "post_grad_custom_pre_pass": _source_pass()}


_SOURCE_PASS = None


def _source_hash() -> str:
    """sha256 of mixprec's version and every .py and .c file of the package."""
    import hashlib
    from pathlib import Path

    from . import __version__
    root = Path(__file__).resolve().parent
    h = hashlib.sha256(__version__.encode())
    for path in sorted(root.rglob("*")):
        if path.suffix in (".py", ".c") and path.is_file():
            h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _source_pass():
    """The no-op graph pass that puts :func:`_source_hash` into torch's cache keys."""
    global _SOURCE_PASS
    if _SOURCE_PASS is None:
        from torch._inductor.custom_graph_pass import CustomGraphPass

        class MixprecSourceKey(CustomGraphPass):
            def __init__(self, key: str):
                self.key = key

            def __call__(self, graph) -> None:   # changes nothing
                return None

            def uuid(self) -> str:
                return self.key

        _SOURCE_PASS = MixprecSourceKey(_source_hash())
    return _SOURCE_PASS
