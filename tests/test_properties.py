"""Property-based checks of packing round trips and the quantization error bound."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ort_wq import (
    pack_fpq4_blob,
    pack_nbits_weight,
    pack_nbits_zero_points,
    pad_tensor,
    quant_tensor,
    unpack_fpq4_blob,
    unpack_nbits_weight,
    unpack_nbits_zero_points,
)

bits_st = st.sampled_from([2, 4, 8])
block_st = st.sampled_from([16, 32, 64, 128])


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, bs=block_st, n=st.integers(1, 9), kb=st.integers(1, 7), seed=st.integers(0, 2**31 - 1))
def test_nbits_weight_round_trip(bits, bs, n, kb, seed):
    rng = np.random.default_rng(seed)
    q = rng.integers(0, 2**bits, size=(n, kb, bs), dtype=np.uint8)
    packed = pack_nbits_weight(q, bits)
    assert packed.shape == (n, kb, bs * bits // 8) and packed.dtype == np.uint8
    np.testing.assert_array_equal(unpack_nbits_weight(packed, bits, bs), q)


@settings(max_examples=60, deadline=None)
@given(bits=bits_st, n=st.integers(1, 9), kb=st.integers(1, 13), seed=st.integers(0, 2**31 - 1))
def test_nbits_zero_points_round_trip(bits, n, kb, seed):
    rng = np.random.default_rng(seed)
    zp = rng.integers(0, 2**bits, size=(n, kb), dtype=np.uint8)
    packed = pack_nbits_zero_points(zp, bits)
    assert packed.shape == (n, -(-kb * bits // 8))
    np.testing.assert_array_equal(unpack_nbits_zero_points(packed, bits, kb), zp)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 6), k=st.integers(1, 200), sym=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_fpq4_blob_round_trip(n, k, sym, seed):
    rng = np.random.default_rng(seed)
    kb = -(-k // 32)
    q = rng.integers(0, 16, size=(n, kb, 32), dtype=np.uint8)
    scale = rng.standard_normal((n, kb)).astype(np.float32)
    zp = None if sym else rng.integers(0, 16, size=(n, kb), dtype=np.uint8)
    blob = pack_fpq4_blob(q, scale, zp)
    assert blob.size == n * kb * (20 if sym else 21)
    q2, s2, z2 = unpack_fpq4_blob(blob, k, n, 0 if sym else 1)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, scale)
    np.testing.assert_array_equal(z2, np.full((n, kb), 8) if sym else zp)


@settings(max_examples=80, deadline=None)
@given(
    bits=st.integers(2, 8),
    bs=block_st,
    k=st.integers(1, 300),
    n=st.integers(1, 8),
    scheme=st.sampled_from(["sym", "asym"]),
    dtype=st.sampled_from(["int", "uint"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_quant_dequant_error_within_half_scale(bits, bs, k, n, scheme, dtype, seed):
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((k, n)) * rng.uniform(0.01, 10) + rng.uniform(-2, 2)).astype(np.float32)
    kb = -(-k // bs)
    data = pad_tensor(w, bs, kb).T
    q, scale, zp = quant_tensor(data, bits, bs, scheme, dtype)
    deq = scale * (q - zp)
    groups = data.reshape(-1, bs)
    err = np.abs(deq - groups)
    # ratio=1 never clips the group's range, so rounding error is at most half a step; the one
    # exception is asym/uint, whose zero point is clipped to [0, maxq] when a group does not cross 0
    ok_groups = np.ones((groups.shape[0], 1), bool)
    if scheme == "asym" and dtype == "uint":
        ok_groups = (groups.min(1, keepdims=True) <= 0) & (groups.max(1, keepdims=True) >= 0)
    bound = scale / 2 * (1 + 1e-6) + 1e-7
    assert np.all((err <= bound) | ~ok_groups)
