"""The text Transformer workload trains: a quick run of `mixprec compare --workload
text-transformer` (30 steps, batch 8; about 3 s of CPU) under fp32 and fp16-mixed."""
from __future__ import annotations

import math

import pytest

from mixprec.experiments.compare import CompareConfig, run_compare


@pytest.fixture(scope="module")
def results() -> dict:
    return run_compare(CompareConfig(recipes=("fp32", "fp16-mixed"), workload="text-transformer",
                                     steps=30, batch_size=8))


def test_loss_falls_from_uniform_guessing(results):
    assert results["config"]["model"] == "CharTransformer"
    assert results["config"]["data"]["name"] == "stdlib-text"
    for run in results["runs"]:
        losses = run["loss_history"]
        assert run["status"] == "ok" and len(losses) == 30 and None not in losses
        # small initial weights: the first loss is that of a uniform guess over 256 bytes
        assert abs(losses[0] - math.log(256)) < 0.05, run["recipe"]["name"]
        assert sum(losses[-5:]) / 5 < 0.7 * losses[0], (run["recipe"]["name"], losses[-5:])


def test_held_out_perplexity_is_far_below_uniform(results):
    rows = {row["recipe"]: row for row in results["summary"]}
    for name, row in rows.items():
        assert row["metric_name"] == "perplexity"
        assert row["metric_mean"] < 40, (name, row["metric_mean"])     # uniform: 256
    assert rows["fp16-mixed"]["verdict"] == "matches fp32"
    assert rows["fp16-mixed"]["saved_activation_ratio"] < 0.75      # 16-bit saved tensors
