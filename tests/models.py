"""Small hand-built models for transform tests, and the numpy result they should give once quantized."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ort_wq import pad_tensor, quant_tensor


def make_model(nodes, inputs, outputs, inits, opset=21, extra_opsets=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", opset), *extra_opsets], ir_version=10 if opset >= 21 else 8
    )
    onnx.checker.check_model(model)
    return model


def vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def init(name, arr):
    return numpy_helper.from_array(np.asarray(arr), name)


def deq(w: np.ndarray, bits=4, bs=32, sym=True, grid="mlas") -> np.ndarray:
    """What the kernel should compute with for ``W[K, N]`` under round-to-nearest (float64).

    ``grid="mlas"``: onnxruntime's rule (symmetric: scale = signed extreme / -2^(b-1);
    asymmetric: range widened to include 0), in its float32 arithmetic, one block at a time;
    ``"inc"``: the utilities' ``quant_tensor`` (symmetric: 2 max|w| / (2^b - 1)).
    """
    k, n = w.shape
    if bs == -1:
        bs = max(16, 1 << (k - 1).bit_length())
    kb = -(-k // bs)
    if grid == "inc" and sym:
        q, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, "sym", "uint")
        stored = scale.astype(w.dtype).astype(np.float64)
        return ((q - zp) * stored).reshape(n, -1)[:, :k].T
    out = np.zeros((k, n))
    maxq, mid = 2**bits - 1, 2 ** (bits - 1)
    for g in range(kb):
        blk = w[g * bs : (g + 1) * bs].astype(np.float32)
        lo, hi = blk.min(0), blk.max(0)
        if sym:
            scale = np.where(np.abs(hi) > np.abs(lo), hi, lo) / np.float32(-mid)
            zp = np.full(n, np.float32(mid))
        else:
            lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)
            scale = (hi - lo) / np.float32(maxq)
            zp = np.floor(np.where(scale != 0, -lo / np.where(scale != 0, scale, 1), 0) + np.float32(0.5))
        scale = scale.astype(w.dtype).astype(np.float32)
        inv = np.where(scale != 0, np.float32(1) / np.where(scale != 0, scale, 1), 0).astype(np.float32)
        q = np.clip(np.floor(blk * inv + zp + np.float32(0.5)), 0, maxq)
        out[g * bs : (g + 1) * bs] = (q - zp) * scale.astype(np.float64)
    return out


def matmul_model(k=64, n=48, seed=0, dtype=np.float32, name="mm"):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((k, n)).astype(dtype)
    elem = TensorProto.FLOAT16 if dtype == np.float16 else TensorProto.FLOAT
    m = make_model([helper.make_node("MatMul", ["x", "W"], ["y"], name=name)],
                   [vi("x", ["M", k], elem)], [vi("y", ["M", n], elem)], [init("W", w)])
    return m, w
