"""``MatMul(X, W)`` with a constant weight -> a quantized MatMul.

Matched: every MatMul the target finder (``targets.py``) takes: ``W`` an initializer or
``Constant`` output (main graph or subgraph), 2-D or with leading 1s, float32/float16, possibly
behind ``Transpose(perm=[1, 0])`` (tied output heads). Left for ``matmul_add``: a MatMul whose
only consumer adds a constant ``[N]`` bias, when the output format takes a bias (so MatMul+Add
becomes one node whatever the visiting order).
"""

from __future__ import annotations

import onnx_ir as ir

from ._base import WeightOnlyRule
from ._weights import bias_vector


def bias_consumer(node: ir.Node, n: int) -> bool:
    """Whether the node's only consumer is ``Add`` with a constant ``[N]`` bias."""
    out = node.outputs[0]
    uses = list(out.uses())
    if len(uses) != 1 or out.is_graph_output():
        return False
    add = uses[0].node
    if add.op_type != "Add" or add.domain not in ("", "ai.onnx"):
        return False
    other = add.inputs[1 - uses[0].idx]
    return bias_vector(other, n) is not None


class MatMulWeightOnly(WeightOnlyRule):
    def pattern(self, op, x, w):
        return op.MatMul(x, w)

    def analyze(self, consumer, **_):
        emitter = self.ctx.emitter_for_matmul()
        if emitter.SUPPORTS_BIAS and bias_consumer(consumer.node, consumer.ref.n):
            return "left to the MatMul+Add rule"
        return ""

    def rewrite(self, op, x, w, **_):
        return self.emit_matmul(op, x)
