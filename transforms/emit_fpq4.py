"""com.microsoft ``MatMulFpQ4`` (legacy): one blob of 32-value block records, float32 only."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from ort_wq.algorithms import QuantizedWeight, QuantSpec
from ort_wq.packing import fpq4_record_size, pack_fpq4_blob

OP_TYPE = "MatMulFpQ4"
SUPPORTS_BIAS = False


def layout(k: int, n: int, spec: QuantSpec, dtype, **_) -> dict[str, tuple[str, ir.DataType, list[int]]]:
    kb = -(-k // 32)
    rec = fpq4_record_size(0 if spec.symmetric else 1)
    return {
        "B": ("_Q4", ir.DataType.UINT8, [n * kb * rec]),
        "B_shape": ("_shape", ir.DataType.INT64, [2]),
    }


def pack(result: QuantizedWeight, k: int, n: int, spec: QuantSpec, dtype, **_) -> dict[str, np.ndarray]:
    zp = None if spec.symmetric else result.zero_point_array().astype(np.uint8)
    return {
        "B": pack_fpq4_blob(result.q, np.asarray(result.scale, np.float32), zp),
        "B_shape": np.array([k, n], dtype=np.int64),
    }


def emit(op, x, values: dict[str, ir.Value], spec: QuantSpec, k: int, n: int, bias=None, accuracy_level: int = 0):
    y = op.MatMulFpQ4(x, values["B"], values["B_shape"], blk_quant_type=0 if spec.symmetric else 1,
                      _domain="com.microsoft")
    return y if bias is None else op.Add(y, bias)
