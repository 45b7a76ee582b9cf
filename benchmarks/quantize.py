"""Throughput of mixprec.quant.quantize against torch's own casts and a plain copy.

For 2^24 float32 values (normal, sigma 100, so every binade of the small formats is hit)
it prints millions of elements per second for

    copy          out.copy_(x): the memory-bandwidth ceiling of a read + write
    nearest       quantize(x, fmt, out=out)
    stochastic    quantize(x, fmt, rounding="stochastic", out=out)
    torch rt      x.to(dtype).float(): torch's cast round trip, allocating as users write it
    torch rt buf  the same round trip into reused buffers (lo.copy_(x); out.copy_(lo))
    compiled      with --compiled: torch.compile of quantize(x, fmt, out=out), the
                  device-generic torch.ops.mixprec path fused by Inductor (nearest and
                  stochastic), against the eager C kernel

and the ratios nearest / torch rt buf (the faster torch figure) and stochastic / nearest.
Every variant runs in each of --rounds interleaved rounds and keeps its best time, so a
busy machine slows all columns alike.  On a shared machine, --clock cpu measures the
CPU time of one thread instead (torch.set_num_threads(1)), which other processes
disturb far less than wall time.

    python benchmarks/quantize.py [--log2n 24] [--rounds 7] [--threads N] [--clock cpu]
                                  [--quick] [--compiled]
"""
from __future__ import annotations

import argparse
import time

import torch

from mixprec.quant import has_c_extension, quantize

FORMATS = ["fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1"]
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16,
                "e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn}


def _compiled(x: torch.Tensor, out: torch.Tensor, name: str, rounding: str, gen):
    fn = torch.compile(lambda a, o: quantize(a, name, rounding=rounding, generator=gen, out=o),
                       fullgraph=True)
    return lambda: fn(x, out)


def variants(x: torch.Tensor, out: torch.Tensor, compiled: bool = False) -> dict:
    """name -> zero-argument callable; buffers are made once, here."""
    runs = {"copy": lambda: out.copy_(x)}
    gen = torch.Generator().manual_seed(0)
    for name in FORMATS:
        if compiled:
            runs[f"{name} compiled"] = _compiled(x, out, name, "nearest", gen)
            runs[f"{name} compiled sr"] = _compiled(x, out, name, "stochastic", gen)
        runs[f"{name} nearest"] = lambda n=name: quantize(x, n, out=out)
        runs[f"{name} stochastic"] = lambda n=name: quantize(
            x, n, rounding="stochastic", generator=gen, out=out)
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
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="cpu: one thread's CPU time (robust on a busy machine)")
    ap.add_argument("--quick", action="store_true",
                    help="2^12 values, one round: a smoke run (seconds), as the test suite runs it")
    ap.add_argument("--compiled", action="store_true",
                    help="also time torch.compile'd quantize (first compiles take minutes)")
    args = ap.parse_args()
    if args.quick:
        args.log2n, args.rounds = 12, 1
    if args.clock == "cpu":
        args.threads = 1
    if args.compiled:   # one compiled function per format and rounding
        torch._dynamo.config.recompile_limit = 64
    if args.threads:
        torch.set_num_threads(args.threads)
    n = 1 << args.log2n
    x = torch.randn(n, generator=torch.Generator().manual_seed(0)) * 100
    out = torch.empty_like(x)
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    rate = measure(variants(x, out, args.compiled), n, args.rounds, clock)

    print(f"mixprec.quant on {n} float32 values, {torch.get_num_threads()} threads, "
          f"C extension: {has_c_extension()}; M elements / s of {args.clock} time "
          f"(best of {args.rounds})")
    print(f"copy (bandwidth ceiling): {rate['copy']:8.0f}")
    head = (f"{'format':8} {'nearest':>8} {'stoch':>8} {'torch rt':>9} {'rt buf':>8}"
            f" {'near/rt':>8} {'stoch/near':>10}")
    print(head)
    print("-" * len(head))
    for name in FORMATS:
        near, sto = rate[f"{name} nearest"], rate[f"{name} stochastic"]
        rt, buf = rate.get(f"{name} torch rt"), rate.get(f"{name} torch rt buf")
        cells = [f"{name:8}", f"{near:8.0f}", f"{sto:8.0f}",
                 f"{rt:9.0f}" if rt else f"{'-':>9}", f"{buf:8.0f}" if buf else f"{'-':>8}",
                 f"{near / max(rt, buf):8.2f}" if rt else f"{'-':>8}", f"{sto / near:10.2f}"]
        print(" ".join(cells))
    print("targets: nearest >= 0.8x the faster torch round trip (e5m2, e4m3); "
          "stochastic >= 0.5x nearest")
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
