"""Bad arguments raise ValueError naming the argument and the allowed values."""

from __future__ import annotations

import numpy as np
import pytest

from ort_wq import make_matmul_weight_only_node, pack_nbits_weight, pad_tensor, quant_tensor, unpack_fpq4_blob

from .helpers import matmul_node


def _q(k=64, n=4, bits=4, bs=32):
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    kb = -(-k // bs)
    return kb, *quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, "asym", "uint")


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(num_bits=0), "num_bits"),
        (dict(num_bits=9), "num_bits"),
        (dict(scheme="foo"), "scheme"),
        (dict(dtype="float"), "dtype"),
        (dict(group_size=7), "group_size"),
        (dict(ratio=0), "ratio"),
    ],
)
def test_quant_tensor_bad_args(kwargs, match):
    with pytest.raises(ValueError, match=match):
        quant_tensor(np.ones((4, 32), np.float32), **kwargs)


def test_quant_tensor_rejects_integers():
    with pytest.raises(ValueError, match="float"):
        quant_tensor(np.ones((4, 32), np.int32))


def test_pad_tensor_rejects_non_2d():
    with pytest.raises(ValueError, match="2-D"):
        pad_tensor(np.ones((2, 3, 4)), 32, 1)


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(num_bits=3), "num_bits"),
        (dict(group_size=24), "group_size"),
        (dict(group_size=8), "group_size"),
        (dict(accuracy_level=7), "accuracy_level"),
        (dict(k_blocks=5), "k_blocks"),
        (dict(weight_shape=(64, 4, 1)), "weight_shape"),
    ],
)
def test_node_builder_bad_args(change, match):
    kb, q, scale, zp = _q()
    args = dict(
        node=matmul_node(), weight_shape=(64, 4), num_bits=4, group_size=32, k_blocks=kb,
        q_weight=q, scale=scale, zero_point=zp,
    )
    args.update(change)
    with pytest.raises(ValueError, match=match):
        make_matmul_weight_only_node(**args)


def test_fpq4_needs_4bit_block_32():
    kb, q, scale, zp = _q(bs=64)
    with pytest.raises(ValueError, match="MatMulFpQ4"):
        make_matmul_weight_only_node(matmul_node(), (64, 4), 4, 64, kb, q, scale, zp, op_type="MatMulFpQ4")


def test_names_avoid_existing():
    kb, q, scale, zp = _q()
    taken = {"W_Q4G32", "W_scale", "W_zp"}
    node, inits = make_matmul_weight_only_node(matmul_node(), (64, 4), 4, 32, kb, q, scale, zp, existing_names=taken)
    names = {i.name for i in inits}
    assert not names & taken
    assert set(node.input[1:]) == names


def test_pack_rejects_bad_bits_and_blob_size():
    with pytest.raises(ValueError, match="bits"):
        pack_nbits_weight(np.zeros((1, 1, 32), np.uint8), 3)
    with pytest.raises(ValueError, match="blob"):
        unpack_fpq4_blob(np.zeros(41, np.uint8), 64, 1, 1)
