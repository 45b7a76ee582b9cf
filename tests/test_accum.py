"""Reduced-precision accumulation against scalar numpy loops.

numpy's float16 scalars round every addition to float16, which makes a loop over them an
independent oracle of a sequential FP16 accumulator. Sums of float16 values and of
products of float16 values are exact in float64 here, so np.float16(float64 sum) is the
single correctly rounded addition a hardware adder performs.
"""
import math

import ml_dtypes
import numpy as np
import pytest
import torch

from mixprec.accum import matmul_accum, sum_accum
from mixprec.recipe import AccumulationConfig

TENTH16 = np.float16(0.1)          # 0.0999755859375


def np_sequential(values, to_acc):
    """Sum values one by one, rounding each partial sum with to_acc (float64 adds)."""
    acc = to_acc(values[0])
    for v in values[1:]:
        acc = to_acc(np.float64(acc) + np.float64(v))
    return acc


def np_chunked(values, chunk, to_inner, to_across):
    sums = [np_sequential(values[i:i + chunk], to_inner) for i in range(0, len(values), chunk)]
    return np_sequential(sums, to_across)


def fp16_loop(values):
    """Plain float16 scalar arithmetic: every + rounds to float16."""
    acc = np.float16(values[0])
    for v in values[1:]:
        acc = acc + np.float16(v)
    return acc


def f32_loop(values):
    acc = np.float32(values[0])
    for v in values[1:]:
        acc = acc + np.float32(v)
    return acc


# --------------------------------------------------------------------------------------
# Swamping (Wang et al. 2018): 10,000 x 0.1
# --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tenths():
    return torch.full((10000,), float(TENTH16))


def test_fp16_sequential_sum_stalls_at_256(tenths):
    got = sum_accum(tenths, AccumulationConfig("fp16"))
    oracle = fp16_loop([TENTH16] * 10000)
    assert got.item() == float(oracle) == 256.0
    # at 256 the fp16 spacing is 0.25: 256 + 0.09998 rounds back to 256


def test_chunks_of_64_in_fp16_with_fp16_chunk_sums_give_1011_5(tenths):
    # Wang et al.'s 1011.5: chunk sums of 64 added in 16 bits as well
    got = sum_accum(tenths, AccumulationConfig("fp16", chunk=64, across="fp16"))
    chunk_sums = [fp16_loop([TENTH16] * min(64, 10000 - i)) for i in range(0, 10000, 64)]
    oracle = fp16_loop(chunk_sums)
    assert got.item() == float(oracle) == 1011.5


def test_chunks_of_64_in_fp16_with_fp32_chunk_sums(tenths):
    got = sum_accum(tenths, AccumulationConfig("fp16", chunk=64, across="fp32"))
    chunk_sums = [fp16_loop([TENTH16] * min(64, 10000 - i)) for i in range(0, 10000, 64)]
    oracle = f32_loop(chunk_sums)
    assert got.item() == float(oracle)
    assert abs(got.item() - 1000) < 5         # about 1004.02: most of the loss recovered


def test_fp32_accumulation_of_tenths(tenths):
    got = sum_accum(tenths, AccumulationConfig("fp32"))
    oracle = f32_loop([TENTH16] * 10000)      # 999.7559 (sequential float32)
    assert abs(got.item() - float(oracle)) < 1e-2
    assert abs(got.item() - 10000 * float(TENTH16)) < 1e-2


# --------------------------------------------------------------------------------------
# sum_accum: exactness against numpy oracles
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,across", [(None, "fp32"), (7, "fp32"), (7, "fp16"),
                                          (16, "bf16"), (1, "fp16"), (100, "fp32")])
def test_sum_accum_fp16_matches_numpy_loop(chunk, across):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 50)).astype(np.float16)
    acc = AccumulationConfig("fp16", chunk=chunk, across=across)
    to_across = {"fp32": np.float32, "fp16": np.float16, "bf16": ml_dtypes.bfloat16}[across]
    got = sum_accum(torch.from_numpy(x.astype(np.float32)), acc, dim=-1)
    assert got.shape == (3, 4)
    for idx in np.ndindex(3, 4):
        ref = np_chunked(list(x[idx]), chunk or 50, np.float16, to_across)
        assert got[idx].item() == float(ref), idx


def test_sum_accum_along_dim_zero_matches_last_dim():
    x = torch.randn(40, 6).half().float()
    acc = AccumulationConfig("fp16", chunk=8, across="fp16")
    assert torch.equal(sum_accum(x, acc, dim=0), sum_accum(x.t(), acc, dim=-1))


ROUND_ONCE_CASES = [
    # 1 + t, t = 2^-11 (1 + 2^-23): float32 rounds the sum to 1 + 2^-11, an exact fp16 tie
    # that would go to even (1.0); the exact sum lies above the tie: 1 + 2^-10.
    (1.0, 2.0 ** -11 * (1 + 2.0 ** -23), 1 + 2.0 ** -10),
    # (1 + 2^-10) + (2^-11 - 2^-35): float32 gives the tie 1 + 3 * 2^-11, whose even
    # neighbour is 1 + 2^-9; the exact sum lies below the tie: 1 + 2^-10.
    (1 + 2.0 ** -10, 2.0 ** -11 - 2.0 ** -35, 1 + 2.0 ** -10),
]


@pytest.mark.parametrize("s,t,expected", ROUND_ONCE_CASES)
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_sum_accum_rounds_each_addition_once(s, t, expected, sign):
    got = sum_accum(torch.tensor([sign * s, sign * t]), AccumulationConfig("fp16"))
    oracle = np.float16(np.float64(sign * s) + np.float64(sign * t))   # exact, then once
    assert got.item() == float(oracle) == sign * expected


def test_sum_accum_e4m3_accumulator_overflows_to_nan():
    # 448 + 32 = 480 rounds past e4m3's largest value: non-saturating e4m3 gives NaN
    # (ml_dtypes' cast is the oracle); e5m2 accumulates 57344 + 8192 to inf.
    got = sum_accum(torch.tensor([448.0, 32.0]), AccumulationConfig("e4m3"))
    assert math.isnan(got.item())
    assert math.isnan(float(np.float32(480.0).astype(ml_dtypes.float8_e4m3fn)))
    inf = sum_accum(torch.tensor([57344.0, 8192.0]), AccumulationConfig("e5m2"))
    assert inf.item() == math.inf


def test_sum_accum_e5m2_matches_ml_dtypes_loop():
    rng = np.random.default_rng(5)
    x = rng.standard_normal(33).astype(ml_dtypes.float8_e5m2).astype(np.float32)
    got = sum_accum(torch.from_numpy(x), AccumulationConfig("e5m2", chunk=4, across="fp16"))
    to_e5m2 = lambda v: np.float32(v).astype(ml_dtypes.float8_e5m2)  # sums exact in f32
    assert got.item() == float(np_chunked(list(x), 4, to_e5m2, np.float16))


def test_sum_accum_keeps_dtype_and_handles_empty():
    x = torch.randn(5, 9).to(torch.bfloat16)
    assert sum_accum(x, AccumulationConfig("bf16")).dtype == torch.bfloat16
    empty = sum_accum(torch.empty(3, 0), AccumulationConfig("fp16"))
    assert torch.equal(empty, torch.zeros(3))


# --------------------------------------------------------------------------------------
# matmul_accum
# --------------------------------------------------------------------------------------
def fp16_matrix(rng, *shape):
    return rng.standard_normal(shape).astype(np.float16)


def np_matmul_accum(a, b, chunk, to_inner, to_across):
    """Oracle: products in float64 (exact for float16 inputs), chunked rounded sums."""
    out = np.zeros((a.shape[0], b.shape[1]))
    for i in range(a.shape[0]):
        for j in range(b.shape[1]):
            prods = [np.float64(a[i, p]) * np.float64(b[p, j]) for p in range(a.shape[1])]
            out[i, j] = np_chunked(prods, chunk, to_inner, to_across)
    return out


@pytest.mark.parametrize("chunk,across", [(None, "fp32"), (8, "fp32"), (8, "fp16"), (5, "fp16")])
def test_matmul_accum_fp16_matches_numpy_oracle(chunk, across):
    rng = np.random.default_rng(1)
    a, b = fp16_matrix(rng, 5, 37), fp16_matrix(rng, 37, 4)
    acc = AccumulationConfig("fp16", chunk=chunk, across=across)
    got = matmul_accum(torch.from_numpy(a.astype(np.float32)),
                       torch.from_numpy(b.astype(np.float32)), acc)
    to_across = np.float32 if across == "fp32" else np.float16
    ref = np_matmul_accum(a, b, chunk or 37, np.float16, to_across)
    np.testing.assert_array_equal(got.numpy(), ref.astype(np.float32))


def test_matmul_accum_fp32_config_is_torch_matmul():
    a, b = torch.randn(6, 33), torch.randn(33, 7)
    assert torch.equal(matmul_accum(a, b, AccumulationConfig()), torch.matmul(a, b))


def test_matmul_accum_batched_and_vector_shapes():
    acc = AccumulationConfig("bf16", chunk=4, across="fp32")
    a, b = torch.randn(2, 3, 5, 10).bfloat16().float(), torch.randn(10, 4).bfloat16().float()
    out = matmul_accum(a, b, acc)
    assert out.shape == (2, 3, 5, 4)
    assert torch.equal(out[1, 2], matmul_accum(a[1, 2], b, acc))
    v = torch.randn(10).bfloat16().float()
    assert torch.equal(matmul_accum(v, b, acc), matmul_accum(v[None], b, acc)[0])
    assert torch.equal(matmul_accum(a[0, 0], v, acc), matmul_accum(a[0, 0], v[:, None], acc)[:, 0])
    assert matmul_accum(v, v, acc).shape == ()
    # the same reduction written as a sum: row . column
    assert matmul_accum(v, v, acc).item() == sum_accum(v * v, acc).item()


def test_matmul_accum_fp16_accumulation_loses_to_fp32():
    # a long dot product of positive values swamps an fp16 accumulator
    a = torch.full((1, 4096), float(TENTH16))
    b = torch.ones(4096, 1)
    fp16 = matmul_accum(a, b, AccumulationConfig("fp16")).item()
    chunked = matmul_accum(a, b, AccumulationConfig("fp16", chunk=64)).item()
    exact = 4096 * float(TENTH16)
    assert fp16 == 256.0 and abs(chunked - exact) < abs(fp16 - exact) / 20


def test_matmul_accum_shape_mismatch():
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(4, 5\)"):
        matmul_accum(torch.ones(2, 3), torch.ones(4, 5), AccumulationConfig("fp16"))
