"""Standard ONNX: blocked ``DequantizeLinear`` (int4/uint4/int8/uint8, opset >= 21) + ``MatMul``.

Runs on any ONNX runtime; onnxruntime fuses it into MatMulNBits when the session starts.
Symmetric weights are signed (``int4``/``int8``, no zero point); asymmetric ones unsigned with
a zero point of the same type. The weight keeps its ``[K, N]`` layout, blocks along K (axis 0);
a table read only by Gathers is stored as ``[N, K]`` rows (blocks along axis 1) and gathered
from the dequantized rows; a table that also feeds a MatMul is gathered through a ``Transpose``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import QuantizedWeight, QuantSpec

OP_TYPE = "DequantizeLinear+MatMul"
GATHER_OP_TYPE = "DequantizeLinear+Gather"
SUPPORTS_BIAS = False
MIN_OPSET = 21

_TYPES = {
    (4, True): (ir.DataType.INT4, ml_dtypes.int4),
    (4, False): (ir.DataType.UINT4, ml_dtypes.uint4),
    (8, True): (ir.DataType.INT8, np.int8),
    (8, False): (ir.DataType.UINT8, np.uint8),
}


def _float(dtype) -> ir.DataType:
    return ir.DataType.FLOAT16 if np.dtype(dtype) == np.float16 else ir.DataType.FLOAT


def layout(k: int, n: int, spec: QuantSpec, dtype, rows: bool = False) -> dict[str, tuple[str, ir.DataType, list[int]]]:
    kb = -(-k // spec.block_size)
    qtype = _TYPES[(spec.bits, spec.symmetric)][0]

    def shape(a: int, b: int) -> list[int]:
        return [b, a] if rows else [a, b]

    out = {
        "q": (f"_Q{spec.bits}", qtype, shape(k, n)),
        "scale": ("_scales", _float(dtype), shape(kb, n)),
    }
    if not spec.symmetric:
        out["zero_point"] = ("_zero_points", qtype, shape(kb, n))
    return out


def pack(result: QuantizedWeight, k: int, n: int, spec: QuantSpec, dtype, rows: bool = False) -> dict[str, np.ndarray]:
    np_type = _TYPES[(spec.bits, spec.symmetric)][1]
    out = _pack_rows(result, k, n, spec, dtype, np_type)
    if rows:
        return out
    return {key: np.ascontiguousarray(arr.T) for key, arr in out.items()}


def _pack_rows(result: QuantizedWeight, k: int, n: int, spec: QuantSpec, dtype, np_type) -> dict[str, np.ndarray]:
    """The arrays in ``[N, ...]`` row layout (blocks along axis 1)."""
    q = result.q.reshape(n, -1)[:, :k]
    out = {"scale": np.asarray(result.scale, dtype=dtype)}
    if spec.symmetric:
        mid = 1 << (spec.bits - 1)
        out["q"] = (q.astype(np.int16) - mid).astype(np.int8).astype(np_type)
    else:
        out["q"] = q.astype(np_type)
        out["zero_point"] = result.zero_point_array().astype(np.uint8).astype(np_type)
    return out


def dequantize(op, values: dict[str, ir.Value], spec: QuantSpec, axis: int = 0):
    inputs = [values["q"], values["scale"]]
    if "zero_point" in values:
        inputs.append(values["zero_point"])
    return op.DequantizeLinear(*inputs, axis=axis, block_size=spec.block_size)


def emit_gather(op, ids, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int):
    q_shape = values["q"].shape
    rows = q_shape is not None and [int(d) for d in q_shape] == [n, k] and (n != k or _is_rows(values, n))
    if rows:
        return op.Gather(dequantize(op, values, spec, axis=1), ids, axis=0)
    return op.Gather(op.Transpose(dequantize(op, values, spec), perm=[1, 0]), ids, axis=0)


def _is_rows(values: dict[str, ir.Value], n: int) -> bool:
    shape = values["scale"].shape
    return shape is not None and int(shape[0]) == n


def emit(op, x, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int, bias=None, accuracy_level: int = 0):
    y = op.MatMul(x, dequantize(op, values, spec))
    return y if bias is None else op.Add(y, bias)
