"""Every matmul-like op, in every spelling, through the dispatcher: values and gradients.

Oracle: the operands rounded by ``mixprec.scaling.quantize_spec`` (itself checked against
ml_dtypes and torch's casts in test_quant*/test_scaling), then float64 products written
out here in the op's canonical GEMM form:

    y  = store(alpha * (q(A, role_A, K) @ q(B, role_B, K)) + beta * addend)
    dA = alpha * q(G, grad, N) @ q(B, role_B, N)^T       (a weight: q(dA, weight_grad))
    dB = alpha * q(A, role_A, M)^T @ q(G, grad, M)        (a weight: q(dB, weight_grad))
    d addend = beta * sum q(G, grad, M)                   (a parameter: q(., weight_grad))

Operands are integers in [-7, 7] with |max| = 7, so per-tensor scales (448/7, 57344/7)
are powers of two, every rounded operand is a short dyadic number and every FP32 sum is
exact: the comparison has zero tolerance.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.emulate import PrecisionMode
from mixprec.policy import LayerPolicy
from mixprec.recipe import get_recipe
from mixprec.scaling import quantize_spec

RECIPES = ("fp16-mixed", "bf16-mixed", "fp8-hybrid", "mxfp8",
           "fp8-e5m2:grads.rounding=nearest")


def ints(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(-7, 8, shape, generator=g).float()
    t.view(-1)[0] = 7.0
    return t


def param(*shape, seed=0):
    return nn.Parameter(ints(*shape, seed=seed))


def act(*shape, seed=0):
    return ints(*shape, seed=seed).requires_grad_()


class Ref:
    """Rounding of a role under a recipe, in float64 (values exact)."""

    def __init__(self, recipe):
        self.r = get_recipe(recipe)
        self.policy = LayerPolicy.from_recipe(self.r)

    def q(self, x, role, axis):
        spec = getattr(self.policy, role)
        return quantize_spec(x.detach().float(), spec, self.r.scaling, axis=axis).double()

    def store(self, y):
        if not self.policy.rounds_output:
            return y
        return self.q(y, "activation", -1)

    def gemm(self, A, B, G, roles, alpha=1.0, beta=1.0, addend=None, addend_param=False):
        """(y, dA, dB, d addend) of the canonical form (A: (.., M, K), B: (.., K, N))."""
        ra, rb = roles
        y = alpha * (self.q(A, ra, -1) @ self.q(B, rb, -2))
        if addend is not None:
            y = y + beta * addend.detach().double()
        y = self.store(y)
        g_row, g_col = self.q(G, "grad_output", -1), self.q(G, "grad_output", -2)
        dA = (alpha * (g_row @ self.q(B, rb, -1).transpose(-1, -2))).sum_to_size(A.shape)
        dB = (alpha * (self.q(A, ra, -2).transpose(-1, -2) @ g_col)).sum_to_size(B.shape)
        if ra == "weight":
            dA = self.q(dA, "weight_grad", -1)
        if rb == "weight":
            dB = self.q(dB, "weight_grad", -2)
        dadd = None
        if addend is not None:
            dadd = (beta * g_col).sum_to_size(addend.shape)
            if addend_param:
                dadd = self.q(dadd, "weight_grad", -1)
        return y, dA, dB, dadd


def run(recipe, fn, *inputs, grad=None, seed=9):
    """fn(*inputs) under the recipe's policy; backward with integer upstream gradient."""
    with PrecisionMode(default_policy=LayerPolicy.from_recipe(recipe)) as mode:
        y = fn(*inputs)
    G = ints(*y.shape, seed=seed) if grad is None else grad
    y.backward(G.to(y.dtype))
    return y, G, [t.grad for t in inputs], mode.recorder.coverage()


def same(ours, ref):
    assert ours is not None and ref is not None
    ours = ours.detach().double()
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    assert torch.equal(ours, ref), (ours - ref).abs().max()


# every GEMM spelling: (name, fn(inputs) -> y, make inputs, canonical form)
def _addmm_case(fn):
    def make():
        return act(5, 8, seed=1), param(8, 6, seed=2), param(6, seed=3)

    def canon(x, w, b):
        return dict(A=x, B=w, roles=("activation", "weight"), addend=b, addend_param=True,
                    grads=(x, w, b))
    return fn, make, canon


GEMM_CASES = {
    # transformers' Conv1D: torch.addmm(bias, x, weight)
    "torch.addmm": _addmm_case(lambda x, w, b: torch.addmm(b, x, w)),
    "Tensor.addmm": _addmm_case(lambda x, w, b: b.addmm(x, w)),
    "torch.addmm alpha beta": (
        lambda x, w, b: torch.addmm(b, x, w, beta=2.0, alpha=0.5),
        lambda: (act(5, 8, seed=1), param(8, 6, seed=2), act(5, 6, seed=3)),
        lambda x, w, b: dict(A=x, B=w, roles=("activation", "weight"), addend=b, alpha=0.5,
                             beta=2.0, grads=(x, w, b))),
    "torch.mm": (lambda x, w: torch.mm(x, w), lambda: (act(5, 8, seed=1), param(8, 6, seed=2)),
                 lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "Tensor.mm weight first": (
        lambda w, x: w.mm(x), lambda: (param(6, 8, seed=2), act(8, 5, seed=1)),
        lambda w, x: dict(A=w, B=x, roles=("weight", "activation"), grads=(w, x))),
    "torch.bmm": (lambda a, b: torch.bmm(a, b),
                  lambda: (act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
                  lambda a, b: dict(A=a, B=b, roles=("activation", "activation"), grads=(a, b))),
    "Tensor.bmm": (lambda a, b: a.bmm(b), lambda: (act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
                   lambda a, b: dict(A=a, B=b, roles=("activation", "activation"), grads=(a, b))),
    "torch.baddbmm": (
        lambda i, a, b: torch.baddbmm(i, a, b, beta=0.5, alpha=2.0),
        lambda: (act(3, 4, 5, seed=3), act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
        lambda i, a, b: dict(A=a, B=b, roles=("activation", "activation"), addend=i, alpha=2.0,
                             beta=0.5, grads=(a, b, i))),
    "Tensor.baddbmm beta 0": (
        lambda i, a, b: i.baddbmm(a, b, beta=0.0),
        lambda: (act(3, 4, 5, seed=3), act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
        lambda i, a, b: dict(A=a, B=b, roles=("activation", "activation"), grads=(a, b))),
    "torch.addbmm": (
        lambda i, a, b: torch.addbmm(i, a, b),
        lambda: (param(4, 5, seed=3), act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
        lambda i, a, b: dict(A=a.permute(1, 0, 2).reshape(4, 24), B=b.reshape(24, 5),
                             roles=("activation", "activation"), addend=i, addend_param=True,
                             grads=(a, b, i),
                             back=(lambda d: d.reshape(4, 3, 8).permute(1, 0, 2),
                                   lambda d: d.reshape(3, 8, 5), None))),
    "Tensor.addbmm": (
        lambda i, a, b: i.addbmm(a, b, alpha=0.5),
        lambda: (act(4, 5, seed=3), act(3, 4, 8, seed=1), act(3, 8, 5, seed=2)),
        lambda i, a, b: dict(A=a.permute(1, 0, 2).reshape(4, 24), B=b.reshape(24, 5),
                             roles=("activation", "activation"), addend=i, alpha=0.5,
                             grads=(a, b, i),
                             back=(lambda d: d.reshape(4, 3, 8).permute(1, 0, 2),
                                   lambda d: d.reshape(3, 8, 5), None))),
    "torch.matmul broadcast weight": (
        lambda x, w: torch.matmul(x, w), lambda: (act(2, 5, 8, seed=1), param(8, 6, seed=2)),
        lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "Tensor.matmul": (
        lambda a, b: a.matmul(b), lambda: (act(2, 5, 8, seed=1), act(2, 8, 6, seed=2)),
        lambda a, b: dict(A=a, B=b, roles=("activation", "activation"), grads=(a, b))),
    "@": (lambda x, w: x @ w, lambda: (act(5, 8, seed=1), param(8, 6, seed=2)),
          lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "__rmatmul__": (lambda x, w: w.__rmatmul__(x), lambda: (act(5, 8, seed=1), param(8, 6, seed=2)),
                    lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "torch.mv": (
        lambda w, v: torch.mv(w, v), lambda: (param(6, 8, seed=2), act(8, seed=1)),
        lambda w, v: dict(A=w, B=v.unsqueeze(-1), roles=("weight", "activation"), grads=(w, v),
                          out=lambda y: y.squeeze(-1), grad_in=lambda g: g.unsqueeze(-1),
                          back=(None, lambda d: d.squeeze(-1)))),
    "Tensor.mv": (
        lambda w, v: w.mv(v), lambda: (param(6, 8, seed=2), act(8, seed=1)),
        lambda w, v: dict(A=w, B=v.unsqueeze(-1), roles=("weight", "activation"), grads=(w, v),
                          out=lambda y: y.squeeze(-1), grad_in=lambda g: g.unsqueeze(-1),
                          back=(None, lambda d: d.squeeze(-1)))),
    "torch.addmv": (
        lambda i, w, v: torch.addmv(i, w, v, beta=2.0),
        lambda: (param(6, seed=3), param(6, 8, seed=2), act(8, seed=1)),
        lambda i, w, v: dict(A=w, B=v.unsqueeze(-1), roles=("weight", "activation"),
                             addend=i.unsqueeze(-1), beta=2.0, addend_param=True,
                             grads=(w, v, i), out=lambda y: y.squeeze(-1),
                             grad_in=lambda g: g.unsqueeze(-1),
                             back=(None, lambda d: d.squeeze(-1), lambda d: d.squeeze(-1)))),
    "Tensor.addmv": (
        lambda i, w, v: i.addmv(w, v),
        lambda: (act(6, seed=3), param(6, 8, seed=2), act(8, seed=1)),
        lambda i, w, v: dict(A=w, B=v.unsqueeze(-1), roles=("weight", "activation"),
                             addend=i.unsqueeze(-1), grads=(w, v, i), out=lambda y: y.squeeze(-1),
                             grad_in=lambda g: g.unsqueeze(-1),
                             back=(None, lambda d: d.squeeze(-1), lambda d: d.squeeze(-1)))),
    "torch.tensordot": (
        lambda x, w: torch.tensordot(x, w, dims=([1], [0])),
        lambda: (act(5, 8, seed=1), param(8, 6, seed=2)),
        lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "torch.tensordot transposed weight": (
        lambda x, w: torch.tensordot(x, w, dims=([1], [1])),
        lambda: (act(5, 8, seed=1), param(6, 8, seed=2)),
        lambda x, w: dict(A=x, B=w.t(), roles=("activation", "weight"), grads=(x, w),
                          back=(None, lambda d: d.t()))),
    "torch.tensordot dims=2": (
        lambda a, b: torch.tensordot(a, b, dims=2),
        lambda: (act(5, 2, 4, seed=1), act(2, 4, 6, seed=2)),
        lambda a, b: dict(A=a.reshape(5, 8), B=b.reshape(8, 6), roles=("activation", "activation"),
                          grads=(a, b), back=(lambda d: d.reshape(5, 2, 4),
                                              lambda d: d.reshape(2, 4, 6)))),
    "torch.einsum linear": (
        lambda x, w: torch.einsum("ij,jk->ik", x, w),
        lambda: (act(5, 8, seed=1), param(8, 6, seed=2)),
        lambda x, w: dict(A=x, B=w, roles=("activation", "weight"), grads=(x, w))),
    "torch.einsum attention scores": (
        lambda q, k: torch.einsum("bhqd,bhkd->bhqk", q, k),
        lambda: (act(2, 3, 4, 8, seed=1), act(2, 3, 5, 8, seed=2)),
        lambda q, k: dict(A=q.reshape(6, 4, 8), B=k.reshape(6, 5, 8).transpose(-1, -2),
                          roles=("activation", "activation"), grads=(q, k),
                          out=lambda y: y.reshape(2, 3, 4, 5),
                          grad_in=lambda g: g.reshape(6, 4, 5),
                          back=(lambda d: d.reshape(2, 3, 4, 8),
                                lambda d: d.transpose(-1, -2).reshape(2, 3, 5, 8)))),
    "torch.einsum list and ellipsis": (
        lambda x, w: torch.einsum("...j,kj", [x, w]),
        lambda: (act(2, 5, 8, seed=1), param(6, 8, seed=2)),
        lambda x, w: dict(A=x.reshape(10, 8), B=w.t(), roles=("activation", "weight"),
                          grads=(x, w), out=lambda y: y.reshape(2, 5, 6),
                          grad_in=lambda g: g.reshape(10, 6),
                          back=(lambda d: d.reshape(2, 5, 8), lambda d: d.t()))),
}


@pytest.mark.parametrize("recipe", RECIPES)
@pytest.mark.parametrize("case", list(GEMM_CASES))
def test_gemm_ops_match_the_reference_forward_and_backward(case, recipe):
    fn, make, canon = GEMM_CASES[case]
    inputs = make()
    y, G, grads, cov = run(recipe, fn, *inputs)
    c = canon(*inputs)
    ref = Ref(recipe)
    Gc = c.get("grad_in", lambda g: g)(G)
    ry, dA, dB, dadd = ref.gemm(c["A"], c["B"], Gc, c["roles"], c.get("alpha", 1.0),
                                c.get("beta", 1.0), c.get("addend"), c.get("addend_param", False))
    same(y, c.get("out", lambda t: t)(ry))
    back = c.get("back", (None, None, None))
    for t, want, to_input in zip(c["grads"], (dA, dB, dadd), back):
        same(t.grad, (to_input or (lambda t: t))(want))
    if "addend" not in c and len(inputs) == 3:      # beta == 0: the input gets no gradient
        assert inputs[0].grad is None or not inputs[0].grad.any()
    assert cov.unrecognised == 0 and cov.emulated >= 1, str(cov)


def test_gemm_references_are_not_vacuous():
    """The oracle must see rounding: under mxfp8, 7 * 1.125 is not an e4m3 element, and
    the reference of another recipe (fp16-mixed, which holds these values) disagrees."""
    fn, make, canon = GEMM_CASES["torch.addmm"]
    x, w, b = make()
    with torch.no_grad():
        x.mul_(1.125)
    y, G, grads, _ = run("mxfp8", fn, x, w, b)
    c = canon(x, w, b)
    exact = x.detach().double() @ w.detach().double() + b.detach().double()
    assert not torch.equal(y.detach().double(), exact)
    ref = Ref("mxfp8").gemm(c["A"], c["B"], G, c["roles"], addend=b, addend_param=True)
    same(y, ref[0])
    same(x.grad, ref[1])
    wrong = Ref("fp16-mixed").gemm(c["A"], c["B"], G, c["roles"], addend=b, addend_param=True)
    assert torch.equal(wrong[0], exact)
    assert not torch.equal(y.detach().double(), wrong[0])


# -- convolutions, transposed ----------------------------------------------------------
@pytest.mark.parametrize("recipe", ("fp16-mixed", "fp8-hybrid", "mxfp8"))
@pytest.mark.parametrize("nd, spelling", [(1, "F"), (2, "F"), (3, "F"), (2, "module"),
                                          (1, "torch")])
def test_conv_transpose_matches_float64_autograd_on_rounded_operands(nd, spelling, recipe):
    cin, cout, groups = 4, 6, 2
    x = act(2, cin, *[3] * nd, seed=1)
    w = param(cin, cout // groups, *[2] * nd, seed=2)
    b = param(cout, seed=3)
    geo = dict(stride=2, padding=1, output_padding=1, groups=groups,
               dilation=2 if nd == 1 else 1)
    if spelling == "module":
        m = nn.ConvTranspose2d(cin, cout, 2, **geo)
        m.weight, m.bias = w, b
        fn = lambda x, w, b: m(x)  # noqa: E731
    else:
        op = (getattr(F, f"conv_transpose{nd}d") if spelling == "F"
              else getattr(torch, f"conv_transpose{nd}d"))
        fn = lambda x, w, b: op(x, w, b, geo["stride"], geo["padding"],  # noqa: E731
                                geo["output_padding"], geo["groups"], geo["dilation"])
    y, G, (dx, dw, db), cov = run(recipe, fn, x, w, b)
    assert cov.rows[0].op == f"conv_transpose{nd}d" and cov.emulated == 1
    ref = Ref(recipe)
    op64 = getattr(F, f"conv_transpose{nd}d")
    xs, ws = ref.q(x, "activation", 1), ref.q(w, "weight", 0)
    same(y, ref.store(op64(xs, ws, b.detach().double(), **geo)))
    g_row, g_col = ref.q(G, "grad_output", 1), ref.q(G, "grad_output", 0)
    # float64 autograd of conv_transpose itself: the oracle of the conv identities
    xr = ref.q(x, "activation", 0).requires_grad_()
    wr = ref.q(w, "weight", 1).requires_grad_()
    xa = xs.clone().requires_grad_()
    want_dx, = torch.autograd.grad(op64(xa, wr, None, **geo), [xa], g_row)
    wa = ws.clone().requires_grad_()
    want_dw, = torch.autograd.grad(op64(xr, wa, None, **geo), [wa], g_col)
    same(dx, want_dx)
    same(dw, ref.q(want_dw, "weight_grad", 0))
    same(db, ref.q(g_col.sum([0] + list(range(2, g_col.dim()))), "weight_grad", -1))


# -- bilinear, embedding_bag ------------------------------------------------------------
@pytest.mark.parametrize("recipe", ("fp16-mixed", "bf16-mixed", "fp8-hybrid"))
@pytest.mark.parametrize("spelling", ["F", "module"])
def test_bilinear_matches_float64_autograd_on_rounded_operands(spelling, recipe):
    x1, x2 = act(5, 4, seed=1), act(5, 3, seed=2)
    w, b = param(6, 4, 3, seed=3), param(6, seed=4)
    if spelling == "module":
        m = nn.Bilinear(4, 3, 6)
        m.weight, m.bias = w, b
        fn = lambda x1, x2, w, b: m(x1, x2)  # noqa: E731
    else:
        fn = F.bilinear
    y, G, (d1, d2, dw, db), cov = run(recipe, fn, x1, x2, w, b)
    assert [r.op for r in cov.rows] == ["bilinear"] and cov.emulated == 1
    ref = Ref(recipe)
    q1, q2, qw = (ref.q(x1, "activation", -1).requires_grad_(),
                  ref.q(x2, "activation", -1).requires_grad_(),
                  ref.q(w, "weight", -1).requires_grad_())
    y64 = F.bilinear(q1, q2, qw, b.detach().double())
    same(y, ref.store(y64))
    gq = ref.q(G, "grad_output", -1)
    w1, w2, ww = torch.autograd.grad(F.bilinear(q1, q2, qw), [q1, q2, qw], gq)
    same(d1, w1)
    same(d2, w2)
    same(dw, ref.q(ww, "weight_grad", -1))
    same(db, ref.q(gq.sum(0), "weight_grad", -1))


@pytest.mark.parametrize("recipe", ("fp16-mixed", "fp8-hybrid", "mxfp8"))
@pytest.mark.parametrize("mode, spelling", [("sum", "F"), ("mean", "F"), ("max", "F"),
                                            ("sum", "module")])
def test_embedding_bag_matches_the_reference(mode, spelling, recipe):
    w = param(10, 8, seed=1)
    idx = torch.tensor([1, 2, 4, 5, 4, 3, 2, 9])
    offsets = torch.tensor([0, 3, 5])
    psw = act(8, seed=2) if mode == "sum" else None
    if spelling == "module":
        m = nn.EmbeddingBag(10, 8, mode=mode)
        m.weight = w
        fn = lambda w, p: m(idx, offsets, per_sample_weights=p)  # noqa: E731
    else:
        fn = lambda w, p: F.embedding_bag(idx, w, offsets, mode=mode,  # noqa: E731
                                          per_sample_weights=p)
    inputs = (w, psw) if psw is not None else (w,)
    y, G, grads, cov = run(recipe, lambda w, p=None: fn(w, p), *inputs)
    assert cov.rows[0].op == "embedding_bag" and cov.emulated == 1
    ref = Ref(recipe)
    w64 = w.detach().double().requires_grad_()
    p64 = None if psw is None else psw.detach().double().requires_grad_()
    y64 = F.embedding_bag(idx, w64, offsets, mode=mode, per_sample_weights=p64)
    same(y, ref.store(ref.q(y64, "activation", -1)))
    gq = ref.q(G, "grad_output", -1)
    wants = torch.autograd.grad(y64, [w64] + ([p64] if p64 is not None else []), gq)
    same(grads[0], ref.q(wants[0], "weight_grad", -1))
    if psw is not None:
        same(grads[1], wants[1])


# -- both dtypes, both passes ------------------------------------------------------------
SIXTEEN_BIT_CASES = {
    "addmm": lambda x, w, b: torch.addmm(b, x, w),
    "mm": lambda x, w, b: x.mm(w),
    "matmul": lambda x, w, b: x @ w,
    "linear": lambda x, w, b: F.linear(x, w.t(), b),
    "tensordot": lambda x, w, b: torch.tensordot(x, w, 1),
    "einsum": lambda x, w, b: torch.einsum("ij,jk->ik", x, w),
    "baddbmm": lambda x, w, b: torch.baddbmm(b, x[None], w[None]),
    "addmv": lambda x, w, b: torch.addmv(b, w.t(), x[0]),
}


@pytest.mark.parametrize("policy", ["fp16-mixed", "fp8-hybrid", "fp32"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", list(SIXTEEN_BIT_CASES))
def test_sixteen_bit_activation_meets_fp32_parameter(case, dtype, policy):
    fn = SIXTEEN_BIT_CASES[case]
    w, b = param(8, 6, seed=2), param(6, seed=3)
    x16 = ints(5, 8, seed=1).to(dtype).requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    pol = LayerPolicy.from_recipe(policy)
    with PrecisionMode(default_policy=pol):
        y16 = fn(x16, w, b)        # must not raise "mat1 and mat2 must have the same dtype"
        y32 = fn(x32, w, b)
    assert torch.equal(y16.double(), y32.double())
    y16.float().sum().backward()
    assert x16.grad is not None and x16.grad.dtype == dtype and w.grad.dtype == torch.float32
    assert torch.isfinite(x16.grad.float()).all()


# -- attribution -----------------------------------------------------------------------
class Conv1DLike(nn.Module):
    """transformers' Conv1D: weight (in, out), computed by torch.addmm."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(ints(nx, nf, seed=nx))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(
            *x.shape[:-1], -1)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = Conv1DLike(8, 8)
        self.head = nn.Linear(8, 4)
        self.tied = nn.Parameter(ints(4, 4, seed=5))

    def forward(self, x):
        h = self.proj(x)
        h = h @ self.head.weight.t()        # the weight of a module that is not running
        return F.linear(h.transpose(0, 1) @ h, self.tied)   # activations only, then own


def test_calls_are_attributed_to_the_module_owning_the_weight():
    from mixprec.policy import attach
    from mixprec.layers import is_gemm_layer, trace_gemm_layers
    block = Block()
    pol = LayerPolicy.from_recipe("fp16-mixed")
    with attach(block, lambda n, m: pol), PrecisionMode() as mode:
        block(ints(3, 8, seed=1))
    rows = [(r.op, r.module, r.status, r.has_weight) for r in mode.recorder.coverage().rows]
    assert rows == [("addmm", "proj", "emulated", True),
                    ("matmul", "", "emulated", True),     # head is not running: its owner
                    ("matmul", "", "emulated", False),    # is the innermost running holder
                    ("linear", "", "emulated", True)]
    assert trace_gemm_layers(block, ints(3, 8, seed=1)) == ("proj", "")
    assert is_gemm_layer(block.proj) and is_gemm_layer(block.head)
    assert not is_gemm_layer(nn.LayerNorm(8)) and not is_gemm_layer(nn.Embedding(4, 4))
    assert not is_gemm_layer(block)      # its weight is named "tied"


def test_kept_module_is_reported_kept_not_emulated():
    from mixprec.policy import attach
    model = nn.Sequential(Conv1DLike(8, 8), Conv1DLike(8, 8))
    fp16, fp32 = LayerPolicy.from_recipe("fp16-mixed"), LayerPolicy()
    with attach(model, lambda n, m: fp32 if n == "1" else fp16, kept=("1",)), \
            PrecisionMode() as mode:
        y = model(ints(3, 8, seed=1))
    cov = mode.recorder.coverage()
    assert [(r.module, r.status) for r in cov.rows] == [("0", "emulated"), ("1", "kept")]
    assert (cov.emulated, cov.kept, cov.unrecognised) == (1, 1, 0)
    assert y.dtype == torch.float32      # the kept layer ran in FP32 on a float16 input
    assert "kept by a rule" in str(cov)


# -- einsum beyond two operands -----------------------------------------------------------
def test_einsum_three_operands_contract_left_to_right():
    a, b, c = act(3, 4, seed=1), act(4, 5, seed=2), act(5, 2, seed=3)
    y, G, grads, cov = run("fp16-mixed", lambda a, b, c: torch.einsum("ij,jk,kl->il", a, b, c),
                           a, b, c)
    ref = Ref("fp16-mixed")
    ab = ref.store(ref.q(a, "activation", -1) @ ref.q(b, "activation", -2))
    same(y, ref.store(ref.q(ab, "activation", -1) @ ref.q(c, "activation", -2)))
    assert [(r.op, r.calls) for r in cov.rows] == [("einsum", 1)]
    assert all(g is not None for g in grads)


def test_einsum_sums_an_index_of_one_operand_before_the_product():
    a, b = act(3, 4, seed=1), act(4, 5, seed=2)
    y, G, grads, cov = run("mxfp8", lambda a, b: torch.einsum("ij,jk->i", a, b), a, b)
    ref = Ref("mxfp8")
    want = ref.q(a, "activation", -1) @ ref.q(b.sum(1, keepdim=True), "activation", -2)
    same(y, want.squeeze(-1))


def test_einsum_with_a_repeated_index_is_not_recognised_and_single_operands_not_recorded():
    a, b = ints(4, 4, seed=1), ints(4, 3, seed=2)
    with PrecisionMode(default_policy=LayerPolicy.from_recipe("fp16-mixed")) as mode:
        with pytest.warns(UserWarning, match="einsum in module .* is not emulated.*'ii,ij->j'"):
            y = torch.einsum("ii,ij->j", a, b)
        torch.einsum("ij->ji", a)
    assert torch.equal(y, torch.einsum("ii,ij->j", a, b))
    cov = mode.recorder.coverage()
    assert [(r.op, r.status, r.calls) for r in cov.rows] == [("einsum", "unrecognised", 1)]


WEIGHTED_16_BIT = {
    "conv2d": (lambda x: F.conv2d(x, param(6, 4, 3, 3, seed=2), param(6, seed=3)), (2, 4, 5, 5)),
    "conv_transpose1d": (lambda x: F.conv_transpose1d(x, param(4, 6, 3, seed=2)), (2, 4, 5)),
    "bilinear": (lambda x: F.bilinear(x, x, param(3, 4, 4, seed=2)), (5, 4)),
}


@pytest.mark.parametrize("policy", ["fp16-mixed", "fp32"])
@pytest.mark.parametrize("case", list(WEIGHTED_16_BIT))
def test_sixteen_bit_inputs_meet_fp32_weights_of_conv_and_bilinear(case, policy):
    fn, shape = WEIGHTED_16_BIT[case]
    x16 = (ints(*shape, seed=1) / 8).half().requires_grad_()
    with PrecisionMode(default_policy=LayerPolicy.from_recipe(policy)):
        y16 = fn(x16)
        y32 = fn(x16.detach().float())
    assert torch.equal(y16.double(), y32.double())
    y16.float().sum().backward()
    assert x16.grad.dtype == torch.float16 and torch.isfinite(x16.grad.float()).all()


def test_out_buffers_run_as_called_and_in_place_variants_are_not_recognised():
    """out= is how compiled code runs the GEMMs it traced: plain and unrecorded."""
    a, b, buf = ints(3, 4, seed=1), ints(4, 5, seed=2), torch.empty(3, 5)
    x = ints(3, 5, seed=3)
    with PrecisionMode(default_policy=LayerPolicy.from_recipe("fp8-hybrid")) as mode:
        torch.mm(a + 0.1, b, out=buf)
        y = torch.mm(a + 0.1, b, out=None)
        with pytest.warns(UserWarning, match="addmm_ in module .* not emulated .*in-place"):
            x.addmm_(a, b)
    assert torch.equal(buf, torch.mm(a + 0.1, b)) and not torch.equal(y, buf)
    assert [(r.op, r.status) for r in mode.recorder.coverage().rows] == [
        ("mm", "emulated"), ("addmm_", "unrecognised")]
