"""Scaling: per-tensor amax/scale chain, delayed scaling, OCP MX blocks, the dispatcher.

Oracles: ml_dtypes casts for element rounding, float64 references that apply the MX rule
block by block in plain Python, hand-computed cases with the arithmetic in comments.
"""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.formats import get_format
from mixprec.recipe import ScalingConfig, ScalingKind, TensorSpec
from mixprec.scaling import (DelayedScaling, amax_to_scale, quantize_mx, quantize_scaled,
                             quantize_spec, tensor_to_amax)
from test_quant_stochastic import assert_sr_frequency

NP_DTYPE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16, "e5m2": ml_dtypes.float8_e5m2,
            "e4m3": ml_dtypes.float8_e4m3fn, "e3m2": ml_dtypes.float6_e3m2fn,
            "e2m3": ml_dtypes.float6_e2m3fn, "e2m1": ml_dtypes.float4_e2m1fn}
MX_FORMATS = ["e5m2", "e4m3", "e3m2", "e2m3", "e2m1"]
F32_MAX = float(np.finfo(np.float32).max)


def ref_round(v, fmt_name, saturate=True):
    """Nearest-even rounding to fmt by ml_dtypes, saturating first (float64 in and out)."""
    fmt = get_format(fmt_name)
    v = np.asarray(v, dtype=np.float64)
    if saturate:
        v = np.where(np.isnan(v), v, np.clip(v, -fmt.max, fmt.max))
    return v.astype(np.float32).astype(NP_DTYPE[fmt_name]).astype(np.float64)


def t32(values):
    return torch.tensor(values, dtype=torch.float32)


# --------------------------------------------------------------------------------------
# tensor_to_amax / amax_to_scale
# --------------------------------------------------------------------------------------
def test_tensor_to_amax_is_max_abs_as_0d_float32():
    amax = tensor_to_amax(torch.tensor([[1.0, -7.5], [3.0, 0.25]], dtype=torch.bfloat16))
    assert amax.dtype == torch.float32 and amax.dim() == 0 and amax.item() == 7.5
    assert tensor_to_amax(torch.empty(0)).item() == 0.0


def test_tensor_to_amax_propagates_nan_and_inf():
    assert math.isnan(tensor_to_amax(t32([1.0, float("nan"), 3.0])).item())
    assert tensor_to_amax(t32([1.0, -float("inf")])).item() == math.inf


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2", "fp16", "e2m1"])
@pytest.mark.parametrize("amax", [2.0, 0.37, 1e-3, 5e4])
@pytest.mark.parametrize("margin", [0, 1, 3])
def test_amax_to_scale_formula(fmt, amax, margin):
    scale = amax_to_scale(torch.tensor(amax), fmt, margin=margin)
    expected = np.float32(np.float32(get_format(fmt).max) / np.float32(amax)) * 2.0 ** -margin
    assert scale.dtype == torch.float32 and scale.dim() == 0
    assert scale.item() == float(np.float32(expected))


def test_amax_to_scale_hand_values():
    assert amax_to_scale(2.0, "e4m3").item() == 224.0            # 448 / 2
    assert amax_to_scale(2.0, "e4m3", margin=1).item() == 112.0  # 448 / 2 / 2
    assert amax_to_scale(57344.0, "e5m2").item() == 1.0


@pytest.mark.parametrize("bad", [0.0, float("inf"), float("nan"), -float("inf")])
def test_amax_to_scale_keeps_previous_scale_on_unusable_amax(bad):
    assert amax_to_scale(torch.tensor(bad), "e4m3").item() == 1.0
    assert amax_to_scale(torch.tensor(bad), "e4m3", prev_scale=torch.tensor(37.0)).item() == 37.0
    assert amax_to_scale(bad, "e4m3", prev_scale=5.0).item() == 5.0


def test_amax_to_scale_clamps_to_float32_max():
    # 448 / 1e-45 = 3e47 overflows float32: the scale stops at float32 max, not inf
    assert amax_to_scale(torch.tensor(1e-45), "e4m3").item() == F32_MAX
    assert amax_to_scale(torch.tensor(1.0), "e4m3", margin=-200).item() == F32_MAX


# --------------------------------------------------------------------------------------
# quantize_scaled
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
def test_quantize_scaled_matches_ml_dtypes_and_ulp_bound(fmt):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4096, generator=g) * 3.0
    scale = amax_to_scale(tensor_to_amax(x), fmt)
    y = quantize_scaled(x, fmt, scale)
    # oracle: x*scale in float32, ml_dtypes rounding, divided by the scale in float32
    xs = (x * scale).numpy()
    ref = (ref_round(xs, fmt).astype(np.float32) / scale.numpy()).astype(np.float32)
    np.testing.assert_array_equal(y.numpy(), ref)
    # relative error <= eps/2 where x*scale is normal; absolute <= min_subnormal/2 below
    f = get_format(fmt)
    xs64, err = np.abs(xs.astype(np.float64)), np.abs(y.numpy() - x.numpy()) * scale.item()
    normal = xs64 >= f.min_normal
    assert np.all(err[normal] <= xs64[normal] * 2.0 ** -(f.mbits + 1) * (1 + 1e-6))
    assert np.all(err[~normal] <= f.min_subnormal / 2 * (1 + 1e-6))


def test_quantize_scaled_stochastic_lands_on_a_neighbour():
    x = torch.randn(4096, generator=torch.Generator().manual_seed(4))
    scale = amax_to_scale(tensor_to_amax(x), "e5m2")
    y = quantize_scaled(x, "e5m2", scale, rounding="stochastic",
                        generator=torch.Generator().manual_seed(9))
    v, q = (x * scale).numpy().astype(np.float64), (y * scale).numpy().astype(np.float64)
    # q is an e5m2 value (ml_dtypes round trip) less than one ulp of v away from v:
    # so q is one of v's two neighbours on the e5m2 grid
    np.testing.assert_array_equal(ref_round(q, "e5m2"), q)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(v), 2.0 ** -14))) - 2)
    assert np.all(np.abs(q - v) < ulp)
    # the odds: with scale 4 (exact both ways) x = 2.625 becomes 10.5, between the e5m2
    # values 10 and 12, so y is 2.5 or 3.0, and 3.0 with probability exactly 1/4
    xs = torch.full((1 << 18,), 2.625)
    y = quantize_scaled(xs, "e5m2", 4.0, rounding="stochastic",
                        generator=torch.Generator().manual_seed(10))
    assert_sr_frequency(y, 2.5, 2.625, 3.0)


def test_quantize_scaled_saturates_and_keeps_dtype():
    x = torch.tensor([1.0, 10.0, -10.0, 0.5], dtype=torch.bfloat16)
    y = quantize_scaled(x, "e4m3", torch.tensor(448.0))  # 10*448 > 448: clamps to 448/448
    assert y.dtype == torch.bfloat16
    assert y.tolist() == [1.0, 1.0, -1.0, 0.5]
    inf = quantize_scaled(t32([float("inf")]), "e5m2", 1.0)
    assert inf.item() == 57344.0


def test_quantize_scaled_without_saturation_overflows_per_format():
    assert math.isnan(quantize_scaled(t32([1000.0]), "e4m3", 1.0, saturate=False).item())
    assert quantize_scaled(t32([1e6]), "e5m2", 1.0, saturate=False).item() == math.inf


# --------------------------------------------------------------------------------------
# DelayedScaling
# --------------------------------------------------------------------------------------
@pytest.fixture
def single_process():
    pytest.importorskip("mixprec.distributed")


def test_delayed_scaling_max_history_walk(single_process):
    ds = DelayedScaling(history_len=3, algo="max", fmt="e4m3")
    assert ds.scale.item() == 1.0 and ds.amax_history.numel() == 0   # first step: 1.0
    walk = [  # (amax pushed, history afterwards oldest first, scale = 448 / max(history))
        (2.0, [2.0], 224.0),
        (4.0, [2.0, 4.0], 112.0),
        (1.0, [2.0, 4.0, 1.0], 112.0),
        (0.5, [4.0, 1.0, 0.5], 112.0),     # 2.0 falls out of the 3-long window
        (0.5, [1.0, 0.5, 0.5], 448.0),     # 4.0 falls out
        (0.5, [0.5, 0.5, 0.5], 896.0),
    ]
    for amax, history, scale in walk:
        ds.update(torch.tensor(amax))
        assert ds.amax_history.tolist() == history
        assert ds.scale.item() == scale


def test_delayed_scaling_most_recent_and_margin(single_process):
    ds = DelayedScaling(history_len=4, algo="most_recent", margin=2, fmt="e5m2")
    for amax in [8.0, 1.0, 2.0]:
        ds.update(amax)
        assert ds.scale.item() == 57344.0 / amax / 4     # only the last amax, 2**-margin


def test_delayed_scaling_guards_zero_and_nonfinite(single_process):
    ds = DelayedScaling(history_len=4, algo="most_recent", fmt="e4m3")
    ds.update(2.0)
    for bad in [0.0, float("nan"), float("inf")]:
        ds.update(bad)
        assert ds.scale.item() == 224.0                  # previous scale kept
    dm = DelayedScaling(history_len=4, algo="max", fmt="e4m3")
    dm.update(2.0)
    dm.update(float("nan"))                              # stored, skipped by "max"
    assert math.isnan(dm.amax_history[-1].item()) and dm.scale.item() == 224.0
    dm.update(4.0)
    assert dm.scale.item() == 112.0


def test_delayed_scaling_quantizes_with_previous_steps_scale(single_process):
    spec, cfg = TensorSpec("e4m3", scaling="delayed", saturate=True), ScalingConfig()
    ds = DelayedScaling.from_config(cfg)
    x1 = t32([2.0, 0.3])
    y1 = quantize_spec(x1, spec, cfg, state=ds)
    # step 1 uses the initial scale 1.0: plain e4m3 rounding (0.3 -> 0.3125)
    np.testing.assert_array_equal(y1.numpy(), ref_round(x1.numpy(), "e4m3"))
    assert ds.fmt.name == "e4m3" and ds.scale.item() == 224.0
    x2 = t32([4.0, 0.3])
    y2 = quantize_spec(x2, spec, cfg, state=ds)
    # step 2 uses 224 from step 1's amax, so 4.0 * 224 = 896 saturates to 448 -> 2.0
    assert y2[0].item() == 2.0
    assert ds.scale.item() == 112.0


def test_delayed_scaling_without_update_changes_nothing(single_process):
    spec, cfg = TensorSpec("e5m2", scaling="delayed"), ScalingConfig(amax_history_len=2)
    ran, idle = DelayedScaling.from_config(cfg), DelayedScaling.from_config(cfg)
    quantize_spec(t32([3.0]), spec, cfg, state=ran)
    quantize_spec(t32([5.0]), spec, cfg, state=idle)
    before = idle.state_dict()
    for step in range(3):                       # idle's module does not run these steps
        quantize_spec(t32([float(step + 1)]), spec, cfg, state=ran)
    after = idle.state_dict()
    assert torch.equal(before["amax_history"], after["amax_history"])
    assert torch.equal(before["scale"], after["scale"]) and before["pos"] == after["pos"]


def test_delayed_scaling_state_dict_round_trip(single_process):
    a = DelayedScaling(history_len=5, algo="max", margin=1, fmt="e4m3")
    for amax in [1.0, 3.0, 0.25, 7.0, 2.0, 0.5]:
        a.update(amax)
    b = DelayedScaling(history_len=5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.scale, b.scale) and torch.equal(a.amax_history, b.amax_history)
    assert (b.algo, b.margin, b.fmt) == (a.algo, a.margin, a.fmt)
    for amax in [0.1, 0.1, 0.1, 9.0]:           # identical futures
        assert a.update(amax).item() == b.update(amax).item()
    with pytest.raises(ValueError, match="history_len 5"):
        DelayedScaling(history_len=4).load_state_dict(a.state_dict())


def _state_tensors(ds: DelayedScaling) -> tuple:
    return ds._history, ds._pos, ds._count, ds._scale


def test_delayed_scaling_updates_its_tensors_in_place(single_process):
    # torch.compile traces update() as mutations of the tensors it was traced with: an
    # update or a load that replaced them would leave the compiled graph writing into
    # tensors the object no longer holds
    ds = DelayedScaling(history_len=3, fmt="e4m3")
    held = _state_tensors(ds)
    first = ds.scale                               # a copy: later updates leave it alone
    for amax in [2.0, 4.0, 1.0, 0.5]:
        returned = ds.update(amax)
    assert all(a is b for a, b in zip(held, _state_tensors(ds)))
    assert first.item() == 1.0 and returned.item() == ds.scale.item() == 112.0
    returned.fill_(7.0)                            # update() returns a copy too
    assert ds.scale.item() == 112.0
    other = DelayedScaling(history_len=3, fmt="e4m3")
    other.load_state_dict(ds.state_dict())
    assert torch.equal(other.amax_history, t32([4.0, 1.0, 0.5])) and other.scale.item() == 112.0
    ds.load_state_dict(DelayedScaling(history_len=3, fmt="e4m3").state_dict())
    assert all(a is b for a, b in zip(held, _state_tensors(ds)))
    assert ds.amax_history.numel() == 0 and ds.scale.item() == 1.0


def test_delayed_scaling_loads_states_with_int_or_tensor_positions(single_process):
    # checkpoints store pos and count as ints (as before they became tensors); a DCP
    # round trip may hand them back as 0-d tensors
    a = DelayedScaling(history_len=4, fmt="e5m2")
    for amax in [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]:
        a.update(amax)
    state = a.state_dict()
    assert (state["pos"], state["count"]) == (2, 4) and type(state["pos"]) is int
    b = DelayedScaling(history_len=4)
    b.load_state_dict({**state, "pos": torch.tensor(2), "count": torch.tensor(4)})
    assert torch.equal(b.amax_history, t32([3.0, 4.0, 5.0, 6.0]))
    # ring [4, 5, 6, 1]: 57344 / 6 in float32
    assert b.update(1.0).item() == a.update(1.0).item() == np.float32(57344) / np.float32(6)
    assert torch.equal(a.amax_history, b.amax_history) and torch.equal(a.scale, b.scale)


def test_delayed_scaling_reset(single_process):
    ds = DelayedScaling(history_len=2, fmt="e4m3")
    ds.update(2.0)
    ds.reset()
    assert ds.amax_history.numel() == 0 and ds.scale.item() == 1.0
    ds.update(4.0)
    assert ds.amax_history.tolist() == [4.0] and ds.scale.item() == 112.0


def test_delayed_scaling_reduces_amax_across_ranks(monkeypatch):
    dist = pytest.importorskip("mixprec.distributed")
    seen = []

    def fake_all_reduce(t):          # another rank saw amax 8: MAX in place
        seen.append(t.item())
        return t.clamp_(min=8.0)
    monkeypatch.setattr(dist, "is_distributed", lambda: True)
    monkeypatch.setattr(dist, "all_reduce_amax_", fake_all_reduce)
    ds = DelayedScaling(history_len=2, fmt="e4m3")
    mine = torch.tensor(2.0)
    ds.update(mine)
    assert seen == [2.0] and mine.item() == 2.0     # the caller's tensor is not touched
    assert ds.scale.item() == 56.0                  # 448 / 8


def test_delayed_scaling_bad_arguments():
    with pytest.raises(ValueError, match=r"'mean'.*max, most_recent"):
        DelayedScaling(algo="mean")
    for bad in [0, -3, 2.5]:
        with pytest.raises(ValueError, match="history_len must be an int >= 1"):
            DelayedScaling(history_len=bad)
    with pytest.raises(ValueError, match="no format"):
        DelayedScaling().update(1.0)
    with pytest.raises(ValueError, match="bound to format 'e4m3'"):
        DelayedScaling(fmt="e4m3").bind("e5m2")


# --------------------------------------------------------------------------------------
# MX: hand-computed blocks
# --------------------------------------------------------------------------------------
def test_mx_e4m3_block_with_amax_one():
    # amax 1.0: floor(log2 1) = 0, emax(e4m3) = 8 -> X = 2^(0-8) = 1/256.
    # 0.3 / X = 76.8; e4m3 spacing in [64, 128) is 8 -> 80; 80 / 256 = 0.3125.
    # -0.01 / X = -2.56; spacing in [2, 4) is 0.25 -> -2.5 -> -0.009765625.
    x = t32([1.0, 0.3, -0.01] + [0.0] * 29)
    deq, scales = quantize_mx(x, "e4m3")
    assert scales.tolist() == [2.0 ** -8]
    assert deq[:3].tolist() == [1.0, 0.3125, -2.5 / 256]


def test_mx_e4m3_saturation_band_and_ceil_rule():
    # amax 1.875: floor(log2 1.875) = 0 -> X = 2^-8; 1.875 * 256 = 480 lies in (448, 512)
    # and saturates to 448 -> 448 / 256 = 1.75.
    x = t32([1.875, 0.5])
    deq, scales = quantize_mx(x, "e4m3", block_size=2)
    assert scales.item() == 2.0 ** -8 and deq.tolist() == [1.75, 0.5]
    # ceil rule: log2(1.875 / 448) = -7.9 -> X = 2^-7; 1.875 * 128 = 240 is an e4m3
    # value (spacing 16 in [128, 256)): exact.
    deq, scales = quantize_mx(x, "e4m3", block_size=2, scale_rule="ceil")
    assert scales.item() == 2.0 ** -7 and deq.tolist() == [1.875, 0.5]


def test_mx_e2m1_blocks():
    # e2m1 values 0, .5, 1, 1.5, 2, 3, 4, 6; emax = 2.
    # amax 3: floor(log2 3) = 1 -> X = 2^(1-2) = 0.5; V/X = 6, 2, 0.8, -4.4
    #   -> 6, 2, 1 (0.8 is nearer 1 than 0.5), -4 (4.4 nearer 4 than 6) -> *0.5
    # amax 3.9: X = 0.5 again; 3.9/0.5 = 7.8 saturates to 6 -> 3.0
    x = t32([3.0, 1.0, 0.4, -2.2, 3.9, 0.0, 0.0, 0.0])
    deq, scales = quantize_mx(x, "e2m1", block_size=4)
    assert scales.tolist() == [0.5, 0.5]
    assert deq.tolist() == [3.0, 1.0, 0.5, -2.0, 3.0, 0.0, 0.0, 0.0]


def test_mx_e3m2_block():
    # e3m2: emax = 4, max 28, smallest subnormal 2^-4. amax 10: floor(log2 10) = 3 ->
    # X = 2^(3-4) = 0.5. V/X = 20 (spacing 4 in [16,32): exact), 1.4 (spacing .25 in
    # [1,2): 1.5), -6.6 (spacing 1 in [4,8): -7), 0.02 (below 2^-5: 0) -> times 0.5.
    deq, scales = quantize_mx(t32([10.0, 0.7, -3.3, 0.01]), "e3m2", block_size=4)
    assert scales.item() == 0.5 and deq.tolist() == [10.0, 0.75, -3.5, 0.0]


def test_mx_all_zero_block_stays_zero_with_smallest_scale():
    x = torch.zeros(2, 64)
    x[1, 32:] = torch.linspace(-1, 1, 32)
    x[0, 5] = -0.0
    deq, scales = quantize_mx(x, "e4m3")
    assert torch.equal(deq[0], torch.zeros(64))
    assert torch.signbit(deq[0, 5])                  # -0 stays -0
    assert scales[0].tolist() == [2.0 ** -127, 2.0 ** -127] and scales[1, 0].item() == 2.0 ** -127


@pytest.mark.parametrize("special", [float("nan"), float("inf")])
def test_mx_nonfinite_block_becomes_nan(special):
    x = torch.ones(64)
    x[40] = special
    deq, scales = quantize_mx(x, "e4m3")
    assert math.isnan(scales[1].item()) and torch.isnan(deq[32:]).all()
    assert scales[0].item() == 2.0 ** -8 and torch.equal(deq[:32], torch.ones(32))


def test_mx_padding_of_the_last_block():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 40, generator=g)
    deq, scales = quantize_mx(x, "e4m3", block_size=32)
    assert deq.shape == (3, 40) and scales.shape == (3, 2)
    # the 8-element tail is a block of its own: same as quantizing it alone
    tail_deq, tail_scale = quantize_mx(x[:, 32:], "e4m3", block_size=32)
    assert torch.equal(deq[:, 32:], tail_deq) and torch.equal(scales[:, 1:], tail_scale)


def test_mx_axis_zero_equals_transposed_last_axis():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(96, 5, generator=g) * 10
    d0, s0 = quantize_mx(x, "e5m2", block_size=32, axis=0)
    d1, s1 = quantize_mx(x.t().contiguous(), "e5m2", block_size=32, axis=-1)
    assert s0.shape == (3, 5)
    assert torch.equal(d0, d1.t()) and torch.equal(s0, s1.t())


def test_mx_keeps_input_dtype():
    x = torch.randn(64).to(torch.bfloat16)
    deq, scales = quantize_mx(x, "e4m3")
    assert deq.dtype == torch.bfloat16 and scales.dtype == torch.float32


# --------------------------------------------------------------------------------------
# MX: properties against a float64 block-by-block reference
# --------------------------------------------------------------------------------------
def mx_reference(row: np.ndarray, fmt_name: str, block: int, rule: str):
    """The MX rule applied block by block in float64 (Python loops, for checking)."""
    fmt = get_format(fmt_name)
    deq, scales = [], []
    for start in range(0, len(row), block):
        blk = row[start:start + block].astype(np.float64)
        amax = float(np.max(np.abs(blk)))
        if not math.isfinite(amax):
            scales.append(math.nan)
            deq += [math.nan] * len(blk)
            continue
        if amax == 0:
            e = -127
        elif rule == "ocp":        # largest e with 2^e <= amax, minus emax_elem
            e = math.floor(math.log2(amax))
            e += (2.0 ** (e + 1) <= amax) - (2.0 ** e > amax)
            e -= fmt.emax
        else:                      # smallest e with max_elem * 2^e >= amax
            e = math.ceil(math.log2(amax / fmt.max)) - 2
            while fmt.max * 2.0 ** e < amax:
                e += 1
        e = min(max(e, -127), 127)
        scales.append(2.0 ** e)
        deq += list(ref_round(blk / 2.0 ** e, fmt_name) * 2.0 ** e)
    return np.array(deq), np.array(scales)


def spread_blocks(rows: int, blocks: int, block: int, seed: int) -> torch.Tensor:
    """Normal data whose blocks span magnitudes 2^-30 .. 2^30, with some zero elements."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((rows, blocks, block)) * 2.0 ** rng.integers(-30, 30, (rows, blocks, 1))
    x[rng.random(x.shape) < 0.05] = 0.0
    return torch.from_numpy(x.reshape(rows, blocks * block).astype(np.float32))


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("rule", ["ocp", "ceil"])
def test_mx_matches_float64_reference(fmt, rule):
    x = spread_blocks(4, 12, 16, seed=MX_FORMATS.index(fmt) * 2 + (rule == "ceil"))
    x[0, :16] = 0.0                          # one all-zero block
    x[1, 20] = float("nan")                  # one NaN block
    deq, scales = quantize_mx(x, fmt, block_size=16, scale_rule=rule)
    for r in range(x.shape[0]):
        ref_deq, ref_scales = mx_reference(x[r].numpy(), fmt, 16, rule)
        np.testing.assert_array_equal(deq[r].numpy(), ref_deq.astype(np.float32))
        np.testing.assert_array_equal(scales[r].numpy(), ref_scales.astype(np.float32))


def grid_ties_and_neighbours(fmt_name: str) -> np.ndarray:
    """Every finite value >= 0 of the format (ml_dtypes decodes all codes), every midpoint
    of two neighbours (a tie; Q/2 included) and the float32 values next to each midpoint."""
    bits = {"e5m2": 8, "e4m3": 8, "e3m2": 6, "e2m3": 6, "e2m1": 4}[fmt_name]
    grid = np.arange(2 ** bits, dtype=np.uint8).view(NP_DTYPE[fmt_name]).astype(np.float64)
    grid = np.unique(grid[np.isfinite(grid) & (grid >= 0)])
    mids = ((grid[:-1] + grid[1:]) / 2).astype(np.float32)
    return np.concatenate([grid.astype(np.float32), mids, np.nextafter(mids, np.float32(0)),
                           np.nextafter(mids, np.float32(np.inf))])


@pytest.mark.parametrize("fmt", MX_FORMATS)
@pytest.mark.parametrize("rule", ["ocp", "ceil"])
def test_mx_blocks_of_32_ties_and_subnormals_against_float64_reference(fmt, rule):
    """Blocks of 32 along the last axis (the OCP block; the C kernel's one-pass loop):
    blocks whose amax is the format's max (scale 2^0 before the row factor) holding every
    value of the format, every tie, both neighbours of every tie and the values between
    Q/2 and the smallest normal, with signs; random blocks; a padded last block."""
    f = get_format(fmt)
    vals = grid_ties_and_neighbours(fmt)
    vals = vals * np.where(np.arange(len(vals)) % 2, -1, 1).astype(np.float32)
    per = -(-len(vals) // 31)
    body = np.zeros(per * 31, dtype=np.float32)
    body[:len(vals)] = vals
    blocks = np.concatenate([np.full((per, 1), f.max, dtype=np.float32),
                             body.reshape(per, 31)], axis=1)
    ties = torch.from_numpy(blocks.reshape(-1))
    rand = spread_blocks(1, 8, 32, seed=11).reshape(-1)
    row = torch.cat([ties, rand, torch.tensor([3.0, -0.1, 1e-3, 0.0, 7.0])])   # 5 pad
    x = torch.stack([row * 2.0 ** k for k in (-20, 0, 9)])
    deq, scales = quantize_mx(x, fmt, block_size=32, scale_rule=rule)
    for r in range(x.shape[0]):
        ref_deq, ref_scales = mx_reference(x[r].numpy(), fmt, 32, rule)
        np.testing.assert_array_equal(deq[r].numpy(), ref_deq.astype(np.float32))
        np.testing.assert_array_equal(scales[r].numpy(), ref_scales.astype(np.float32))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mx_out_writes_the_given_buffers(dtype):
    """out=(dequantized, scales): the same tensors come back, holding the bits of a call
    without out= and of the float64 reference; x may be its own out."""
    x = spread_blocks(3, 4, 32, seed=5).to(dtype)
    x[1, 40] = float("nan")
    deq_buf = torch.full_like(x, 7.0)
    sc_buf = torch.full((3, 4), 7.0)
    got = quantize_mx(x, "e4m3", out=(deq_buf, sc_buf))
    assert got[0] is deq_buf and got[1] is sc_buf
    want = quantize_mx(x, "e4m3")
    for a, b in zip(got, want):
        assert torch.equal(a.view(torch.int16 if a.dtype == torch.bfloat16 else torch.int32),
                           b.view(torch.int16 if b.dtype == torch.bfloat16 else torch.int32))
    if dtype == torch.float32:
        for r in range(3):
            ref_deq, ref_scales = mx_reference(x[r].numpy(), "e4m3", 32, "ocp")
            np.testing.assert_array_equal(deq_buf[r].numpy(), ref_deq.astype(np.float32))
            np.testing.assert_array_equal(sc_buf[r].numpy(), ref_scales.astype(np.float32))
    y = x.clone()
    quantize_mx(y, "e4m3", out=(y, torch.empty(3, 4)))
    assert torch.equal(y.float().view(torch.int32), want[0].float().view(torch.int32))


def test_mx_bad_out():
    x = torch.randn(2, 64)
    for bad in [torch.empty(2, 64), (torch.empty(2, 64),), (torch.empty(2, 64), torch.empty(2, 3)),
                (torch.empty(2, 64, dtype=torch.float64), torch.empty(2, 2)),
                (torch.empty(2, 64), torch.empty(2, 2, dtype=torch.bfloat16))]:
        with pytest.raises(ValueError, match=r"out must be a \(dequantized, scales\) pair"):
            quantize_mx(x, "e4m3", out=bad)


@pytest.mark.parametrize("fmt", MX_FORMATS)
def test_mx_ceil_rule_never_saturates_ocp_does(fmt):
    f = get_format(fmt)
    x = spread_blocks(8, 64, 32, seed=7)
    for rule in ["ocp", "ceil"]:
        deq, scales = quantize_mx(x, fmt, scale_rule=rule)
        amax = x.double().abs().reshape(8, 64, 32).amax(-1)
        ratio = amax / scales.double()                       # largest |V/X| per block
        if rule == "ceil":
            assert (ratio <= f.max).all()
        else:
            assert (ratio > f.max).any()                     # random data hits the band
            assert (ratio < 2.0 ** (f.emax + 1)).all()       # and never beyond it


@pytest.mark.parametrize("rule", ["ocp", "ceil"])
def test_mx_scales_are_e8m0_powers_of_two(rule):
    x = spread_blocks(4, 64, 32, seed=3) * 2.0 ** 60
    x[0, :32] *= 2.0 ** -80                                 # pushes a scale to E8M0's floor
    _, scales = quantize_mx(x, "e4m3", scale_rule=rule)
    s = scales.numpy().astype(np.float64)
    mant, _ = np.frexp(s)
    assert np.all(mant == 0.5)
    assert s.min() >= 2.0 ** -127 and s.max() <= 2.0 ** 127
    # E8M0 holds every scale exactly (ml_dtypes' float8_e8m0fnu as oracle)
    back = scales.numpy().astype(ml_dtypes.float8_e8m0fnu).astype(np.float32)
    np.testing.assert_array_equal(back, scales.numpy())


def test_mx_tiny_block_scale_is_clamped_to_e8m0_min():
    # amax 2^-130 (float32 subnormal): floor(log2) - 8 = -138 < -127 -> X = 2^-127;
    # 2^-130 / 2^-127 = 1/8, an e4m3 value, so the element survives exactly.
    x = t32([2.0 ** -130, 0.0])
    deq, scales = quantize_mx(x, "e4m3", block_size=2)
    assert scales.item() == 2.0 ** -127 and deq[0].item() == 2.0 ** -130


def test_mx_stochastic_rounding_picks_a_neighbour_with_the_right_odds():
    # amax 1.0 -> X = 2^-8; 0.3 / X = 76.8 lies between the e4m3 values 72 and 80:
    # stochastic rounding gives 80 with probability (76.8 - 72) / 8 = 0.6.
    # (float32's 0.3 is 0.30000001192..., so p is a hair above 0.6; the check uses it exactly)
    n = 1 << 18
    x = t32([1.0, 0.3]).repeat(n)
    g = torch.Generator().manual_seed(11)
    deq, _ = quantize_mx(x, "e4m3", block_size=2, rounding="stochastic", generator=g)
    picks = deq[1::2] * 256
    assert set(picks.unique().tolist()) == {72.0, 80.0}
    assert_sr_frequency(picks, 72.0, x[1].item() * 256, 80.0)
    assert torch.equal(deq[0::2], torch.ones(n))                      # on-grid values stay
    again, _ = quantize_mx(x, "e4m3", block_size=2, rounding="stochastic",
                           generator=torch.Generator().manual_seed(11))
    assert torch.equal(deq, again)                                    # seeded: reproducible


def test_mx_bad_arguments():
    x = torch.ones(32)
    with pytest.raises(ValueError, match=r"'floor'.*ocp, ceil"):
        quantize_mx(x, "e4m3", scale_rule="floor")
    for bad in [0, -1, 2.0]:
        with pytest.raises(ValueError, match="block_size must be an int >= 1"):
            quantize_mx(x, "e4m3", block_size=bad)
    with pytest.raises(ValueError, match="at least one dimension"):
        quantize_mx(torch.tensor(1.0), "e4m3")


# --------------------------------------------------------------------------------------
# quantize_spec dispatch
# --------------------------------------------------------------------------------------
def test_quantize_spec_identity_returns_the_same_object():
    x = torch.randn(8, requires_grad=True)
    assert quantize_spec(x, TensorSpec(), ScalingConfig()) is x


def test_quantize_spec_none_is_plain_quantize():
    x = torch.randn(256) * 100
    y = quantize_spec(x, TensorSpec("fp16"), ScalingConfig())
    assert torch.equal(y, x.half().float())                 # torch's cast as oracle
    big = t32([1000.0])
    assert quantize_spec(big, TensorSpec("e4m3", saturate=True), ScalingConfig()).item() == 448.0
    assert math.isnan(quantize_spec(big, TensorSpec("e4m3"), ScalingConfig()).item())


def test_quantize_spec_current_uses_this_tensors_amax():
    x = torch.randn(512) * 1e-3
    cfg = ScalingConfig(margin=1)
    spec = TensorSpec("e4m3", scaling="current", saturate=True)
    scale = amax_to_scale(tensor_to_amax(x), "e4m3", margin=1)
    assert torch.equal(quantize_spec(x, spec, cfg), quantize_scaled(x, "e4m3", scale))
    assert not torch.equal(quantize_spec(x, spec, cfg), quantize_spec(x, TensorSpec("e4m3"), cfg))


def test_quantize_spec_delayed_needs_state():
    with pytest.raises(ValueError, match="needs state=DelayedScaling"):
        quantize_spec(torch.ones(4), TensorSpec("e4m3", scaling="delayed"), ScalingConfig())


@pytest.mark.parametrize("axis", [0, -1])
def test_quantize_spec_mx_uses_config(axis):
    x = torch.randn(32, 48)
    cfg = ScalingConfig(mx_block_size=16, mx_scale_rule="ceil")
    y = quantize_spec(x, TensorSpec("e2m1", scaling=ScalingKind.MX), cfg, axis=axis)
    ref, _ = quantize_mx(x, "e2m1", block_size=16, axis=axis, scale_rule="ceil")
    assert torch.equal(y, ref)


def test_quantize_spec_passes_rounding_and_generator():
    x = torch.randn(4096) * 1e-2
    spec = TensorSpec("e5m2", rounding="stochastic", scaling="current")
    cfg = ScalingConfig()
    runs = [quantize_spec(x, spec, cfg, generator=torch.Generator().manual_seed(s))
            for s in (5, 5, 6)]
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    nearest = quantize_spec(x, TensorSpec("e5m2", scaling="current"), cfg)
    assert not torch.equal(runs[0], nearest)


def test_quantize_spec_keeps_dtype_and_detaches():
    x = torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    for kind in ["none", "current", "mx"]:
        y = quantize_spec(x, TensorSpec("e5m2", scaling=kind), ScalingConfig())
        assert y.dtype == torch.bfloat16 and not y.requires_grad
