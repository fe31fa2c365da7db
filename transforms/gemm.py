"""``Gemm(A, B[, C])`` with constant ``B`` -> a quantized MatMul (+ bias).

Matched: ``transA == 0``, ``alpha == 1``, ``beta == 1`` or no ``C``; ``transB`` 0 or 1 (``B``
``[N, K]`` is then read transposed). A constant ``C`` of shape ``[N]`` or ``[1, N]`` becomes the
MatMulNBits bias; any other ``C`` is added after the node.
"""

from __future__ import annotations

from ._base import WeightOnlyRule, resolve_weight
from ._weights import bias_vector, gemm_reason


class GemmWeightOnly(WeightOnlyRule):
    def pattern(self, op, a, b):
        return op.Gemm(a, b, _allow_other_inputs=True)

    def analyze(self, node, a, b, **_):
        reason = gemm_reason(node)
        if reason:
            return None, reason
        trans_b = node.attributes["transB"].as_int() if "transB" in node.attributes else 0
        return resolve_weight(node, b, bool(trans_b), self.ctx)

    def rewrite(self, op, a, b, **_):
        return self.named(self._rewrite(op, a, b))

    def _rewrite(self, op, a, b):
        node = self._node
        entry, spec = self.quantized(a)
        ref = entry.ref
        c = node.inputs[2] if len(node.inputs) > 2 else None
        emitter, level = entry.emitter, self.ctx.config.accuracy_level
        if c is None:
            return emitter.emit(op, a, entry.values, spec, ref.k, ref.n, None, level)
        if emitter.SUPPORTS_BIAS and bias_vector(c, ref.n) is not None:
            shape = [int(d) for d in c.shape] if c.shape is not None else None
            bias = c if shape == [ref.n] else op.Reshape(c, op.Constant(value_ints=[ref.n]))
            return emitter.emit(op, a, entry.values, spec, ref.k, ref.n, bias, level)
        return op.Add(emitter.emit(op, a, entry.values, spec, ref.k, ref.n, None, level), c)
