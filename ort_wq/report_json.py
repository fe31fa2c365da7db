"""Machine-readable reports (``--report-json FILE``) of quantize, inspect, validate and eval.

Every report is one JSON object with ``"tool": "ort-wq"``, ``"version"``, ``"command"`` and the
command's data. Report objects (dataclasses) are serialised field by field
(``dataclasses.asdict``), so fields added to them appear in the JSON without changes here; the
derived values listed per command (sizes, verdicts) are added under fixed keys. Non-finite
floats become ``null``. The file is written atomically (a temporary file renamed into place).
The schema is documented in the README ("Report JSON").
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["jsonable", "quantize_report", "inspect_report", "validate_report", "eval_report", "write_report"]


def jsonable(obj: Any) -> Any:
    """Plain JSON values for dataclasses, mappings, sequences, numpy scalars/arrays and paths."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, Mapping):
        return {str(k) if not isinstance(k, tuple) else "/".join(map(str, k)): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "tolist") and hasattr(obj, "dtype"):  # numpy scalar or array
        return jsonable(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return str(obj)


def _envelope(command: str, **data: Any) -> dict[str, Any]:
    from . import __version__

    return {"tool": "ort-wq", "version": __version__, "command": command, **jsonable(data)}


def quantize_report(report: Any, *, input: str, output: str, config: Any = None) -> dict[str, Any]:
    """``QuantReport`` fields plus ``weight_bytes_before/after``, ``counts`` ({"op/bits": n})."""
    derived = {}
    for name in ("weight_bytes_before", "weight_bytes_after"):
        if hasattr(report, name):
            derived[name] = getattr(report, name)
    if hasattr(report, "counts"):
        derived["counts"] = {f"{op}/{bits}": n for (op, bits), n in sorted(report.counts().items())}
    return _envelope("quantize", input=input, output=output, config=config, report=report, **derived)


def inspect_report(rows: list[dict], *, model: str) -> dict[str, Any]:
    """``nodes``: one object per MatMul/Gemm/quantized node (the rows of ``ort-wq inspect``)."""
    return _envelope("inspect", model=model, nodes=rows)


def validate_report(report: Any, *, original: str, quantized: str, max_rel_error: float, min_cosine: float) -> dict[str, Any]:
    """``ValidationReport`` fields plus ``passed``, ``failures`` and the thresholds."""
    return _envelope(
        "validate", original=original, quantized=quantized, report=report,
        thresholds={"max_rel_error": max_rel_error, "min_cosine": min_cosine},
        passed=report.passed(max_rel_error, min_cosine), failures=report.failures(max_rel_error, min_cosine),
    )  # fmt: skip


def eval_report(result: Any, *, original: str, quantized: str) -> dict[str, Any]:
    """``EvalResult`` fields (``original.perplexity``, ``quantized.perplexity``, ``kl_divergence``,
    ``top1_agreement``, ``windows`` ...)."""
    return _envelope("eval", original_path=original, quantized_path=quantized, **jsonable(result))


def write_report(path: str | os.PathLike, data: Mapping[str, Any]) -> None:
    """Write ``data`` as indented JSON to ``path`` atomically."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"{parent}: folder for --report-json does not exist")
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, allow_nan=False)
            f.write("\n")
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
