"""``rules(config)``: the weight-only rules as one onnxscript ``RewriteRuleSet``."""

from __future__ import annotations

from onnxscript.rewriter import RewriteRuleSet

from ort_wq.config import WeightOnlyConfig

from ._context import QuantContext
from .fused_matmul import FusedMatMulWeightOnly
from .gather import GatherWeightOnly
from .gemm import GemmWeightOnly
from .matmul import MatMulWeightOnly
from .matmul_add import MatMulAddWeightOnly


def rules(config: WeightOnlyConfig | None = None, *, context: QuantContext | None = None) -> RewriteRuleSet:
    """The rule set for ``config`` (default :class:`WeightOnlyConfig`).

    Use with ``onnxscript.rewriter.rewrite(model, pattern_rewrite_rules=rules(cfg))``; the
    quantized initializers are computed in the background and filled in when first read.
    ``WeightOnlyQuantPass`` adds clean-up and a report on top.
    """
    ctx = context or QuantContext(config or WeightOnlyConfig())
    add_rules = MatMulAddWeightOnly.rule(ctx).commute()
    return RewriteRuleSet([
        *add_rules, MatMulWeightOnly.rule(ctx), GemmWeightOnly.rule(ctx), FusedMatMulWeightOnly.rule(ctx),
        GatherWeightOnly.rule(ctx),
    ])
