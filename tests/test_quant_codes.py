"""encode/decode: storage dtypes, every code of every <= 8-bit format against ml_dtypes,
decode -> encode round trips, and decode(encode(x)) == quantize(x) bitwise."""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.formats import get_format
from mixprec.quant import decode, encode, has_c_extension, quantize
from test_quant_reference import ML

BACKENDS = ["c", "torch"] if has_c_extension() else ["torch"]

# Storage as the format table promises it: torch's dtype where torch has one.
STORAGE = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16,
           "fp16": torch.float16, "e5m2": torch.float8_e5m2, "e4m3": torch.float8_e4m3fn,
           "e4m3fnuz": torch.float8_e4m3fnuz, "e5m2fnuz": torch.float8_e5m2fnuz,
           "e8m0": torch.float8_e8m0fnu, "e3m2": torch.uint8, "e2m3": torch.uint8,
           "e2m1": torch.uint8, "e4m3ieee": torch.uint8, "e3m4": torch.uint8,
           "e4m3b11fnuz": torch.uint8, "e3m3fin": torch.uint8, "e6m9": torch.int32,
           "e5m7": torch.int32}
SMALL = ["e5m2", "e4m3", "e4m3fnuz", "e5m2fnuz", "e3m2", "e2m3", "e2m1", "e8m0", "e4m3ieee",
         "e3m4", "e4m3b11fnuz"]
CUSTOM_SMALL = ["e3m3fin", "e4m2", "e2m2fnuz", "e3m0fn", "e5m0", "e2m5", "e4m3b5fn"]


@pytest.mark.parametrize("name", list(STORAGE))
def test_storage_dtype(name):
    x = torch.tensor([0.5, -1.25, 3.0])
    assert encode(x, name).dtype == STORAGE[name]


def all_codes(name: str) -> torch.Tensor:
    """Every code of the format in its storage dtype."""
    fmt = get_format(name)
    codes = torch.arange(1 << fmt.bits, dtype=torch.int32).to(torch.uint8)
    dt = STORAGE.get(name, torch.uint8)
    return codes.view(dt) if dt != torch.uint8 else codes


def same_bits(a: torch.Tensor, b: np.ndarray) -> bool:
    a = a.numpy()
    return bool(((a.view(np.uint32) == b.view(np.uint32)) | (np.isnan(a) & np.isnan(b))).all())


@pytest.mark.parametrize("name", SMALL)
def test_every_code_decodes_like_ml_dtypes(name):
    fmt = get_format(name)
    want = np.arange(1 << fmt.bits, dtype=np.uint8).view(ML[name]).astype(np.float32)
    assert same_bits(decode(all_codes(name), name), want)
    # float64 output is the same values
    assert same_bits(decode(all_codes(name), name, torch.float64).float(), want)


@pytest.mark.parametrize("name", SMALL + CUSTOM_SMALL)
def test_every_code_round_trips(name):
    codes = all_codes(name)
    values = decode(codes, name)
    nan = torch.isnan(values)
    back = encode(values, name)
    assert back.dtype == codes.dtype
    raw, raw_back = codes.view(torch.uint8), back.view(torch.uint8)
    assert torch.equal(raw[~nan], raw_back[~nan])
    if nan.any():   # every NaN code maps to a NaN code (the canonical one)
        assert torch.isnan(decode(back[nan], name)).all()
    assert quantize(values, name).view(torch.int32)[~nan].equal(values.view(torch.int32)[~nan])


def test_layout_of_uint8_codes():
    # code = s << (E+M) | e << M | m: e2m1 1.5 = 0|01|1, -6 = 1|11|1; e3m2 28 = 0|111|11
    assert encode(torch.tensor([1.5, -6.0, 0.5, -0.0]), "e2m1").tolist() == [3, 15, 1, 8]
    assert encode(torch.tensor([28.0, 0.0625]), "e3m2").tolist() == [31, 1]
    # e6m9, int32: 1.0 = exponent 31 -> 31 << 9; -2^-39 (min subnormal) -> 1 << 15 | 1
    assert encode(torch.tensor([1.0, -2.0 ** -39]), "e6m9").tolist() == [31 << 9, (1 << 15) | 1]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(STORAGE) + CUSTOM_SMALL)
@pytest.mark.parametrize("mode", ["nearest", "stochastic", "toward_zero"])
def test_decode_encode_equals_quantize(name, mode, backend):
    rng = np.random.default_rng(4)
    x = (rng.choice([-1.0, 1.0], 3000) * np.exp2(rng.uniform(-30, 20, 3000))).astype(np.float32)
    x = torch.from_numpy(np.concatenate([x, [0.0, -0.0, math.inf, -math.inf, 1e30]]).astype(
        np.float32))
    for saturate in (False, True):
        kw = dict(rounding=mode, saturate=saturate, backend=backend)
        q = quantize(x, name, generator=torch.Generator().manual_seed(1), **kw)
        codes = encode(x, name, generator=torch.Generator().manual_seed(1), **kw)
        d = decode(codes, name)
        same = (d.view(torch.int32) == q.view(torch.int32)) | (torch.isnan(d) & torch.isnan(q))
        assert same.all(), (name, x[~same][:4], d[~same][:4], q[~same][:4])


def test_encode_of_float64_and_half_inputs():
    x = torch.tensor([1e6, 0.3, -3.3e-5], dtype=torch.float64)
    assert torch.equal(decode(encode(x, "e3m4"), "e3m4", torch.float64), quantize(x, "e3m4"))
    # bf16 input to fp16 storage keeps fp16's max (bfloat16 itself cannot hold 65504)
    b = torch.tensor([1e6], dtype=torch.bfloat16)
    assert encode(b, "fp16", saturate=True).item() == 65504.0


def test_decode_dtypes():
    codes = torch.tensor([3, 15], dtype=torch.uint8)
    for dt in (torch.float32, torch.float64, torch.bfloat16, torch.float16):
        assert decode(codes, "e2m1", dt).dtype == dt
        assert decode(codes, "e2m1", dt).tolist() == [1.5, -6.0]


def test_errors_name_the_value_and_the_choices():
    with pytest.raises(ValueError, match="'e2m1' has no NaN code"):
        encode(torch.tensor([math.nan]), "e2m1")
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\).*\[0, 16\]"):
        decode(torch.tensor([0, 16], dtype=torch.uint8), "e2m1")
    with pytest.raises(ValueError, match=r"must be integer \(torch.uint8\).*torch.float32"):
        decode(torch.tensor([1.0]), "e2m1")
    with pytest.raises(ValueError, match=r"must have dtype torch.float8_e4m3fn.*torch.uint8"):
        decode(torch.tensor([1], dtype=torch.uint8), "e4m3")
    with pytest.raises(ValueError, match=r"dtype torch.int32 not supported.*torch.float32"):
        decode(torch.tensor([1], dtype=torch.uint8), "e2m1", torch.int32)
    with pytest.raises(ValueError, match="rounding 'round'.*'nearest'"):
        encode(torch.ones(2), "e4m3", rounding="round")
