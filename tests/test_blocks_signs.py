"""Hadamard signs re-drawn every optimizer step (``hadamard.signs=redraw``) and the
``mxfp4-rht-sr`` preset (Tseng et al. 2025): the seeded stream, one set of signs for the
forward and backward of a step, fresh signs the next step, bit-identical resume."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec import get_scheme, quantize_blocked
from mixprec.blocks import SignStream, hadamard_transform
from mixprec.emulate import PrecisionMode
from mixprec.policy import LayerPolicy
from mixprec.recipe import HadamardConfig, ScalingKind, format_recipe, get_recipe, parse_recipe


def _draws(seed: int, sizes: tuple, steps: int) -> list:
    """The stream as documented: one generator, each step one randint(0, 2) draw per size
    in ascending order, mapped to -1 / +1."""
    g = torch.Generator().manual_seed(seed)
    return [{n: torch.randint(0, 2, (n,), generator=g).float() * 2 - 1 for n in sorted(sizes)}
            for _ in range(steps)]


def test_stream_is_the_seeded_sequence_and_checkpoints():
    want = _draws(5, (64, 16), 4)
    s = SignStream((64, 16, 64), seed=5)
    assert s.sizes == (16, 64)
    seen = []
    for k in range(4):
        cur = s.current()
        seen.append(cur)
        assert all(torch.equal(cur[n], want[k][n]) for n in (16, 64))
        if k == 1:
            state = s.state_dict()
        s.advance()
    # an earlier step's mapping is left alone by advance() (an op's backward keeps it)
    assert torch.equal(seen[0][64], want[0][64]) and not torch.equal(want[0][64], want[1][64])
    resumed = SignStream((16, 64), seed=5)
    resumed.load_state_dict(state)
    assert resumed.step == 1 and torch.equal(resumed.advance()[64], want[2][64])
    with pytest.raises(ValueError, match="sign stream state is for sizes"):
        SignStream((32,), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="Hadamard size 24 not supported; valid choices"):
        SignStream((24,))


def test_preset_and_grammar():
    r = get_recipe("mxfp4-rht-sr")
    mx = get_recipe("mxfp4")
    assert (r.weight, r.activation) == (mx.weight, mx.activation)   # the mxfp4 forward
    assert r.grad_output.scheme == "mxfp4-dither" and r.grad_output.scaling is ScalingKind.BLOCK
    assert r.grad_output.rounding.value == "stochastic" and r.weight_grad.is_identity
    assert r.hadamard == HadamardConfig(signs="redraw", dgrad=64, wgrad=64)
    assert r.hadamard.sizes() == (64,)
    for text in ("mxfp4-rht-sr", "mxfp4:hadamard.signs=redraw,hadamard.seed=3,hadamard.wgrad=32",
                 "mxfp4-rht-sr:hadamard.signs=fixed,hadamard.dgrad=0"):
        assert parse_recipe(format_recipe(parse_recipe(text))) == parse_recipe(text)


def _deq(x, scheme, axis, signs, rounding="nearest", generator=None):
    """Reference for one operand: H^T Q(H x) along ``axis`` with RHT-64 and ``signs``."""
    s = get_scheme(scheme).with_(axis=axis)
    q = quantize_blocked(hadamard_transform(x, 64, signs=signs, axis=axis), s,
                         rounding=rounding, generator=generator).dequantize()
    return hadamard_transform(q, 64, signs=signs, axis=axis, inverse=True)


def test_forward_and_backward_share_a_steps_signs():
    # dgrad: dx = [H^T Q_sr(H g)]_{along N} [H^T Q(H w)]_{along N}
    # wgrad: dw = [H^T Q_sr(H g)]_{along M}^T [H^T Q(H x)]_{along M}
    # with the signs of the step in which the forward ran, even if the stream advanced
    # before backward; the next step's forward takes the next signs
    g0 = torch.Generator().manual_seed(0)
    x, w, dy = (torch.randn(*s, generator=g0) for s in ((64, 32), (64, 32), (64, 64)))
    policy = LayerPolicy.from_recipe("mxfp4-rht-sr:high_precision=fp32")
    stream = SignStream((64,), seed=9)
    grads = []
    for step in range(2):
        signs = stream.current()[64]
        xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
        gen = torch.Generator().manual_seed(11)
        with PrecisionMode(default_policy=policy, generator=gen, signs=stream):
            y = F.linear(xr, wr)
        stream.advance()                 # the optimizer step would happen here
        y.backward(dy)
        ref = torch.Generator().manual_seed(11)
        g_row = _deq(dy, "mxfp4-dither", -1, signs, "stochastic", ref)
        g_col = _deq(dy, "mxfp4-dither", 0, signs, "stochastic", ref)
        assert torch.equal(xr.grad, g_row @ _deq(w, "mxfp4", 0, signs))
        assert torch.equal(wr.grad, g_col.t() @ _deq(x, "mxfp4", 0, signs))
        grads.append(wr.grad)
    assert not torch.equal(grads[0], grads[1])     # fresh signs, different rounding


def test_redraw_without_a_stream_is_an_error():
    policy = LayerPolicy.from_recipe("mxfp4-rht-sr")
    x, w = torch.randn(4, 32), torch.randn(8, 32, requires_grad=True)
    # the forward already stores the activation's wgrad copy, transformed
    with pytest.raises(ValueError, match="hadamard.signs='redraw'.*sign stream"), \
            PrecisionMode(default_policy=policy):
        F.linear(x, w)


# -- engine: one draw per optimizer step, checkpointed ------------------------------------
def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 10))


def _batch(step):
    g = torch.Generator().manual_seed(step)
    return torch.randn(64, 32, generator=g), torch.randint(0, 10, (64,), generator=g)


def _build(recipe="mxfp4-rht-sr"):
    model = _model()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    return model, mixprec.prepare(model, opt, recipe, seed=1234)


def _steps(model, mp, start, steps) -> list:
    signs = []
    for s in range(start, start + steps):
        signs.append(mp.signs.current()[64].clone())
        with mp.autocast():
            loss = F.cross_entropy(model(_batch(s)[0]), _batch(s)[1])
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
    return signs


def _train(steps, start=0, state=None):
    model, mp = _build()
    if state is not None:
        model.load_state_dict(state["model"])
        mp.load_state_dict(state["engine"])
    signs = _steps(model, mp, start, steps)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "engine": mp.state_dict()}, buf)
    buf.seek(0)
    return model, mp, signs, torch.load(buf, weights_only=True)


def _same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k].view(torch.int32), b[k].view(torch.int32)) for k in a)


@pytest.fixture(scope="module")
def uninterrupted():
    return _train(6)


def test_engine_redraws_every_step_and_resumes_bit_identically(uninterrupted):
    full, full_mp, full_signs, _ = uninterrupted
    assert [s.tolist() for s in full_signs] == [d[64].tolist() for d in _draws(0, (64,), 6)]
    assert full_mp.signs.step == 6
    _, _, _, state = _train(3)
    resumed, resumed_mp, resumed_signs, _ = _train(3, start=3, state=state)
    assert all(torch.equal(a, b) for a, b in zip(resumed_signs, full_signs[3:]))
    assert _same(resumed.state_dict(), full.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(resumed_mp.master_params, full_mp.master_params))
    assert resumed_mp.state_dict()["hadamard_signs"]["step"] == 6
    # the stream is what makes it identical: resuming with the signs of step 0 differs
    state["engine"]["hadamard_signs"] = SignStream((64,), seed=0).state_dict()
    other, _, _, _ = _train(3, start=3, state=state)
    assert not _same(other.state_dict(), full.state_dict())
    # a checkpoint without the stream cannot resume a redraw recipe
    state["engine"]["hadamard_signs"] = None
    with pytest.raises(ValueError, match="holds no Hadamard sign stream"):
        _train(0, state=state)
    # fixed signs: no stream, the same signs every step
    model = _model()
    assert mixprec.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1),
                           "mxfp4-rht-sr:hadamard.signs=fixed").signs is None


# one process: DCP says it saves and loads without a process group, as intended here
@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")
def test_dcp_engine_state_resumes_the_stream(uninterrupted, tmp_path):
    import torch.distributed.checkpoint as dcp
    from mixprec.distributed.checkpoint import EngineState
    full, _, full_signs, _ = uninterrupted
    model, mp = _build()
    _steps(model, mp, 0, 3)
    dcp.save({"train": EngineState(mp)}, checkpoint_id=str(tmp_path / "ckpt"))
    model, mp = _build()
    dcp.load({"train": EngineState(mp)}, checkpoint_id=str(tmp_path / "ckpt"))
    assert mp.signs.step == 3
    signs = _steps(model, mp, 3, 3)
    assert all(torch.equal(a, b) for a, b in zip(signs, full_signs[3:]))
    assert _same(model.state_dict(), full.state_dict())


def test_preset_equals_the_readme_override_line():
    import dataclasses
    from pathlib import Path
    # README: "The mxfp4-rht-sr preset is the mxfp4:...redraw... line above ... with BF16
    # outside the FP4 GEMMs" (the mxfp4 preset's high precision)
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    line = next(ln.split("#")[0].strip() for ln in readme.splitlines()
                if ln.startswith("mxfp4:") and "hadamard.signs=redraw" in ln)
    assert dataclasses.replace(parse_recipe(line), name="mxfp4-rht-sr") == \
        get_recipe("mxfp4-rht-sr")
