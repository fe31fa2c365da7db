"""``Gather(E, ids)`` with a constant table -> a quantized Gather (com.microsoft ``GatherBlockQuantized``).

Matched: the Gathers the target finder takes: ``E`` an initializer or ``Constant`` (main graph
or subgraph), 2-D float32/float16, or ``Transpose(W)`` of one (the onnxruntime-genai builder's
tied embedding); ``axis == 0``; int32/int64 indices (negative ones as onnxruntime treats them).
The table is quantized along its last axis (K), so when it also feeds the output head both nodes
read one set of quantized bytes.
"""

from __future__ import annotations

from ._base import WeightOnlyRule


class GatherWeightOnly(WeightOnlyRule):
    def pattern(self, op, table, ids):
        return op.Gather(table, ids)

    def rewrite(self, op, table, ids, **_):
        emitter, values, entry = self.emitted()
        return self.named(emitter.emit_gather(op, ids, values, entry.spec, entry.ref.k, entry.ref.n))
