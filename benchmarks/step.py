"""Training-step time and bytes saved for backward, per recipe, against FP32 and torch.amp.

Model: MLP 784-1024-1024-10 (ReLU), batch 256, cross-entropy, SGD with momentum.
Time: median over rounds of one step (forward under autocast, backward, step, zero_grad)
after warm-up, as CPU time of this process (what the step costs, little affected by
other processes on a shared machine) and as wall time; the variants are interleaved
round by round so that load from other processes spreads over all of them. One
intra-op thread by default (--threads), so CPU time is not inflated by spinning threads.
Saved bytes: one forward under ``torch.autograd.graph.saved_tensors_hooks``, summing
numel * element_size of every tensor saved for backward, once per storage.

    python benchmarks/step.py [--rounds 15] [--batch 256] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from mixprec.engine import prepare
from mixprec.native import cpu_has_bf16_dot
from mixprec.recipe import list_presets

SIZES = (784, 1024, 1024, 10)


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(SIZES) - 2 else [])
    return nn.Sequential(*layers)


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


class Variant:
    """One way of training: ``forward(x, y) -> loss`` inside its autocast, ``update(loss)``."""

    def __init__(self, name: str, model: nn.Module, autocast: Callable, update: Callable):
        self.name, self.model, self.autocast, self.update = name, model, autocast, update
        self.times: list = []       # (cpu seconds, wall seconds) per step

    def loss(self, x, y):
        with self.autocast():
            return F.cross_entropy(self.model(x), y)

    def step(self, x, y) -> tuple:
        c0, t0 = time.process_time(), time.perf_counter()
        self.update(self.loss(x, y))
        return time.process_time() - c0, time.perf_counter() - t0

    def saved_bytes(self, x, y) -> int:
        storages: dict = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            storages[key] = max(storages.get(key, 0), t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(x, y)
        del loss
        return sum(storages.values())


def plain_fp32() -> Variant:
    model = make_model()
    opt = make_opt(model)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Variant("torch fp32", model, contextlib.nullcontext, update)


def torch_amp(dtype: torch.dtype) -> Variant:
    model = make_model()
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)

    def update(loss):
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    name = "torch.amp fp16+GradScaler" if dtype == torch.float16 else "torch.amp bf16"
    return Variant(name, model, lambda: torch.autocast("cpu", dtype=dtype), update)


def mixprec_variant(recipe: str, backend: str) -> Variant:
    model = make_model()
    mp = prepare(model, make_opt(model), recipe, backend=backend, seed=0)

    def update(loss):
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
    return Variant(f"mixprec {recipe} ({mp.backend})", model, mp.autocast, update)


# (variant name, time ratio limit vs torch fp32, saved-bytes ratio limit vs torch fp32)
TARGETS = {
    "mixprec bf16-mixed (native)": (1 / 1.4, 0.52),
    "mixprec fp16-mixed (emulated)": (1.3, 0.52),
    "mixprec bf16-mixed (emulated)": (None, 0.52),
    "mixprec fp8-e5m2 (emulated)": (1.6, 0.27),
}


def build_variants() -> list:
    variants = [plain_fp32(), torch_amp(torch.float16), torch_amp(torch.bfloat16)]
    wanted = [("fp32", "emulated"), ("fp16-mixed", "emulated"), ("bf16-mixed", "native"),
              ("bf16-mixed", "emulated"), ("fp16-pure", "emulated")]
    wanted += [(p, "emulated") for p in ("fp8-e5m2", "fp8-hybrid", "mxfp8", "mxfp6", "mxfp4")
               if p in list_presets()]
    # fp8-e5m2 keeps its first and last layer in FP16; here every layer in FP8
    wanted += [("fp8-e5m2:keep_high_precision=none", "emulated")]
    for recipe, backend in wanted:
        try:
            variants.append(mixprec_variant(recipe, backend))
        except (ImportError, ValueError, NotImplementedError) as e:
            print(f"skipped {recipe} ({backend}): {e}")
    return variants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="an MLP 64-32-32-10, batch 16, one round: a smoke run (seconds), as "
                         "the test suite runs it")
    args = ap.parse_args()
    if args.quick:
        global SIZES
        SIZES = (64, 32, 32, 10)
        args.rounds, args.warmup, args.batch = 1, 0, 16
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, SIZES[0], generator=g)
    y = torch.randint(0, SIZES[-1], (args.batch,), generator=g)

    variants = build_variants()
    for v in variants:
        for _ in range(args.warmup):
            v.step(x, y)
    for _ in range(args.rounds):
        for v in variants:
            v.times.append(v.step(x, y))
    saved = {v.name: v.saved_bytes(x, y) for v in variants}

    def cpu(v):
        return statistics.median(t[0] for t in v.times)

    def wall(v):
        return statistics.median(t[1] for t in v.times)

    ref, amp = variants[0], variants[1]
    t_ref, t_amp = cpu(ref), cpu(amp)
    print(f"MLP {'-'.join(map(str, SIZES))}, batch {args.batch}, {torch.get_num_threads()} "
          f"thread(s), median of {args.rounds} steps after {args.warmup} warm-up; torch "
          f"{torch.__version__}. Shared machine: timings are noisy; ratios use CPU time.")
    print(f"CPU: {torch.backends.cpu.get_cpu_capability()}, bf16 dot-product instructions: "
          f"{'yes' if cpu_has_bf16_dot() else 'no (native bf16 GEMMs are slow here)'}")
    print(f"{'variant':<48}{'cpu ms':>8}{'wall ms':>9}{'vs fp32':>9}{'vs amp16':>9}"
          f"{'saved MiB':>11}{'vs fp32':>9}  target")
    failures = 0
    for v in variants:
        t = cpu(v)
        rt, rb = t / t_ref, saved[v.name] / saved[ref.name]
        verdict = ""
        if v.name in TARGETS:
            lim_t, lim_b = TARGETS[v.name]
            ok = (lim_t is None or rt <= lim_t) and rb <= lim_b
            failures += not ok
            parts = ([f"time<={lim_t:.2f}x"] if lim_t else []) + [f"bytes<={lim_b:.2f}x"]
            verdict = f"{' '.join(parts)}: {'PASS' if ok else 'FAIL'}"
        print(f"{v.name:<48}{t * 1e3:>8.1f}{wall(v) * 1e3:>9.1f}{rt:>8.2f}x{t / t_amp:>8.2f}x"
              f"{saved[v.name] / 2 ** 20:>11.2f}{rb:>8.2f}x  {verdict}")
    print(f"{failures} target(s) failed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
