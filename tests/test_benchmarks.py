"""Every script in benchmarks/ runs in its ``--quick`` mode (tiny sizes, one round) and
prints its table, so none can rot. A new script must be listed in ``TABLES``."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

# script -> lines its table must print (regular expressions, one per row)
TABLES = {
    "quantize.py": [r"^copy \(bandwidth ceiling\): +\d+$",
                    r"^format +nearest +stoch +torch rt +rt buf +near/rt +stoch/near$"]
    + [rf"^{f} +\d+ +\d+ +" for f in ("fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1")],
    "step.py": [r"^variant +cpu ms +wall ms +vs fp32 +vs amp16 +saved MiB +vs fp32 +target$",
                r"^torch fp32 ", r"^torch\.amp fp16\+GradScaler ", r"^torch\.amp bf16 "]
    + [rf"^mixprec {re.escape(p)} \(emulated\) +[\d.]+ +[\d.]+ +[\d.]+x"
       for p in ("fp32", "fp16-mixed", "bf16-mixed", "fp16-pure", "fp8-e5m2", "fp8-hybrid",
                 "mxfp8", "mxfp6", "mxfp4")]
    + [r"^\d+ target\(s\) failed$"],
    # without CUDA the GPU checks say so and stop; with it the device line comes first
    "gpu.py": [r"^(no CUDA device: nothing to check \(this script needs a GPU\)|device: .+)$"],
}


def test_every_benchmark_is_listed():
    assert sorted(p.name for p in BENCHMARKS.glob("*.py")) == sorted(TABLES)


@pytest.mark.parametrize("script", sorted(TABLES))
def test_benchmark_runs_quick_and_prints_its_table(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for pattern in TABLES[script]:
        assert re.search(pattern, proc.stdout, re.M), (pattern, proc.stdout)
    assert "skipped" not in proc.stdout, proc.stdout      # every variant could be built
