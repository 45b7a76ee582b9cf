"""Built-in data and models, the training records, the comparison and the results schema.

Training-loop bookkeeping is checked with a stand-in engine (plain FP32 training with a
fixed loss scale and chosen skipped steps), so every recorded number has a known value;
the real engine runs end to end in tests/test_cli.py.
"""
import contextlib
import copy
import json
import math
import os
import re
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mixprec.experiments import data as D
from mixprec.experiments.compare import (CompareConfig, _run_line, divergence_step, load_results,
                                         run_compare, save_results, split_recipes)
from mixprec.experiments.models import CharTransformer, digits_cnn, digits_mlp
from mixprec.experiments.schema import _check, load_schema, schema_errors
from mixprec.experiments.train import (SavedTensorBytes, TrainConfig, grad_log2_histogram,
                                       histogram_steps, train_recipe)
from mixprec.experiments.workloads import load_factory, resolve_workload


# --------------------------------------------------------------------------------------
# a stand-in engine with known behaviour
# --------------------------------------------------------------------------------------
class StandInEngine:
    """FP32 training; the loss is multiplied by ``scale`` and the gradients divided by
    it; the steps in ``skip`` are skipped; ``fail_at`` raises at that step."""

    def __init__(self, model, optimizer, recipe, *, scale=1.0, skip=(), fail_at=None):
        self.model, self.optimizer, self.recipe = model, optimizer, recipe
        self._scale, self.skip, self.fail_at = scale, set(skip), fail_at
        self.steps = self.skipped_steps = 0
        self.backend = "stand-in"

    @property
    def scale(self):
        return self._scale

    @contextlib.contextmanager
    def autocast(self):
        yield

    def backward(self, loss):
        (loss * self._scale).backward()

    def step(self):
        if self.steps == self.fail_at:
            raise RuntimeError(f"stand-in failure at step {self.steps}")
        skipped = self.steps in self.skip
        if not skipped:
            for p in self.model.parameters():
                p.grad /= self._scale
            self.optimizer.step()
        self.steps += 1
        self.skipped_steps += skipped
        return not skipped

    def zero_grad(self):
        self.optimizer.zero_grad(set_to_none=True)


def stand_in(**per_preset):
    """A prepare() whose engine behaviour is chosen per preset name."""
    def prepare(model, optimizer, recipe, *, seed=0):
        return StandInEngine(model, optimizer, recipe, **per_preset.get(recipe.name, {}))
    return prepare


@pytest.fixture(scope="module")
def digits():
    return D.load_digits_dataset(seed=0)


# --------------------------------------------------------------------------------------
# data
# --------------------------------------------------------------------------------------
def test_digits_split_is_deterministic_complete_and_standardized(digits):
    from sklearn.datasets import load_digits
    raw = load_digits()
    again = D.load_digits_dataset(seed=0)
    assert torch.equal(digits.x_train, again.x_train) and torch.equal(digits.y_test, again.y_test)
    other = D.load_digits_dataset(seed=1)
    assert not torch.equal(digits.y_train, other.y_train)
    # train + test is the whole set: label counts match sklearn's
    labels = torch.cat([digits.y_train, digits.y_test]).numpy()
    assert np.array_equal(np.bincount(labels), np.bincount(raw.target))
    assert len(digits.x_test) == round(0.25 * len(raw.target))
    # standardized with training statistics, computed independently in float64
    x = digits.x_train.double().numpy().reshape(len(digits.x_train), -1)
    assert np.allclose(x.mean(axis=0), 0, atol=1e-5)
    std = x.std(axis=0, ddof=1)
    assert np.allclose(std[std > 0], 1, atol=1e-5)
    assert digits.x_train.shape[1:] == (1, 8, 8) and digits.num_classes == 10
    assert digits.metric == "accuracy"


def test_batches_follow_one_order_per_seed():
    x, y = torch.arange(10.0).unsqueeze(1), torch.arange(10)
    take = lambda seed: [b[1].tolist() for _, b in zip(range(7), D.iterate_batches(x, y, 3, seed=seed))]
    first = take(5)
    assert first == take(5)
    assert first != take(6)
    # each epoch (4 batches of 3, 3, 3, 1) is a permutation of all examples
    assert sorted(sum(first[:4], [])) == list(range(10))
    assert [len(b) for b in first] == [3, 3, 3, 1, 3, 3, 3]
    assert D.steps_per_epoch(10, 3) == 4


def test_text_corpus_is_the_stdlib_source():
    corpus, names = D.stdlib_corpus(max_bytes=200_000)
    root = Path(os.__file__).resolve().parent
    expected = sorted(p.name for p in root.glob("*.py"))[: len(names)]
    assert names == expected
    independent = b"".join((root / n).read_bytes() for n in names)[:200_000]
    assert corpus == independent and len(corpus) == 200_000


def test_text_dataset_is_next_byte_prediction():
    ds = D.load_text_dataset(context=32, max_bytes=50_000, max_test_windows=10)
    corpus, _ = D.stdlib_corpus(max_bytes=50_000)
    assert ds.task is D.Task.LM and ds.num_classes == 256 and ds.metric == "perplexity"
    assert bytes(ds.x_train[0].tolist()) == corpus[:32]
    assert bytes(ds.y_train[0].tolist()) == corpus[1:33]
    assert bytes(ds.x_train[1].tolist()) == corpus[32:64]
    cut = int(50_000 * 0.9)
    assert bytes(ds.x_test[0].tolist()) == corpus[cut: cut + 32]
    assert len(ds.x_test) == 10 and ds.x_train.shape[1] == 32
    assert ds.info["sha256"] and ds.info["bytes"] == 50_000


def test_dataset_contract_errors():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(ValueError, match="unknown task 'regression'"):
        D.Dataset("d", "regression", x, y, x, y, 2)
    with pytest.raises(ValueError, match="y_train must be int64"):
        D.Dataset("d", "classification", x, y.float(), x, y, 2)
    with pytest.raises(ValueError, match="x_test has 2 examples and y_test 4"):
        D.Dataset("d", "classification", x, y, x[:2], y, 2)
    with pytest.raises(ValueError, match=r"labels span \[0, 5\]"):
        D.Dataset("d", "classification", x, y, x, torch.full((4,), 5), 2)
    with pytest.raises(ValueError, match="task 'lm' needs int64"):
        D.Dataset("d", "lm", x, y, x, y, 2)


# --------------------------------------------------------------------------------------
# models
# --------------------------------------------------------------------------------------
def test_digits_models_map_images_to_ten_logits(digits):
    for make in (digits_mlp, digits_cnn):
        assert make()(digits.x_test[:5]).shape == (5, 10)


def test_transformer_is_causal():
    torch.manual_seed(0)
    model = CharTransformer(context=16).eval()
    idx = torch.randint(0, 256, (2, 16))
    changed = idx.clone()
    changed[:, 10:] = (changed[:, 10:] + 1) % 256
    with torch.no_grad():
        a, b = model(idx), model(changed)
    assert a.shape == (2, 16, 256)
    assert torch.equal(a[:, :10], b[:, :10])          # the past cannot see the future
    assert not torch.allclose(a[:, 10:], b[:, 10:])
    with pytest.raises(ValueError, match="exceeds the model context 16"):
        model(torch.zeros(1, 17, dtype=torch.int64))


# --------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, width", [(torch.float32, 4), (torch.float16, 2)])
def test_saved_bytes_count_the_input_of_a_linear_layer(dtype, width):
    layer = nn.Linear(16, 8).to(dtype)
    x = torch.randn(32, 16, dtype=dtype, requires_grad=True)
    with SavedTensorBytes(layer) as saved:
        y = layer(x)
        z = y.exp()          # exp saves its output: a second, distinct storage
    # the weight (saved by the matmul) is the model's own storage and not counted
    assert saved.nbytes == x.numel() * width + z.numel() * width
    assert saved.by_dtype == {str(dtype)[6:]: saved.nbytes}


def test_saved_bytes_leave_out_the_held_batch_for_one_block():
    layer = nn.Linear(16, 8)
    x = torch.randn(32, 16)                  # saved by the matmul itself, as the caller's
    saved = SavedTensorBytes(layer)
    with saved.holding(x):
        z = layer(x).exp()
    assert saved.nbytes == z.numel() * 4
    again = SavedTensorBytes(layer)
    with again.holding(x):
        pass
    with again:                              # holding() covered one block only
        z = layer(x).exp()
    assert again.nbytes == x.numel() * 4 + z.numel() * 4


def test_saved_bytes_count_a_storage_once():
    x = torch.randn(64, requires_grad=True)
    with SavedTensorBytes(nn.Identity()) as saved:
        y = x.sin() + x.cos() + x * x    # x saved three times
    assert saved.nbytes == 64 * 4
    del y


def test_grad_histogram_matches_numpy():
    values = np.array([0.0, -0.0, 1.0, 0.75, -0.5, 2.0 ** -30, 3 * 2.0 ** -140, 2.0 ** 10 - 1,
                       np.inf, np.nan, -3.0, 1.5e-45], dtype=np.float32)
    hist = grad_log2_histogram([torch.from_numpy(values[:6]), torch.from_numpy(values[6:])],
                               scale=2.0, step=7)
    v = values.astype(np.float64) / 2.0
    good = v[np.isfinite(v) & (v != 0)]
    binades = np.floor(np.log2(np.abs(good))).astype(int)
    assert hist["binade_lo"] == binades.min()
    assert hist["counts"] == np.bincount(binades - binades.min()).tolist()
    assert (hist["zeros"], hist["nonfinite"], hist["total"], hist["step"]) == (2, 2, 12, 7)


def test_histogram_steps_spread_over_training():
    assert histogram_steps(100, 3) == [0, 50, 99]
    assert histogram_steps(1, 3) == [0]
    assert histogram_steps(2, 3) == [0, 1]


# --------------------------------------------------------------------------------------
# user factories
# --------------------------------------------------------------------------------------
@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "user_mp_factories.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from mixprec.experiments.data import Dataset
        NOT_CALLABLE = 3
        def model():
            return nn.Sequential(nn.Flatten(), nn.Linear(6, 3))
        def wrong():
            return "a string"
        def data():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(40, 6, generator=g)
            y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
            return Dataset("blobs", "classification", x[:30], y[:30], x[30:], y[30:], 3)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "user_mp_factories"


def test_bad_factory_specs_name_the_spec_and_form(user_module):
    with pytest.raises(ValueError, match=r"'nocolon'.*package\.module:callable"):
        load_factory("nocolon")
    with pytest.raises(ValueError, match=r"cannot import module 'no_such_mod_xyz'.*package\.module:callable"):
        load_factory("no_such_mod_xyz:f")
    with pytest.raises(ValueError, match=r"has no attribute 'missing'"):
        load_factory(f"{user_module}:missing")
    with pytest.raises(ValueError, match=r"'NOT_CALLABLE' is a int, not callable"):
        load_factory(f"{user_module}:NOT_CALLABLE")
    with pytest.raises(ValueError, match=r"--model '.*:wrong' returned a str.*nn\.Module"):
        resolve_workload(model=f"{user_module}:wrong").make_model()
    with pytest.raises(ValueError, match=r"--data '.*:wrong' returned a str.*Dataset"):
        resolve_workload(data=f"{user_module}:wrong").make_data()
    with pytest.raises(ValueError, match="unknown workload 'cifar'; valid choices: digits-cnn"):
        resolve_workload("cifar")


def test_user_model_and_data_run(user_module):
    cfg = CompareConfig(recipes=("fp32", "bf16-mixed"), model=f"{user_module}:model",
                        data=f"{user_module}:data", steps=5, batch_size=8)
    res = run_compare(cfg, prepare=stand_in())
    assert res["config"]["model"] == f"{user_module}:model"
    assert res["config"]["data"]["name"] == "blobs"
    assert all(r["status"] == "ok" for r in res["runs"])


def test_model_that_does_not_fit_the_data_fails_early(user_module):
    cfg = CompareConfig(recipes=("fp32",), model=f"{user_module}:model", steps=2)
    with pytest.raises(ValueError, match=r"cannot run on the data 'digits'"):
        run_compare(cfg, prepare=stand_in())


# --------------------------------------------------------------------------------------
# recipes and configuration
# --------------------------------------------------------------------------------------
def test_split_recipes_keeps_overrides_together():
    assert split_recipes("fp32, bf16-mixed") == ("fp32", "bf16-mixed")
    assert split_recipes("fp8-e5m2:grads.rounding=nearest,backend=emulated,mxfp8") == (
        "fp8-e5m2:grads.rounding=nearest,backend=emulated", "mxfp8")
    with pytest.raises(ValueError, match="starts with an override 'backend=native'"):
        split_recipes("backend=native,fp32")


def test_compare_config_puts_fp32_first_and_rejects_bad_recipes():
    assert CompareConfig(recipes="bf16-mixed").recipes == ("fp32", "bf16-mixed")
    assert CompareConfig(recipes=("mxfp8", "fp32")).recipes == ("fp32", "mxfp8")
    with pytest.raises(ValueError, match=r"unknown recipe 'fp7'; valid presets: fp32, fp16-mixed"):
        CompareConfig(recipes="fp32,fp7")
    with pytest.raises(ValueError, match="listed twice: bf16-mixed"):
        CompareConfig(recipes="bf16-mixed,bf16-mixed")


def test_divergence_step_finds_where_the_gap_opens_for_good():
    base = [1.0] * 100
    assert divergence_step([1.0] * 100, base, tol=0.1) is None
    late = [1.0] * 60 + [2.0] * 40
    at = divergence_step(late, base, tol=0.1, window=5)
    assert 60 <= at <= 61
    blip = [1.0] * 30 + [5.0] * 5 + [1.0] * 65      # recovers: no departure
    assert divergence_step(blip, base, tol=0.1, window=5) is None
    assert divergence_step([1.0] * 10 + [None] * 90, base, tol=0.1, window=5) == 10


# --------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------
def test_train_record_holds_every_step(digits):
    cfg = TrainConfig(steps=12, batch_size=32, seed=3, hist_points=3)
    rec = train_recipe(digits_cnn(), digits, "fp16-mixed", cfg,
                       prepare=stand_in(**{"fp16-mixed": {"scale": 2.0 ** 12, "skip": (2, 5)}}))
    assert rec["status"] == "ok" and rec["steps_run"] == 12
    assert rec["skipped_at"] == [2, 5] and rec["skipped_steps"] == 2
    assert rec["scale_history"] == [2.0 ** 12] * 12 and rec["final_scale"] == 2.0 ** 12
    assert len(rec["loss_history"]) == 12 and all(v > 0 for v in rec["loss_history"])
    assert rec["final_loss"] == pytest.approx(rec["loss_history"][-1])     # last tenth: 1 step
    assert [h["step"] for h in rec["grad_histograms"]] == [0, 6, 11]
    assert rec["grad_histograms"][0]["total"] == sum(p.numel() for p in digits_cnn().parameters())
    assert 0.0 <= rec["metric"]["value"] <= 1.0 and rec["metric"]["name"] == "accuracy"
    assert rec["saved_activation_bytes"] > 0 and rec["step_time_s"] > 0
    assert rec["recipe"] == {"name": "fp16-mixed", "preset": "fp16-mixed", "spec": "fp16-mixed"}
    assert rec["config"]["seed"] == 3 and rec["config"]["torch_version"] == torch.__version__


def test_train_record_holds_the_optimizer_state_underflow(digits):
    """AdamW moments in FP16 lose most of exp_avg_sq at this learning rate's gradients;
    in FP32 (fp16-pure's default) nothing is counted."""
    cfg = TrainConfig(steps=3, batch_size=32, seed=0, hist_points=1)
    with pytest.warns(UserWarning, match="optimizer state underflows in fp16"):
        fp16 = train_recipe(digits_mlp(), digits, "fp16-pure:optimizer_state=fp16", cfg)
    assert fp16["state_underflow"] > 0.1
    assert re.search(r"optimizer state \d+\.\d% zero where the gradient is not",
                     _run_line(fp16, 1, 2))
    fp32_state = train_recipe(digits_mlp(), digits, "fp16-pure", cfg)
    assert fp32_state["state_underflow"] is None and "optimizer state" not in _run_line(
        fp32_state, 2, 2)


def test_histograms_are_of_unscaled_gradients(digits):
    """The loss scale must not shift the recorded histogram (powers of two are exact)."""
    cfg = TrainConfig(steps=1, batch_size=16)
    hists = []
    for scale in (1.0, 2.0 ** 10):
        torch.manual_seed(0)
        hists.append(train_recipe(digits_mlp(), digits, "fp32", cfg,
                                  prepare=stand_in(fp32={"scale": scale}))["grad_histograms"])
    assert hists[0] != [] and hists[0] == hists[1]


def test_every_recipe_starts_from_the_same_weights_and_batches():
    """With an engine that ignores the recipe, all loss curves are bit-identical."""
    cfg = CompareConfig(recipes=("fp32", "bf16-mixed", "mxfp8"), workload="digits-mlp", steps=8)
    res = run_compare(cfg, prepare=stand_in())
    curves = [r["loss_history"] for r in res["runs"]]
    assert curves[0] == curves[1] == curves[2]
    assert [r["verdict"] for r in res["summary"]] == ["baseline", "matches fp32", "matches fp32"]
    assert res["summary"][1]["saved_activation_ratio"] == 1.0


def test_failed_run_is_recorded_and_reported_where(tmp_path):
    cfg = CompareConfig(recipes=("fp32", "fp16-pure"), workload="digits-mlp", steps=10)
    res = run_compare(cfg, prepare=stand_in(**{"fp16-pure": {"fail_at": 4}}))
    run = res["runs"][1]
    assert run["status"] == "failed" and run["steps_run"] == 4
    assert run["error"] == "RuntimeError: stand-in failure at step 4"
    row = res["summary"][1]
    assert row["verdict"] == "failed" and row["departs_at"] == 4
    assert "stopped at step 4" in row["detail"]
    assert load_results(save_results(res, tmp_path)) == json.loads(json.dumps(res))


def test_baseline_failure_stops_the_comparison():
    cfg = CompareConfig(recipes=("fp32",), workload="digits-mlp", steps=4)
    with pytest.raises(RuntimeError, match="the fp32 baseline failed"):
        run_compare(cfg, prepare=stand_in(fp32={"fail_at": 1}))


def test_thread_setting_applies_to_the_run_only():
    before = torch.get_num_threads()
    cfg = CompareConfig(recipes=("fp32",), workload="digits-mlp", steps=2, threads=1)
    res = run_compare(cfg, prepare=stand_in())
    assert res["environment"]["torch_threads"] == 1 and res["config"]["threads"] == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="threads must be at least 1, got 0"):
        CompareConfig(threads=0)


def test_seeds_give_one_record_each_and_means():
    cfg = CompareConfig(recipes=("fp32",), workload="digits-mlp", steps=3, seeds=(0, 1))
    res = run_compare(cfg, prepare=stand_in())
    assert [r["seed"] for r in res["runs"]] == [0, 1]
    m = [r["metric"]["value"] for r in res["runs"]]
    assert res["summary"][0]["metric_mean"] == pytest.approx(sum(m) / 2)


# --------------------------------------------------------------------------------------
# schema
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_results():
    cfg = CompareConfig(recipes=("fp32", "fp16-mixed"), workload="digits-mlp", steps=4)
    return run_compare(cfg, prepare=stand_in(**{"fp16-mixed": {"scale": 8.0, "skip": (1,)}}))


def test_results_validate_and_violations_are_found(small_results):
    schema = load_schema()
    assert schema_errors(small_results) == []
    assert list(_check(small_results, schema, schema, "$")) == []    # the built-in checker
    broken = copy.deepcopy(small_results)
    del broken["runs"][1]["loss_history"]
    broken["runs"][0]["skipped_steps"] = -1
    broken["summary"][0]["verdict"] = "great"
    broken["runs"][0]["scale_history"][0] = "big"
    for errors in (schema_errors(broken), list(_check(broken, schema, schema, "$"))):
        text = " | ".join(errors)
        assert len(errors) == 4, text
        assert "loss_history" in text and "great" in text and "big" in text
    with pytest.raises(ValueError, match="results do not match results.schema.json"):
        save_results(broken, "/nonexistent/never-written")


def test_builtin_checker_types():
    schema = {"type": "object", "required": ["a"], "properties": {
        "a": {"type": "integer", "minimum": 0}, "b": {"type": ["number", "null"]},
        "c": {"type": "array", "items": {"type": "boolean"}, "minItems": 1}}}
    ok = {"a": 1, "b": None, "c": [True]}
    assert list(_check(ok, schema, schema, "$")) == []
    bad = {"a": True, "b": math.inf, "c": []}     # bool is no integer in JSON; inf no number
    assert len(list(_check(bad, schema, schema, "$"))) == 3
