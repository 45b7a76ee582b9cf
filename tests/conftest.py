"""Suite-wide checks.

Oracle libraries (ml_dtypes, torchao) are the independent answers that mixprec's numerics
are held to; their behaviour changes between releases (ml_dtypes 0.7 changed e8m0
rounding below 2^-126).  A test module that imports one runs only against the version
pinned in constraints.txt: with any other version each of its tests fails at once with a
message that names both versions (printed once more at the end), instead of a wall of
value mismatches.
"""
from __future__ import annotations

import pytest

from lockfile import oracle_version_problem

ORACLES = ("ml_dtypes", "torchao")
_seen: dict = {}


def _problems(module) -> list:
    found = []
    for name in ORACLES:
        oracle = vars(module).get(name)
        if oracle is not None and getattr(oracle, "__version__", None):
            problem = oracle_version_problem(name, oracle.__version__)
            if problem:
                found.append(problem)
    return found


def pytest_runtest_call(item):
    problems = _problems(item.module) if getattr(item, "module", None) else []
    if problems:
        for p in problems:
            _seen[p] = _seen.get(p, 0) + 1
        pytest.fail("\n".join(problems), pytrace=False)


def pytest_terminal_summary(terminalreporter):
    for problem, count in _seen.items():
        terminalreporter.section("oracle version differs from the lock", red=True)
        terminalreporter.write_line(f"{count} tests failed because: {problem}")


@pytest.fixture
def one_thread():
    """torch on one thread for the test: tiny models run fastest so, and several threads
    wait on each other on a busy CPU."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def fresh_dynamo():
    """torch.compile from a clean slate, and nothing left behind: Dynamo's caches reset
    before and after, and Inductor compiles in this process (no pool of compile workers
    left running beside later tests; the distributed ones spawn processes of their own).
    AOT autograd's on-disk cache is off: it keys a graph on Dynamo's graph, where a
    mixprec operator is one opaque call, so it would serve kernels compiled from another
    version of the operators' definitions (another checkout, an earlier commit); the
    Inductor cache below it keys on the decomposed graph and stays on.
    The compile test modules use it for every test."""
    import torch
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config
    with inductor_config.patch(compile_threads=1), \
            functorch_config.patch(enable_autograd_cache=False):
        torch._dynamo.reset()
        yield
        torch._dynamo.reset()
