"""com.microsoft ``MatMulNBits``: packed blocks, scales, optional zero points and bias, one node.

Also the storage that ``GatherBlockQuantized`` reads (``emit_gather``): the same ``B``, scales and
zero points serve a tied embedding and its head.
"""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import QuantizedWeight, QuantSpec
from ort_wq.packing import pack_nbits_weight, pack_nbits_zero_points

OP_TYPE = "MatMulNBits"
SUPPORTS_BIAS = True


def _float(dtype) -> ir.DataType:
    return ir.DataType.FLOAT16 if np.dtype(dtype) == np.float16 else ir.DataType.FLOAT


def layout(k: int, n: int, spec: QuantSpec, dtype, b_2d: bool = False) -> dict[str, tuple[str, ir.DataType, list[int]]]:
    """``B`` is ``[N, kb, blob]`` (MatMulNBits), or ``[N, kb * blob]`` when only Gathers read it."""
    kb = -(-k // spec.block_size)
    blob = spec.block_size * spec.bits // 8
    out = {
        "B": (f"_Q{spec.bits}", ir.DataType.UINT8, [n, kb * blob] if b_2d else [n, kb, blob]),
        "scales": ("_scales", _float(dtype), [n, kb]),
    }
    if not spec.symmetric:
        if spec.float_zero_points:
            out["zero_points"] = ("_zero_points", _float(dtype), [n, kb])
        else:
            out["zero_points"] = ("_zero_points", ir.DataType.UINT8, [n, -(-kb * spec.bits // 8)])
    return out


def pack(result: QuantizedWeight, k: int, n: int, spec: QuantSpec, dtype, b_2d: bool = False) -> dict[str, np.ndarray]:
    b = pack_nbits_weight(result.q, spec.bits)
    out = {
        "B": b.reshape(n, -1) if b_2d else b,
        "scales": np.ascontiguousarray(result.scale, dtype=dtype),
    }
    if not spec.symmetric:
        zp = result.zero_point_array()
        if spec.float_zero_points:
            out["zero_points"] = zp.astype(dtype)
        else:
            out["zero_points"] = pack_nbits_zero_points(zp.astype(np.uint8), spec.bits)
    return out


def emit(op, x, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int, bias=None, accuracy_level: int = 0):
    inputs = [x, values["B"], values["scales"], values.get("zero_points")]
    if bias is not None:
        inputs += [None, bias]
    while inputs[-1] is None:
        inputs.pop()
    attrs = dict(K=k, N=n, bits=spec.bits, block_size=spec.block_size)
    if accuracy_level:
        attrs["accuracy_level"] = accuracy_level
    return op.MatMulNBits(*inputs, _domain="com.microsoft", **attrs)
