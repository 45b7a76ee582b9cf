"""The torch.compile checks of the default run, in a process of their own.

Inductor's compiles leave state in the process (worker pools, compiled kernels) beside
which tests/test_distributed.py's spawned ranks have hung, so the compile tests are
marked slow and run here as a child pytest: graph breaks of the MLP under three recipes,
of an MLP 64 wide under every preset and of a one-layer tiny Llama under nvfp4
(Dynamo's trace only);
compiled training steps (3 steps) of the MLP under fp16-mixed, bf16-mixed, fp8-hybrid and
fp8-e5m2 and of the tiny Llama against eager, as closely as torch's own compiled FP32 (the
Llama's exact allowance is in its test); of an MLP 64 wide under te-delayed, with the
same amax histories and scales as eager, and under te-delayed of a step whose head runs
outside the model's forward (no graph break; the outside scalers' histories and every
scale as eager's), and under fp8-hybrid with a graph break before that head
(backend="eager", bit-identical); compiled rounding against eager at 1 and 2 threads,
stochastic stream included, and float32 ties against the C kernel; backend="eager" bit-identical
to eager (an MLP under fp8-hybrid, a conv net under fp16-mixed); a one-layer conv net
compiled by Inductor under mxfp8, bit-identical to eager (E8M0 scales saved as uint8
codes); a conv net's step under fp8-e5m2 compiled by Inductor, gradients bit-identical
to eager (stochastic-rounding seeds drawn in the eager order); Dynamo's trace of an MLP
under fp8-hybrid on the native backend (GEMMs through torch._scaled_mm, padded), without
graph breaks (about 6 s). 280 s in a full run with the machine loaded (load average
about 7); the te-delayed checks add about 50 s of it (the outside head about 15-20 s, its
graph-break check about 5 s), the conv net about
10 s (about 50 s of CPU while Inductor's kernel cache is empty and its C++ kernels are
compiled).
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import mixprec

TESTS = Path(__file__).resolve().parent
SELECTED = [
    "test_compile.py::test_mlp_compiles_without_graph_breaks",
    "test_compile.py::test_small_mlp_traces_without_graph_breaks_under_every_preset",
    "test_compile.py::test_one_layer_llama_traces_without_graph_breaks_under_nvfp4",
    "test_compile.py::test_compiled_mlp_step_matches_eager_as_closely_as_fp32",
    "test_compile.py::test_compiled_mlp_step_matches_eager_under_16_bit_and_fp8_recipes",
    "test_compile.py::test_compiled_llama_step_matches_eager",
    "test_compile.py::test_compiled_te_delayed_step_matches_eager[scalers-made-at-first-compile]",
    "test_compile.py::test_eager_backend_replays_emulated_layers_without_rounding_twice",
    "test_compile.py::test_compiled_conv_net_matches_eager_under_mxfp8",
    "test_compile.py::test_compiled_stochastic_rounding_draws_seeds_in_the_eager_order",
    "test_compile.py::test_compiled_steps_do_not_recompile_and_coverage_lists_traced_calls",
    "test_compile.py::test_compile_caches_key_on_mixprec_sources",
    "test_compile.py::test_compiled_outside_calls_under_te_delayed_match_eager",
    "test_compile.py::test_outside_call_traced_after_a_graph_break_matches_eager",
    "test_compile.py::test_native_fp8_mlp_traces_without_graph_breaks_and_counts_its_gemms",
    "test_ops.py::test_compiled_rounding_is_bit_identical_to_eager_at_1_and_2_threads",
    "test_ops.py::test_compiled_float32_ties_match_the_c_kernel",
]


def test_compile_checks_pass_in_their_own_process():
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "slow",
         *[str(TESTS / s) for s in SELECTED]],
        capture_output=True, text=True, timeout=900, cwd=TESTS.parent)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    passed = re.search(r"(\d+) passed", proc.stdout)
    assert passed and int(passed.group(1)) == 19 + len(mixprec.list_presets()), \
        proc.stdout[-2000:]
