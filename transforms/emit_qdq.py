"""Standard ONNX: blocked ``DequantizeLinear`` (int4/uint4/int8/uint8, opset >= 21) + ``MatMul``.

Runs on any ONNX runtime; onnxruntime fuses it into MatMulNBits when the session starts.
Symmetric weights are signed (``int4``/``int8``, no zero point); asymmetric ones unsigned with
a zero point of the same type. The weight keeps its ``[K, N]`` layout, blocks along K (axis 0).
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import QuantizedWeight, QuantSpec

OP_TYPE = "DequantizeLinear+MatMul"
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


def layout(k: int, n: int, spec: QuantSpec, dtype) -> dict[str, tuple[str, ir.DataType, list[int]]]:
    kb = -(-k // spec.block_size)
    qtype = _TYPES[(spec.bits, spec.symmetric)][0]
    out = {
        "q": (f"_Q{spec.bits}G{spec.block_size}", qtype, [k, n]),
        "scale": ("_scale", _float(dtype), [kb, n]),
    }
    if not spec.symmetric:
        out["zero_point"] = ("_zp", qtype, [kb, n])
    return out


def pack(result: QuantizedWeight, k: int, n: int, spec: QuantSpec, dtype) -> dict[str, np.ndarray]:
    np_type = _TYPES[(spec.bits, spec.symmetric)][1]
    q = result.q.reshape(n, -1)[:, :k].T
    out = {"scale": np.ascontiguousarray(np.asarray(result.scale, dtype=dtype).T)}
    if spec.symmetric:
        mid = 1 << (spec.bits - 1)
        out["q"] = np.ascontiguousarray((q.astype(np.int16) - mid).astype(np.int8).astype(np_type))
    else:
        out["q"] = np.ascontiguousarray(q.astype(np_type))
        out["zero_point"] = np.ascontiguousarray(result.zero_point_array().T.astype(np.uint8).astype(np_type))
    return out


def dequantize(op, values: dict[str, ir.Value], spec: QuantSpec):
    inputs = [values["q"], values["scale"]]
    if "zero_point" in values:
        inputs.append(values["zero_point"])
    return op.DequantizeLinear(*inputs, axis=0, block_size=spec.block_size)


def emit(op, x, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int, bias=None, accuracy_level: int = 0):
    y = op.MatMul(x, dequantize(op, values, spec))
    return y if bias is None else op.Add(y, bias)
