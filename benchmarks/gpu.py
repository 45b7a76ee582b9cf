r"""On a CUDA GPU: native and compiled paths against the emulation, bit for bit, and step ratios.

On a GPU, in order of value (durations estimated, not measured):

    1. python benchmarks/gpu.py --quick          ~1 min: every check below but triton,
                                                 2 timed steps, eager only
    2. pytest -q -p no:cacheprovider -x tests/test_ops.py tests/test_native_fp8.py \
           tests/test_cuda_readiness.py          ~1-2 min: the CUDA tests (skipped
                                                 without a GPU) and the fake-CUDA checks
    3. python benchmarks/gpu.py                  ~3-8 min: adds triton (six compiles of
                                                 quantize) and seven compiled step variants
                                                 (--skip-compile: ~1 min, 20 timed steps)
    4. pytest -q -p no:cacheprovider tests/      the whole suite (7.5 min on 2 CPU cores
                                                 without a GPU)

Each check runs on its own: one that raises prints ``FAILED name: error`` and the rest
still run; a check fails too when any of its bit-for-bit rows differs. The last line is
``gpu.py: N checks ok, M failed (names)``, and the exit status is 1 when M > 0.

Checks (each prints ok or the number of differing elements):

    cuda ops       quantize on CUDA tensors (the torch.ops.mixprec operators) against the
                   CPU C kernel, every format and rounding mode, the same seed
    triton         torch.compile of quantize on CUDA (Inductor's Triton kernels) against
                   eager CUDA, the stochastic stream included
    native casts   torch's own CUDA casts to float16 / bfloat16 / float8_e5m2 against
                   quantize(..., "nearest") (they must agree: the cast is round-to-even)
    scaled_mm      torch._scaled_mm on e4m3 operands against the emulated product of the
                   same operands (FP32 accumulation: equal up to summation order; prints
                   the max relative difference), where the device supports it
    native fp8     a linear layer under backend="native" with fp8-hybrid and te-current
                   (its three GEMMs through torch._scaled_mm) against backend="emulated":
                   y, dX, dW bit for bit on operands whose rounding, products and sums
                   are exact (small integers, power-of-two scales); the max relative
                   difference on random operands (scale applied after the sum, another
                   summation order); the number of GEMMs that ran natively; the exact
                   check again on Linear(24, 40) with 33 tokens, whose GEMMs run on
                   zero-padded codes

then the step time of an MLP 784-1024-1024-10 (batch 1024, AdamW) for fp32, the native
fp16-mixed and bf16-mixed backends, fp8-hybrid emulated and native (torch._scaled_mm),
and the emulated mxfp8 recipe, eager
and compiled, as ratios to fp32 from the same run (each variant on its own: one that
fails prints FAILED and counts as a failed check). Without CUDA it prints that and
exits 0.

    python benchmarks/gpu.py [--steps 20] [--skip-compile] [--quick]
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from typing import Callable, List, Sequence, Tuple

import torch

FORMATS = ["fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1", "e8m0"]
MODES = ["nearest", "stochastic", "toward_zero"]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64 if t.dtype == torch.float64 else torch.int32)


def _differ(a: torch.Tensor, b: torch.Tensor) -> int:
    return int((_bits(a.cpu()) != _bits(b.cpu())).sum())


_MISMATCHES: List[str] = []     # bit-for-bit rows that differed, since the check began


def expect_equal(label: str, differing: int) -> None:
    """Print ``label differing: n``; a row with n > 0 fails the check it belongs to (the
    check's other rows still run)."""
    print(f"{label} differing: {differing}")
    if differing:
        _MISMATCHES.append(label)


def run_checks(checks: Sequence[Tuple[str, Callable[[], None]]]) -> Tuple[int, List[str]]:
    """Run every (name, check); returns (number ok, names failed). A check fails when it
    raises (the traceback is printed, the next check runs) or when one of its
    :func:`expect_equal` rows differed."""
    ok, failed = 0, []
    for name, check in checks:
        del _MISMATCHES[:]
        t0 = time.perf_counter()
        try:
            check()
        except Exception as e:  # noqa: BLE001 - one failure must not hide the others
            traceback.print_exc(limit=-3)
            print(f"FAILED {name}: {type(e).__name__}: {e}")
            failed.append(name)
        else:
            if _MISMATCHES:
                print(f"FAILED {name}: {len(_MISMATCHES)} rows differ")
                failed.append(name)
            else:
                ok += 1
        print(f"  ({name}: {time.perf_counter() - t0:.1f} s)")
        sys.stdout.flush()
    return ok, failed


def summary(ok: int, failed: Sequence[str]) -> str:
    """The last line: how many checks passed and which failed."""
    names = f" ({', '.join(failed)})" if failed else ""
    return f"gpu.py: {ok} checks ok, {len(failed)} failed{names}"


def check_ops(x: torch.Tensor, device: str = "cuda") -> None:
    """quantize's tensor operators on ``device`` against the CPU C kernel (``device``
    "cpu": the operators there, as the tests run this check)."""
    from mixprec import quantize
    for fmt in FORMATS:
        for mode in MODES:
            seed = torch.tensor(1234)
            cpu = quantize(x, fmt, rounding=mode, seed=seed)
            gpu = quantize(x.to(device), fmt, rounding=mode, seed=seed.to(device),
                           backend="torch")
            expect_equal(f"cuda ops  {fmt:5} {mode:12}", _differ(cpu, gpu))


def check_triton(x: torch.Tensor) -> None:
    from mixprec import compile_options, quantize
    xc = x.cuda()
    for fmt in ("e4m3", "e2m1", "bf16"):
        for mode in ("nearest", "stochastic"):
            seed = torch.tensor(99, device="cuda")
            # compile_options(): the rounding as eager casts do it, and a compile-cache
            # key on mixprec's sources
            fn = torch.compile(lambda a, s: quantize(a, fmt, rounding=mode, seed=s),
                               fullgraph=True, options=compile_options())
            expect_equal(f"triton    {fmt:5} {mode:12}",
                         _differ(quantize(xc, fmt, rounding=mode, seed=seed), fn(xc, seed)))


def check_native_casts(x: torch.Tensor, device: str = "cuda") -> None:
    from mixprec import quantize
    xc = x.to(device)
    for fmt, dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16),
                       ("e5m2", torch.float8_e5m2)):
        want = quantize(xc, fmt)
        got = xc.to(dtype).to(torch.float32)
        same = (_bits(want) == _bits(got)) | (want.isnan() & got.isnan())
        expect_equal(f"native    {fmt:5} cast        ", int((~same).sum()))


def check_scaled_mm(device: str = "cuda") -> None:
    """torch._scaled_mm of two e4m3 matrices against their FP32 product; a relative
    difference beyond 1e-2 fails: a wrong scale or layout, not the summation order or a
    narrower accumulator (Hopper's FP8 tensor cores keep fewer than 24 bits between
    promotions to FP32)."""
    from mixprec.native import scaled_mm_available
    if not scaled_mm_available(device):
        print(f"scaled_mm does not run on {device}: skipped (CUDA needs capability 8.9+)")
        return
    g = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(256, 512, device=device, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(256, 512, device=device, generator=g).to(torch.float8_e4m3fn)
    one = torch.ones((), device=device)
    native = torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.float32)
    emulated = a.float() @ b.float().t()
    rel = ((native - emulated).abs().max() / emulated.abs().max()).item()
    print(f"scaled_mm e4m3 x e4m3 -> fp32: max relative difference {rel:.2e}")
    if not rel <= 1e-2:
        raise AssertionError(f"torch._scaled_mm is {rel:.2e} away from the FP32 product")


def _linear_run(recipe: str, backend: str, exact: bool, device: str,
                shape: tuple = (64, 128, 32)):
    """y, dX, dW of Linear(in, out) on ``tokens`` tokens (``shape``: (in, out, tokens))
    under ``recipe`` and ``backend``, and the engine's coverage. ``exact``: integer
    operands of magnitude <= 7 with amax 7, so the per-tensor scales are powers of two
    (448/7 = 64, 57344/7 = 8192) and every FP8 rounding, product and sum is exact in any
    order."""
    import torch.nn as nn
    import mixprec
    g = torch.Generator().manual_seed(1)

    def operand(*shape):
        if not exact:
            return torch.randn(*shape, generator=g)
        t = torch.randint(-7, 8, shape, generator=g).float()
        t.view(-1)[0] = 7
        return t

    k, n, m = shape
    layer = nn.Linear(k, n).to(device)
    with torch.no_grad():
        layer.weight.copy_(operand(n, k))
        layer.bias.copy_(operand(n))
    x = operand(m, k).to(device).requires_grad_()
    mp = mixprec.prepare(layer, torch.optim.SGD(layer.parameters(), lr=0.0), recipe,
                         backend=backend, keep_high_precision=())
    with mp.autocast():
        y = layer(x)
    y.backward(operand(*y.shape).to(device=device, dtype=y.dtype))
    return (y.detach(), x.grad, layer.weight.grad), mp.coverage()


def check_native_fp8(device: str = "cuda") -> None:
    from mixprec.native import scaled_mm_available
    if not scaled_mm_available(device):
        print("native fp8: torch._scaled_mm does not run on this device")
        return
    for recipe in ("fp8-hybrid", "te-current"):
        emulated, _ = _linear_run(recipe, "emulated", True, device)
        native, cov = _linear_run(recipe, "native", True, device)
        diff = [_differ(a.float(), b.float()) for a, b in zip(emulated, native)]
        expect_equal(f"native fp8 {recipe:10} exact operands   (GEMMs native "
                     f"{cov.native_gemms}, emulated {cov.emulated_gemms}) y/dX/dW {diff}",
                     sum(diff) + cov.emulated_gemms)
        # K and N not multiples of 16 (24, 40, 33 tokens): zero-padded codes, still exact
        emulated, _ = _linear_run(recipe, "emulated", True, device, (24, 40, 33))
        native, cov = _linear_run(recipe, "native", True, device, (24, 40, 33))
        diff = [_differ(a.float(), b.float()) for a, b in zip(emulated, native)]
        expect_equal(f"native fp8 {recipe:10} exact, padded    (GEMMs native "
                     f"{cov.native_gemms}, padded {cov.padded_gemms}, emulated "
                     f"{cov.emulated_gemms}) y/dX/dW {diff}", sum(diff) + cov.emulated_gemms)
        emulated, _ = _linear_run(recipe, "emulated", False, device)
        native, _ = _linear_run(recipe, "native", False, device)
        rel = [float((a.float() - b.float()).abs().max() / a.float().abs().max())
               for a, b in zip(emulated, native)]
        print(f"native fp8 {recipe:10} random operands  max relative difference y/dX/dW: "
              + ", ".join(f"{r:.1e}" for r in rel))


def step_ratios(steps: int, compile_too: bool) -> None:
    import torch.nn as nn
    import torch.nn.functional as F
    import mixprec

    x = torch.randn(1024, 784, device="cuda")
    y = torch.randint(0, 10, (1024,), device="cuda")

    def timed(recipe, backend, compiled):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024),
                              nn.ReLU(), nn.Linear(1024, 10)).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        mp = mixprec.prepare(model, opt, recipe=recipe, backend=backend, example_inputs=x)
        fwd = torch.compile(model, options=mixprec.compile_options()) if compiled else model

        def step():
            with mp.autocast():
                loss = F.cross_entropy(fwd(x), y)
            mp.backward(loss)
            mp.step()
            mp.zero_grad()

        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / steps

    variants = [("fp32", "emulated"), ("fp16-mixed", "native"), ("bf16-mixed", "native"),
                ("fp16-mixed", "emulated"), ("fp8-hybrid", "emulated"), ("fp8-hybrid", "native"),
                ("mxfp8", "emulated")]
    ref = timed("fp32", "emulated", False)
    print(f"\nMLP step, {steps} steps, ratio to eager fp32 ({ref * 1e3:.2f} ms)")
    broken = []
    for recipe, backend in variants:
        cells = []
        for compiled in (False, True) if compile_too else (False,):
            kind = "compiled" if compiled else "eager"
            try:
                if compiled:
                    torch._dynamo.reset()
                cells.append(f"{timed(recipe, backend, compiled) / ref:6.2f}x {kind}")
            except Exception as e:  # noqa: BLE001 - the other variants still run
                traceback.print_exc(limit=-3)
                cells.append(f"FAILED {kind}: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                broken.append(f"{recipe} {backend} {kind}")
        print(f"{recipe:11} {backend:9} " + "  ".join(cells))
        sys.stdout.flush()
    if broken:
        raise RuntimeError(f"step failed for {', '.join(broken)}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--skip-compile", action="store_true")
    ap.add_argument("--quick", action="store_true",
                    help="two timed steps, no compiling (no triton check, no compiled "
                         "steps): about a minute on a GPU; the test suite runs it on CPU")
    args = ap.parse_args()
    if args.quick:
        args.steps, args.skip_compile = 2, True
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to check (this script needs a GPU)")
        return 0
    print(f"device: {torch.cuda.get_device_name()}, capability "
          f"{torch.cuda.get_device_capability()}, torch {torch.__version__}")
    g = torch.Generator().manual_seed(0)
    patterns = torch.randint(-(1 << 31), (1 << 31) - 1, (1 << 16,), dtype=torch.int32,
                             generator=g).view(torch.float32)
    x = torch.cat([patterns, torch.randn(1 << 16, generator=g) * 100])
    checks = [("cuda ops", lambda: check_ops(x))]
    if not args.skip_compile:
        checks.append(("triton", lambda: check_triton(x)))
    checks += [("native casts", lambda: check_native_casts(x)),
               ("scaled_mm", check_scaled_mm),
               ("native fp8", check_native_fp8),
               ("step ratios", lambda: step_ratios(args.steps, not args.skip_compile))]
    ok, failed = run_checks(checks)
    print(summary(ok, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
