"""What the CUDA paths need, checked without a GPU.

* Every ``torch._scaled_mm`` call the native FP8 backend makes under CUDA's rules is
  replayed on fake CUDA tensors (``FakeTensorMode``) of the same shapes, strides and
  dtypes: torch's own CUDA checks (operand a row-major, b column-major, K and N
  multiples of 16, float32 per-tensor scales), the ones ``torch.compile`` applies.
* The tensor-op quantizers (what runs on CUDA: the C kernel takes CPU tensors only)
  produce fake CUDA tensors from fake CUDA inputs and a CPU seed, with no device mix.
* ``benchmarks/gpu.py`` runs every check even when one fails, and says so in its exit code.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import mixprec
from mixprec import native

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_native_fp8 import _assert_same_bits, _exact_layer  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
_SCALED_MM = torch._scaled_mm        # torch's own, also while a test spies on the name


def _cuda_refusal(a: torch.Tensor, b: torch.Tensor, scale_a: torch.Tensor,
                  scale_b: torch.Tensor, out_dtype: torch.dtype) -> str:
    """What torch's CUDA _scaled_mm check says of these operands' layout ("" if none):
    the call replayed on fake CUDA tensors with the same sizes, strides and dtypes."""
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            fa = torch.empty_strided(a.shape, a.stride(), dtype=a.dtype, device="cuda")
            fb = torch.empty_strided(b.shape, b.stride(), dtype=b.dtype, device="cuda")
            sa = torch.empty_strided(scale_a.shape, scale_a.stride(), dtype=scale_a.dtype,
                                     device="cuda")
            sb = torch.empty_strided(scale_b.shape, scale_b.stride(), dtype=scale_b.dtype,
                                     device="cuda")
            _SCALED_MM(fa, fb, scale_a=sa, scale_b=sb, out_dtype=out_dtype,
                             use_fast_accum=False)
    except RuntimeError as e:
        return str(e).splitlines()[0]
    return ""


def test_the_fake_cuda_check_refuses_what_cuda_refuses():
    # the oracle itself: a column-major a, a row-major b, K = 24 are refused
    e4 = torch.float8_e4m3fn
    one = torch.ones(())
    a, b = torch.zeros(32, 32, dtype=e4), torch.zeros(32, 32, dtype=e4)
    assert _cuda_refusal(a, b.t(), one, one, torch.float32) == ""
    assert "row_major" in _cuda_refusal(a.t(), b.t(), one, one, torch.float32)
    assert "col_major" in _cuda_refusal(a, b, one, one, torch.float32)
    assert "divisible by 16" in _cuda_refusal(torch.zeros(32, 24, dtype=e4),
                                              torch.zeros(32, 24, dtype=e4).t(), one, one,
                                              torch.float32)
    assert "fp32" in _cuda_refusal(a, b.t(), one.double(), one.double(), torch.float32)


@pytest.mark.parametrize("recipe", ["fp8-hybrid", "te-delayed"])
@pytest.mark.parametrize("x_shape, out, bias", [
    ((16, 16), 1, True),     # wgrad's a = g^T is 1 x 16: a (1, 1)-strided view before;
                             # dgrad's K = 1 padded to 16: zero products keep their sign
    ((1, 16), 16, True),     # one token: wgrad's K = 1 padded
    ((2, 16, 32), 48, True),  # the plain case
    ((33, 24), 40, True),    # K and N padded
    ((16, 1), 16, False),    # fprop's K = 1 padded (no bias: y's zeros stay as computed)
])
def test_native_gemms_pass_torchs_cuda_layout_checks(recipe, x_shape, out, bias,
                                                     monkeypatch):
    calls, real = [], torch._scaled_mm

    def spy(a, b, *, scale_a, scale_b, out_dtype, **kw):
        calls.append(_cuda_refusal(a, b, scale_a, scale_b, out_dtype))
        return real(a, b, scale_a=scale_a, scale_b=scale_b, out_dtype=out_dtype, **kw)

    assert native.scaled_mm_available("cpu")     # its probe GEMM (cached) not spied on
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    got = _exact_layer(recipe, "native", bias, x_shape=x_shape, out=out, rules="cuda")
    monkeypatch.setattr(torch, "_scaled_mm", real)
    want = _exact_layer(recipe, "emulated", bias, x_shape=x_shape, out=out)
    # fprop, dgrad, wgrad (and no other) ran natively, every call accepted
    assert len(calls) == got[4].native_gemms >= 3 and got[4].emulated_gemms == 0
    assert all(c == "" for c in calls), calls
    for g, w in zip(got[:4], want[:4]):
        if w is not None:
            _assert_same_bits(g, w)


def test_row_major_gives_canonical_strides_without_a_copy():
    t = torch.zeros(16, 1, dtype=torch.float8_e4m3fn).t()     # 1 x 16, strides (1, 1)
    assert t.is_contiguous() and t.stride() == (1, 1)
    r = native._row_major(t)
    assert r.stride() == (16, 1) and r.data_ptr() == t.data_ptr()
    u = torch.zeros(8, 32, dtype=torch.float8_e4m3fn)
    assert native._row_major(u) is not None and native._row_major(u).data_ptr() == u.data_ptr()
    assert native._row_major(u.t()).stride() == (8, 1)


FORMATS = ["fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1", "e8m0", "e3m4"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "toward_zero"])
def test_tensor_op_quantize_stays_on_a_cuda_device(fmt, mode):
    # a CPU seed with a CUDA tensor (what gpu.py and the tests pass): the tensor ops move
    # it; any op mixing devices raises FakeTensorDeviceMismatchError here
    with FakeTensorMode(allow_non_fake_inputs=True):
        x = torch.empty(4, 64, device="cuda")
        y = mixprec.quantize(x, fmt, rounding=mode, seed=torch.tensor(7))
        s = mixprec.quantize_scaled(x, fmt, torch.tensor(2.0), rounding=mode)
    assert y.device.type == "cuda" and y.shape == x.shape and y.dtype == x.dtype
    assert s.device.type == "cuda" and s.shape == x.shape


# -- benchmarks/gpu.py ------------------------------------------------------------------
def _gpu_script():
    spec = importlib.util.spec_from_file_location("gpu_bench", ROOT / "benchmarks" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_script_runs_every_check_and_counts_failures(capsys):
    gpu = _gpu_script()
    ran = []

    def broken():
        ran.append("broken")
        raise RuntimeError("boom")

    def fine():
        ran.append("fine")
        print("fine check printed")

    ok, failed = gpu.run_checks([("broken", broken), ("fine", fine)])
    out = capsys.readouterr().out
    assert ran == ["broken", "fine"] and (ok, failed) == (1, ["broken"])
    assert "FAILED broken: RuntimeError: boom" in out and "fine check printed" in out
    assert gpu.summary(ok, failed) == "gpu.py: 1 checks ok, 1 failed (broken)"


def test_gpu_script_fails_a_check_whose_bits_differ(capsys):
    gpu = _gpu_script()
    ok, failed = gpu.run_checks([("differs", lambda: gpu.expect_equal("x", 3))])
    assert failed == ["differs"] and "x differing: 3" in capsys.readouterr().out
    assert gpu.run_checks([("same", lambda: gpu.expect_equal("x", 0))]) == (1, [])


def test_gpu_script_checks_run_on_the_cpu(capsys):
    # the checks a GPU run starts with, on CPU tensors: tensor ops against the C kernel,
    # torch's casts against quantize, the native FP8 layer against the emulated one;
    # any crash or differing row fails here before it can waste GPU time
    gpu = _gpu_script()
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 12,), dtype=torch.int32,
                             generator=g).view(torch.float32)
    x = torch.cat([patterns, torch.randn(1 << 12, generator=g) * 100])
    ok, failed = gpu.run_checks([("cuda ops", lambda: gpu.check_ops(x, "cpu")),
                                 ("native casts", lambda: gpu.check_native_casts(x, "cpu")),
                                 ("scaled_mm", lambda: gpu.check_scaled_mm("cpu")),
                                 ("native fp8", lambda: gpu.check_native_fp8("cpu"))])
    out = capsys.readouterr().out
    assert (ok, failed) == (4, []), out
    assert "scaled_mm e4m3 x e4m3 -> fp32: max relative difference" in out
    assert out.count("differing: 0") == len(gpu.FORMATS) * len(gpu.MODES) + 3 + 4, out
    assert "native fp8 fp8-hybrid random operands" in out


@pytest.fixture
def tf32_flags():
    """Sets torch's TF32 flags for a test (cuda.matmul, cudnn) and restores them."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32

    def set_flags(matmul: bool, cudnn: bool) -> None:
        torch.backends.cuda.matmul.allow_tf32 = matmul
        torch.backends.cudnn.allow_tf32 = cudnn

    yield set_flags
    set_flags(*saved)


def _engine_thinking_it_is_on_cuda(model, backend="emulated", recipe="fp16-mixed"):
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), recipe,
                         backend=backend, keep_high_precision=())
    mp.device = torch.device("cuda")     # what autocast() looks at; the tensors stay on CPU
    return mp


@pytest.mark.parametrize("matmul, cudnn, conv, warned", [
    (False, True, False, ""),                 # torch's defaults, no convolution
    (True, False, False, "matmul.allow_tf32"),
    (False, True, True, "cudnn.allow_tf32"),  # torch's defaults with a convolution
    (False, False, True, ""),
])
def test_emulated_gemms_on_cuda_warn_when_tf32_is_allowed(matmul, cudnn, conv, warned,
                                                           tf32_flags):
    import warnings
    tf32_flags(matmul, cudnn)
    model = torch.nn.Sequential(torch.nn.Conv1d(4, 4, 3) if conv else torch.nn.Identity(),
                                torch.nn.Linear(6, 8))
    mp = _engine_thinking_it_is_on_cuda(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            with mp.autocast():
                model(torch.ones(2, 4, 8) if conv else torch.ones(2, 4, 6))
    tf32 = [str(w.message) for w in caught if issubclass(w.category, native.TF32Warning)]
    if warned:
        assert len(tf32) == 1 and warned in tf32[0], tf32     # once per engine
    else:
        assert tf32 == []


@pytest.mark.parametrize("where", ["cpu", "native autocast"])
def test_the_tf32_check_leaves_cpu_and_native_autocast_alone(where, tf32_flags):
    # on CPU there is no TF32; under torch.autocast the GEMMs are torch's own
    import warnings
    tf32_flags(True, True)
    model = torch.nn.Linear(4, 4)
    if where == "cpu":
        mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                             "fp16-mixed", backend="emulated", keep_high_precision=())
    else:
        mp = _engine_thinking_it_is_on_cuda(model, "native", "bf16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with mp.autocast():
            # (torch.autocast("cuda") is off without CUDA: the input in the weights' dtype)
            model(torch.ones(2, 4, dtype=model.weight.dtype))
    assert not [w for w in caught if issubclass(w.category, native.TF32Warning)]


def test_fp8_linear_native_names_cuda_shapes_it_cannot_take(monkeypatch):
    # on CUDA, in_features 24 is refused before torch's own check (no padding there)
    monkeypatch.setattr(native, "scaled_mm_available", lambda device=None: True)
    with FakeTensorMode(allow_non_fake_inputs=True):
        x, w = torch.empty(4, 24, device="cuda"), torch.empty(32, 24, device="cuda")
        with pytest.raises(ValueError, match=r"multiples of 16, got x \(4, 24\) and w "
                                             r"\(32, 24\); valid: the native backend"):
            native.fp8_linear_native(x, w, 1.0, 1.0)
        y = native.fp8_linear_native(torch.empty(4, 32, device="cuda"),
                                     torch.empty(16, 32, device="cuda"), 1.0, 1.0)
    assert y.shape == (4, 16) and y.device.type == "cuda"
