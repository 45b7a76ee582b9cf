"""FP32 softmax/normalisation that saves 16-bit tensors: bit-identical to the naive path."""
import pytest
import torch
import torch.nn.functional as F

from mixprec.policy import run_fp32

DTYPES = [torch.float16, torch.bfloat16]


def _case(name, dtype, gen):
    """(F function, positional args builder taking x, leaves (weight/bias), stats)."""
    c = 6
    x = (torch.randn(4, c, 5, 5, generator=gen) * 3 + 1).to(dtype)
    w = torch.randn(c, generator=gen).requires_grad_()
    b = torch.randn(c, generator=gen).requires_grad_()
    stats = (torch.randn(c, generator=gen), torch.rand(c, generator=gen) + 0.5)
    if name == "batch_norm_train":
        return F.batch_norm, x, (w, b), stats, lambda x, w, b, s: (x, s[0], s[1], w, b, True, 0.1, 1e-5)
    if name == "batch_norm_eval":
        return F.batch_norm, x, (w, b), stats, lambda x, w, b, s: (x, s[0], s[1], w, b, False, 0.1, 1e-5)
    if name == "instance_norm":
        return F.instance_norm, x, (w, b), stats, lambda x, w, b, s: (x, s[0], s[1], w, b, True)
    if name == "group_norm":
        return F.group_norm, x, (w, b), None, lambda x, w, b, s: (x, 3, w, b)
    if name == "layer_norm":
        w5 = torch.randn(5, generator=gen).requires_grad_()
        b5 = torch.randn(5, generator=gen).requires_grad_()
        return F.layer_norm, x, (w5, b5), None, lambda x, w, b, s: (x, (5,), w, b)
    if name == "softmax":
        return F.softmax, x, (), None, lambda x, *_: (x, -1)
    if name == "log_softmax":
        return F.log_softmax, x, (), None, lambda x, *_: (x, 1)
    raise AssertionError(name)


NAMES = ["batch_norm_train", "batch_norm_eval", "instance_norm", "group_norm", "layer_norm",
         "softmax", "log_softmax"]


def _run(name, dtype, recomputed):
    gen = torch.Generator().manual_seed(0)
    func, x, leaves, stats, build = _case(name, dtype, gen)
    x = x.requires_grad_()
    w, b = (leaves + (None, None))[:2]
    args = build(x, w, b, stats)
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if recomputed:
            out = run_fp32(func, func.__name__, args, {})
        else:   # the naive FP32 path: upcast copies, autograd through them, cast back
            up = tuple(a.float() if isinstance(a, torch.Tensor) and a.dtype == dtype else a
                       for a in args)
            out = func(*up).to(dtype)
    grad = torch.randn(out.shape, generator=gen).to(dtype)
    out.backward(grad)
    grads = [t.grad for t in (x, *leaves)]
    return out, grads, stats, saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_forward_and_gradients_are_bit_identical_to_the_naive_fp32_path(name, dtype):
    out, grads, stats, _ = _run(name, dtype, recomputed=True)
    ref_out, ref_grads, ref_stats, _ = _run(name, dtype, recomputed=False)
    assert out.dtype == dtype and torch.equal(out, ref_out)
    for g, r in zip(grads, ref_grads):
        assert g.dtype == r.dtype and torch.equal(g, r)
    if stats is not None:      # running statistics updated exactly once, like the naive path
        for s, r in zip(stats, ref_stats):
            assert torch.equal(s, r)


@pytest.mark.parametrize("name", NAMES)
def test_no_float32_activation_is_saved(name):
    dtype = torch.float16
    _, _, _, saved = _run(name, dtype, recomputed=True)
    _, _, _, naive = _run(name, dtype, recomputed=False)
    big = 4 * 6 * 5 * 5
    assert (dtype, big) in saved
    assert not [s for s in saved if s[0] == torch.float32 and s[1] >= big]
    assert [s for s in naive if s[0] == torch.float32 and s[1] >= big]   # what it avoids


def test_two_forwards_before_backward_with_running_statistics():
    # the second forward updates the running statistics in place; the first backward must
    # not depend on them (batch statistics), so no in-place-modification error
    bn = torch.nn.BatchNorm1d(3)
    x = torch.randn(8, 3).half().requires_grad_()
    y1 = run_fp32(F.batch_norm, "batch_norm", (x, bn.running_mean, bn.running_var,
                                               bn.weight, bn.bias, True, 0.1, 1e-5), {})
    y2 = run_fp32(F.batch_norm, "batch_norm", (x * 2, bn.running_mean, bn.running_var,
                                               bn.weight, bn.bias, True, 0.1, 1e-5), {})
    (y1.float().sum() + y2.float().sum()).backward()
    assert bn.num_batches_tracked.item() == 0 and x.grad is not None   # functional call
    assert bn.running_mean.ne(0).all()


def test_no_grad_and_fp32_inputs_take_the_plain_path():
    x = torch.randn(4, 5).half()
    with torch.no_grad():
        out = run_fp32(F.softmax, "softmax", (x.requires_grad_(), -1), {})
    assert out.grad_fn is None and out.dtype == torch.float16
    x32 = torch.randn(4, 5, requires_grad=True)
    out = run_fp32(F.softmax, "softmax", (x32, -1), {})
    assert type(out.grad_fn).__name__ == "SoftmaxBackward0"


def _grads_and_saved(fn, x):
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    x = x.detach().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn(x)
    out.backward(torch.ones_like(out) if out.dim() else None)
    return out, x.grad, saved


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spelling", ["torch.softmax", "Tensor.softmax", "torch.log_softmax",
                                      "Tensor.log_softmax"])
def test_torch_and_method_spellings_of_softmax(spelling, dtype):
    ns, name = spelling.split(".")
    func = getattr(torch if ns == "torch" else torch.Tensor, name)
    x = (torch.randn(8, 16, generator=torch.Generator().manual_seed(1)) * 4).to(dtype)
    out, grad, saved = _grads_and_saved(lambda t: run_fp32(func, name, (t, -1), {}), x)
    ref, ref_grad, _ = _grads_and_saved(lambda t: func(t.float(), -1).to(dtype), x)
    assert out.dtype == dtype and torch.equal(out, ref) and torch.equal(grad, ref_grad)
    assert not [s for s in saved if s[0] == torch.float32]


@pytest.mark.parametrize("dtype", DTYPES)
def test_cross_entropy_keeps_a_float32_loss_and_saves_16_bit_logits(dtype):
    gen = torch.Generator().manual_seed(2)
    x = (torch.randn(32, 10, generator=gen) * 3).to(dtype)
    y = torch.randint(0, 10, (32,), generator=gen)
    w = torch.rand(10, generator=gen) + 0.5
    for kwargs in ({}, {"weight": w, "label_smoothing": 0.1}, {"reduction": "none"}):
        out, grad, saved = _grads_and_saved(
            lambda t: run_fp32(F.cross_entropy, "cross_entropy", (t, y), kwargs), x)
        ref, ref_grad, naive = _grads_and_saved(
            lambda t: F.cross_entropy(t.float(), y, **kwargs), x)
        assert out.dtype == torch.float32 and torch.equal(out, ref)
        assert grad.dtype == dtype and torch.equal(grad, ref_grad)
        assert not [s for s in saved if s[0] == torch.float32 and s[1] == 320]
        assert [s for s in naive if s[0] == torch.float32 and s[1] == 320]
