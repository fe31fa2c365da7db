"""``quantize()``: the model-level entry point (Python API of ``ort-wq quantize``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import onnx
import onnx_ir as ir

from .config import WeightOnlyConfig
from .model_io import PROTO_LIMIT, ModelInputError, as_ir_model, has_external_data, model_nbytes
from .output_files import AtomicModelWriter, same_file
from .report import QuantReport


def quantize(
    model: Any,
    config: WeightOnlyConfig | None = None,
    *,
    output: str | os.PathLike | None = None,
    calibration: Any = None,
    progress: bool = False,
    return_report: bool = False,
) -> Any:
    """Quantize the constant weights of every MatMul/Gemm/FusedMatMul and Gather table in ``model``
    (each tensor once, however many nodes read it; ``config.op_types`` chooses the consumers).

    ``model``: an ``onnx.ModelProto`` (not modified; a new one is returned), an ``onnx_ir.Model``
    (modified in place and returned) or a path (then ``output`` is required and the output path
    is returned; the input file is never modified). With ``output`` the result is saved
    atomically, with external data when the input had it or the result exceeds 2 GB.
    A folder path (one ``.onnx`` plus side files such as ``genai_config.json`` and tokenizer
    files) gives a folder ``output``: the model under the same name and copies of the side files.
    ``calibration``: for algorithms that need it, an onnxruntime ``CalibrationDataReader``, a
    list of input dicts or an :class:`ort_wq.CalibrationText`. ``return_report=True`` returns ``(result, QuantReport)``.
    """
    config = config or WeightOnlyConfig()
    config.validate()
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        from .folders import quantize_folder

        return quantize_folder(model, output, config, calibration=calibration, progress=progress,
                               return_report=return_report)
    if isinstance(model, (str, os.PathLike)):
        if output is None:
            raise ModelInputError("quantize(path) needs output=...: the input file is never modified")
        if same_file(Path(model), Path(output)):
            raise ModelInputError(f"output {os.fspath(output)!r} is the input model; choose another path")
    ir_model, kind = as_ir_model(model)
    before = model_nbytes(ir_model)
    external = has_external_data(ir_model) or before >= PROTO_LIMIT
    stats = None
    from .algorithms import get_algorithm

    if get_algorithm(config.algorithm)[1]:
        if calibration is None:
            raise ValueError(f"algorithm {config.algorithm!r} needs calibration data (calibration=...)")
        from .algorithms.calibration import LayerwiseStats

        stats = LayerwiseStats(ir_model, calibration, config, progress=progress,
                               model_path=model if kind == "path" else None)
    from .transforms import WeightOnlyQuantPass

    def run(sink=None) -> QuantReport:
        qpass = WeightOnlyQuantPass(config, stats=stats, progress=progress, sink=sink)
        qpass(ir_model)
        return qpass.last_report  # type: ignore[return-value]

    if output is None:
        report = run()
    else:
        # with external data, quantized tensors stream to disk as they are finished
        with AtomicModelWriter(output, external) as writer:
            writer.check_inputs(ir_model, source=model if kind == "path" else None)
            report = run(writer.sink)
            writer.finish(ir_model)
    report.model_bytes_before = before
    report.model_bytes_after = model_nbytes(ir_model)
    result: Any
    if kind == "proto":
        result = ir.serde.serialize_model(ir_model)
    elif kind == "path":
        result = os.fspath(output)
    else:
        result = ir_model
    return (result, report) if return_report else result


__all__ = ["quantize"]
_ = onnx
