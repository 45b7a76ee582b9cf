"""fp8-e5m2 training steps against a step written out by hand with ``quantize``.

The reference follows the recipe (Mellempudi et al. 2019) literally, one rounding at a
time, with the random seeds drawn from the generator in the order the engine draws them:

    setup     master = round(w, fp16, stochastic)          one draw per parameter
              model  = round(master, storage, nearest)     e5m2, or fp16 for kept layers
    forward   y = round(round(x, A) @ w^T + b, A)          A = e5m2 or fp16, nearest
    backward  g' = round(g, G)        dx = g' @ w          G = e5m2 stochastic (fp16 nearest
              dw = round(g'^T x', G)  db = round(sum g', G)    in kept layers); draws g', dw, db
    step      grads / S, SGD on the masters, master = round(master, fp16, stochastic),
              model = round(master, storage)

Values, gradients and weights must agree bit for bit: every speed-up of the emulation
(casts skipped, rounding fused, other kernels) has to keep exactly this arithmetic.
"""
import pytest
import torch
from torch import nn

from mixprec.engine import prepare
from mixprec.quant import quantize
from mixprec.recipe import get_recipe

B, SIZES, LR, MOMENTUM, STEPS = 16, (12, 40, 40, 6), 0.05, 0.9, 3


def mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(),
                         nn.Linear(SIZES[1], SIZES[2]), nn.ReLU(),
                         nn.Linear(SIZES[2], SIZES[3]))


def batch(step):
    g = torch.Generator().manual_seed(100 + step)
    # the loss is sum(out * c): its gradient is c * S, small enough for e5m2 at S = 2^16
    return torch.randn(B, SIZES[0], generator=g), torch.randn(B, SIZES[3], generator=g) * 1e-3


def run_engine(keep):
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM),
                 "fp8-e5m2", backend="emulated", seed=0, keep_high_precision=keep)
    outs = []
    for step in range(STEPS):
        x, c = batch(step)
        with mp.autocast():
            out = model(x)
        outs.append(out.detach().float().clone())
        mp.backward((out.float() * c).sum())
        assert mp.step(), "a skipped step would make the comparison vacuous"
        mp.zero_grad()
    return outs, [p.detach().clone() for p in model.parameters()], [m.detach().clone() for m in mp.master_params]


def run_reference(kept_layers):
    """The three Linear layers by hand; ``kept_layers``: indices computing in FP16."""
    gen = torch.Generator().manual_seed(0)
    scale = get_recipe("fp8-e5m2").loss_scale.init_scale
    linears = [m for m in mlp() if isinstance(m, nn.Linear)]
    fmt = ["fp16" if i in kept_layers else "e5m2" for i in range(3)]

    def sr(t, f):
        return quantize(t, f, rounding="stochastic", generator=gen)

    masters = []
    for lin in linears:
        for p in (lin.weight, lin.bias):
            masters.append(nn.Parameter(sr(p.detach().float(), "fp16")))
    opt = torch.optim.SGD(masters, lr=LR, momentum=MOMENTUM)

    def model_weights():
        return [quantize(m.detach(), fmt[i // 2]) for i, m in enumerate(masters)]

    weights, outs = model_weights(), []
    for step in range(STEPS):
        x, c = batch(step)
        # forward; activations leave every layer in a float16 container
        inputs, pre = [], []
        a = x
        for i in range(3):
            xq = quantize(a.float(), fmt[i])
            inputs.append(xq)
            y = quantize(xq @ quantize(weights[2 * i], fmt[i]).t() + weights[2 * i + 1], fmt[i])
            pre.append(y.half())
            a = torch.relu(pre[-1]) if i < 2 else pre[-1]
        outs.append(pre[-1].float())
        # backward of sum(out * c) * S
        g = (c * torch.tensor(scale, dtype=torch.float32)).half()
        grads = [None] * 6
        for i in (2, 1, 0):
            stochastic = fmt[i] == "e5m2"
            rnd = (lambda t, f=fmt[i]: sr(t, f)) if stochastic else (
                lambda t, f=fmt[i]: quantize(t, f))
            gq = rnd(g.float())
            dx = (gq @ quantize(weights[2 * i], fmt[i])).half() if i > 0 else None
            grads[2 * i] = rnd(gq.t() @ inputs[i])
            grads[2 * i + 1] = rnd(gq.sum(0))
            if i > 0:
                g = torch.where(pre[i - 1] > 0, dx, torch.zeros((), dtype=torch.float16))
        inv = torch.tensor(1.0 / scale, dtype=torch.float32)
        for m, gr in zip(masters, grads):
            m.grad = gr * inv
        opt.step()
        with torch.no_grad():
            for m in masters:
                m.copy_(sr(m.detach(), "fp16"))
        weights = model_weights()
    return outs, weights, [m.detach() for m in masters]


@pytest.mark.parametrize("keep,kept_layers", [(None, (0, 2)), ((), ())],
                         ids=["first-last-fp16", "all-e5m2"])
def test_fp8_e5m2_steps_match_the_hand_written_reference(keep, kept_layers):
    outs, weights, masters = run_engine(keep)
    ref_outs, ref_weights, ref_masters = run_reference(kept_layers)
    for got, want in zip(outs + weights + masters, ref_outs + ref_weights + ref_masters):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    # not vacuous: the steps changed the weights and the outputs
    assert not torch.equal(outs[0], outs[-1])
