"""Nodes built by make_matmul_weight_only_node run in onnxruntime's own kernels and match numpy."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

from ort_wq import make_matmul_weight_only_node, pad_tensor, quant_tensor
from ort_wq.packing import unpack_nbits_weight

from .helpers import dequant_groups, matmul_node, run_model, single_node_model

BLOCKS = [16, 32, 64, 128, 256]


def _k_values(bs):
    # odd k_blocks and a multiple of the block; even k_blocks with a ragged tail; one block only
    return [3 * bs, 2 * bs - 5, bs // 2 + 1]


def _quantize(w, bits, bs, scheme, dtype="uint"):
    k = w.shape[0]
    kb = -(-k // bs)
    q, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, scheme, dtype)
    return kb, q, scale, zp


def _check(bits, bs, k, scheme, fdtype, zp_kind="uint", accuracy_level=0, seed=0):
    rng = np.random.default_rng(seed)
    n = 24
    w = rng.standard_normal((k, n)).astype(np.float32)
    if scheme == "asym":
        w += rng.uniform(-0.5, 1.5, size=(1, n)).astype(np.float32)  # shifted columns: zero points vary
    w = w.astype(fdtype)
    kb, q, scale, zp = _quantize(w, bits, bs, scheme, zp_kind)
    passed_zp = zp if scheme == "asym" else None
    node, inits = make_matmul_weight_only_node(matmul_node(), (k, n), bits, bs, kb, q, scale, passed_zp, accuracy_level)
    assert node.op_type == "MatMulNBits" and node.domain == "com.microsoft"
    names = [i.name for i in inits]
    assert (len(node.input) == 4) == (scheme == "asym")
    packed = next(i for i in inits if i.name == node.input[1])
    assert tuple(packed.dims) == (n, kb, bs * bits // 8)
    if scheme == "asym":
        zp_init = next(i for i in inits if i.name == node.input[3])
        if zp_init.data_type == 2:  # uint8: packed per row
            assert tuple(zp_init.dims) == (n, -(-kb * bits // 8))
    assert len(set(names)) == len(names)
    model = single_node_model(node, inits, k, n, dtype=fdtype)
    a = rng.standard_normal((5, k)).astype(fdtype)
    (y,) = run_model(model, {"A": a})
    # independent reference: float64 dequantisation of the scales the node stores
    stored_scale = scale.astype(fdtype)
    w_deq = dequant_groups(q, stored_scale, zp, k, n, bs)
    ref = a.astype(np.float64) @ w_deq
    if fdtype == np.float16:
        tol = 2e-3 * np.abs(a).astype(np.float64) @ np.abs(w_deq) + 1e-2
        assert np.all(np.abs(y - ref) <= tol)
    else:
        np.testing.assert_allclose(y, ref, rtol=2e-5, atol=2e-4 * np.sqrt(k))


@pytest.mark.parametrize("fdtype", [np.float32, np.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("scheme", ["sym", "asym"])
@pytest.mark.parametrize("bs", BLOCKS)
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_matmulnbits_matches_numpy(bits, bs, scheme, fdtype):
    for k in _k_values(bs):
        _check(bits, bs, k, scheme, fdtype)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_signed_symmetric_input_is_shifted(bits):
    """sym/int output (signed q, zero zero points) is stored unsigned with the default zero point."""
    for k in (96, 70):
        _check(bits, 32, k, "sym", np.float32, zp_kind="int", seed=1)


@pytest.mark.parametrize("bits", [2, 4])
def test_asym_int_out_of_range_zero_points_become_float(bits):
    rng = np.random.default_rng(3)
    k, n, bs = 64, 8, 32
    w = (rng.uniform(1.0, 2.0, size=(k, n))).astype(np.float32)  # never crosses zero: zp < 0
    kb, q, scale, zp = _quantize(w, bits, bs, "asym", "int")
    assert (zp < 0).any()
    node, inits = make_matmul_weight_only_node(matmul_node(), (k, n), bits, bs, kb, q, scale, zp)
    zp_init = next(i for i in inits if i.name == node.input[3])
    assert zp_init.data_type == 1  # float zero points
    a = rng.standard_normal((3, k)).astype(np.float32)
    (y,) = run_model(single_node_model(node, inits, k, n), {"A": a})
    np.testing.assert_allclose(y, a.astype(np.float64) @ dequant_groups(q, scale, zp, k, n, bs), rtol=1e-5, atol=1e-4)


def test_asym_int_out_of_range_zero_points_8bit_refused():
    w = np.random.default_rng(0).uniform(1.0, 2.0, size=(32, 4)).astype(np.float32)
    kb, q, scale, zp = _quantize(w, 8, 32, "asym", "int")
    with pytest.raises(ValueError, match="zero points"):
        make_matmul_weight_only_node(matmul_node(), (32, 4), 8, 32, kb, q, scale, zp)


def test_accuracy_level_4_close():
    _check(4, 32, 96, "sym", np.float32, accuracy_level=0)
    rng = np.random.default_rng(0)
    k, n = 256, 16
    w = rng.standard_normal((k, n)).astype(np.float32)
    kb, q, scale, zp = _quantize(w, 4, 32, "sym")
    node, inits = make_matmul_weight_only_node(matmul_node(), (k, n), 4, 32, kb, q, scale, None, accuracy_level=4)
    assert any(a.name == "accuracy_level" and a.i == 4 for a in node.attribute)
    a = rng.standard_normal((4, k)).astype(np.float32)
    (y,) = run_model(single_node_model(node, inits, k, n), {"A": a})
    ref = a @ dequant_groups(q, scale, zp, k, n, 32)
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 2e-2


def test_padded_tail_is_zero():
    k, n, bs = 40, 4, 32
    w = np.random.default_rng(0).standard_normal((k, n)).astype(np.float32)
    kb, q, scale, zp = _quantize(w, 4, bs, "asym")
    node, inits = make_matmul_weight_only_node(matmul_node(), (k, n), 4, bs, kb, q, scale, zp)
    import onnx

    packed = onnx.numpy_helper.to_array(next(i for i in inits if i.name == node.input[1]))
    tail = unpack_nbits_weight(packed, 4, bs).reshape(n, -1)[:, k:]
    assert not tail.any()


def _fpq4_supported() -> str | None:
    from .helpers import single_node_model as _s  # noqa: F401

    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 4)).astype(np.float32)
    kb, q, scale, zp = _quantize(w, 4, 32, "sym")
    node, inits = make_matmul_weight_only_node(matmul_node(), (32, 4), 4, 32, kb, q, scale, None, op_type="MatMulFpQ4")
    model = _fpq4_model(node, inits, 32, 4)
    try:
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    except Exception as exc:  # the runtime's own reason
        return str(exc).strip().splitlines()[-1][:300]
    return None


def _fpq4_model(node, inits, k, n):
    return single_node_model(node, inits, k, n)


@pytest.mark.parametrize("scheme", ["sym", "asym"])
def test_matmulfpq4_matches_numpy(scheme):
    reason = _fpq4_supported()
    if reason:
        pytest.skip(f"onnxruntime has no MatMulFpQ4 kernel here: {reason}")
    rng = np.random.default_rng(5)
    for k in (96, 64, 70, 33):
        n = 12
        w = rng.standard_normal((k, n)).astype(np.float32) + (0.7 if scheme == "asym" else 0.0)
        kb, q, scale, zp = _quantize(w, 4, 32, scheme)
        passed = zp if scheme == "asym" else None
        node, inits = make_matmul_weight_only_node(
            matmul_node(), (k, n), 4, 32, kb, q, scale, passed, op_type="MatMulFpQ4"
        )
        assert node.op_type == "MatMulFpQ4"
        assert node.attribute[0].i == (1 if scheme == "asym" else 0)
        a = rng.standard_normal((2, 3, k)).astype(np.float32)
        model = _fpq4_model(node, inits, k, n)
        model.graph.input[0].type.tensor_type.shape.dim.insert(0, model.graph.input[0].type.tensor_type.shape.dim[0])
        model.graph.output[0].type.tensor_type.shape.dim.insert(0, model.graph.output[0].type.tensor_type.shape.dim[0])
        (y,) = run_model(model, {"A": a})
        ref = a.astype(np.float64) @ dequant_groups(q, scale.astype(np.float32), zp, k, n, 32)
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-3)
