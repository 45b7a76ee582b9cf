"""Training-step time and bytes saved for backward, per recipe, against FP32 in the same run.

Models (--model):
  mlp    MLP 784-1024-1024-10 (ReLU), batch 1024, cross-entropy
  llama  transformers' LlamaForCausalLM from a config with random weights: hidden 256,
         intermediate 768, 4 layers, 4 heads, vocab 512, batch 8 x seq 128, its own loss
Variants: torch FP32 and torch.amp bf16, then each recipe on the emulated backend; where
it runs, bf16-mixed on the native backend (CPUs with bf16 dot products) and fp8-hybrid on
the native backend (linear GEMMs through CPU torch._scaled_mm, for information).
Optimizer: SGD with momentum. One step = forward under the variant's autocast, backward,
optimizer step, zero_grad.

Time: the variants run interleaved, one step each per round, after warm-up, so load from
other processes spreads over all of them. --clock cpu (default) measures CPU time of this
process, which other processes on a shared machine disturb far less than wall time; one
intra-op thread by default (--threads), so CPU time is not inflated by spinning threads.
The ratio to FP32 is taken round by round (this round's step over this round's torch
fp32 step); the table prints the median and the spread (min - max) over rounds.

With the native fp8-hybrid variant a line times one GEMM of the MLP's middle layer
both ways: CPU torch._scaled_mm on E4M3 codes against torch.matmul of the same operands in
float32 (the emulated GEMM); a last line times that layer's native fprop, whose operand
rounding makes only the codes and scales _scaled_mm takes, against the same rounding
also making the dequantized copies (which the native fprop computed before and never
used).

Saved bytes: one forward under ``torch.autograd.graph.saved_tensors_hooks``, summing
numel * element_size of every tensor saved for backward, once per storage, except the
batch's own storages: the training loop holds the batch through the step, so a layer
that saves its input batch itself (torch's FP32 layers; mixprec's emulated layers, which
round it again in backward) keeps nothing alive that would otherwise be freed. Column
"w/ batch" gives the ratio with the batch counted too. Parameters saved by reference
(torch's FP32 layers save their weights) are counted.

    python benchmarks/step.py [--model mlp|llama] [--rounds 15] [--clock cpu|wall] [--quick]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _cpuinfo import cpu_line  # noqa: E402

from mixprec.engine import prepare  # noqa: E402
from mixprec.native import cpu_has_bf16_dot, scaled_mm_available  # noqa: E402

SIZES = (784, 1024, 1024, 10)
LLAMA = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=4, vocab_size=512,
             max_position_embeddings=128)
LLAMA_BATCH, LLAMA_SEQ = 8, 128


# -- workloads ------------------------------------------------------------------------
def make_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    layers = []
    for i, (a, b) in enumerate(zip(SIZES, SIZES[1:])):
        layers += [nn.Linear(a, b)] + ([nn.ReLU()] if i < len(SIZES) - 2 else [])
    return nn.Sequential(*layers)


def make_llama(seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**LLAMA, attn_implementation="sdpa"))


def mlp_loss(model, batch):
    x, y = batch
    return F.cross_entropy(model(x), y)


def llama_loss(model, batch):
    return model(input_ids=batch, labels=batch).loss


WORKLOADS = {"mlp": (make_mlp, mlp_loss), "llama": (make_llama, llama_loss)}


def make_batch(model_name: str, batch: int):
    g = torch.Generator().manual_seed(0)
    if model_name == "mlp":
        return (torch.randn(batch, SIZES[0], generator=g),
                torch.randint(0, SIZES[-1], (batch,), generator=g))
    return torch.randint(0, LLAMA["vocab_size"], (batch, LLAMA_SEQ), generator=g)


def make_opt(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)


# -- variants -------------------------------------------------------------------------
class Variant:
    """One way of training: ``loss(batch)`` inside its autocast, ``update(loss)``."""

    def __init__(self, name: str, model: nn.Module, loss_fn: Callable, autocast: Callable,
                 update: Callable):
        self.name, self.model, self.loss_fn = name, model, loss_fn
        self.autocast, self.update = autocast, update
        self.times: list = []       # (cpu seconds, wall seconds) per round

    def loss(self, batch):
        with self.autocast():
            return self.loss_fn(self.model, batch)

    def step(self, batch) -> tuple:
        c0, t0 = time.process_time(), time.perf_counter()
        self.update(self.loss(batch))
        return time.process_time() - c0, time.perf_counter() - t0

    def saved_bytes(self, batch) -> tuple:
        """(bytes saved beyond the batch's own storages, bytes with them)."""
        storages: dict = {}

        def pack(t):
            key = t.untyped_storage().data_ptr()
            storages[key] = max(storages.get(key, 0), t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss = self.loss(batch)
        del loss
        held = {t.untyped_storage().data_ptr() for t in
                (batch if isinstance(batch, (tuple, list)) else (batch,))}
        total = sum(storages.values())
        return total - sum(n for k, n in storages.items() if k in held), total


def plain_fp32(workload: str) -> Variant:
    make, loss_fn = WORKLOADS[workload]
    model = make()
    opt = make_opt(model)

    def update(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return Variant("torch fp32", model, loss_fn, contextlib.nullcontext, update)


def torch_amp(workload: str, dtype: torch.dtype) -> Variant:
    make, loss_fn = WORKLOADS[workload]
    model = make()
    opt = make_opt(model)
    scaler = torch.amp.GradScaler("cpu", enabled=dtype == torch.float16)

    def update(loss):
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
    name = "torch.amp fp16+GradScaler" if dtype == torch.float16 else "torch.amp bf16"
    return Variant(name, model, loss_fn, lambda: torch.autocast("cpu", dtype=dtype), update)


def mixprec_variant(workload: str, recipe: str, backend: str) -> Variant:
    make, loss_fn = WORKLOADS[workload]
    model = make()
    mp = prepare(model, make_opt(model), recipe, backend=backend, seed=0)

    def update(loss):
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
    return Variant(f"mixprec {recipe} ({mp.backend})", model, loss_fn, mp.autocast, update)


# (time ratio limit vs torch fp32, saved-bytes ratio limit vs torch fp32) per model
TARGETS = {
    "mlp": {
        "mixprec fp16-mixed (emulated)": (1.10, None),
        "mixprec bf16-mixed (emulated)": (1.10, None),
        "mixprec fp8-e5m2 (emulated)": (1.30, 0.30),
        "mixprec fp8-hybrid (emulated)": (1.20, 0.40),
        "mixprec mxfp8 (emulated)": (1.50, 0.40),
    },
    "llama": {
        "mixprec fp16-mixed (emulated)": (1.20, None),
        "mixprec bf16-mixed (emulated)": (1.20, None),
        "mixprec fp8-e5m2 (emulated)": (1.40, None),
        "mixprec fp8-hybrid (emulated)": (1.40, None),
        "mixprec mxfp8 (emulated)": (1.80, None),
        "mixprec mxfp6 (emulated)": (1.80, None),
        "mixprec mxfp4 (emulated)": (1.80, None),
    },
}
RECIPES = "fp32,fp16-mixed,bf16-mixed,fp8-e5m2,fp8-hybrid,mxfp8,mxfp6,mxfp4"


def scaled_mm_vs_matmul(m: int, k: int, n: int, repeats: int) -> str:
    """One line: CPU time of torch._scaled_mm on E4M3 codes (M x K by K x N, FP32 out)
    against torch.matmul of the same operands already in float32 (the emulated GEMM),
    medians over ``repeats`` calls after one warm-up."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(torch.float8_e4m3fn)
    b = torch.randn(n, k, generator=g).to(torch.float8_e4m3fn).t()      # column-major
    a32, b32, scale = a.float(), b.float(), torch.tensor(0.5)

    def median_time(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            c0 = time.process_time()
            fn()
            times.append(time.process_time() - c0)
        return statistics.median(times)

    t_native = median_time(lambda: torch._scaled_mm(a, b, scale_a=scale, scale_b=scale,
                                                    out_dtype=torch.float32))
    t_fp32 = median_time(lambda: torch.matmul(a32, b32))
    return (f"GEMM {m}x{k}x{n}: torch._scaled_mm e4m3 {t_native * 1e3:.1f} ms, FP32 matmul "
            f"{t_fp32 * 1e3:.1f} ms, ratio {t_native / t_fp32:.2f}x")


def native_fprop_operands(m: int, k: int, n: int, repeats: int) -> str:
    """One line: CPU time of the native fp8-hybrid fprop of one linear layer (x: M x K,
    W: N x K): both operands rounded to their E4M3 codes and scales, as the native
    backend does, against the same rounding that also makes the dequantized float32
    copies codes / scale (what it computed before, for the emulated GEMM only); both
    alone and followed by torch._scaled_mm. Each way runs in blocks of 4 calls, the ways
    taking turns ``repeats`` times; the first call of a block is not timed, so each way
    is timed in the steady state of its own allocations, as a training loop repeating
    one step (a way that frees more memory than glibc keeps gets it back by page
    faults every call). Medians of the timed calls."""
    from mixprec.native import ScaledMMGemms
    from mixprec.policy import LayerPolicy
    from mixprec.qfunc import OpContext
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
    c = OpContext(LayerPolicy.from_recipe("fp8-hybrid"), None, None, 0)
    gemms = ScaledMMGemms(torch.device("cpu"))

    def rounding(dequantize: bool):
        return (c.operands(x, "activation", -1, 0, keep=True, dequantize=dequantize)[1],
                c.operands(w, "weight", -1, 0, keep=True, dequantize=dequantize)[1])

    def fprop(dequantize: bool):
        x_pack, w_pack = rounding(dequantize)
        (a, sa), (b, sb) = x_pack[4], w_pack[4]
        return gemms.mm(a, sa, b.t(), sb, torch.float32, layer="", gemm="fprop")

    calls = [lambda: rounding(False), lambda: rounding(True), lambda: fprop(False),
             lambda: fprop(True)]
    times: list = [[] for _ in calls]
    for _ in range(repeats):
        for fn, t in zip(calls, times):
            fn()
            for _ in range(3):
                c0 = time.process_time()
                fn()
                t.append(time.process_time() - c0)
    r_now, r_before, f_now, f_before = (statistics.median(t) * 1e3 for t in times)
    return (f"native fprop {m}x{k}x{n}, codes only vs with dequantized copies: operand "
            f"rounding {r_now:.1f} ms vs {r_before:.1f} ms, ratio {r_now / r_before:.2f}x; "
            f"with torch._scaled_mm {f_now:.1f} ms vs {f_before:.1f} ms, ratio "
            f"{f_now / f_before:.2f}x")


def build_variants(workload: str, recipes: list, amp_fp16: bool) -> list:
    variants = [plain_fp32(workload), torch_amp(workload, torch.bfloat16)]
    if amp_fp16:   # tens of times slower than fp32 on CPUs without fp16 arithmetic
        variants.append(torch_amp(workload, torch.float16))
    wanted = [(r, "emulated") for r in recipes]
    if "bf16-mixed" in recipes and cpu_has_bf16_dot():
        wanted.append(("bf16-mixed", "native"))
    if "fp8-hybrid" in recipes and scaled_mm_available("cpu"):
        # for information: the linear GEMMs through CPU torch._scaled_mm
        wanted.append(("fp8-hybrid", "native"))
    for recipe, backend in wanted:
        try:
            variants.append(mixprec_variant(workload, recipe, backend))
        except (ImportError, ValueError, NotImplementedError) as e:
            print(f"skipped {recipe} ({backend}): {e}")
    return variants


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=sorted(WORKLOADS), default="mlp")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None,
                    help=f"default: 1024 (mlp), {LLAMA_BATCH} sequences (llama)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--clock", choices=["cpu", "wall"], default="cpu")
    ap.add_argument("--recipes", default=RECIPES, help=f"comma-separated (default {RECIPES})")
    ap.add_argument("--amp-fp16", action="store_true", help="also time torch.amp fp16")
    ap.add_argument("--quick", action="store_true",
                    help="tiny sizes (MLP 64-32-32-10, batch 16; Llama batch 1 x seq 16), "
                         "one round: a smoke run (seconds), as the test suite runs it")
    args = ap.parse_args()
    if args.quick:
        global SIZES, LLAMA_SEQ
        SIZES, LLAMA_SEQ = (64, 32, 32, 10), 16
        args.rounds, args.warmup, args.batch = 1, 0, args.batch or (16 if args.model == "mlp" else 1)
    torch.set_num_threads(args.threads)
    batch_size = args.batch or (1024 if args.model == "mlp" else LLAMA_BATCH)
    batch = make_batch(args.model, batch_size)

    variants = build_variants(args.model, args.recipes.split(","), args.amp_fp16)
    for v in variants:
        for _ in range(args.warmup):
            v.step(batch)
    for _ in range(args.rounds):
        for v in variants:
            v.times.append(v.step(batch))
    saved = {v.name: v.saved_bytes(batch) for v in variants}

    k = 0 if args.clock == "cpu" else 1
    ref = variants[0]
    what = (f"MLP {'-'.join(map(str, SIZES))}, batch {batch_size}" if args.model == "mlp" else
            f"LlamaForCausalLM hidden {LLAMA['hidden_size']}, {LLAMA['num_hidden_layers']} "
            f"layers, {LLAMA['num_attention_heads']} heads, vocab {LLAMA['vocab_size']}, "
            f"batch {batch_size} x seq {LLAMA_SEQ}")
    print(f"{what}; {torch.get_num_threads()} thread(s), {args.clock} time, {args.rounds} "
          f"rounds after {args.warmup} warm-up; ratio = step / same round's torch fp32 step")
    print(cpu_line())
    print(f"bf16 dot-product instructions: {'yes' if cpu_has_bf16_dot() else 'no'}")
    head = (f"{'variant':<40}{'ms':>8}{'vs fp32':>9}{'spread':>14}{'saved MiB':>11}"
            f"{'vs fp32':>9}{'w/ batch':>10}  target")
    print(head)
    print("-" * (len(head) + 24))
    failures, checked = 0, 0
    for v in variants:
        ratios = [t[k] / r[k] for t, r in zip(v.times, ref.times)]
        med = statistics.median(ratios)
        rb = saved[v.name][0] / saved[ref.name][0]
        rb_all = saved[v.name][1] / saved[ref.name][1]
        verdict = ""
        lim_t, lim_b = TARGETS[args.model].get(v.name, (None, None))
        if lim_t is not None or lim_b is not None:
            ok_t = lim_t is None or med <= lim_t
            ok_b = lim_b is None or rb <= lim_b
            parts = ([f"time<={lim_t:.2f}x {'met' if ok_t else 'NOT met'}"] if lim_t else [])
            parts += ([f"bytes<={lim_b:.2f}x {'met' if ok_b else 'NOT met'}"] if lim_b else [])
            failures += (not ok_t) + (not ok_b)
            checked += (lim_t is not None) + (lim_b is not None)
            verdict = ", ".join(parts)
        ms = statistics.median(t[k] for t in v.times) * 1e3
        spread = f"{min(ratios):.2f}-{max(ratios):.2f}"
        print(f"{v.name:<40}{ms:>8.1f}{med:>8.2f}x{spread:>14}{saved[v.name][0] / 2 ** 20:>11.2f}"
              f"{rb:>8.2f}x{rb_all:>9.2f}x  {verdict}")
    print(f"{checked - failures} of {checked} targets met on this run")
    if any(v.name == "mixprec fp8-hybrid (native)" for v in variants) and args.model == "mlp":
        print(scaled_mm_vs_matmul(batch_size, SIZES[1], SIZES[2], max(args.rounds, 3)))
        print(native_fprop_operands(batch_size, SIZES[1], SIZES[2], max(args.rounds, 3)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
