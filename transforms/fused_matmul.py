"""com.microsoft ``FusedMatMul(A, B)`` with constant ``B`` (left by onnxruntime's fusions) -> a quantized MatMul.

Matched: the FusedMatMuls the target finder takes: ``alpha == 1``, no ``transA`` / batch
transposes; ``transB`` 0 or 1 (``B`` ``[N, K]`` then read transposed).
"""

from __future__ import annotations

from ._base import WeightOnlyRule


class FusedMatMulWeightOnly(WeightOnlyRule):
    def pattern(self, op, a, b):
        return op.FusedMatMul(a, b, _domain="com.microsoft")

    def rewrite(self, op, a, b, **_):
        return self.emit_matmul(op, a)
