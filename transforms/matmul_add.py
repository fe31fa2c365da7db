"""``Add(MatMul(X, W), b)`` (either operand order) with constant ``W`` and ``b[N]`` -> one node.

Only for formats whose node takes a bias (MatMulNBits input 5). The MatMul must feed nothing
else, so removing it is safe.
"""

from __future__ import annotations

from ._base import WeightOnlyRule
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

    def analyze(self, consumer, b, **_):
        if not self.ctx.emitter_for_matmul().SUPPORTS_BIAS:
            return f"format {self.ctx.config.format!r} has no bias input"
        mm_out = consumer.node.outputs[0]
        if len(list(mm_out.uses())) != 1 or mm_out.is_graph_output():
            return "MatMul output has other consumers"
        if bias_vector(b, consumer.ref.n) is None:
            return "Add operand is not a constant [N] bias"
        return ""

    def rewrite(self, op, x, w, b, **_):
        return self.emit_matmul(op, x, b)
