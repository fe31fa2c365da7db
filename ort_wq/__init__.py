"""ort-wq: weight-only quantization of ONNX models for onnxruntime.

The public API: the five weight-only utilities (``quant_tensor``, ``qdq_tensor``, ``pad_tensor``,
``make_matmul_weight_only_node``, ``prepare_inputs``), the packing functions, and the model
level entry points ``quantize``, ``validate`` and ``evaluate`` (model files or model folders).
"""

from __future__ import annotations

import importlib
import sys
import types

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

from .evaluate import EvalResult, evaluate  # noqa: E402
from .text import CalibrationText  # noqa: E402

__version__ = "0.1.0"

# Imported on first use, as they are not needed to quantize: ``ort_wq.ops`` (the reference ops)
# and ``validate`` with its classes (they import onnxruntime and the ops).
_LAZY = {"validate": ".validate", "ValidationReport": ".validate", "ValidationInputError": ".validate"}


class _Package(types.ModuleType):
    """The package module, whose lazy exports are properties.

    Importing the submodule ``ort_wq.validate`` sets the package attribute ``validate`` to the
    module; as a property the name keeps meaning the function, as when it was imported eagerly.
    """

    def __dir__(self):
        return sorted({*super().__dir__(), *_LAZY, "ops"})


def _lazy(name: str, module: str) -> property:
    def get(self):
        return getattr(importlib.import_module(module, __name__), name)

    def ignore(self, value) -> None:  # the import system setting the submodule of the same name
        pass

    return property(get, ignore, doc=f"``ort_wq{module}.{name}``")


for _name, _module in _LAZY.items():
    setattr(_Package, _name, _lazy(_name, _module))
sys.modules[__name__].__class__ = _Package


def __getattr__(name: str):
    if name == "ops":
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
