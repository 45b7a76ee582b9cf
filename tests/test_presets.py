"""Every preset trains through ``mixprec.prepare()`` and stores what it says it stores.

An MLP 64-96-64-10 learns a random linear teacher (40 steps of SGD with momentum over
96 examples) under each preset, from the same initial weights and batches. For each
preset: the loss falls; the result differs from fp32's; and the middle layer's weight and
an activation saved for backward hold values of the preset's formats, checked against
independent oracles:

- unscaled formats (fp16, bf16, e5m2): torch's own casts, ``t.to(dtype).float() == t``
  bit for bit, on the stored weight after training and on the saved activation,
  and every floating tensor saved for backward is in the preset's storage dtypes;
- per-tensor scaled E4M3 (fp8-hybrid): the saved E4M3 copies are torch's saturated cast
  of ``t * s`` with ``s = 448 / amax(t)`` (float32), for the weight and the input;
- MX (mxfp8/6/4): the saved elements and E8M0 scales are the OCP MX quantization of the
  weight and the input, blocks of 32 along the dimension the backward GEMM reduces
  over, ``X = 2^(floor(log2 amax) - emax)`` and ``V / X`` rounded to nearest-even and
  saturated, computed with ml_dtypes from the formats' definitions;
- mxfp4-rht-sr: the same MXFP4 quantization of the weight and the input after a 64-point
  Hadamard transform along that dimension (numpy: Sylvester's H_64 times the first
  step's signs, 2 * randint(0, 2) - 1 from a generator seeded with hadamard.seed = 0,
  over 8; the input's 24 tokens zero-padded to 64), and the saved signs are those.
"""
from __future__ import annotations

import math

import ml_dtypes
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mixprec
from mixprec.recipe import list_presets

PRESETS = ("fp32", "fp16-mixed", "bf16-mixed", "fp16-pure", "fp8-e5m2", "fp8-hybrid",
           "mxfp8", "mxfp6", "mxfp4", "nvfp4", "mxfp4-rht-sr")
STEPS, BATCH, BATCHES = 40, 24, 4      # 40 steps over 4 batches of a fixed training set

# element format of MX saved tensors: (ml_dtypes type, largest value, emax of the element)
# from the OCP MX v1.0 definitions (FACTS.md): e4m3 448 / 8, e5m2 57344 / 15,
# e3m2 28 / 4, e2m1 6 / 2
_MX_ELEMENT = {"mxfp8": (ml_dtypes.float8_e4m3fn, 448.0, 8),
               "mxfp6": (ml_dtypes.float6_e3m2fn, 28.0, 4),
               "mxfp4": (ml_dtypes.float4_e2m1fn, 6.0, 2)}
# the torch dtype of the middle layer's weight and activations, then any other dtype the
# preset may save in: fp8-e5m2 keeps its first and last layers in fp16
_CAST = {"fp16-mixed": (torch.float16,), "fp16-pure": (torch.float16,),
         "bf16-mixed": (torch.bfloat16,), "fp8-e5m2": (torch.float8_e5m2, torch.float16)}


def _make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64), nn.ReLU(),
                         nn.Linear(64, 10))


def _data() -> tuple:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(BATCHES * BATCH, 64, generator=g)
    teacher = torch.randn(64, 10, generator=g)
    return x, (x @ teacher).argmax(1)


def train(preset: str) -> dict:
    """Train under ``preset``; return the losses, the final weights, and the middle
    layer's weight and input at the first step with what that step saved for backward
    (later steps may reuse a cached low-precision weight copy without saving it again)."""
    model = _make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mp = mixprec.prepare(model, opt, preset,
                         backend="emulated", seed=0)
    x, y = _data()
    losses: list = []
    saved: list = []        # what the first step's forward saves for backward
    first: dict = {}

    # the middle layer's weight, input and output at its last call of the first step: the
    # first forward under autocast may also trace the model once to resolve keep rules
    def keep(module, args, output) -> None:      # returns None: nothing is changed
        if not losses:
            first.update(weight=module.weight.detach().clone(),
                         input=args[0].detach().clone(), output=output.detach().clone())
    hook = model[2].register_forward_hook(keep)
    for i in range(STEPS):
        b = i % BATCHES
        xb, yb = x[b * BATCH:(b + 1) * BATCH], y[b * BATCH:(b + 1) * BATCH]
        pack = (lambda t: saved.append(t) or t) if i == 0 else (lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), mp.autocast():
            loss = F.cross_entropy(model(xb), yb)
        losses.append(float(loss.detach()))
        mp.backward(loss)
        mp.step()
        mp.zero_grad()
    hook.remove()
    return {"losses": losses, "skipped": mp.skipped_steps,
            "weights": [p.detach().clone() for p in model.parameters()],
            "first_weight": first["weight"], "first_input": first["input"],
            "first_output": first["output"], "saved": saved, "batch": x}


@pytest.fixture(scope="module")
def fp32_run() -> dict:
    return train("fp32")


def test_every_preset_is_covered():
    """Every preset is trained here, except the conformance presets, which
    tests/test_conformance_*.py hold bit for bit to the stack each one names."""
    from mixprec.conformance import CONFORMANCE_PRESETS
    conformance = {r.name for r in CONFORMANCE_PRESETS}
    assert set(PRESETS) == set(list_presets()) - conformance
    assert conformance <= set(list_presets())


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().contiguous().view(torch.int32)


def _saved_like(run: dict, shape: tuple, dtype: torch.dtype) -> list:
    return [t for t in run["saved"] if tuple(t.shape) == shape and t.dtype == dtype]


def _check_cast(run: dict, dtypes: tuple) -> None:
    fmt = dtypes[0]
    # the stored weight after training (before the first step, keep rules may still be
    # unresolved and the weight unrounded: the layer rounds it at every use anyway)
    w = run["weights"][2]
    assert torch.equal(_bits(w.to(fmt)), _bits(w))
    # everything saved for backward is in the preset's storage dtypes (targets: int64) ...
    # (uint8: the 1-bit masks that ReLUs of 16-bit tensors save, packed), except the
    # caller's batch, which the first layer saves itself (and rounds again in backward)
    batch = run["batch"].untyped_storage().data_ptr()
    floats = [t for t in run["saved"] if t.dtype not in (torch.int64, torch.uint8)
              and t.untyped_storage().data_ptr() != batch]
    assert any(t.untyped_storage().data_ptr() == batch for t in run["saved"])
    assert floats and all(t.dtype in dtypes for t in floats), {t.dtype for t in floats}
    # ... and an activation of the middle layer is saved as its torch cast, bit for bit:
    # its input, or (fp8-e5m2, whose layer recomputes the input's rounding from the FP16
    # tensor the ReLU before it saves anyway) the ReLU of its output
    acts = {"input": run["first_input"], "relu(output)": F.relu(run["first_output"])}
    matches = [name for name, a in acts.items()
               if any(torch.equal(_bits(t), _bits(a.to(fmt)))
                      for t in _saved_like(run, tuple(a.shape), fmt))]
    assert matches, f"no {fmt} activation of the middle layer was saved"


def _scaled_e4m3(t: torch.Tensor) -> tuple:
    """(E4M3 copy, scale) by the per-tensor rule s = 448 / amax(t), saturating; t * s in
    float32 (a BF16 input, as the preset's BF16 first layer writes, is widened first)."""
    t = t.float()
    s = torch.tensor(448.0) / t.abs().max()
    return torch.clamp(t * s, -448, 448).to(torch.float8_e4m3fn), s


def _check_per_tensor(run: dict) -> None:
    for t in (run["first_weight"], run["first_input"]):
        q, s = _scaled_e4m3(t)
        copies = _saved_like(run, tuple(t.shape), torch.float8_e4m3fn)
        assert copies and all(torch.equal(_bits(c), _bits(q)) for c in copies)
        # the scale is saved too, as a float32 scalar (its inverse would also do)
        scalars = [float(c) for c in run["saved"] if c.dim() == 0 and c.dtype == torch.float32]
        assert float(s) in scalars or 1 / float(s) in scalars


def _mx_reference(t: torch.Tensor, preset: str) -> tuple:
    """OCP MX of ``t`` with blocks of 32 along dim 0: (elements as float32, scales)."""
    dtype, top, emax = _MX_ELEMENT[preset]
    rows, cols = t.shape
    nb = -(-rows // 32)
    v = np.zeros((nb * 32, cols), np.float64)
    v[:rows] = t.double().numpy()
    blocks = v.reshape(nb, 32, cols)
    amax = np.abs(blocks).max(1, keepdims=True)
    scale = np.exp2(np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - emax)
    elems = np.clip(blocks / scale, -top, top).astype(np.float32).astype(dtype)
    return elems.astype(np.float32).reshape(nb * 32, cols)[:rows], scale.reshape(nb, cols)


def _decode(codes: torch.Tensor, preset: str) -> np.ndarray:
    if codes.dtype == torch.uint8:          # formats torch has no dtype for: bit codes
        return codes.numpy().view(_MX_ELEMENT[preset][0]).astype(np.float32)
    return codes.float().numpy()


def _check_mx(run: dict, preset: str) -> None:
    for t in (run["first_weight"], run["first_input"]):
        want, want_scale = _mx_reference(t, preset)
        nb = want_scale.shape[0]
        found = 0
        # an MX operand is saved as its elements followed by their E8M0 scales
        for i, c in enumerate(run["saved"][:-1]):
            scale = run["saved"][i + 1]
            if tuple(c.shape) == tuple(t.shape) and scale.dtype == torch.float8_e8m0fnu:
                if tuple(scale.shape) != (nb, t.shape[1]):
                    continue
                got = _decode(c, preset)
                assert np.array_equal(got.view(np.int32), want.view(np.int32)), preset
                assert np.array_equal(scale.float().numpy(), want_scale.astype(np.float32))
                found += 1
        assert found, f"no MX copy of a {tuple(t.shape)} tensor was saved ({preset})"


def _rht_reference(t: torch.Tensor, signs: np.ndarray) -> torch.Tensor:
    """t (rows <= 64) zero-padded to 64 rows, each column times diag(signs) H_64 / 8."""
    h = np.ones((1, 1))
    while h.shape[0] < 64:
        h = np.block([[h, h], [h, -h]])           # Sylvester: H_2m = [[H, H], [H, -H]]
    v = np.zeros((64, t.shape[1]))
    v[:t.shape[0]] = t.double().numpy()
    m = signs[:, None] * h / 8.0                  # exact in float64
    return torch.from_numpy((v.T @ m).T.astype(np.float32))


def _check_rht(run: dict) -> None:
    g = torch.Generator().manual_seed(0)           # hadamard.seed
    signs = (torch.randint(0, 2, (64,), generator=g) * 2 - 1).double().numpy()
    saved_signs = [t for t in run["saved"] if tuple(t.shape) == (64,) and t.dtype == torch.float32]
    assert saved_signs and all(np.array_equal(t.double().numpy(), signs) for t in saved_signs)
    # the weight's dgrad copy and the input's wgrad copy: elements, then E8M0 scales
    pairs = [(c, run["saved"][i + 1]) for i, c in enumerate(run["saved"][:-1])
             if c.dtype == torch.uint8 and run["saved"][i + 1].dtype == torch.float8_e8m0fnu]
    for t in (run["first_weight"], run["first_input"]):
        want, want_scale = _mx_reference(_rht_reference(t, signs), "mxfp4")
        hits = [1 for c, sc in pairs if tuple(c.shape) == want.shape
                and np.array_equal(_decode(c, "mxfp4").view(np.int32), want.view(np.int32))
                and np.array_equal(sc.float().numpy(), want_scale.astype(np.float32))]
        assert hits, f"no RHT-64 MXFP4 copy of a {tuple(t.shape)} tensor was saved"


@pytest.mark.parametrize("preset", PRESETS)
def test_preset_trains_in_its_formats_and_differs_from_fp32(preset, fp32_run):
    run = fp32_run if preset == "fp32" else train(preset)
    losses = run["losses"]
    # the loss falls: the last five steps average under 85% of the first step's loss
    # (fp32: 69%; a model that does not learn stays at ln 10 = 2.30)
    assert all(math.isfinite(v) for v in losses), losses
    assert sum(losses[-5:]) / 5 < 0.85 * losses[0], (preset, losses[0], losses[-5:])
    assert run["skipped"] <= 3, preset
    if preset == "fp32":
        assert all(t.dtype in (torch.float32, torch.int64) for t in run["saved"])
        return
    # the same initial weights and batches give a different result than fp32
    assert any(not torch.equal(a, b) for a, b in zip(run["weights"], fp32_run["weights"]))
    assert run["losses"] != fp32_run["losses"]
    if preset in _CAST:
        _check_cast(run, _CAST[preset])
    elif preset == "fp8-hybrid":
        _check_per_tensor(run)
    elif preset in _MX_ELEMENT:
        _check_mx(run, preset)
    elif preset == "mxfp4-rht-sr":
        _check_rht(run)
    # nvfp4 (16-element blocks with E4M3 scales and a tensor scale): its saved blocks are
    # not checked here; tests/test_blocks_torchao.py holds its quantization to torchao
