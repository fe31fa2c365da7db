"""Calibration: the input activations of the target MatMuls, reduced to per-layer statistics.

One onnxruntime pass per batch over a copy of the model whose graph outputs include every
target activation; each batch is folded into :class:`LayerStats` (``X^T X`` and per-channel
``sum |x|``) and dropped, so memory is bounded by the K x K matrices, not by the data.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir

from ..config import WeightOnlyConfig
from ..model_io import ModelInputError, inference_session
from ..validate_inputs import check_feeds, input_values, load_npz
from .base import LayerStats


def npz_batches(path: str | os.PathLike, batch_size: int = 8, max_batches: int | None = None) -> list[dict[str, np.ndarray]]:
    """Batches from an ``.npz`` of arrays keyed by input name, batch along axis 0."""
    p = Path(path)
    arrays = load_npz(p)
    if not arrays:
        raise ModelInputError(f"calibration file {p}: holds no arrays")
    rows = {k: (v.shape[0] if v.ndim else 0) for k, v in arrays.items()}
    if len(set(rows.values())) != 1 or 0 in rows.values():
        raise ModelInputError(f"calibration file {p}: arrays need the same batch size along axis 0, got {rows}")
    bad = [k for k, v in arrays.items() if v.dtype.kind in "fc" and not np.isfinite(v).all()]
    if bad:
        raise ModelInputError(f"calibration file {p}: array {bad[0]!r} holds NaN or infinite values; "
                              "calibration needs finite inputs")
    n = next(iter(rows.values()))
    batches = [{k: v[i : i + batch_size] for k, v in arrays.items()} for i in range(0, n, batch_size)]
    return batches[:max_batches] if max_batches else batches


def iter_batches(calibration: Any) -> Iterator[dict[str, np.ndarray]]:
    """Batches from a ``CalibrationDataReader`` (``get_next`` until ``None``) or an iterable of dicts."""
    if hasattr(calibration, "get_next"):
        rewind = getattr(calibration, "rewind", None)
        if callable(rewind):
            rewind()
        while (batch := calibration.get_next()) is not None:
            yield dict(batch)
        if callable(rewind):
            rewind()
        return
    if isinstance(calibration, dict):
        yield calibration
        return
    if isinstance(calibration, Iterable):
        yield from (dict(b) for b in calibration)
        return
    raise ValueError(f"calibration must be a CalibrationDataReader or a list of input dicts, got {type(calibration).__name__}")


def target_activations(model: ir.Model, config: WeightOnlyConfig) -> dict[str, int]:
    """Activation value name -> K, for every main-graph consumer the transform would convert."""
    from ort_wq.transforms.targets import find_targets

    return find_targets(model, config).activations()


def collect_stats(
    model: ir.Model,
    calibration: Any,
    config: WeightOnlyConfig,
    *,
    progress: bool = False,
) -> dict[str, LayerStats]:
    """Run the calibration batches and return the statistics of every target activation."""
    import onnxruntime as ort

    targets = target_activations(model, config)
    stats = {name: LayerStats(k) for name, k in targets.items()}
    if not targets:
        return stats
    specs = input_values(model)
    known = {v.name for v in model.graph.outputs}
    values = {v.name: v for node in model.graph for v in node.outputs}
    values.update({v.name: v for v in model.graph.inputs})
    extra = [values[n] for n in targets if n in values and n not in known]
    model.graph.outputs.extend(extra)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    try:
        sess = inference_session(model, so)
        names = list(targets)
        batches = iter_batches(calibration)
        if progress:
            from tqdm import tqdm

            batches = tqdm(batches, desc="calibrating", unit="batch", leave=False)
        seen = 0
        for i, batch in enumerate(batches):
            feeds = check_feeds(batch, specs, f"model (calibration batch {i})")
            outs = sess.run(names, feeds)
            for name, x in zip(names, outs):
                stats[name].update(x)
            seen += 1
        if not seen:
            raise ModelInputError("calibration data holds no batch")
    finally:
        for v in extra:
            model.graph.outputs.remove(v)
    return stats
