"""Accuracy of the presets on the digits CNN, mean of three seeds (slow: about 3 minutes;
run with ``pytest -m slow``). The same numbers come from
``mixprec compare --seeds 0,1,2``."""
import pytest

from mixprec.experiments.compare import CompareConfig, run_compare

pytestmark = pytest.mark.slow


def _means(recipes, **kw):
    results = run_compare(CompareConfig(recipes=recipes, workload="digits-cnn",
                                        seeds=(0, 1, 2), threads=1, **kw))
    return {s["recipe"]: s for s in results["summary"]}


def test_mixed_and_fp8_presets_track_fp32_on_digits_cnn():
    s = _means(("fp32", "fp16-mixed", "bf16-mixed", "fp8-e5m2", "fp8-hybrid"))
    base = s["fp32"]["metric_mean"]
    assert base > 0.95
    for name, points in [("fp16-mixed", 1.0), ("bf16-mixed", 1.0), ("fp8-e5m2", 1.5),
                         ("fp8-hybrid", 1.5)]:
        assert s[name]["skipped_steps"] <= 3, name
        assert base - s[name]["metric_mean"] <= points / 100, (name, s[name]["metric_mean"], base)


def test_fp16_pure_loses_updates_and_accuracy_at_a_small_learning_rate():
    results = run_compare(CompareConfig(recipes=("fp32", "fp16-mixed", "fp16-pure"),
                                        workload="digits-cnn", seeds=(0, 1, 2), threads=1,
                                        lr=3e-5))
    s = {x["recipe"]: x for x in results["summary"]}
    lost = [r["lost_update_fraction"] for r in results["runs"] if r["recipe"]["name"] == "fp16-pure"]
    assert min(lost) > 0.3          # about 40% of the element updates per step
    assert s["fp32"]["metric_mean"] - s["fp16-mixed"]["metric_mean"] <= 0.01
    assert s["fp32"]["metric_mean"] - s["fp16-pure"]["metric_mean"] >= 0.01
    assert s["fp16-pure"]["final_loss_mean"] > s["fp32"]["final_loss_mean"]
