"""ort-wq: weight-only quantization of ONNX models for onnxruntime.

The public API: the five weight-only utilities (``quant_tensor``, ``qdq_tensor``, ``pad_tensor``,
``make_matmul_weight_only_node``, ``prepare_inputs``), the packing functions, and the model
level entry points ``quantize``, ``validate`` and ``evaluate`` (model files or model folders).
"""

from __future__ import annotations

from .packing import (
    pack_fpq4_blob,
    pack_nbits_weight,
    pack_nbits_zero_points,
    unpack_fpq4_blob,
    unpack_nbits_weight,
    unpack_nbits_zero_points,
)
from .config import NodeOverride, WeightOnlyConfig
from .quantize import quantize
from .report import QuantReport
from .utility import make_matmul_weight_only_node, pad_tensor, prepare_inputs, qdq_tensor, quant_tensor

from .validate import ValidationInputError, ValidationReport, validate  # noqa: E402  (the function)
from .evaluate import EvalResult, evaluate  # noqa: E402
from .text import CalibrationText  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name: str):
    """``ort_wq.ops`` (the reference ops) is imported on first use: it is not needed to quantize."""
    if name == "ops":
        import importlib

        return importlib.import_module(".ops", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "__version__",
    "NodeOverride",
    "QuantReport",
    "WeightOnlyConfig",
    "quantize",
    "validate",
    "evaluate",
    "EvalResult",
    "CalibrationText",
    "ValidationReport",
    "ValidationInputError",
    "ops",
    "make_matmul_weight_only_node",
    "pad_tensor",
    "prepare_inputs",
    "qdq_tensor",
    "quant_tensor",
    "pack_nbits_weight",
    "unpack_nbits_weight",
    "pack_nbits_zero_points",
    "unpack_nbits_zero_points",
    "pack_fpq4_blob",
    "unpack_fpq4_blob",
]
