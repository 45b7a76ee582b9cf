"""Recipes: presets match the design table; the string grammar round-trips."""
import dataclasses

import pytest
from hypothesis import given, settings, strategies as st

from mixprec.recipe import (PRESETS, AccumulationConfig, HadamardConfig, LossScaleConfig, Recipe,
                            Rounding, ScalingKind, TensorSpec, get_recipe, parse_recipe)

# The preset table of DESIGN.md: weight/activation format, gradient format, master, loss scale.
DESIGN_TABLE = {
    "fp32": ("fp32", "fp32", None, "none"),
    "fp16-mixed": ("fp16", "fp16", "fp32", "dynamic"),
    "bf16-mixed": ("bf16", "bf16", "fp32", "none"),
    "fp16-pure": ("fp16", "fp16", None, "dynamic"),
    "fp8-e5m2": ("e5m2", "e5m2", "fp16", "dynamic"),
    "fp8-hybrid": ("e4m3", "e5m2", "fp32", "none"),
    "mxfp8": ("e4m3", "e5m2", "fp32", "none"),
    "mxfp6": ("e3m2", "e3m2", "fp32", "none"),
    "mxfp4": ("e2m1", "e2m1", "fp32", "none"),
}


@pytest.mark.parametrize("name", list(DESIGN_TABLE))
def test_presets_follow_the_design_table(name):
    fwd, bwd, master, loss = DESIGN_TABLE[name]
    r = get_recipe(name)
    assert r.name == name
    assert r.weight.format == r.activation.format == fwd
    assert r.grad_output.format == r.weight_grad.format == bwd
    assert (r.master.format if r.master is not None else None) == master
    assert r.loss_scale.kind == loss
    assert r.accumulation.is_fp32


def test_fp8_e5m2_is_the_2019_recipe():
    r = get_recipe("fp8-e5m2")
    assert r.weight.rounding is Rounding.NEAREST and r.activation.rounding is Rounding.NEAREST
    assert r.grad_output.rounding is Rounding.STOCHASTIC
    assert r.weight_grad.rounding is Rounding.STOCHASTIC
    assert r.master.rounding is Rounding.STOCHASTIC
    assert r.loss_scale.floor, "enhanced loss scaling needs a rising floor"
    floors = [v for _, v in r.loss_scale.floor]
    assert floors == sorted(floors) and floors[-1] > floors[0]
    assert set(r.keep_high_precision) == {"first", "last", "norm"}


def test_scaled_presets():
    assert get_recipe("fp8-hybrid").weight.scaling is ScalingKind.CURRENT
    assert get_recipe("fp8-hybrid").weight.saturate
    for n in ("mxfp8", "mxfp6", "mxfp4"):
        assert {get_recipe(n).spec(r).scaling for r in
                ("weight", "activation", "grad_output", "weight_grad")} == {ScalingKind.MX}


def test_overrides_and_canonical_print():
    s = "fp8-e5m2:grads.rounding=nearest,master.rounding=nearest,loss_scale.floor=none"
    r = parse_recipe(s)
    assert r.grad_output.rounding is Rounding.NEAREST and r.weight_grad.rounding is Rounding.NEAREST
    assert r.master == TensorSpec("fp16") and r.loss_scale.floor == ()
    assert str(r) == ("fp8-e5m2:grad_output.rounding=nearest,weight_grad.rounding=nearest,"
                      "master.rounding=nearest,loss_scale.floor=none")
    assert parse_recipe(str(r)) == r
    # aliases are canonicalized: float16 is fp16
    assert get_recipe("fp32:weight=float16").weight.format == "fp16"
    assert get_recipe("fp16-mixed", grad_output__rounding="stochastic").grad_output.rounding \
        is Rounding.STOCHASTIC


def test_master_can_be_dropped_and_restored():
    r = get_recipe("fp16-mixed:master=none")
    assert r.master is None and parse_recipe(str(r)) == r
    r2 = get_recipe("fp16-pure:master=fp32,master.rounding=stochastic")
    assert r2.master == TensorSpec("fp32", Rounding.STOCHASTIC)
    assert parse_recipe(str(r2)) == r2


def test_floor_schedule_parses_and_prints():
    r = get_recipe("fp16-mixed:loss_scale.floor=100:4/0:1")
    assert r.loss_scale.floor == ((0, 1.0), (100, 4.0))
    assert parse_recipe(str(r)) == r


@pytest.mark.parametrize("bad, match", [
    ("fp17", r"unknown recipe 'fp17'.*fp16-mixed"),
    ("fp16-mixed:weight=e9m9", r"e9m9"),
    ("fp16-mixed:weight.rounding=up", r"'up'.*nearest, stochastic, toward_zero"),
    ("fp16-mixed:nonsense=1", r"unknown key 'nonsense'.*valid keys"),
    ("fp16-mixed:backend=gpu", r"'gpu'.*auto, emulated, native"),
    ("fp16-mixed:loss_scale.kind=magic", r"'magic'.*none, static, dynamic"),
    ("fp16-mixed:weight.scaling=block", r"'block'.*none, current, delayed, mx"),
    ("fp16-mixed:loss_scale.floor=x", r"step:value"),
    ("fp16-mixed:weight", r"key=value"),
    ("fp16-mixed:scaling.amax_algo=mean", r"'mean'.*max, most_recent"),
    ("fp16-mixed:accumulation.chunk=0", r"chunk"),
])
def test_bad_recipe_strings_name_the_value_and_choices(bad, match):
    with pytest.raises(ValueError, match=match):
        get_recipe(bad)


def test_bad_recipe_type():
    with pytest.raises(ValueError, match="preset name"):
        get_recipe(16)


_FORMATS = st.sampled_from(["fp32", "fp16", "bf16", "e5m2", "e4m3", "e3m2", "e2m1", "e6m9"])
# "block" scaling comes with a scheme (which sets format and scaling)
_SPECS = st.builds(TensorSpec, format=_FORMATS, rounding=st.sampled_from(list(Rounding)),
                   scaling=st.sampled_from([k for k in ScalingKind if k is not ScalingKind.BLOCK]),
                   saturate=st.booleans(),
                   scheme=st.one_of(st.none(), st.sampled_from(["nvfp4", "nvfp4-2d", "mxfp4",
                                                                "fp8-block128"])))
_HADAMARD = st.builds(HadamardConfig, signs=st.sampled_from(["fixed", "none"]),
                      seed=st.integers(0, 3), fprop=st.sampled_from([0, 16, 128]),
                      dgrad=st.sampled_from([0, 32]), wgrad=st.sampled_from([0, 16, 64]))


@settings(max_examples=150, deadline=None)
@given(base=st.sampled_from(list(PRESETS)), w=_SPECS, go=_SPECS,
       master=st.one_of(st.none(), _SPECS),
       acc=st.builds(AccumulationConfig, format=_FORMATS,
                     chunk=st.one_of(st.none(), st.integers(1, 512)), across=_FORMATS),
       ls=st.builds(LossScaleConfig, kind=st.sampled_from(["none", "static", "dynamic"]),
                    init_scale=st.sampled_from([1.0, 2.0 ** -3, 2.0 ** 16, 1e5]),
                    min_scale=st.one_of(st.none(), st.just(2.0 ** -8)),
                    floor=st.lists(st.tuples(st.integers(0, 10 ** 6), st.sampled_from([1.0, 16.0, 0.25])),
                                   max_size=3, unique_by=lambda t: t[0]).map(tuple)),
       keep=st.lists(st.sampled_from(["first", "last", "norm", "encoder.*"]), max_size=3,
                     unique=True).map(tuple),
       backend=st.sampled_from(["auto", "emulated", "native"]), rht=_HADAMARD)
def test_parse_print_round_trip(base, w, go, master, acc, ls, keep, backend, rht):
    r = dataclasses.replace(PRESETS[base], weight=w, grad_output=go, master=master,
                            accumulation=acc, loss_scale=ls, keep_high_precision=keep,
                            backend=backend, hadamard=rht)
    text = str(r)
    assert parse_recipe(text) == r
    assert str(parse_recipe(text)) == text
    assert r.short_str().startswith(base)
