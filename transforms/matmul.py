"""``MatMul(X, W)`` with a constant weight -> a quantized MatMul.

Matched: ``W`` an initializer or ``Constant`` output (main graph or subgraph), 2-D or with
leading 1s, float32/float16, possibly behind ``Transpose(perm=[1, 0])`` (tied output heads).
Left for ``matmul_add``: a MatMul whose only consumer adds a constant ``[N]`` bias, when the
output format takes a bias (so MatMul+Add becomes one node whatever the visiting order).
"""

from __future__ import annotations

import onnx_ir as ir

from ._base import WeightOnlyRule, resolve_weight
from ._weights import bias_vector


def _bias_consumer(node: ir.Node, n: int) -> bool:
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

    def analyze(self, node, x, w, **_):
        ref, reason = resolve_weight(node, w, False, self.ctx)
        if ref is not None and self.ctx.emitter.SUPPORTS_BIAS and _bias_consumer(node, ref.n):
            return None, "left to the MatMul+Add rule"
        return ref, reason

    def rewrite(self, op, x, w, **_):
        entry, spec = self.quantized(x)
        ref = entry.ref
        return self.named(entry.emitter.emit(op, x, entry.values, spec, ref.k, ref.n, None, self.ctx.config.accuracy_level))
