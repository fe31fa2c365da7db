"""``Gemm(A, B[, C])`` with constant ``B`` -> a quantized MatMul (+ bias).

Matched: the Gemms the target finder takes (``transA == 0``, ``alpha == 1``, ``beta == 1`` or no
``C``; ``transB`` 0 or 1, ``B`` ``[N, K]`` then read transposed). A constant ``C`` of shape
``[N]`` or ``[1, N]`` becomes the MatMulNBits bias; any other ``C`` is added after the node.
"""

from __future__ import annotations

from ._base import WeightOnlyRule
from ._weights import bias_vector


class GemmWeightOnly(WeightOnlyRule):
    def pattern(self, op, a, b):
        return op.Gemm(a, b, _allow_other_inputs=True)

    def rewrite(self, op, a, b, **_):
        node, n = self._consumer.node, self._consumer.ref.n
        c = node.inputs[2] if len(node.inputs) > 2 else None
        if c is None:
            return self.emit_matmul(op, a)
        if self.ctx.emitter_for_matmul().SUPPORTS_BIAS and bias_vector(c, n) is not None:
            return self.emit_matmul(op, a, c)
        return self.emit_matmul(op, a, add=c)
