"""Framework integrations: a tiny model trained through each framework's own loop.

Formats are checked against torch's own casts (round to nearest even): a value v is in
fp16 / e5m2 exactly when ``v.to(dtype).float() == v``.
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lightning.pytorch as pl
from lightning.pytorch.loggers import CSVLogger

import mixprec
from mixprec.integrations.lightning import MixprecPrecision

E5M2 = torch.float8_e5m2


pytestmark = pytest.mark.usefixtures("one_thread")


def _in_dtype(t: torch.Tensor, dtype: torch.dtype) -> bool:
    t = t.detach().float()
    return bool(torch.equal(t.to(dtype).float(), t))


# --------------------------------------------------------------------------------------
# PyTorch Lightning
# --------------------------------------------------------------------------------------
class _LitMLP(pl.LightningModule):
    """8 -> 32 -> 32 -> 4 with a LayerNorm: under fp8-e5m2 ("first", "last", "norm" kept)
    the middle Linear ``net.2`` runs in E5M2."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 32),
                                 nn.LayerNorm(32), nn.ReLU(), nn.Linear(32, 4))
        self.seen_outputs: list = []
        # training forwards only: a keep-rule trace runs the model once without gradients
        self.net[2].register_forward_hook(
            lambda m, a, out: self.seen_outputs.append(out.detach().clone())
            if torch.is_grad_enabled() else None)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def forward(self, x):
        return self.net(x)

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def _loader(n: int = 48, batch: int = 8):
    g = torch.Generator().manual_seed(0)
    ds = torch.utils.data.TensorDataset(torch.randn(n, 8, generator=g),
                                        torch.randint(0, 4, (n,), generator=g))
    return torch.utils.data.DataLoader(ds, batch_size=batch)


def _fit(tmp_path, plugin, *, max_steps: int = 3, **trainer_kwargs):
    torch.manual_seed(0)
    module = _LitMLP()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, plugins=[plugin],
                         logger=CSVLogger(tmp_path, name="lit"), log_every_n_steps=1,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path,
                         **trainer_kwargs)
    trainer.fit(module, _loader())
    return module, trainer


def _csv_column(trainer, name: str) -> list:
    import csv
    path = f"{trainer.logger.log_dir}/metrics.csv"
    with open(path) as f:
        return [float(r[name]) for r in csv.DictReader(f) if r.get(name)]


def test_lightning_plugin_trains_under_the_recipe(tmp_path):
    plugin = MixprecPrecision("fp8-e5m2")
    torch.manual_seed(0)
    initial = _LitMLP().net[2].weight.detach().clone()
    assert not _in_dtype(initial, E5M2)     # FP32 init: the check below can fail
    module, trainer = _fit(tmp_path, plugin)
    engine = plugin.engine
    assert engine is not None and engine.steps == 3
    # the middle layer's weights are stored in E5M2 and moved from their rounded init
    w = module.net[2].weight
    assert _in_dtype(w, E5M2)
    assert not torch.equal(w.detach(), initial.to(E5M2).float())
    # kept layers ("first", "last", "norm") stay FP32; their masters moved
    assert not _in_dtype(module.net[0].weight, E5M2)
    # FP32 master weights hold what E5M2 cannot
    masters = dict(zip([n for n, _ in module.named_parameters()], engine.master_params))
    assert not _in_dtype(masters["net.2.weight"], E5M2)
    # the emulated layer's outputs are E5M2 values in every training step
    assert len(module.seen_outputs) == 3
    assert all(_in_dtype(o, E5M2) for o in module.seen_outputs)
    # the coverage report: the middle layer emulated in E5M2, first and last kept
    cov = engine.coverage()
    status = {r.module: (r.status, dict(r.formats)) for r in cov.rows if r.has_weight}
    assert status["net.2"] == ("emulated", {"weight": "e5m2", "activation": "e5m2",
                                            "grad_output": "e5m2/stochastic",
                                            "weight_grad": "e5m2/stochastic"})
    assert status["net.0"][0] == status["net.5"][0] == "kept"
    assert cov.unrecognised == 0
    # fp8-e5m2 scales the loss dynamically: the scale of each step is in the logs
    logged = _csv_column(trainer, "mixprec/loss_scale")
    assert logged == [h["scale"] for h in engine.history]
    assert logged[0] == mixprec.get_recipe("fp8-e5m2").loss_scale.init_scale
    assert _csv_column(trainer, "mixprec/skipped_steps")[-1] == engine.skipped_steps


@pytest.mark.parametrize("accumulate", [1, 2])
def test_lightning_plugin_fp32_matches_plain_lightning(tmp_path, accumulate):
    """The fp32 recipe through the plugin gives the weights of Lightning without it, with
    and without gradient accumulation (several backward passes per step)."""
    plugin_module, _ = _fit(tmp_path / "a", MixprecPrecision("fp32"),
                            accumulate_grad_batches=accumulate)
    torch.manual_seed(0)
    plain = _LitMLP()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path / "b",
                         accumulate_grad_batches=accumulate)
    trainer.fit(plain, _loader())
    for (n, p), q in zip(plugin_module.named_parameters(), plain.parameters()):
        assert torch.equal(p, q), n


class _ManualMLP(_LitMLP):
    def __init__(self):
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        self.manual_backward(nn.functional.cross_entropy(self(x), y))
        opt.step()
        opt.zero_grad()


def test_lightning_plugin_manual_optimization(tmp_path):
    plugin = MixprecPrecision("fp16-mixed")
    torch.manual_seed(0)
    module = _ManualMLP()
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, plugins=[plugin],
                         logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, _loader())
    assert plugin.engine.steps == 3 and plugin.engine.skipped_steps == 0
    assert all(_in_dtype(p, torch.float16) for p in module.parameters())


def test_lightning_plugin_clips_unscaled_gradients(tmp_path):
    """gradient_clip_val acts on the unscaled FP32 gradients: under FP32 with a static
    loss scale of 2^20 (exact in FP32) the result equals clipping at scale 1; a clip of
    the scaled gradients would differ."""
    results = []
    for init in (1, 2 ** 20):
        plugin = MixprecPrecision(f"fp32:loss_scale.kind=static,"
                                  f"loss_scale.init_scale={init}")
        module, _ = _fit(tmp_path / str(init), plugin, gradient_clip_val=0.05)
        results.append([p.detach().clone() for p in module.parameters()])
    # the plugin clipped (not a no-op): a run without clipping ends elsewhere
    unclipped, _ = _fit(tmp_path / "noclip", MixprecPrecision(
        "fp32:loss_scale.kind=static,loss_scale.init_scale=1"))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, p) for a, p in zip(results[0], unclipped.parameters()))


def test_lightning_plugin_skips_nonfinite_steps(tmp_path):
    """An overflowing scaled gradient skips the step (weights unchanged) and backs off S."""
    plugin = MixprecPrecision("fp16-mixed:loss_scale.init_scale=1e38")
    torch.manual_seed(0)
    initial = [p.detach().clone() for p in _LitMLP().parameters()]
    module, trainer = _fit(tmp_path, plugin, max_steps=1)
    assert plugin.engine.skipped_steps == 1
    assert plugin.engine.scale < 1e38
    for p, q in zip(module.parameters(), initial):
        assert torch.equal(p.detach(), q.half().float())     # rounded once, never stepped


def test_lightning_plugin_state_dict_restores_the_engine(tmp_path):
    """The plugin's state (Lightning saves it in checkpoints) is the engine's: loaded
    before the engine exists, it is applied when Lightning connects the plugin."""
    recipe = "fp16-mixed:loss_scale.init_scale=1e38"        # the first step skips, S backs off
    first = MixprecPrecision(recipe)
    _fit(tmp_path, first, max_steps=2)
    state = first.state_dict()
    second = MixprecPrecision(recipe)
    second.load_state_dict(state)
    module = _LitMLP()
    second.connect(module, [torch.optim.AdamW(module.parameters(), lr=1e-2)], [])
    assert (second.engine.steps, second.engine.skipped_steps, second.engine.scale) == (
        first.engine.steps, first.engine.skipped_steps, first.engine.scale)
    assert first.engine.skipped_steps >= 1 and first.engine.scale < 1e38
    for a, b in zip(second.engine.master_params, first.engine.master_params):
        assert torch.equal(a, b)
    second.teardown()


def test_lightning_plugin_state_waits_for_the_keep_rule_trace(tmp_path):
    """Under fp8-hybrid ("first"/"last" by a traced forward) the engine has no masters
    until the LightningModule's first forward: a loaded state is applied right after that
    trace, before the forward computes; ``example_inputs`` makes the engine ready at once."""
    first = MixprecPrecision("fp8-hybrid")
    _fit(tmp_path, first, max_steps=2)
    state = first.state_dict()
    assert state["counters"]["steps"] == 2
    second = MixprecPrecision("fp8-hybrid")
    second.load_state_dict(state)
    torch.manual_seed(0)
    module = _LitMLP()
    second.connect(module, [torch.optim.AdamW(module.parameters(), lr=1e-2)], [])
    assert second.engine.keep is None and second.state_dict() == {}
    with second.forward_context():
        module(torch.randn(4, 8))
    assert second.engine.keep == first.engine.keep == frozenset({"net.0", "net.3", "net.5"})
    assert second.engine.steps == 2
    for a, b in zip(second.engine.master_params, first.engine.master_params):
        assert torch.equal(a, b)
    third = MixprecPrecision("fp8-hybrid", example_inputs=torch.randn(4, 8))
    module = _LitMLP()
    third.connect(module, [torch.optim.AdamW(module.parameters(), lr=1e-2)], [])
    assert third.engine.keep == frozenset({"net.0", "net.3", "net.5"})


class _LitEval(_LitMLP):
    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", nn.functional.cross_entropy(self(x), y))


def test_lightning_plugin_evaluates_without_fit(tmp_path):
    """Trainer.validate alone: the weights are rounded to the recipe's storage and the
    forward runs under it, with an optimizer that never steps."""
    plugin = MixprecPrecision("fp16-mixed")
    torch.manual_seed(0)
    module = _LitEval()
    initial = module.net[2].weight.detach().clone()
    trainer = pl.Trainer(accelerator="cpu", devices=1, plugins=[plugin], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, default_root_dir=tmp_path)
    trainer.validate(module, _loader())
    assert torch.equal(module.net[2].weight, initial.half().float())
    assert module.seen_outputs == []                   # no gradients: validation forwards
    assert plugin.engine.steps == 0
    assert plugin.engine.coverage().emulated > 0


def test_lightning_plugin_sanity_validation_changes_nothing(tmp_path):
    """Lightning's sanity validation runs first, under torch.inference_mode: under
    fp8-hybrid it is the forward the keep rules trace. Training after it ends with the
    weights of a fit without validation, bit for bit."""
    results = []
    for validate in (True, False):
        torch.manual_seed(0)
        module, plugin = _LitEval(), MixprecPrecision("fp8-hybrid")
        trainer = pl.Trainer(accelerator="cpu", devices=1, max_steps=3, plugins=[plugin],
                             logger=False, enable_checkpointing=False,
                             enable_progress_bar=False, enable_model_summary=False,
                             default_root_dir=tmp_path, limit_val_batches=2,
                             num_sanity_val_steps=2 if validate else 0)
        trainer.fit(module, _loader(), _loader() if validate else None)
        assert plugin.engine.steps == 3
        assert plugin.engine.keep == frozenset({"net.0", "net.3", "net.5"})
        results.append([p.detach().clone() for p in module.parameters()])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_lightning_precision_alias_and_errors():
    import mixprec.lightning
    assert mixprec.lightning.Precision is MixprecPrecision
    with pytest.raises(ValueError, match="fp8-hybrid"):
        MixprecPrecision("fp7-mixed")
    with pytest.raises(RuntimeError, match="connects the plugin"):
        MixprecPrecision("fp16-mixed").pre_backward(torch.ones(()), None)
    assert math.isnan(MixprecPrecision().loss_scale)


# --------------------------------------------------------------------------------------
# Hugging Face Trainer
# --------------------------------------------------------------------------------------
def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))


class _Tokens(torch.utils.data.Dataset):
    """16 random token sequences of length 16, labels = inputs (causal LM)."""

    def __init__(self):
        self.ids = torch.randint(0, 64, (16, 16), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _hf_train(tmp_path, model, *, trainer_cls=None, max_grad_norm=1.0, **kwargs):
    from transformers import TrainingArguments
    from mixprec.integrations.hf import MixprecTrainer
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-3, logging_steps=1, report_to="none",
                             save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
                             dataloader_num_workers=0, max_grad_norm=max_grad_norm)
    trainer = (trainer_cls or MixprecTrainer)(model=model, args=args, train_dataset=_Tokens(),
                                              **kwargs)
    trainer.train()
    return trainer


def test_hf_trainer_trains_under_the_recipe(tmp_path):
    model = _tiny_llama()
    q_proj = model.model.layers[0].self_attn.q_proj
    initial = q_proj.weight.detach().clone()
    assert not _in_dtype(initial, torch.float16)            # the check below can fail
    outputs: list = []
    q_proj.register_forward_hook(lambda m, a, out: outputs.append(out.detach().clone()))
    trainer = _hf_train(tmp_path, model, recipe="fp16-mixed")
    engine = trainer.engine
    assert engine is not None and engine.steps == 3
    # weights stored in FP16 (moved from the rounded init); FP32 masters
    assert _in_dtype(q_proj.weight, torch.float16)
    assert not torch.equal(q_proj.weight.detach(), initial.half().float())
    names = [n for n, _ in model.named_parameters()]
    master = dict(zip(names, engine.master_params))["model.layers.0.self_attn.q_proj.weight"]
    assert not _in_dtype(master, torch.float16)
    # activations: every q_proj output of the 3 training steps is FP16
    assert len(outputs) == 3 and all(_in_dtype(o, torch.float16) for o in outputs)
    # the coverage report: every projection of the Llama emulated in FP16
    cov = engine.coverage()
    rows = [r for r in cov.rows if r.has_weight and r.op == "linear"]
    assert len({r.module for r in rows}) == 2 * 7 + 1          # 7 per layer, lm_head
    assert all(r.status == "emulated" and dict(r.formats)["weight"] == "fp16" for r in rows)
    assert cov.unrecognised == 0
    # the loss scale of each step is in the Trainer's logs
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["loss_scale"] for h in steps] == [h["scale"] for h in engine.history]
    assert steps[0]["loss_scale"] == 65536.0
    assert all(math.isfinite(h["loss"]) for h in steps)


def test_hf_trainer_fp32_matches_plain_trainer(tmp_path):
    """fp32 through MixprecTrainer (engine backward and step) gives the plain Trainer's
    weights bit for bit without clipping. With clipping the gradient norm sums the
    tensors in the optimizer's group order (decay, then no-decay parameters) instead of
    the model's, so the norm may differ in the last bit: it agrees to 1e-6."""
    from transformers import Trainer
    ours = _hf_train(tmp_path / "a", _tiny_llama(), recipe="fp32", max_grad_norm=0.0)
    plain = _hf_train(tmp_path / "b", _tiny_llama(), trainer_cls=Trainer, max_grad_norm=0.0)
    for (n, p), q in zip(ours.model.named_parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h]
             for t in (ours, plain)]
    assert len(norms[0]) == 3 and norms[0] == pytest.approx(norms[1], rel=1e-6, abs=0)
    clipped = [_hf_train(tmp_path / c, _tiny_llama(), max_grad_norm=0.5, **kw)
               for c, kw in (("c", {"recipe": "fp32"}), ("d", {"trainer_cls": Trainer}))]
    clipped_model = clipped[0].model
    norms = [[h["grad_norm"] for h in t.state.log_history if "grad_norm" in h] for t in clipped]
    assert norms[0] == pytest.approx(norms[1], rel=1e-6, abs=0)
    assert not torch.equal(clipped_model.lm_head.weight, ours.model.lm_head.weight)  # it clipped


def test_hf_trainer_checkpoint_resumes_the_engine(tmp_path):
    """A Trainer checkpoint holds the engine's state (optimizer.pt): a resumed run
    continues the step count and the loss scale (growing x2 every step here), where a
    fresh engine would start again from 2^16."""
    from transformers import TrainingArguments
    from mixprec.integrations.hf import MixprecTrainer
    recipe = "fp16-mixed:loss_scale.growth_interval=1"

    def run(max_steps, **train_kwargs):
        args = TrainingArguments(output_dir=str(tmp_path), max_steps=max_steps,
                                 per_device_train_batch_size=4, learning_rate=1e-3,
                                 report_to="none", save_strategy="steps", save_steps=2,
                                 use_cpu=True, disable_tqdm=True, seed=0)
        trainer = MixprecTrainer(model=_tiny_llama(), args=args, train_dataset=_Tokens(),
                                 recipe=recipe)
        trainer.train(**train_kwargs)
        return trainer

    first = run(2)
    assert first.engine.scale == 2.0 ** 18
    resumed = run(4, resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert resumed.engine.steps == 4 and resumed.engine.scale == 2.0 ** 20
    assert [h["scale"] for h in resumed.engine.history] == [2.0 ** k for k in (16, 17, 18, 19)]


def test_hf_trainer_rejects_autocast_on_top(tmp_path):
    from transformers import TrainingArguments
    from mixprec.integrations.hf import MixprecTrainer
    args = TrainingArguments(output_dir=str(tmp_path), bf16=True, use_cpu=True,
                             report_to="none")
    with pytest.raises(ValueError, match="bf16=True"):
        MixprecTrainer(model=_tiny_llama(), args=args, recipe="fp16-mixed")
    with pytest.raises(ValueError, match="fp8-hybrid"):
        MixprecTrainer(model=_tiny_llama(), args=args, recipe="fp9")


# --------------------------------------------------------------------------------------
# TensorBoard
# --------------------------------------------------------------------------------------
def test_monitor_logs_to_tensorboard(tmp_path):
    """What the event file holds equals the monitor's own report: fractions, log2
    histogram counts, and the loss scale passed in."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mp = mixprec.prepare(model, opt, "fp16-mixed")
    mon = mp.attach_monitor(mixprec.NumericsMonitor(model, formats=("fp16", "e4m3"),
                                                    bins=range(-30, 5)))
    x, y = torch.randn(32, 8) * 1e-4, torch.randint(0, 4, (32,))   # some e4m3 underflow
    with mp.autocast():
        loss = nn.functional.cross_entropy(model(x), y)
    mp.backward(loss)
    mp.step()
    mp.zero_grad()
    writer = SummaryWriter(str(tmp_path))
    n = mon.log_to(writer, 7, loss_scale=mp.scale)
    writer.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    report = mon.report()
    tags = acc.Tags()
    assert n == len(tags["scalars"]) + len(tags["histograms"])
    [ls] = acc.Scalars("numerics/loss_scale")
    assert (ls.step, ls.value) == (7, 65536.0)
    checked_under = 0
    for d in report["tensors"]:
        tag = f"numerics/{d['layer']}/{d['role']}"
        for fmt, vals in d["formats"].items():
            for kind in ("underflow", "overflow"):
                [ev] = acc.Scalars(f"{tag}/{kind}/{fmt}")
                assert ev.step == 7
                assert ev.value == pytest.approx(vals[f"{kind}_frac"], rel=1e-6, abs=0)
                checked_under += kind == "underflow" and vals["underflow_frac"] > 0
        if d["numel"] - d["zeros"] - d["nonfinite"]:
            [h] = acc.Histograms(f"{tag}/log2_magnitude")
            counts = [d["hist"]["below"], *d["hist"]["counts"], d["hist"]["above"]]
            assert h.histogram_value.bucket == counts
            assert list(h.histogram_value.bucket_limit)[:-1] == list(range(-30, 5))
            assert h.histogram_value.num == sum(counts)
            assert h.histogram_value.max == pytest.approx(math.log2(d["amax"]))
    assert checked_under > 0                     # nonzero fractions were compared too
    with pytest.raises(TypeError, match="SummaryWriter"):
        mon.log_to(object())


# --------------------------------------------------------------------------------------
# mixprec compare --model hf:CONFIG
# --------------------------------------------------------------------------------------
_TINY_LLAMA_JSON = {"model_type": "llama", "vocab_size": 300, "hidden_size": 32,
                    "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "max_position_embeddings": 64}


def test_compare_runs_a_hf_model_from_a_config_file(tmp_path, capsys):
    import json
    from mixprec.cli import main
    from mixprec.experiments.workloads import resolve_workload
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "config.json").write_text(json.dumps(_TINY_LLAMA_JSON))
    out = tmp_path / "run"
    rc = main(["compare", "--model", f"hf:{tmp_path / 'cfg'}", "--recipes", "bf16-mixed,fp8-hybrid",
               "--steps", "2", "--batch-size", "2", "--out", str(out), "--quiet"])
    assert rc == 0
    doc = json.loads((out / "results.json").read_text())
    assert [r["recipe"]["name"] for r in doc["runs"]] == ["fp32", "bf16-mixed", "fp8-hybrid"]
    assert doc["config"]["model"] == f"hf:{tmp_path / 'cfg'}"
    assert doc["config"]["data"]["name"] == "stdlib-text"     # the text workload's data
    assert all(r["status"] == "ok" and r["steps_run"] == 2 and math.isfinite(r["final_loss"])
               for r in doc["runs"])
    assert doc["runs"][1]["final_loss"] != doc["runs"][0]["final_loss"]   # not plain FP32
    assert "fp8-hybrid" in capsys.readouterr().out
    # the model is the config's, with random weights: a file path works as well
    (tmp_path / "llama.json").write_text(json.dumps(_TINY_LLAMA_JSON))
    model = resolve_workload(model=f"hf:{tmp_path / 'llama.json'}").make_model()
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert model.model.config.hidden_size == 32 and model.model.config.vocab_size == 300
    assert model(torch.zeros(1, 5, dtype=torch.long)).shape == (1, 5, 300)


def test_compare_hf_spec_errors(tmp_path, capsys):
    import json
    from mixprec.cli import main
    from mixprec.experiments.workloads import resolve_workload
    with pytest.raises(ValueError, match="holds no config.json"):
        resolve_workload(model=f"hf:{tmp_path}")
    (tmp_path / "bad.json").write_text(json.dumps({"model_type": "llamma"}))
    with pytest.raises(ValueError, match="'llamma' is not a transformers model type"):
        resolve_workload(model=f"hf:{tmp_path / 'bad.json'}")
    with pytest.raises(ValueError, match="nothing is downloaded"):
        resolve_workload(model="hf:no-such-org/no-such-model")
    small = dict(_TINY_LLAMA_JSON, vocab_size=100)        # the data has 256 byte tokens
    (tmp_path / "small.json").write_text(json.dumps(small))
    rc = main(["compare", "--model", f"hf:{tmp_path / 'small.json'}", "--steps", "1",
               "--out", str(tmp_path / "x"), "--quiet"])
    assert rc == 2 and "cannot run on the data" in capsys.readouterr().err


def test_readme_hf_compare_command_builds_its_model():
    """The README's `compare --model hf:` command names a config that builds the model."""
    import re
    import shlex
    from pathlib import Path
    from mixprec.experiments.workloads import resolve_workload
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    line = re.search(r"^mixprec compare --model hf:.*$", readme, flags=re.M).group(0)
    spec = shlex.split(line)[shlex.split(line).index("--model") + 1]
    workload = resolve_workload(model="hf:" + str(root / spec[len("hf:"):]))
    assert workload.data_name == "stdlib-text"
    model = workload.make_model()
    assert type(model.model).__name__ == "LlamaForCausalLM"
    assert model(torch.zeros(1, 64, dtype=torch.long)).shape == (1, 64, 512)
