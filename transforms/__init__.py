"""Graph transforms: onnxscript rewrite rules replacing MatMul/Gemm weights with quantized ones.

- :func:`rules` -> an onnxscript ``RewriteRuleSet`` (``onnxscript.rewriter.rewrite``).
- :class:`WeightOnlyQuantPass` -> an ``onnx_ir`` in-place pass with clean-up and a report.

One module per rule: ``matmul`` (MatMul, also through a Transpose), ``matmul_add`` (MatMul + bias),
``gemm``; one per output format: ``emit_nbits``, ``emit_fpq4``, ``emit_qdq``.
"""

from __future__ import annotations

from ._context import QuantContext
from .quant_pass import WeightOnlyQuantPass
from .rule_set import rules

__all__ = ["QuantContext", "WeightOnlyQuantPass", "rules"]
