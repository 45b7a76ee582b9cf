"""Activations saved once (mixprec.shared): exact byte counts, bit-identical training with
and without sharing, stale tags after in-place changes, ReLU backward on every code."""
import contextlib

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from mixprec.emulate import PrecisionMode, attach
from mixprec.engine import prepare
from mixprec.formats import get_format
from mixprec.policy import LayerPolicy
from mixprec.shared import (QReLU, caller_inputs, e5m2_as_float16, exit_caller_inputs, get_tag,
                            shared_operand, sharing_disabled, tag_output)

B, SIZES = 8, (12, 16, 16, 4)


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(SIZES[0], SIZES[1]), nn.ReLU(),
                         nn.Linear(SIZES[1], SIZES[2]), nn.ReLU(),
                         nn.Linear(SIZES[2], SIZES[3]))


def data(seed=1, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, SIZES[0], generator=g) * scale,
            torch.randint(0, SIZES[3], (B,), generator=g))


def saved_by_dtype(fn) -> dict:
    """Bytes saved for backward per dtype, once per storage (as benchmarks/step.py)."""
    storages = {}

    def pack(t):
        key = t.untyped_storage().data_ptr()
        size = t.numel() * t.element_size()
        storages[key] = (t.dtype, max(size, storages.get(key, (None, 0))[1]))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    totals: dict = {}
    for dtype, size in storages.values():
        totals[dtype] = totals.get(dtype, 0) + size
    return totals


def engine_loss(recipe):
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), recipe,
                 backend="emulated", seed=0)
    x, y = data()

    def loss():
        with mp.autocast():
            return F.cross_entropy(model(x), y)
    return mp, loss


def test_fp8_preset_saved_bytes_by_dtype():
    # first and last layer FP16: the batch x itself (float32, the caller's: no copy); ReLU 1
    # (fp16 output) its 1-bit mask; layer 2 its own e5m2 copy of its input and its weight
    # (e5m2); ReLU 2 output (e5m2, reused by layer 3); layer 3 weight (fp16); the loss's
    # fp16 logits (its FP32 log-softmax is recomputed in backward), int64 targets
    _, loss = engine_loss("fp8-e5m2")
    got = saved_by_dtype(loss)
    assert got[torch.float32] == 4 * B * SIZES[0]
    assert got[torch.float16] == 2 * (SIZES[3] * SIZES[2] + B * SIZES[3])
    assert got[torch.uint8] == B * SIZES[1] // 8
    assert got[torch.float8_e5m2] == SIZES[2] * SIZES[1] + B * SIZES[1] + B * SIZES[2]
    assert got[torch.int64] == 8 * B
    with sharing_disabled():
        before = saved_by_dtype(loss)
    # without sharing: layer 1 keeps an fp16 copy of x, ReLU 2 its mask, layer 3 its fp16
    # input, layer 2 no e5m2 copy of ReLU 2's output
    assert torch.float32 not in before
    assert before[torch.float16] == got[torch.float16] + 2 * B * SIZES[2] + 2 * B * SIZES[0]
    assert before[torch.uint8] == got[torch.uint8] + B * SIZES[2] // 8
    assert before[torch.float8_e5m2] == got[torch.float8_e5m2] - B * SIZES[2]


def test_all_fp8_saved_bytes_by_dtype():
    _, loss = engine_loss("fp8-e5m2:keep_high_precision=none")
    got = saved_by_dtype(loss)
    assert got[torch.float16] == 2 * B * SIZES[3]     # the loss's logits, nothing else
    weights = sum(a * b for a, b in zip(SIZES, SIZES[1:])) - SIZES[0] * SIZES[1]
    # layer 1 saves the caller's float32 batch itself, layers 2 and 3 e5m2 inputs
    assert got[torch.float32] == 4 * B * SIZES[0]
    assert got[torch.float8_e5m2] == B * sum(SIZES[1:3]) + weights


@pytest.mark.parametrize("recipe", ["fp8-e5m2", "fp8-e5m2:keep_high_precision=none",
                                    "fp16-mixed", "bf16-mixed"])
@pytest.mark.parametrize("scale", [1.0, 1e-4])
def test_training_bit_identical_without_sharing(recipe, scale):
    """Losses, gradients and weights of three steps equal those of the unshared path
    (scale 1e-4 puts activations into the e5m2 subnormals and below)."""
    runs = []
    for ctx in (contextlib.nullcontext, sharing_disabled):
        model = mlp()
        x, y = data(scale=scale)
        # the steps call pieces of the model: "first"/"last" are traced from example_inputs
        mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     recipe, backend="emulated", seed=0, example_inputs=x)
        seen = []
        with ctx():
            for _ in range(3):
                with mp.autocast():
                    h = model[:2](x)
                    out = model[2:](h)
                    loss = F.cross_entropy(out, y)
                h.retain_grad()
                mp.backward(loss)
                seen += [loss.detach(), out.detach(), h.grad.clone()]
                seen += [p.grad.clone() for p in model.parameters()]
                mp.step()
                mp.zero_grad()
        seen += [p.detach().clone() for p in model.parameters()]
        runs.append(seen)
    for a, b in zip(*runs):
        assert a.dtype == b.dtype
        assert torch.equal(a.view(-1).view(torch.uint8) if a.dtype.itemsize == 1 else a, b)


def saved_tensors(fn) -> list:
    """The tensors saved for backward while fn runs (as saved, without copies)."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return saved, out


@pytest.mark.parametrize("recipe, copy_dtype", [
    ("fp8-e5m2", torch.float16), ("fp16-mixed", torch.float16),
    ("bf16-mixed", torch.bfloat16), ("fp8-hybrid", torch.bfloat16)])
def test_first_layer_saves_the_callers_batch(recipe, copy_dtype):
    """The model's input (the data batch the caller holds) is saved itself, not a rounded
    16-bit copy of it; with sharing off the layer keeps its copy."""
    x, y = data()
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe,
                 backend="emulated", seed=0)

    def run():
        with mp.autocast():
            return F.cross_entropy(model(x), y)
    for ctx, shares in ((contextlib.nullcontext, True), (sharing_disabled, False)):
        with ctx():
            saved, _ = saved_tensors(run)
        batch = [t for t in saved if t.untyped_storage().data_ptr() == x.data_ptr()]
        copies = [t for t in saved if t.shape == x.shape and t.dtype == copy_dtype]
        assert (len(batch), len(copies)) == ((1, 0) if shares else (0, 1))


def test_an_input_computed_inside_the_model_is_copied():
    """A tensor without gradient that the model computes itself (here x / 4) is no input
    of the caller's: the layer saves its own 16-bit copy, as before."""
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = mlp()

        def forward(self, x):
            return self.net(x / 4)

    model = Scaled()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-e5m2",
                 backend="emulated", seed=0)
    x, y = data()

    def run():
        with mp.autocast():
            return F.cross_entropy(model(x), y)
    saved, _ = saved_tensors(run)
    assert not any(t.dtype == torch.float32 and t.shape == x.shape for t in saved)
    assert sum(t.dtype == torch.float16 and t.shape == x.shape for t in saved) == 1


@pytest.mark.parametrize("recipe", ["fp8-e5m2", "fp16-mixed", "bf16-mixed", "fp8-hybrid"])
@pytest.mark.parametrize("scale", [1.0, 1e-6])
def test_whole_model_training_bit_identical_without_sharing(recipe, scale):
    """Three steps of model(x) (the batch saved itself and rounded again in backward):
    losses, gradients and weights equal those of the path that saves rounded copies
    (scale 1e-6 puts the batch into the fp16 subnormals and below)."""
    runs = []
    for ctx in (contextlib.nullcontext, sharing_disabled):
        model = mlp()
        x, y = data(scale=scale)
        mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
                     recipe, backend="emulated", seed=0)
        seen = []
        with ctx():
            for _ in range(3):
                with mp.autocast():
                    loss = F.cross_entropy(model(x), y)
                mp.backward(loss)
                seen += [loss.detach()] + [p.grad.clone() for p in model.parameters()]
                mp.step()
                mp.zero_grad()
        seen += [p.detach().clone() for p in model.parameters()]
        runs.append(seen)
    for a, b in zip(*runs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def test_batch_changed_in_place_before_backward_raises():
    """The saved batch is the caller's tensor: changing it in place before backward is
    caught by autograd's version check (as with torch's own FP32 layers), never a
    gradient silently computed from the new values."""
    model = mlp()
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed",
                 backend="emulated", seed=0)
    x, y = data()
    with mp.autocast():
        loss = F.cross_entropy(model(x), y)
    x.mul_(2)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        mp.backward(loss)


def test_caller_inputs_blocks_nest_and_close():
    x, other = torch.randn(3, 4), torch.randn(3, 4)
    spec = LayerPolicy.from_recipe("fp16-mixed").activation
    assert shared_operand(x, spec) is None
    with caller_inputs([x]):
        with caller_inputs([other]):
            how, stored = shared_operand(x[1:], spec)
            assert how == "requantize" and stored.data_ptr() == x[1:].data_ptr()
        assert shared_operand(x.view(12), spec)[0] == "requantize"
        assert shared_operand(other, spec) is None
        assert shared_operand(x.half(), spec) is None     # a copy, and the format's dtype
        with sharing_disabled():
            assert shared_operand(x, spec) is None
    assert shared_operand(x, spec) is None
    exit_caller_inputs()      # nothing open: no error


def e5m2_policy():
    return LayerPolicy.from_recipe("fp8-e5m2")


def test_in_place_change_invalidates_shared_copy():
    """After ``h.mul_(3)`` the next layer must not reuse ReLU's saved copy of h: the result
    equals that of the out-of-place ``h * 3`` (whose product carries no tag)."""
    torch.manual_seed(0)
    lin1, lin2 = nn.Linear(6, 5), nn.Linear(5, 3)
    model = nn.Sequential(lin1, nn.ReLU(), lin2)
    x = torch.randn(4, 6)

    def grads(in_place):
        torch.manual_seed(1)           # the same stochastic rounding of the gradients
        for p in model.parameters():
            p.grad = None
        with attach(model, lambda n, m: e5m2_policy() if n else None), PrecisionMode():
            h = F.relu(lin1(x))
            assert get_tag(h).stored.dtype == torch.float8_e5m2
            if in_place:
                h.mul_(3.0)              # off the e5m2 grid: the tag is stale now
                assert get_tag(h) is None
            else:
                h = h * 3.0
            out = lin2(h)
        out.square().sum().backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(in_place=True), grads(in_place=False)):
        assert torch.equal(a, b)


def test_view_of_tagged_tensor_is_not_shared():
    t = torch.zeros(4, 4, dtype=torch.float16)
    tag_output(t, get_format("e5m2"), t.to(torch.float8_e5m2))
    assert get_tag(t) is not None
    assert get_tag(t[1:]) is None and get_tag(t.detach()) is None
    t[0, 0] = 1.0
    assert get_tag(t) is None


@pytest.mark.parametrize("dtype,fmt", [(torch.float8_e5m2, "e5m2"),
                                       (torch.float8_e4m3fn, "e4m3")])
def test_relu_backward_every_code(dtype, fmt):
    """QReLU on every float8 value (±0, subnormals, ±inf, NaNs of both signs) matches
    torch's relu forward and backward bit for bit, and saves the codes, not 16 bits."""
    x = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(dtype).to(torch.float16)
    g = torch.linspace(-3, 3, 256, dtype=torch.float16)
    xa = x.clone().requires_grad_()
    ya = torch.relu(xa)
    ya.backward(g)
    xb = x.clone().requires_grad_()
    got = saved_by_dtype(lambda: QReLU.apply(xb, get_format(fmt)))
    assert got == {dtype: 256}
    yb = QReLU.apply(xb, get_format(fmt))
    yb.backward(g)
    i16 = torch.int16
    assert torch.equal(ya.detach().view(i16), yb.detach().view(i16))
    assert torch.equal(xa.grad.view(i16), xb.grad.view(i16))
    assert get_tag(yb).stored.dtype == dtype


def test_e5m2_as_float16_is_the_cast_on_every_code():
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2)
    got = e5m2_as_float16(codes)
    # same values; the cast quiets the signalling NaN codes 0x7D and 0xFD
    torch.testing.assert_close(got, codes.to(torch.float16), rtol=0, atol=0, equal_nan=True)
    assert torch.equal(got.to(torch.float32).view(torch.int32),
                       codes.to(torch.float32).view(torch.int32))


def test_relu_backward_fp16_container_saves_a_bit_mask():
    x = torch.tensor([-1.0, -0.0, 0.0, 2.0 ** -24, float("nan"), -float("nan")],
                     dtype=torch.float16, requires_grad=True)
    assert saved_by_dtype(lambda: QReLU.apply(x, get_format("fp16"))) == {torch.uint8: 1}
    y = QReLU.apply(x, get_format("fp16"))
    assert get_tag(y).fmt == get_format("fp16") and get_tag(y).stored is None
    y.backward(torch.full_like(y, -2.0))
    want = torch.tensor([0.0, 0.0, 0.0, -2.0, -2.0, -2.0], dtype=torch.float16)
    assert torch.equal(x.grad.view(torch.int16), want.view(torch.int16))


def _all_codes(dtype):
    return torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [65536, 65531])
@pytest.mark.parametrize("backend", ["c", "torch"])
def test_relu_mask_backward_every_code(dtype, n, backend, monkeypatch):
    """ReLU with a packed mask on every 16-bit code (both zeros, subnormals, infinities,
    NaNs of both signs), also with a length that is not a multiple of 8: forward and
    backward equal torch's relu bit for bit (oracle: torch's ReluBackward0)."""
    import mixprec.shared as shared
    if backend == "torch":
        monkeypatch.setattr(shared, "_cquant", None)
    elif shared._cquant is None:
        pytest.skip("C extension not built")
    x = _all_codes(dtype)[torch.randperm(65536, generator=torch.Generator().manual_seed(0))][:n]
    g = torch.randn(n, generator=torch.Generator().manual_seed(1)).to(dtype)
    xa = x.clone().requires_grad_()
    ya = torch.relu(xa)
    ya.backward(g)
    xb = x.clone().requires_grad_()
    yb = QReLU.apply(xb, None)
    yb.backward(g)
    assert torch.equal(ya.detach().view(torch.int16), yb.detach().view(torch.int16))
    assert torch.equal(xa.grad.view(torch.int16), xb.grad.view(torch.int16))


def test_relu_mask_c_and_torch_paths_agree_at_any_thread_count(monkeypatch):
    """The packed bytes and the masked gradient are the same from the C kernel at 1 and
    2 threads (ranges big enough to be split) and from the torch path."""
    import mixprec.shared as shared
    if shared._cquant is None:
        pytest.skip("C extension not built")
    gen = torch.Generator().manual_seed(2)
    y = torch.relu(torch.randn(3 * 65536 + 5, generator=gen)).to(torch.bfloat16)
    g = torch.randn(y.shape, generator=gen)
    before = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            mask = shared.relu_mask(y)
            got.append((mask, shared.masked_grad(g, mask)))
    finally:
        torch.set_num_threads(before)
    monkeypatch.setattr(shared, "_cquant", None)
    mask = shared.relu_mask(y)
    got.append((mask, shared.masked_grad(g, mask)))
    for mask, grad in got[1:]:
        assert torch.equal(mask, got[0][0])
        assert torch.equal(grad.view(torch.int32), got[0][1].view(torch.int32))
    assert torch.equal(got[0][1], torch.where(y > 0, g, torch.zeros(())))


def test_relu_untagged_or_inplace_runs_torch():
    x = torch.randn(3, 4, dtype=torch.float16, requires_grad=True)
    x32 = torch.randn(3, 4, requires_grad=True)
    with PrecisionMode(default_policy=e5m2_policy()):
        assert F.relu(x32 * 1).grad_fn.name() == "ReluBackward0"
        assert type(F.relu(x * 1).grad_fn).__name__ == "QReLUBackward"   # a packed mask
        t = tag_output(x * 1, get_format("e5m2"))
        assert type(F.relu(t).grad_fn).__name__ == "QReLUBackward"
        assert type(torch.relu(t).grad_fn).__name__ == "QReLUBackward"
        assert type(t.relu().grad_fn).__name__ == "QReLUBackward"
        with torch.no_grad():
            assert F.relu(t).grad_fn is None
        F.relu(t, inplace=True)
        assert t.grad_fn.name().startswith("ReluBackward")


def test_e5m2_cast_is_quantize_nearest():
    """The layers round e5m2 (nearest, non-saturating) by torch's float8 cast: it must
    equal quantize() on every float16 and on float32 values around every midpoint."""
    from mixprec.quant import quantize
    h = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e5m2)
    vals = codes.float()
    vals = vals[torch.isfinite(vals)].double().sort().values
    mids = ((vals[1:] + vals[:-1]) / 2).float()
    mids = torch.cat([mids, torch.tensor([57344.0, 61440.0, 65536.0, 1e38])])
    up, down = torch.tensor(float("inf")), torch.tensor(-float("inf"))
    f = torch.cat([mids, torch.nextafter(mids, up), torch.nextafter(mids, down)])
    f = torch.cat([f, -f, h.float()])
    want = quantize(f, "e5m2")
    got = f.to(torch.float8_e5m2).float()
    assert torch.equal(torch.isnan(want), torch.isnan(got))
    ok = ~torch.isnan(want)
    assert torch.equal(want[ok].view(torch.int32), got[ok].view(torch.int32))


@pytest.mark.parametrize("recipe", ["fp16-mixed", "fp8-e5m2"])
def test_inference_mode_forward_equals_no_grad(recipe):
    """Under torch.inference_mode (how Lightning runs validation) outputs are inference
    tensors without a version counter: they stay untagged and the forward gives the
    no_grad values."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.LayerNorm(16),
                          nn.ReLU(), nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 4))
    mp = prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe,
                 example_inputs=torch.randn(2, 8))
    x = torch.randn(4, 8)
    model.eval()
    with torch.no_grad(), mp.autocast():
        expected = model(x)
    with torch.inference_mode(), mp.autocast():
        got = model(x)
    assert got.is_inference() and torch.equal(got, expected)
