"""Throughput of mixprec.quant.quantize and quantize_mx against torch's own casts and a copy.

For 2^24 float32 values (normal, sigma 100, so every binade of the small formats is hit)
it prints millions of elements per second for

    copy          out.copy_(x): the memory-bandwidth ceiling of a read + write
    nearest       quantize(x, fmt, out=out)
    stochastic    quantize(x, fmt, rounding="stochastic", out=out)
    mx            quantize_mx(x viewed as rows of 1024, fmt, out=(out, scales)) (blocks of
                  32 along the rows), into preallocated buffers as nearest
    torch rt      x.to(dtype).float(): torch's cast round trip, allocating as users write it
    torch rt buf  the same round trip into reused buffers (lo.copy_(x); out.copy_(lo))
    compiled      with --compiled: torch.compile of quantize(x, fmt, out=out), the
                  device-generic torch.ops.mixprec path fused by Inductor (nearest and
                  stochastic), against the eager C kernel

and the ratios nearest / torch rt buf, stochastic / nearest and mx / nearest.
Every variant runs in each of --rounds interleaved rounds and keeps its best time, so a
busy machine slows all columns alike.  --clock cpu measures CPU time (of the calling
thread with one thread, of the whole process with more), which other processes on a
shared machine disturb far less than wall time; with several threads a kernel's CPU time
is the sum over its threads, so the ratios compare work done, not elapsed time.
OpenMP's workers (torch's casts and copies) sleep as soon as a parallel region ends
(OMP_WAIT_POLICY=PASSIVE unless set): a worker that spins on waits charges its CPU time to
whichever variant is timed next, and to none when it is still spinning at the clock read.

    python benchmarks/quantize.py [--log2n 24] [--rounds 7] [--threads 2] [--clock cpu]
                                  [--quick] [--compiled]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # read once, when torch loads OpenMP
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpuinfo import cpu_line  # noqa: E402

from mixprec.ops import compile_options  # noqa: E402
from mixprec.quant import has_c_extension, quantize  # noqa: E402
from mixprec.scaling import quantize_mx  # noqa: E402

FORMATS = ["fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1"]
MX_FORMATS = ("e5m2", "e4m3", "e3m2", "e2m1")
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16,
                "e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}


def _compiled(x: torch.Tensor, out: torch.Tensor, name: str, rounding: str, gen):
    # compile_options(), as the README asks of every compile: without its source key,
    # torch's compile caches served kernels compiled from an older version of the
    # operators (this benchmark timed them at about half the speed)
    fn = torch.compile(lambda a, o: quantize(a, name, rounding=rounding, generator=gen, out=o),
                       fullgraph=True, options=compile_options())
    return lambda: fn(x, out)


def variants(x: torch.Tensor, out: torch.Tensor, compiled: bool = False) -> dict:
    """name -> zero-argument callable; buffers are made once, here."""
    runs = {"copy": lambda: out.copy_(x)}
    gen = torch.Generator().manual_seed(0)
    rows = x.view(-1, 1024)
    mx_out = (out.view(-1, 1024), torch.empty(rows.shape[0], 1024 // 32))
    for name in FORMATS:
        if compiled:
            runs[f"{name} compiled"] = _compiled(x, out, name, "nearest", gen)
            runs[f"{name} compiled sr"] = _compiled(x, out, name, "stochastic", gen)
        runs[f"{name} nearest"] = lambda n=name: quantize(x, n, out=out)
        runs[f"{name} stochastic"] = lambda n=name: quantize(
            x, n, rounding="stochastic", generator=gen, out=out)
        if name in MX_FORMATS:
            runs[f"{name} mx"] = lambda n=name: quantize_mx(rows, n, out=mx_out)
        dt = TORCH_DTYPES.get(name)
        if dt is not None:
            lo = torch.empty(x.shape, dtype=dt)
            runs[f"{name} torch rt"] = lambda d=dt: x.to(d).float()
            runs[f"{name} torch rt buf"] = lambda lo=lo: out.copy_(lo.copy_(x))
    return runs


def measure(runs: dict, n: int, rounds: int, clock=time.perf_counter) -> dict:
    """Best seconds per variant over interleaved rounds, as M elements / s."""
    best = {k: float("inf") for k in runs}
    for f in runs.values():   # warm up: first-touch page faults, thread pools
        f()
    for _ in range(rounds):
        for k, f in runs.items():
            t0 = clock()
            f()
            best[k] = min(best[k], clock() - t0)
    return {k: n / t / 1e6 for k, t in best.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--log2n", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: CPU time (robust on a busy machine)")
    ap.add_argument("--quick", action="store_true",
                    help="2^12 values, one round: a smoke run (seconds), as the test suite runs it")
    ap.add_argument("--compiled", action="store_true",
                    help="also time torch.compile'd quantize (first compiles take minutes)")
    args = ap.parse_args()
    if args.quick:
        args.log2n, args.rounds = 12, 1
    if args.compiled:   # one compiled function per format and rounding
        torch._dynamo.config.recompile_limit = 64
    torch.set_num_threads(args.threads)
    n = 1 << args.log2n
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 100
    out = torch.empty_like(x)
    if args.clock == "cpu":
        clock = time.thread_time if args.threads == 1 else time.process_time
    else:
        clock = time.perf_counter
    rate = measure(variants(x, out, args.compiled), n, args.rounds, clock)

    print(f"mixprec.quant on {n} float32 values, {torch.get_num_threads()} threads, "
          f"C extension: {has_c_extension()}; M elements / s of {args.clock} time "
          f"(best of {args.rounds})")
    print(cpu_line())
    print(f"copy (bandwidth ceiling): {rate['copy']:8.0f}")
    head = (f"{'format':8} {'nearest':>8} {'stoch':>8} {'mx':>8} {'torch rt':>9} {'rt buf':>8}"
            f" {'near/buf':>9} {'stoch/near':>10} {'mx/near':>8}")
    print(head)
    print("-" * len(head))
    met = total = 0
    for name in FORMATS:
        near, sto = rate[f"{name} nearest"], rate[f"{name} stochastic"]
        mx = rate.get(f"{name} mx")
        rt, buf = rate.get(f"{name} torch rt"), rate.get(f"{name} torch rt buf")
        cells = [f"{name:8}", f"{near:8.0f}", f"{sto:8.0f}",
                 f"{mx:8.0f}" if mx else f"{'-':>8}",
                 f"{rt:9.0f}" if rt else f"{'-':>9}", f"{buf:8.0f}" if buf else f"{'-':>8}",
                 f"{near / buf:9.2f}" if buf else f"{'-':>9}", f"{sto / near:10.2f}",
                 f"{mx / near:8.2f}" if mx else f"{'-':>8}"]
        print(" ".join(cells))
        checks = [sto / near >= 0.7] + ([near / buf >= 1.5] if buf else [])
        checks += [mx / near >= 0.5] if mx else []
        met, total = met + sum(checks), total + len(checks)
    print(f"targets: nearest >= 1.5x torch's cast into preallocated buffers (8- and 16-bit "
          f"formats with a torch dtype); stochastic >= 0.7x nearest; mx >= 0.5x nearest: "
          f"{met} of {total} met")
    if args.compiled:
        head = f"{'format':8} {'compiled':>9} {'comp sr':>8} {'comp/C':>7} {'sr/C sr':>8}"
        print(f"\ncompiled (torch.ops.mixprec fused by Inductor) vs the eager kernel "
              f"above ({'C' if has_c_extension() else 'torch'})")
        print(head)
        print("-" * len(head))
        for name in FORMATS:
            c, csr = rate[f"{name} compiled"], rate[f"{name} compiled sr"]
            print(f"{name:8} {c:9.0f} {csr:8.0f} {c / rate[f'{name} nearest']:7.2f} "
                  f"{csr / rate[f'{name} stochastic']:8.2f}")
        print("target: device-generic path, compiled, on CPU >= 0.5x the C kernel")


if __name__ == "__main__":
    main()
