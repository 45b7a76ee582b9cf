"""The CPU the benchmarks ran on: model name, cores, vector extensions, and torch's view."""
from __future__ import annotations

import datetime
import os
import platform

import torch

_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16",
          "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_line() -> str:
    """One line: date, CPU model, logical CPUs, the vector flags that matter here, torch's
    CPU capability and the load average (the machine may be shared)."""
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name" and model in ("", "unknown CPU", "x86_64"):
                    model = value.strip()
                elif key.strip() == "flags" and not flags:
                    flags = set(value.split())
    except OSError:
        pass
    have = [f for f in _FLAGS if f in flags]
    load = "/".join(f"{v:.1f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "?"
    return (f"{datetime.date.today().isoformat()}; CPU: {model}, {os.cpu_count()} logical CPUs; "
            f"flags: {' '.join(have) or 'none of ' + ' '.join(_FLAGS)}; torch "
            f"{torch.__version__} capability {torch.backends.cpu.get_cpu_capability()}; "
            f"load average {load}")
