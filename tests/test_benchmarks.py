"""Every script in benchmarks/ runs in its ``--quick`` mode (tiny sizes, one round) and
prints its table, so none can rot. A new script must be listed in ``TABLES``; step.py's
Llama model runs quick too."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mixprec import list_presets

BENCHMARKS = Path(__file__).parents[1] / "benchmarks"

# script -> lines its table must print (regular expressions, one per row)
TABLES = {
    "quantize.py": [r"^copy \(bandwidth ceiling\): +\d+$",
                    r"^format +nearest +stoch +mx +torch rt +rt buf +near/buf +stoch/near +mx/near$",
                    r"^\d+.*CPU: .*flags: "]
    + [rf"^{f} +\d+ +\d+ +" for f in ("fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1")]
    + [r"^targets: .*: \d+ of \d+ met$"],
    "step.py": [r"^variant +ms +vs fp32 +spread +saved MiB +vs fp32 +w/ batch +target$",
                r"^torch fp32 ", r"^torch\.amp bf16 ", r"^\d+.*CPU: .*flags: "]
    + [rf"^mixprec {re.escape(p)} \(emulated\) +[\d.]+ +[\d.]+x +[\d.]+-[\d.]+ +[\d.]+ +[\d.]+x"
       for p in ("fp32", "fp16-mixed", "bf16-mixed", "fp8-e5m2", "fp8-hybrid", "mxfp8",
                 "mxfp6", "mxfp4")]
    + [r"^mixprec fp8-hybrid \(native\) +[\d.]+ +[\d.]+x",     # linear GEMMs via _scaled_mm
       r"^GEMM \d+x\d+x\d+: torch\._scaled_mm e4m3 [\d.]+ ms, FP32 matmul [\d.]+ ms, "
       r"ratio [\d.]+x$",
       r"^native fprop \d+x\d+x\d+, codes only vs with dequantized copies: operand rounding "
       r"[\d.]+ ms vs [\d.]+ ms, ratio [\d.]+x; with torch\._scaled_mm [\d.]+ ms vs [\d.]+ "
       r"ms, ratio [\d.]+x$"]
    + [r"^\d+ of \d+ targets met on this run$"],
    # every model under every preset: finite loss, ratios, coverage counts of step 0 with
    # nothing unrecognised ("-" under the native backend), no error column; fp32 is 1.000x
    "real_models.py": [r"^model +preset +final loss +vs fp32 +step ms +time vs fp32 "
                       r"+emulated/kept/fp32/unrecognised +error$"]
    + [rf"^{m} +fp32 +[\d.]+ +1\.000x +[\d.]+ +1\.000x +0/0/\d+/0$"
       for m in ("gpt2", "llama", "resnet")]
    + [rf"^{m} +{re.escape(p)} +[\d.]+ +[\d.]+x +[\d.]+ +[\d.]+x +(\d+/\d+/\d+/0|-)$"
       for m in ("gpt2", "llama", "resnet") for p in list_presets()],
    # without CUDA the GPU checks say so and stop; with it the device line comes first
    "gpu.py": [r"^(no CUDA device: nothing to check \(this script needs a GPU\)|device: .+)$"],
}


def test_every_benchmark_is_listed():
    # (modules named _*.py are helpers the scripts import, not benchmarks)
    scripts = [p.name for p in BENCHMARKS.glob("*.py") if not p.name.startswith("_")]
    assert sorted(scripts) == sorted(TABLES)


@pytest.mark.parametrize("script", sorted(TABLES))
def test_benchmark_runs_quick_and_prints_its_table(script):
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), "--quick"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for pattern in TABLES[script]:
        assert re.search(pattern, proc.stdout, re.M), (pattern, proc.stdout)
    assert "skipped" not in proc.stdout, proc.stdout      # every variant could be built


def test_step_benchmark_runs_the_llama_model_quick():
    pytest.importorskip("transformers")
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "step.py"), "--quick", "--model",
                           "llama", "--recipes", "fp32,fp8-hybrid"],
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert re.search(r"^LlamaForCausalLM hidden 256", proc.stdout, re.M), proc.stdout
    assert re.search(r"^mixprec fp8-hybrid \(emulated\) +[\d.]+ +[\d.]+x", proc.stdout, re.M)


def test_step_benchmark_saved_bytes_of_the_fp8_e5m2_mlp():
    """The README's MLP saved-bytes figures for fp8-e5m2, at full size (one forward each,
    no timing), against a count from the layer shapes: fp32 saves ReLU 1's and ReLU 2's
    outputs, W2 and W3 (parameters saved by torch itself, counted), the log-softmax output
    and the loss's scalar weight; fp8-e5m2 ReLU 1's bit mask, layer 2's e5m2 input and
    weight, ReLU 2's e5m2 output (shared with layer 3), W3 and the logits in fp16. Both
    save the batch itself (left out, counted in the second number)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import step
    finally:
        sys.path.remove(str(BENCHMARKS))
    (n, k, h, c), b = step.SIZES, 1024
    batch = step.make_batch("mlp", b)
    x_bytes, y_bytes = 4 * b * n, 8 * b
    fp32 = step.plain_fp32("mlp").saved_bytes(batch)
    ours = step.mixprec_variant("mlp", "fp8-e5m2", "emulated").saved_bytes(batch)
    assert fp32[0] == 4 * (b * k + b * h + h * k + c * h + b * c) + 4
    assert ours[0] == b * k // 8 + b * k + h * k + b * h + 2 * (c * h + b * c)
    assert (fp32[1] - fp32[0], ours[1] - ours[0]) == (x_bytes + y_bytes,) * 2
    assert ours[0] / fp32[0] <= 0.30
    assert f"{ours[0] / fp32[0]:.2f}x" == "0.26x"
    assert f"{ours[1] / fp32[1]:.2f}x" == "0.41x"
