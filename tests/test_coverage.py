"""The coverage report, warn-once / strict, and a real model (GPT-2 from transformers)."""
import math
import warnings

import pytest
import torch
from torch import nn

import mixprec
from mixprec.coverage import Coverage, CoverageWarning, UnemulatedOpError

transformers = pytest.importorskip("transformers")

PROJECTIONS = ("c_attn", "c_proj", "c_fc", "lm_head")


def tiny_gpt2():
    cfg = transformers.GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=128, n_positions=64,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.mark.parametrize("recipe", ["fp16-mixed", "bf16-mixed", "fp16-pure", "fp8-e5m2",
                                    "fp8-hybrid", "mxfp8"])
def test_gpt2_trains_and_every_projection_is_emulated_or_kept(recipe):
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    mp = mixprec.prepare(model, torch.optim.AdamW(model.parameters(), lr=1e-3), recipe,
                         backend="emulated", strict=True)   # strict: nothing unrecognised
    for _ in range(2):
        with mp.autocast():
            loss = model(ids, labels=ids).loss
        assert math.isfinite(loss.item())
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
    cov = mp.coverage()
    assert cov.unrecognised == 0
    projections = [n for n, _ in model.named_modules() if n.rsplit(".", 1)[-1] in PROJECTIONS]
    assert len(projections) == 2 * 4 + 1
    for name in projections:
        rows = cov.by_module(name)
        assert sum(r.calls for r in rows) == 2, (name, rows)       # one call per step
        for r in rows:
            assert r.op in ("addmm", "linear") and r.has_weight
            assert r.status == ("kept" if name in mp.keep else "emulated"), (name, r)
            if r.status == "emulated":
                formats = dict(r.formats)
                assert formats["weight"] == mixprec.coverage.spec_text(mp.recipe.weight)
                assert formats["grad_output"] == mixprec.coverage.spec_text(mp.recipe.grad_output)
    # Conv1D (addmm) layers are GEMM layers for reports and keep rules
    conv1d = [n for n in projections if not n.endswith("lm_head")]
    assert set(conv1d) <= set(cov.gemm_layers())
    assert all(mixprec.is_gemm_layer(model.get_submodule(n)) for n in projections)


def test_gpt2_fp8_actually_rounds_the_conv1d_projections():
    """A probe: c_fc's output under fp8-hybrid differs from its FP32 recomputation."""
    model = tiny_gpt2()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    seen = {}
    mlp = model.transformer.h[0].mlp.c_fc
    mlp.register_forward_hook(lambda m, a, out: seen.update(x=a[0].detach(), y=out.detach()))
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.0), "fp8-hybrid")
    with mp.autocast():
        model(ids)
    fp32 = torch.addmm(mlp.bias, seen["x"].reshape(-1, 64).float(), mlp.weight).reshape(
        seen["y"].shape)
    assert not torch.equal(seen["y"].float(), fp32)
    assert torch.allclose(seen["y"].float(), fp32, rtol=0.2, atol=0.2)


class Chain(nn.Module):
    """A product of three matrices through torch.linalg.multi_dot: a composite op."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.eye(4))
        self.b = nn.Parameter(torch.eye(4))

    def forward(self, x):
        return torch.linalg.multi_dot([x, self.a, self.b])


class WithChain(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.rnn = Chain()

    def forward(self, x):
        return self.rnn(self.fc(x).reshape(-1, 4)).sum()


def _train(mp, model, steps=2):
    for _ in range(steps):
        with mp.autocast():
            loss = model(torch.ones(2, 3, 4))
        mp.backward(loss)
        mp.step()
        mp.zero_grad()


def test_unrecognised_call_warns_once_naming_op_and_module():
    model = WithChain()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _train(mp, model, steps=3)
    ours = [w for w in caught if issubclass(w.category, CoverageWarning)]
    assert len(ours) == 1
    assert "multi_dot in module 'rnn' is not emulated" in str(ours[0].message)
    cov = mp.coverage()
    assert (cov.emulated, cov.unrecognised, cov.kept) == (3, 3, 0)
    row = next(r for r in cov.rows if r.status == "unrecognised")
    assert (row.op, row.module, row.calls) == ("multi_dot", "rnn", 3)
    assert "multi_dot" in str(cov) and "not recognised" in str(cov)


def test_strict_raises_naming_op_and_module():
    model = WithChain()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed",
                         strict=True)
    with pytest.raises(UnemulatedOpError, match="multi_dot in module 'rnn' is not emulated"):
        _train(mp, model, steps=1)


def test_kept_module_neither_warns_nor_raises():
    model = WithChain()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp16-mixed",
                         keep_high_precision="rnn", strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CoverageWarning)
        _train(mp, model, steps=1)
    cov = mp.coverage()
    assert cov.counts() == {"emulated": 1, "kept": 1, "fp32": 0, "unrecognised": 0}


def test_fp32_op_and_fp32_recipe_are_reported_as_fp32():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp32")
    with mp.autocast():
        model(torch.ones(2, 4)).sum().backward()
    assert mp.coverage().counts() == {"emulated": 0, "kept": 0, "fp32": 2, "unrecognised": 0}
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                         "fp16-mixed:fp32_ops=linear")
    with mp.autocast():
        model(torch.ones(2, 4))
    rows = mp.coverage(reset=True).rows
    assert [(r.status, r.reason) for r in rows] == [("fp32", "in recipe.fp32_ops")] * 2
    assert mp.coverage().total == 0


def test_coverage_round_trips_through_its_dict_and_rejects_unknown_status():
    model = WithChain()
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "fp8-hybrid",
                         keep_high_precision="fc")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CoverageWarning)
        _train(mp, model, steps=1)
    cov = mp.coverage()
    d = cov.to_dict()
    assert (d["kept"], d["unrecognised"]) == (1, 1)
    assert Coverage.from_dict(d) == cov
    with pytest.raises(ValueError, match="unknown coverage status 'emulate'.*emulated, kept"):
        cov.count("emulate")


def test_native_backend_records_nothing():
    model = nn.Linear(4, 4)
    mp = mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1), "bf16-mixed",
                         backend="native")
    with mp.autocast():
        model(torch.ones(2, 4))
    assert mp.coverage().total == 0


def test_inspect_prints_and_saves_the_coverage_section(capsys, tmp_path, monkeypatch):
    import argparse
    import json
    from mixprec.inspection import add_inspect_parser, run_inspect
    (tmp_path / "covmod.py").write_text(
        "import torch\n"
        "from mixprec.experiments.data import Dataset\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.fc = torch.nn.Linear(3, 4)\n"
        "        self.w = torch.nn.Parameter(torch.randn(4, 2))\n"
        "    def forward(self, x):\n"
        "        h = torch.addmm(torch.zeros(2), self.fc(x), self.w)\n"
        "        return torch.linalg.multi_dot([h, torch.eye(2), torch.eye(2)])\n"
        "def model():\n    return Net()\n"
        "def data():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    x, y = torch.randn(20, 3, generator=g), torch.arange(20) % 2\n"
        "    return Dataset('toy', 'classification', x, y, x, y, 2)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    parser = argparse.ArgumentParser()
    add_inspect_parser(parser.add_subparsers(dest="command"))
    path = tmp_path / "r.json"
    args = parser.parse_args(["inspect", "--model", "covmod:model", "--data", "covmod:data",
                              "--steps", "1", "--batch-size", "5", "--coverage", "mxfp8",
                              "--json", str(path)])
    with pytest.warns(CoverageWarning, match=r"multi_dot in module '\(root\)' is not emulated"):
        assert run_inspect(args) == 0
    out = capsys.readouterr().out
    assert "Coverage under mxfp8" in out
    assert "3 matmul-like calls: 2 emulated, 0 kept by a rule, 0 FP32 ops, 1 not recognised" in out
    assert "weight e4m3/mx, activation e4m3/mx, grad_output e5m2/mx" in out
    saved = json.loads(path.read_text())["coverage"]
    assert [(r["op"], r["module"], r["status"]) for r in saved["rows"]] == [
        ("linear", "fc", "emulated"), ("addmm", "", "emulated"), ("multi_dot", "", "unrecognised")]
    with pytest.raises(ValueError, match="unknown recipe"):
        run_inspect(parser.parse_args(["inspect", "--steps", "1", "--coverage", "fp9"]))
