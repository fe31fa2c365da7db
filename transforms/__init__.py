"""Graph transforms: onnxscript rewrite rules replacing weight consumers with quantized ones.

- :func:`rules` -> an onnxscript ``RewriteRuleSet`` (``onnxscript.rewriter.rewrite``).
- :class:`WeightOnlyQuantPass` -> an ``onnx_ir`` in-place pass with clean-up and a report.

``targets`` decides which tensors are quantized and who reads them (one table per consumer op).
One module per rule: ``matmul`` (MatMul, also through a Transpose), ``matmul_add`` (MatMul + bias),
``gemm``, ``fused_matmul``, ``gather`` (embeddings); one per output op: ``emit_nbits``,
``emit_fpq4``, ``emit_qdq``, ``emit_gather``.
"""

from __future__ import annotations

from ._context import QuantContext
from .quant_pass import WeightOnlyQuantPass
from .rule_set import rules

__all__ = ["QuantContext", "WeightOnlyQuantPass", "rules"]
