"""The one door into emulation: every matmul-like torch call, in every spelling.

:class:`mixprec.emulate.PrecisionMode` hands each call it intercepts to :func:`dispatch`,
which

1. binds the call's arguments (function and Tensor-method spellings alike) and reduces
   it to an emulated primitive of :mod:`mixprec.emulate`;
2. attributes it to a layer: the innermost running module that holds the weight
   operand's Parameter, else the innermost running module (:func:`mixprec.policy.owner_layer`);
3. records it in the coverage report (:mod:`mixprec.coverage`): emulated (with the
   formats of its roles), kept by a rule, an FP32 op, or not recognised (warned once
   per op and module, or raised under ``strict``);
4. runs it under that layer's policy, or as torch's own op in the widest dtype of its
   floating operands (so a 16-bit activation meeting an FP32 parameter never fails).

Reductions, each with rounded operands and FP32 accumulation::

    F.linear(x, w, b)                     QLinear
    addmm / baddbmm / addmv (input, a, b) beta * input + alpha * (a @ b)     QMatmul
    mm, bmm, matmul, @, mv                a @ b                              QMatmul
    addbmm(input, A, B)                   beta * input + alpha * (A' @ B'),  A' = [A_0 .. A_n]
                                          along K, B' stacked along K        QMatmul
    tensordot(a, b, dims)                 permute + reshape to (M, K) @ (K, N)
    einsum (two or more operands)         pairwise, left to right: indices of one operand
                                          that nothing later needs are summed first, the
                                          rest become (batch, M, K) @ (batch, K, N)
    conv1d/2d/3d, conv_transpose1d/2d/3d  QConv, QConvTranspose
    F.bilinear                            QBilinear
    F.embedding, F.embedding_bag          QEmbedding, QEmbeddingBag
    F.scaled_dot_product_attention        matmul, FP32 softmax, matmul

A call with an ``out=`` buffer runs as called and is not recorded: that is how compiled
code (Inductor's extern kernels) runs the GEMMs of an emulation it traced.

MX blocks of a reshaped operand run along its flattened reduction axis: in ``addbmm``
and ``tensordot`` a block may span two batch entries or contracted dimensions when
their size is not a multiple of the block size.

Roles: an operand that is an ``nn.Parameter`` (or a view of one, such as ``w.t()``) is
rounded as a weight and its gradient as a weight gradient; other operands are
activations; the weight of linear, conv, bilinear and embedding is always a weight.
"""
from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .coverage import OUTSIDE
from .emulate import (_bilinear, _conv, _conv_transpose, _embedding, _embedding_bag, _linear,
                      _matmul, _sdpa)
from .policy import Layer, owner_layer, parameter_of, run_fp32
from .qfunc import GemmSpec, OpContext

__all__ = ["NOT_MATMUL", "dispatch", "matmul_like_ops", "einsum_contract"]

NOT_MATMUL = object()    # dispatch's answer for a call that is not matmul-like

_ALL_ROLES = ("weight", "activation", "grad_output", "weight_grad")
_ACT_ROLES = ("activation", "grad_output")
_LOOKUP_ROLES = ("activation", "grad_output", "weight_grad")


class _Call(NamedTuple):
    """A bound call: ``run(next_context)`` computes it emulated; ``weight`` is the
    operand it is attributed by; ``roles`` the tensor roles it rounds."""
    run: Callable
    weight: Optional[torch.Tensor]
    roles: Tuple[str, ...]


class _Unsupported(NamedTuple):
    reason: str
    weight: Optional[torch.Tensor] = None


def _bind(args: tuple, kwargs: dict, names: Sequence[str], defaults: dict):
    """Arguments as a list in ``names`` order; None if a keyword is unknown (out=...)."""
    if len(args) > len(names) or any(k not in names for k in kwargs):
        return None
    values = list(args)
    for n in names[len(args):]:
        values.append(kwargs.get(n, defaults.get(n)))
    return values


def _unknown(kwargs: dict, names: Sequence[str]) -> _Unsupported:
    extra = sorted(k for k in kwargs if k not in names)
    return _Unsupported(f"arguments {', '.join(e + '=' for e in extra) or 'beyond the signature'}")


def _floating(*tensors) -> bool:
    return all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)


def _role(t: torch.Tensor) -> str:
    return "weight" if parameter_of(t) is not None else "activation"


def _gemm_call(a, b, addend=None, alpha=1.0, beta=1.0, operands=None, reshape=None) -> _Call:
    """A product a @ b with an optional addend; each operand's role follows its
    Parameter-ness. ``operands()`` (if given) returns the (A, B) actually multiplied, a
    reshape of a and b built only when the call is emulated; ``reshape`` maps the
    product back to the op's result shape."""
    roles = (_role(a), _role(b))
    spec = GemmSpec(roles, float(alpha), float(beta),
                    addend is not None and parameter_of(addend) is not None)
    weight = a if roles[0] == "weight" else b if roles[1] == "weight" else None

    def run(ctx):
        x, y = (a, b) if operands is None else operands()
        out = _matmul(x, y, ctx(), spec, addend)
        return out if reshape is None else reshape(out)
    return _Call(run, weight, _ALL_ROLES if weight is not None else _ACT_ROLES)


def _numbers(*values) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)


# --------------------------------------------------------------------------------------
# Binders: (args, kwargs) -> _Call, _Unsupported, or None (not a floating matmul: the
# op runs as called, unrecorded; torch raises its own errors for bad shapes)
# --------------------------------------------------------------------------------------
def _bind_linear(args, kwargs):
    names = ("input", "weight", "bias")
    b = _bind(args, kwargs, names, {})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(*b[:2]):
        return None
    return _Call(lambda ctx: _linear(*b, ctx()), b[1], _ALL_ROLES)


def _bind_product(second: str, dims: Optional[Tuple[int, int]] = None, swap: bool = False):
    names = ("input", second)

    def bind(args, kwargs):
        b = _bind(args, kwargs, names, {})
        if b is None:
            return _unknown(kwargs, names)
        a, m = (b[1], b[0]) if swap else (b[0], b[1])
        if not _floating(a, m) or (dims is not None and (a.dim(), m.dim()) != dims):
            return None
        return _gemm_call(a, m)
    return bind


def _bind_add_product(first: str, second: str, dims: Tuple[int, int], stacked: bool = False):
    names = ("input", first, second, "beta", "alpha")

    def bind(args, kwargs):
        b = _bind(args, kwargs, names, {"beta": 1, "alpha": 1})
        if b is None:
            return _unknown(kwargs, names)
        addend, a, m, beta, alpha = b
        if not _floating(addend, a, m) or (a.dim(), m.dim()) != dims:
            return None
        if not _numbers(alpha, beta):
            return _Unsupported("alpha/beta that are not Python numbers", m)
        if stacked:      # sum_i A_i @ B_i == [A_0 .. A_n] @ [B_0; ..; B_n]
            if a.shape[0] != m.shape[0] or a.shape[2] != m.shape[1]:
                return None
            return _gemm_call(a, m, addend, alpha, beta, operands=lambda: (
                a.permute(1, 0, 2).reshape(a.shape[1], -1), m.reshape(-1, m.shape[2])))
        return _gemm_call(a, m, addend, alpha, beta)
    return bind


def _bind_tensordot(args, kwargs):
    names = ("a", "b", "dims", "out")
    b = _bind(args, kwargs, names, {"dims": 2})
    if b is None:
        return _unknown(kwargs, names)
    a, m, dims, out = b
    if out is not None:
        return _Unsupported("out=")
    if not _floating(a, m):
        return None
    if isinstance(dims, torch.Tensor):
        return _Unsupported("dims given as a tensor")
    if isinstance(dims, int):
        if dims < 0 or dims > min(a.dim(), m.dim()):
            return None
        da, db = list(range(a.dim() - dims, a.dim())), list(range(dims))
    else:
        try:
            da, db = ([d] if isinstance(d, int) else list(d) for d in dims)
        except (TypeError, ValueError):
            return None
        if len(da) != len(db):
            return None
        da, db = [d % a.dim() for d in da], [d % m.dim() for d in db]
    free_a = [i for i in range(a.dim()) if i not in da]
    free_b = [i for i in range(m.dim()) if i not in db]
    if any(a.shape[i] != m.shape[j] for i, j in zip(da, db)):
        return None
    k = math.prod(a.shape[i] for i in da)
    out_shape = [a.shape[i] for i in free_a] + [m.shape[i] for i in free_b]
    return _gemm_call(a, m, operands=lambda: (a.permute(free_a + da).reshape(-1, k),
                                              m.permute(db + free_b).reshape(k, -1)),
                      reshape=lambda y: y.reshape(out_shape))


# -- einsum ----------------------------------------------------------------------------
_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _parse_einsum(equation: str, operands: Sequence[torch.Tensor]):
    """(input index strings, output index string) with '...' replaced by letters;
    None when the equation is not of the supported form."""
    eq = equation.replace(" ", "")
    lhs, arrow, rhs = eq.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(operands):
        return None
    used = set(c for c in eq if c.isalpha())
    spare = [c for c in _LETTERS if c not in used]
    ell_dims = max([op.dim() - len(t.replace("...", "")) for t, op in zip(terms, operands)
                    if "..." in t] or [0])
    if ell_dims > len(spare):
        return None
    ell = "".join(spare[:ell_dims])
    out_terms = []
    for t, op in zip(terms, operands):
        if "..." in t:
            n = op.dim() - len(t.replace("...", ""))
            if n < 0:
                return None
            t = t.replace("...", ell[ell_dims - n:])
        if len(t) != op.dim() or not t.isalpha() or len(set(t)) != len(t):
            return None      # repeated index (a diagonal) or a malformed term
        out_terms.append(t)
    if arrow:
        out = rhs.replace("...", ell)
    else:
        counts = {c: sum(t.count(c) for t in out_terms) for c in set("".join(out_terms))}
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    if not out.isalpha() and out != "" or len(set(out)) != len(out):
        return None
    if any(c not in "".join(out_terms) for c in out):
        return None
    return out_terms, out


def _sum_alone(x: torch.Tensor, tx: str, needed: str) -> Tuple[torch.Tensor, str]:
    """Sum out the indices of ``x`` that ``needed`` does not name."""
    alone = [i for i, c in enumerate(tx) if c not in needed]
    if not alone:
        return x, tx
    return x.sum(alone), "".join(c for c in tx if c in needed)


def einsum_contract(x: torch.Tensor, tx: str, y: torch.Tensor, ty: str, keep: str,
                    product: Callable) -> Tuple[torch.Tensor, str]:
    """Contract ``x`` (indices ``tx``) with ``y`` (``ty``), keeping the indices in
    ``keep``, as one batched product ``product(X, Y)`` of X (batch, M, K) and
    Y (batch, K, N); indices of one operand that ``keep`` and the other operand lack
    are summed first. Returns the result and its index string (batch, M, N order)."""
    x, tx = _sum_alone(x, tx, ty + keep)
    y, ty = _sum_alone(y, ty, tx + keep)
    batch = [c for c in tx if c in ty and c in keep]
    contr = [c for c in tx if c in ty and c not in keep]
    mx = [c for c in tx if c not in ty]
    ny = [c for c in ty if c not in tx]
    size = {}
    for t, v in ((tx, x), (ty, y)):
        for c, s in zip(t, v.shape):
            size[c] = max(size.get(c, 1), s)
    xp = x.permute([tx.index(c) for c in batch + mx + contr])
    yp = y.permute([ty.index(c) for c in batch + contr + ny])
    xp = xp.expand([size[c] for c in batch + mx + contr])
    yp = yp.expand([size[c] for c in batch + contr + ny])
    prod = lambda cs: math.prod(size[c] for c in cs)  # noqa: E731
    X = xp.reshape(prod(batch), prod(mx), prod(contr))
    Y = yp.reshape(prod(batch), prod(contr), prod(ny))
    if not batch:
        X, Y = X[0], Y[0]
    z = product(X, Y).reshape([size[c] for c in batch + mx + ny])
    return z, "".join(batch + mx + ny)


def _bind_einsum(args, kwargs):
    if kwargs or not args or not isinstance(args[0], str):
        return _Unsupported("the sublist form or keyword arguments")
    operands = list(args[1]) if len(args) == 2 and isinstance(args[1], (list, tuple)) \
        else list(args[1:])
    if len(operands) < 2:
        return None         # a single operand is a transpose, trace or sum: no product
    if not _floating(*operands):
        return None
    parsed = _parse_einsum(args[0], operands)
    if parsed is None:
        return _Unsupported(f"einsum {args[0]!r} is not a contraction of operands with "
                            f"distinct indices")
    terms, out = parsed
    weight = next((t for t in operands if parameter_of(t) is not None), None)

    roles = [_role(t) for t in operands]

    def run(ctx):
        z, tz = operands[0], terms[0]
        for i in range(1, len(operands)):
            keep = out + "".join(terms[i + 1:])
            spec = GemmSpec((roles[0] if i == 1 else "activation", roles[i]))
            a, b = z, operands[i]
            z, tz = einsum_contract(a, tz, b, terms[i], keep,
                                    lambda X, Y, spec=spec: _matmul(X, Y, ctx(), spec))
        extra = [j for j, c in enumerate(tz) if c not in out]
        if extra:
            z, tz = z.sum(extra), "".join(c for c in tz if c in out)
        return z.permute([tz.index(c) for c in out])
    return _Call(run, weight, _ALL_ROLES if weight is not None else _ACT_ROLES)


# -- convolutions, bilinear, lookups, attention -----------------------------------------
def _bind_conv(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    b = _bind(args, kwargs, names, {"stride": 1, "padding": 0, "dilation": 1, "groups": 1})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(*b[:2]):
        return None
    return _Call(lambda ctx: _conv(*b, ctx()), b[1], _ALL_ROLES)


def _bind_conv_transpose(args, kwargs):
    names = ("input", "weight", "bias", "stride", "padding", "output_padding", "groups",
             "dilation")
    b = _bind(args, kwargs, names, {"stride": 1, "padding": 0, "output_padding": 0,
                                    "groups": 1, "dilation": 1})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(*b[:2]):
        return None
    if isinstance(b[4], str):
        return _Unsupported(f"padding={b[4]!r}", b[1])
    return _Call(lambda ctx: _conv_transpose(*b, ctx()), b[1], _ALL_ROLES)


def _bind_bilinear(args, kwargs):
    names = ("input1", "input2", "weight", "bias")
    b = _bind(args, kwargs, names, {})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(*b[:3]):
        return None
    return _Call(lambda ctx: _bilinear(*b, ctx()), b[2], _ALL_ROLES)


def _bind_embedding(args, kwargs):
    names = ("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq",
             "sparse")
    b = _bind(args, kwargs, names, {"norm_type": 2.0, "scale_grad_by_freq": False,
                                    "sparse": False})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(b[1]):
        return None
    if b[6]:
        return _Unsupported("sparse=True", b[1])
    return _Call(lambda ctx: _embedding(*b, ctx()), b[1], _LOOKUP_ROLES)


def _bind_embedding_bag(args, kwargs):
    names = ("input", "weight", "offsets", "max_norm", "norm_type", "scale_grad_by_freq",
             "mode", "sparse", "per_sample_weights", "include_last_offset", "padding_idx")
    b = _bind(args, kwargs, names, {"norm_type": 2.0, "scale_grad_by_freq": False,
                                    "mode": "mean", "sparse": False,
                                    "include_last_offset": False})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(b[1]):
        return None
    if b[7]:
        return _Unsupported("sparse=True", b[1])
    return _Call(lambda ctx: _embedding_bag(*b, ctx()), b[1], _LOOKUP_ROLES)


def _bind_sdpa(args, kwargs):
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
             "enable_gqa")
    b = _bind(args, kwargs, names, {"dropout_p": 0.0, "is_causal": False, "enable_gqa": False})
    if b is None:
        return _unknown(kwargs, names)
    if not _floating(*b[:3]):
        return None
    return _Call(lambda ctx: _sdpa(*b, ctx(), ctx()), None, _ACT_ROLES)


def _opaque(reason: str):
    def bind(args, kwargs):
        return _Unsupported(reason)
    return bind


def _table() -> dict:
    """{torch callable: (op name, binder)} for every spelling."""
    T = torch.Tensor
    mm = _bind_product("mat2", (2, 2))
    bmm = _bind_product("mat2", (3, 3))
    matmul = _bind_product("other")
    mv = _bind_product("vec", (2, 1))
    addmm = _bind_add_product("mat1", "mat2", (2, 2))
    baddbmm = _bind_add_product("batch1", "batch2", (3, 3))
    addbmm = _bind_add_product("batch1", "batch2", (3, 3), stacked=True)
    addmv = _bind_add_product("mat", "vec", (2, 1))
    table = {
        F.linear: ("linear", _bind_linear),
        torch.mm: ("mm", mm), T.mm: ("mm", mm),
        torch.bmm: ("bmm", bmm), T.bmm: ("bmm", bmm),
        torch.matmul: ("matmul", matmul), T.matmul: ("matmul", matmul),
        torch.linalg.matmul: ("matmul", matmul), T.__matmul__: ("matmul", matmul),
        T.__rmatmul__: ("matmul", _bind_product("other", swap=True)),
        torch.mv: ("mv", mv), T.mv: ("mv", mv),
        torch.addmm: ("addmm", addmm), T.addmm: ("addmm", addmm),
        torch.baddbmm: ("baddbmm", baddbmm), T.baddbmm: ("baddbmm", baddbmm),
        torch.addbmm: ("addbmm", addbmm), T.addbmm: ("addbmm", addbmm),
        torch.addmv: ("addmv", addmv), T.addmv: ("addmv", addmv),
        torch.tensordot: ("tensordot", _bind_tensordot),
        torch.einsum: ("einsum", _bind_einsum),
        F.conv1d: ("conv1d", _bind_conv), F.conv2d: ("conv2d", _bind_conv),
        F.conv3d: ("conv3d", _bind_conv),
        F.conv_transpose1d: ("conv_transpose1d", _bind_conv_transpose),
        F.conv_transpose2d: ("conv_transpose2d", _bind_conv_transpose),
        F.conv_transpose3d: ("conv_transpose3d", _bind_conv_transpose),
        F.bilinear: ("bilinear", _bind_bilinear),
        F.embedding: ("embedding", _bind_embedding),
        F.embedding_bag: ("embedding_bag", _bind_embedding_bag),
        F.scaled_dot_product_attention: ("scaled_dot_product_attention", _bind_sdpa),
    }
    inplace = _opaque("an in-place variant")
    for name in ("addmm_", "baddbmm_", "addbmm_", "addmv_"):
        table[getattr(T, name)] = (name, inplace)
    composite = _opaque("a composite op whose inner products mixprec cannot see")
    for owner, name in ((F, "multi_head_attention_forward"), (torch, "lstm"), (torch, "gru"),
                        (torch, "rnn_tanh"), (torch, "rnn_relu"),
                        (torch, "_transformer_encoder_layer_fwd"),
                        (torch, "_native_multi_head_attention"), (torch, "chain_matmul"),
                        (torch.linalg, "multi_dot")):
        fn = getattr(owner, name, None)
        if fn is not None:
            table[fn] = (name, composite)
    return table


_ROUTES = _table()


def matmul_like_ops() -> Tuple[str, ...]:
    """Names of the ops dispatch recognises (emulated ones and known composites)."""
    return tuple(sorted({name for name, _ in _ROUTES.values()}))


# --------------------------------------------------------------------------------------
# The door
# --------------------------------------------------------------------------------------
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


def common_dtype(args: tuple, kwargs: dict) -> tuple:
    """Floating operands in one dtype (the widest): an FP32 layer may receive activations
    that an emulated layer stored in float16 or bfloat16."""
    dtypes = _floating_dtypes(kwargs.values(), _floating_dtypes(args, set()))
    if len(dtypes) < 2:
        return args, kwargs
    wide = functools.reduce(torch.promote_types, dtypes)
    return (tuple(_cast_floating(a, wide) for a in args),
            {k: _cast_floating(v, wide) for k, v in kwargs.items()})


def _plain(func, args, kwargs):
    args, kwargs = common_dtype(args, kwargs)
    return func(*args, **kwargs)


def dispatch(mode, func, args: tuple, kwargs: dict):
    """Run one intercepted call; :data:`NOT_MATMUL` if ``func`` is not matmul-like.

    ``mode`` provides ``default`` (the Layer for calls outside attached modules, or
    None), ``default_policy_ids`` (``id()`` of its policy and of that policy's
    activations-only policy), ``generator``, ``fp32`` ({callable: name} of the recipe's
    FP32 ops) and ``recorder`` (a :class:`mixprec.coverage.CoverageRecorder`).
    """
    entry = _ROUTES.get(func)
    if entry is None:
        return NOT_MATMUL
    op, bind = entry
    if "out" in kwargs:
        if kwargs["out"] is not None:
            # Compiled code (Inductor's extern kernels) calls GEMMs into out= buffers to
            # compute what the traced emulation asked for: run as called, unrecorded.
            return func(*args, **kwargs)
        kwargs = {k: v for k, v in kwargs.items() if k != "out"}
    call = bind(args, kwargs)
    if call is None:
        return func(*args, **kwargs)
    weight = call.weight
    default = mode.default
    layer: Optional[Layer] = owner_layer(weight) or default
    module = OUTSIDE if layer is None or layer is default else layer.name
    param = parameter_of(weight)
    has_weight = param is not None and layer is not None and id(param) in layer.params
    rec = mode.recorder
    fp32_name = mode.fp32.get(func)
    if fp32_name is not None and layer is not None:
        rec.record(op, module, "fp32", None, (), "in recipe.fp32_ops", has_weight)
        return run_fp32(func, fp32_name, args, kwargs)
    if layer is None:      # no policy anywhere (torch.autocast decides, in native mode)
        return func(*args, **kwargs)
    policy = layer.policy
    if weight is None:      # activations only (attention): Recipe.attention decides
        policy = policy.for_activations_only()
    if isinstance(call, _Unsupported) or policy.is_identity:
        reason = call.reason if isinstance(call, _Unsupported) else ""
        if layer.kept:
            rec.record(op, module, "kept", None, (), reason, has_weight)
        elif policy.is_identity:
            rec.record(op, module, "fp32", None, (), reason or "FP32 policy", has_weight)
        else:
            rec.unrecognised(op, module, reason, has_weight)
        return _plain(func, args, kwargs)
    # id() of an object Dynamo reached through the torch function mode stack (the outside
    # layer's policy) fails in a frame resumed after a graph break (NameError in its
    # source resolution, torch 2.13): the mode took those ids when it was made
    pid = mode.default_policy_ids[weight is None] if layer is default else id(policy)
    rec.record(op, module, "kept" if layer.kept else "emulated", policy, call.roles, "",
               has_weight, policy_id=pid)
    gen, state, stream = mode.generator, layer.state, mode.signs
    signs = None if stream is None else stream.current()    # this step's Hadamard signs
    return call.run(lambda: OpContext(policy, state, gen, state.next_slot(), signs))
