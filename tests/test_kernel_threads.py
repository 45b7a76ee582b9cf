"""The C kernels (mixprec/_cquant.c) use torch.get_num_threads() threads, and their results
do not depend on the thread count; the MX kernel gives the bits of the torch ops it
replaces, random stream included."""
import itertools
import threading
import time

import pytest
import torch

import mixprec.scaling as scaling
from mixprec.formats import get_format
from mixprec.quant import has_c_extension, quantize

pytestmark = pytest.mark.skipif(not has_c_extension(), reason="C extension not built")

N = 3 * 65536 + 77      # above two threads' minimum share, not a multiple of 64


def _data(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g) * torch.exp2(torch.randint(-40, 40, (n,), generator=g).float())
    x[::101] = 0.0
    x[7::997] = float("nan")
    x[9::1999] = -float("inf")
    return x


def _with_threads(k, fn):
    before = torch.get_num_threads()
    torch.set_num_threads(k)
    try:
        return fn()
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("fmt,rounding", [("e4m3", "nearest"), ("e5m2", "stochastic"),
                                          ("bf16", "toward_zero"), ("e2m1", "stochastic")])
def test_quantize_same_bits_at_one_and_two_threads(fmt, rounding):
    x = _data(N)
    got = [_with_threads(k, lambda: quantize(x, fmt, rounding=rounding,
                                              generator=torch.Generator().manual_seed(3)))
           for k in (1, 2)]
    assert torch.equal(got[0].view(torch.int32), got[1].view(torch.int32))


def test_the_kernel_runs_on_two_threads():
    """With two threads allowed, a large rounding call runs on two OS threads at once:
    the process's thread count rises above its resting count while the call runs."""
    import os
    x = torch.randn(1 << 24)
    out = torch.empty_like(x)

    def threads_now():
        return len(os.listdir("/proc/self/task"))

    if not os.path.isdir("/proc/self/task"):
        pytest.skip("needs /proc")
    seen, stop = [], threading.Event()

    def watch():
        while not stop.is_set():
            seen.append(threads_now())
            time.sleep(0.0005)

    rest = threads_now()
    w = threading.Thread(target=watch)
    w.start()
    try:
        _with_threads(2, lambda: [quantize(x, "e4m3", rounding="stochastic", out=out)
                                  for _ in range(8)])
    finally:
        stop.set()
        w.join()
    assert max(seen) >= rest + 2      # the watcher and the kernel's second thread


def _mx(x, fmt, ax, rule, rounding, block, c):
    saved = scaling._cquant
    if not c:
        scaling._cquant = None
    try:
        return scaling._mx_parts(x, get_format(fmt), block, ax, rule, rounding,
                                 torch.Generator().manual_seed(7), elements=True)
    finally:
        scaling._cquant = saved


@pytest.mark.parametrize("shape,axis", [((6, 96), 1), ((70, 33), 0), ((3, 50, 7), 1),
                                        ((2, 3, 65), 2)])
def test_mx_kernel_equals_the_torch_ops(shape, axis):
    """Dequantized values, scales and element values, bit for bit, for every scale rule
    and rounding mode, with zero blocks, NaN/inf blocks, subnormal amaxes and padding."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(*shape, generator=g) * torch.exp2(
        torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    flat[::13] = 0.0
    flat[5], flat[-3], flat[11] = float("nan"), -float("inf"), 1e-40
    for fmt, rule, rounding, block in itertools.product(
            ["e4m3", "e5m2", "e2m1"], ["ocp", "ceil"],
            ["nearest", "stochastic", "toward_zero"], [32, 16]):
        ours = _mx(x, fmt, axis, rule, rounding, block, c=True)
        ref = _mx(x, fmt, axis, rule, rounding, block, c=False)
        for a, b in zip(ours, ref):
            assert a.shape == b.shape
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (fmt, rule, rounding)


@pytest.mark.parametrize("fmt", ["e4m3fnuz", "e5m2fnuz", "e2m3", "e3m2"])
def test_mx_blocks_of_32_nearest_equals_the_torch_ops(fmt):
    """The one-pass nearest loop for blocks of 32 along the last axis, on formats whose
    zero is unsigned (fnuz: -0 rounds to +0) and on blocks mixing values below and above
    the format's smallest normal, with a padded last block."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 103, generator=g) * torch.exp2(
        torch.randint(-12, 1, (64, 103), generator=g).float())
    x[::3, ::7] = -1e-30                      # rounds to zero: -0 or +0 by the format
    x[5, 40] = float("nan")
    for rule in ("ocp", "ceil"):
        ours = _mx(x, fmt, 1, rule, "nearest", 32, c=True)
        ref = _mx(x, fmt, 1, rule, "nearest", 32, c=False)
        for a, b in zip(ours, ref):
            assert torch.equal(a.view(torch.int32), b.view(torch.int32)), (fmt, rule)


@pytest.mark.parametrize("axis,rounding", [(0, "stochastic"), (1, "stochastic"),
                                           (1, "nearest")])
def test_mx_kernel_same_bits_at_one_and_two_threads(axis, rounding):
    x = _data(1024 * 400).view(1024, 400)
    got = [_with_threads(k, lambda: _mx(x, "e5m2", axis, "ocp", rounding, 32, c=True))
           for k in (1, 2)]
    for a, b in zip(*got):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_amax_to_scale_host_path_equals_the_tensor_ops():
    """amax_to_scale's host-float path (CPU amax) gives the bits of its tensor ops (taken
    here by an amax that requires grad), every margin and fallback included."""
    g = torch.Generator().manual_seed(0)
    vals = [0.0, -0.0, 1e-45, 1e-40, 1e-38, 1.0, 448.0, 1e30, 3.4e38, float("inf"),
            float("nan")]
    vals += (torch.randn(100, generator=g) * torch.exp2(
        torch.randint(-140, 120, (100,), generator=g).float())).abs().tolist()
    for fmt, margin, prev in itertools.product(["e4m3", "e5m2", "fp16", "e2m1", "tf32"],
                                               [0, 1, 0.5, -3], [None, torch.tensor(2.5)]):
        for a in vals:
            amax = torch.tensor(a, dtype=torch.float32)
            fast = scaling.amax_to_scale(amax, fmt, margin=margin, prev_scale=prev)
            ref = scaling.amax_to_scale(amax.clone().requires_grad_(), fmt, margin=margin,
                                        prev_scale=prev)
            assert fast.shape == ref.shape == ()
            assert fast.view(torch.int32) == ref.detach().view(torch.int32), (fmt, margin, a)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec_kw", [dict(format="e4m3", saturate=True),
                                     dict(format="e5m2", rounding="stochastic", saturate=True),
                                     dict(format="e4m3", saturate=False),
                                     dict(format="e2m1", saturate=True)])
def test_fused_scaled_rounding_equals_the_tensor_ops(dtype, spec_kw, monkeypatch):
    """The one-pass C kernel of per-tensor scaled rounding (x * s, round, / s) gives the
    values, the stored codes and the random stream of the tensor ops, at 1 and 2 threads."""
    import mixprec.qfunc as qfunc
    from mixprec.recipe import ScalingConfig, TensorSpec
    spec = TensorSpec(scaling="current", **spec_kw)
    x = _data(7 * 40000).to(dtype).view(-1, 7)[:, :5]     # not contiguous
    x[3, 2] = float("nan") if dtype == torch.float32 else 0.0

    def run():
        out = qfunc._round(x, spec, ScalingConfig(), None, -1,
                           torch.Generator().manual_seed(5), pack=True)
        values, (_, _, _, _, (codes, scale)) = out
        return values, codes.view(torch.uint8) if codes.dtype.itemsize == 1 else codes, scale

    fused = [_with_threads(k, run) for k in (1, 2)]
    monkeypatch.setattr(qfunc, "_scaled_round_c", lambda *a: None)
    ref = run()
    for got in fused:
        for a, b in zip(got, ref):
            assert a.dtype == b.dtype
            assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "e5m2", "e4m3", "e4m3fnuz", "e3m2", "e2m1",
                                 "tf32", "e5m0"])
@pytest.mark.parametrize("saturate", [False, True])
def test_nearest_fast_path_equals_the_torch_path(fmt, saturate):
    """Runs of 64 values that are all normal in the format take the C kernel's fast path;
    mixed with chunks that are not (subnormals, overflow, NaN), the result equals the
    integer torch path bit for bit."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(1 << 18, generator=g) * 3
    x[1000:1100] *= 1e-6                      # subnormal or zero in the small formats
    x[5000:5010] = 1e6                        # overflow
    x[7000] = float("nan")
    x[9000:9064] = 1.0 + torch.arange(64) * 2.0 ** -12     # ties and near-ties
    c = quantize(x, fmt, saturate=saturate, backend="c")
    t = quantize(x, fmt, saturate=saturate, backend="torch")
    assert torch.equal(c.view(torch.int32), t.view(torch.int32))


@pytest.mark.parametrize("dtype,fmt", [(torch.float16, "fp16"), (torch.bfloat16, "bf16"),
                                       (torch.float8_e5m2, "e5m2"),
                                       (torch.float8_e4m3fn, "e4m3")])
def test_nearest_fast_path_against_torch_casts(dtype, fmt):
    """Oracle: torch's own float32 cast (nearest-even; e4m3 values kept below its
    saturation point, where the non-saturating formats agree)."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1 << 18, generator=g) * (60 if fmt == "e4m3" else 1000)
    want = x.to(dtype).to(torch.float32)
    got = quantize(x, fmt, backend="c")
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


@pytest.mark.parametrize("fmt", ["bf16", "e5m2", "e4m3", "e2m1", "fp16"])
def test_stochastic_fast_path_equals_the_torch_path(fmt):
    """Blocks whose values are all normal in the format take the stochastic kernel's fast
    path (the 31 bits of A decide alone there); the random stream and the result equal
    the integer torch path bit for bit, also in place."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(5000, generator=g).abs() + 1.0        # all normal, several blocks
    x[4500:4600] = torch.randn(100, generator=g) * 1e-6   # one block that is not
    c = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1),
                 backend="c")
    t = quantize(x, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1),
                 backend="torch")
    y = x.clone()
    quantize(y, fmt, rounding="stochastic", generator=torch.Generator().manual_seed(1), out=y)
    assert torch.equal(c.view(torch.int32), t.view(torch.int32))
    assert torch.equal(y.view(torch.int32), t.view(torch.int32))
