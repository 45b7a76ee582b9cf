"""BlockScheme: named schemes, resolution of strings, and the errors for bad values."""
from __future__ import annotations

import pytest

import mixprec
from mixprec.blocks import BlockScheme, ScaleFormat, ScaleRule, Ties, get_scheme, list_schemes
from mixprec.formats import get_format


def test_named_schemes_are_the_published_settings():
    # NVFP4 (TE NVFP4BlockScaling): E2M1 in 1x16 (weights 16x16), E4M3 scales, FP32 tensor scale
    nv = get_scheme("nvfp4")
    assert (nv.element.name, nv.block, nv.scale_format, nv.scale_rule, nv.tensor_scale) == \
        ("e2m1", (1, 16), ScaleFormat.E4M3, ScaleRule.AMAX, True)
    assert get_scheme("nvfp4-2d").block == (16, 16) and get_scheme("nvfp4-2d").tensor_scale
    # OCP MX v1.0: 32-element blocks, E8M0 scales, floor rule
    for name, elem in [("mxfp8", "e4m3"), ("mxfp6", "e3m2"), ("mxfp4", "e2m1")]:
        s = get_scheme(name)
        assert (s.element.name, s.block, s.scale_format, s.scale_rule, s.tensor_scale) == \
            (elem, (1, 32), ScaleFormat.E8M0, ScaleRule.FLOOR, False)
    # Blockwise FP8 (TE Float8BlockScaling, DeepSeek-V3 tiles): power-of-two FP32 scales
    assert get_scheme("fp8-block128").block == (1, 128)
    assert get_scheme("fp8-block128x128").block == (128, 128)
    assert get_scheme("fp8-block128").scale_format is ScaleFormat.POW2
    assert get_scheme("fp8-block128-fp32").scale_format is ScaleFormat.FP32
    # the MX blocks for stochastic rounding (Tseng et al. 2025): the floor scale, 3/4 dither
    for name, elem in [("mxfp8", "e4m3"), ("mxfp6", "e3m2"), ("mxfp4", "e2m1")]:
        assert get_scheme(f"{name}-dither") == get_scheme(name).with_(scale_rule="dither")
    assert set(list_schemes()) == {"nvfp4", "nvfp4-2d", "mxfp8", "mxfp6", "mxfp4",
                                   "mxfp8-dither", "mxfp6-dither", "mxfp4-dither",
                                   "fp8-block128", "fp8-block128x128",
                                   "fp8-block128-fp32", "fp8-block128x128-fp32"}


def test_strings_resolve_once_and_aliases():
    s = BlockScheme("E2M1", block=[1, 16], scale_format="ue4m3", scale_rule="nvfp4",
                    tensor_scale=True, ties="even")
    assert s == get_scheme("nvfp4")
    assert s.element is get_format("e2m1") and s.block == (1, 16)
    assert BlockScheme(scale_rule="ocp").scale_rule is ScaleRule.FLOOR
    assert BlockScheme(scale_rule="rceil").scale_rule is ScaleRule.CEIL
    assert BlockScheme(ties="half-up").ties is Ties.UP
    assert BlockScheme(scale_format="ue5m3", scale_rule="amax").scale_max == 114688.0
    assert get_scheme("nvfp4").with_(block=(16, 16)) == get_scheme("nvfp4-2d")
    assert mixprec.get_scheme is get_scheme


def test_short_str():
    assert get_scheme("mxfp4").short_str() == "mxfp4"
    s = get_scheme("mxfp4").with_(block=(1, 64), scale_rule="dither", hadamard=64,
                                  hadamard_signs="random")
    assert s.short_str() == "e2m1-1x64-e8m0-dither-rht64-random"


@pytest.mark.parametrize("kwargs, match", [
    (dict(element="q4"), "unknown format 'q4'"),
    (dict(element="e8m0"), "cannot be a block element"),
    (dict(block=(2, 16)), r"\(1, k\) or \(k, k\)"),
    (dict(block=(1, 0)), r"\(1, k\) or \(k, k\)"),
    (dict(block=16), r"\(1, k\) or \(k, k\)"),
    (dict(scale_format="e5m2"), r"unknown scale format 'e5m2'; valid choices: 'e8m0', 'e4m3', "
                                r"'ue5m3', 'fp32', 'pow2'"),
    (dict(scale_rule="round"), r"unknown scale rule 'round'; valid choices: 'floor', 'ceil', "
                               r"'amax', 'dither'"),
    (dict(ties="odd"), r"unknown tie rule 'odd'; valid choices: 'nearest-even', 'half-up', "
                       r"'half-down'"),
    (dict(scale_format="e4m3", scale_rule="floor"), "needs scale rule 'amax'"),
    (dict(scale_format="e8m0", scale_rule="amax"), "floor, ceil or dither"),
    (dict(tensor_scale=True), "tensor_scale=True needs narrow block scales"),
    (dict(block=(16, 16), axis=0), "axis must be -1 or -2"),
    (dict(hadamard=24), "hadamard size 24 not supported; valid choices: None, 16, 32, 64, 128"),
    (dict(hadamard=16, hadamard_signs="fixed"), "valid choices: te, random, none"),
    (dict(hadamard=32, hadamard_signs="te"), "needs hadamard=16"),
])
def test_bad_values_raise_naming_the_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BlockScheme(**kwargs)


def test_unknown_name():
    with pytest.raises(ValueError, match="unknown block scheme 'nvfp8'; valid choices: a "
                                         "BlockScheme or one of nvfp4, nvfp4-2d, mxfp8"):
        get_scheme("nvfp8")
