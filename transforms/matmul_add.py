"""``Add(MatMul(X, W), b)`` (either operand order) with constant ``W`` and ``b[N]`` -> one node.

Only for formats whose node takes a bias (MatMulNBits input 5). The MatMul must feed nothing
else, so removing it is safe.
"""

from __future__ import annotations

from ._base import WeightOnlyRule, resolve_weight
from ._weights import bias_vector


class MatMulAddWeightOnly(WeightOnlyRule):
    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def consumer(self, root, w, **_):
        """The MatMul under the Add (the node whose weight is quantized and whose name is reported)."""
        for v in root.inputs:
            producer = v.producer() if v is not None else None
            if producer is not None and producer.op_type == "MatMul" and producer.inputs[1] is w:
                return producer
        return root

    def analyze(self, matmul, x, w, b, **_):
        if not self.ctx.emitter.SUPPORTS_BIAS:
            return None, f"format {self.ctx.config.format!r} has no bias input"
        ref, reason = resolve_weight(matmul, w, False, self.ctx)
        if ref is None:
            return None, reason
        mm_out = matmul.outputs[0]
        if len(list(mm_out.uses())) != 1 or mm_out.is_graph_output():
            return None, "MatMul output has other consumers"
        if bias_vector(b, ref.n) is None:
            return None, "Add operand is not a constant [N] bias"
        return ref, ""

    def rewrite(self, op, x, w, b, **_):
        entry, spec = self.quantized(x)
        ref = entry.ref
        bias = b
        shape = [int(d) for d in b.shape] if b.shape is not None else None
        if shape != [ref.n]:
            bias = op.Reshape(b, op.Constant(value_ints=[ref.n]))
        return self.named(entry.emitter.emit(op, x, entry.values, spec, ref.k, ref.n, bias, self.ctx.config.accuracy_level))
