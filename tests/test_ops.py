"""torch.ops.mixprec: registered rounding operators, compiled bit for bit like eager.

Compiled results are held to the eager C kernel (and the eager torch path) with zero
tolerance on bit patterns, for every format and rounding mode, stochastic rounding's
random stream included; the eager paths themselves are held to oracles in test_quant*.
Compiling is slow on a small CPU, so one compiled function covers all cases at once.
"""
from __future__ import annotations

import os

# Inductor compiles in this process: no pool of compile workers, which it would start on
# import, left running beside later tests (the distributed ones spawn processes).
os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

import mixprec
from mixprec import ops
from mixprec.quant import has_c_extension, quantize

FORMATS = ["fp16", "bf16", "tf32", "e5m2", "e4m3", "e4m3fnuz", "e5m2fnuz", "e3m2", "e2m3",
           "e2m1", "e8m0", "e5m7", "e3m1fnuz"]
MODES = ["nearest", "stochastic", "toward_zero"]
EAGER_BACKEND = "c" if has_c_extension() else "torch"

pytestmark = pytest.mark.usefixtures("fresh_dynamo")   # tests/conftest.py


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _inputs() -> dict:
    """float32: every exponent, subnormals, +-0, inf, NaN (random bit patterns) and
    values near the small formats' ranges; float64: 52-bit mantissas, so stochastic
    rounding reaches the ties that the second random word decides."""
    g = torch.Generator().manual_seed(3)
    patterns = torch.randint(-(1 << 31), (1 << 31) - 1, (4096,), dtype=torch.int32,
                             generator=g).view(torch.float32)
    normal = torch.randn(4096, generator=g) * torch.logspace(-12, 6, 4096, base=2.0)
    special = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 448.0,
                            464.0, 465.0, 57344.0, 61440.0, 65504.0, 65520.0, 2.0 ** -149,
                            2.0 ** -127, 1.5 * 2.0 ** -127, 6.0, 7.0, 0.25, 0.75])
    x32 = torch.cat([patterns, normal, special])
    x64 = torch.randn(4096, generator=g, dtype=torch.float64) * 3
    return {"f32": x32, "f64": x64}


def _roundings(x32, x64, gen, cases):
    """cases: (source "f32"/"f64", format, rounding, saturate)."""
    src = {"f32": x32, "f64": x64}
    return [quantize(src[s], fmt, rounding=mode, saturate=sat, generator=gen)
            for s, fmt, mode, sat in cases]


def _cases(formats, modes):
    return [(s, fmt, mode, sat) for fmt in formats for mode in modes
            for s, sat in (("f32", False), ("f32", True), ("f64", False))]


def _check_compiled_against_eager(cases, with_scaled=False, with_mx=False, threads=(None,)):
    x = _inputs()
    eager_gen, compiled_gen = torch.Generator(), torch.Generator()

    def all_of(a, b, gen):
        out = _roundings(a, b, gen, cases)
        if with_scaled:
            out.append(mixprec.quantize_scaled(b.float(), "e4m3", torch.tensor(37.5),
                                               rounding="stochastic", generator=gen))
        if with_mx:
            out.append(mixprec.quantize_mx(b.float().view(64, 64), "e2m1",
                                           rounding="stochastic", generator=gen)[0])
        return out

    before = torch.get_num_threads()
    try:
        with torch.no_grad():
            fn = torch.compile(lambda a, b: all_of(a, b, compiled_gen), fullgraph=True)
            eager_gen.manual_seed(11)
            compiled_gen.manual_seed(11)
            for n in threads:   # each call draws the next seeds of the same stream
                if n is not None:
                    torch.set_num_threads(n)
                want = all_of(x["f32"], x["f64"], eager_gen)
                got = fn(x["f32"], x["f64"])
                for i, (w, c) in enumerate(zip(want, got)):
                    assert torch.equal(_bits(w), _bits(c)), (i, n)
    finally:
        torch.set_num_threads(before)


def test_operators_are_registered_with_fake_implementations():
    x = torch.randn(8, 40)
    with torch._subclasses.fake_tensor.FakeTensorMode() as mode:
        fx = mode.from_tensor(x)
        assert torch.ops.mixprec.quantize(fx, "e4m3").shape == x.shape
        assert torch.ops.mixprec.quantize_scaled(fx, "e5m2", torch.tensor(2.0)).shape == x.shape
        deq, scales = torch.ops.mixprec.quantize_mx(fx, "e4m3")
        assert deq.shape == x.shape and scales.shape == (8, 2)
        assert torch.ops.mixprec.draw_seed(fx, 0).dtype == torch.int64


def test_operators_match_torch_casts():
    # oracle: torch's own nearest-even casts (non-saturating)
    x = _inputs()["f32"]
    for fmt, dtype in [("fp16", torch.float16), ("bf16", torch.bfloat16),
                       ("e5m2", torch.float8_e5m2)]:
        got = torch.ops.mixprec.quantize(x, fmt)
        want = x.to(dtype).to(torch.float32)
        same = (_bits(got) == _bits(want)) | (got.isnan() & want.isnan())
        assert bool(same.all()), fmt
    seed = torch.tensor(12345)
    a = torch.ops.mixprec.quantize(x, "e5m2", "stochastic", False, seed)
    assert torch.equal(_bits(a), _bits(quantize(x, "e5m2", rounding="stochastic", seed=seed)))


@pytest.mark.slow   # see tests/test_compile.py: compiles here make distributed tests hang
def test_compiled_rounding_is_bit_identical_to_eager_at_1_and_2_threads():
    # One compile: the fused kernels differ between formats only in constants, so the
    # representative cases are float32 nearest (saturating) and stochastic, float64
    # stochastic (ties decided by the second random word) and per-tensor scaling; the
    # compiled kernels use torch's threads, and the bits do not depend on how many.
    _check_compiled_against_eager([("f32", "e4m3", "nearest", True),
                                   ("f32", "e4m3", "stochastic", False),
                                   ("f64", "e5m2", "stochastic", False)],
                                  with_scaled=True, threads=(1, 2))
    # the eager C kernel and the eager torch operators draw and round alike
    x, g = _inputs()["f32"], torch.Generator()
    ref = [quantize(x, "e5m2", rounding="stochastic", generator=g.manual_seed(1),
                    backend=EAGER_BACKEND), quantize(x, "e2m1", backend=EAGER_BACKEND)]
    tor = [quantize(x, "e5m2", rounding="stochastic", generator=g.manual_seed(1),
                    backend="torch"), quantize(x, "e2m1", backend="torch")]
    assert all(torch.equal(_bits(r), _bits(t)) for r, t in zip(ref, tor))


@pytest.mark.slow   # run by tests/test_compile_isolated.py
def test_compiled_float32_ties_match_the_c_kernel():
    # float32 inputs whose first random word ties (test_quant_stochastic.float32_ties):
    # the second word is hashed in a branch of the fused kernel taken only where some
    # element of a vector ties; each input ends with a tie in the loop's tail.  One
    # compile for two formats.
    from test_quant_stochastic import float32_ties
    seed, names, xs = 0x0123456789ABCDEF, ("fp16", "e4m3"), []
    for name in names:
        x, ties, _ = float32_ties(name, seed)
        end = ties[-1] + 1 if (ties[-1] + 1) % 16 else ties[-1] + 2
        xs.append(x[:end])
    s = torch.tensor(seed)
    fn = torch.compile(lambda *a: [quantize(x, name, rounding="stochastic", seed=a[-1])
                                   for x, name in zip(a[:-1], names)], fullgraph=True)
    for name, x, got in zip(names, xs, fn(*xs, s)):
        want = quantize(x, name, rounding="stochastic", seed=s, backend=EAGER_BACKEND)
        assert torch.equal(_bits(want), _bits(got)), name


@pytest.mark.slow
@pytest.mark.parametrize("fmt", FORMATS)
def test_compiled_rounding_is_bit_identical_to_eager_for_every_format_and_mode(fmt):
    _check_compiled_against_eager(_cases([fmt], MODES), with_mx=fmt == "e2m1", threads=(1, 2))


def test_generator_ids_name_live_generators():
    g = torch.Generator()
    assert ops.generator_id(None) == 0
    assert ops.generator_id(g) == ops.generator_id(g) != 0
    g.manual_seed(5)
    a = ops.draw_seed(g, torch.empty(0))
    g.manual_seed(5)
    b = torch.ops.mixprec.draw_seed(torch.empty(0), ops.generator_id(g))
    assert a.dtype == torch.int64 and int(a) == int(b)


def test_stochastic_rounding_without_a_seed_names_the_fix():
    with pytest.raises(ValueError, match="seed"):
        torch.ops.mixprec.round_bits(torch.ones(3), [0] + [0] * 11, 1, None)


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("fmt", ["fp16", "e4m3", "e5m2", "e2m1", "e8m0"])
@pytest.mark.parametrize("mode", MODES)
def test_cuda_operators_match_the_cpu_kernel(fmt, mode):
    x, seed = _inputs()["f32"], torch.tensor(4321)
    want = quantize(x, fmt, rounding=mode, seed=seed)
    got = quantize(x.cuda(), fmt, rounding=mode, seed=seed.cuda()).cpu()
    assert torch.equal(_bits(want), _bits(got))


@cuda
def test_compiled_cuda_rounding_is_bit_identical_to_eager():
    x, seed = _inputs()["f32"].cuda(), torch.tensor(7, device="cuda")
    fn = torch.compile(lambda a, s: (quantize(a, "e4m3", rounding="stochastic", seed=s),
                                     quantize(a, "e2m1", saturate=True)), fullgraph=True)
    want = (quantize(x, "e4m3", rounding="stochastic", seed=seed),
            quantize(x, "e2m1", saturate=True))
    for w, c in zip(want, fn(x, seed)):
        assert torch.equal(_bits(w), _bits(c))


def test_gpu_benchmark_is_import_safe_without_cuda():
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "gpu.py"
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True,
                         text=True, check=True).stdout
    assert "--steps" in out and "--skip-compile" in out
