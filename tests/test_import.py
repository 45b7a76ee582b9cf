"""``import mixprec`` stays light: no compiler, distributed-tensor or framework modules.

torch._dynamo alone cost about 1 s of a 3-5 s import (through the decorators
``torch.compiler.assume_constant_result`` and ``torch.compiler.disable``), and
torch.distributed.tensor about as much again (sympy and DTensor's op tables). They are
reached only when used: compiling imports Dynamo, and a DTensor exists only once its
module is imported. The frameworks (transformers, lightning, torchao, ...) are imported
by the integrations that use them.
"""
from __future__ import annotations

import json
import subprocess
import sys

import torch

import mixprec.ops

# Modules that `import torch` does not import (checked below) and `import mixprec` must not.
LAZY = ("torch._dynamo", "torch._inductor", "torch.distributed.tensor", "sympy",
        "transformers", "lightning", "torchao", "matplotlib", "sklearn", "tensorboard",
        "accelerate", "ml_dtypes")

_PROBE = """
import json, sys
lazy = {lazy!r}
import torch
after_torch = sorted(m for m in lazy if m in sys.modules)
import mixprec
print(json.dumps([after_torch, sorted(m for m in lazy if m in sys.modules)]))
"""


def test_import_mixprec_imports_no_compiler_distributed_or_framework_modules():
    # in a fresh interpreter: `import torch`, then `import mixprec`
    out = subprocess.run([sys.executable, "-c", _PROBE.format(lazy=LAZY)],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    after_torch, after_mixprec = json.loads(out.strip().splitlines()[-1])
    assert after_torch == []       # else the check below would prove nothing
    assert after_mixprec == []


def test_generator_id_is_marked_as_torch_compiler_marks_constant_results():
    # ops.py sets the attribute that torch.compiler.assume_constant_result sets, without
    # importing torch._dynamo; a torch whose decorator does more must fail here
    def f():
        return 0

    before = dict(vars(f))
    assert torch.compiler.assume_constant_result(f) is f
    assert {k: v for k, v in vars(f).items() if k not in before} == {
        "_dynamo_marked_constant": True}
    assert mixprec.ops.generator_id._dynamo_marked_constant is True
