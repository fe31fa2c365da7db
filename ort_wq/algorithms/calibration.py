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
    model_path: str | os.PathLike | None = None,
) -> dict[str, LayerStats]:
    """Run the calibration batches and return the statistics of every target activation.

    ``calibration``: a ``CalibrationDataReader``, a list of input dicts or a
    :class:`ort_wq.text.CalibrationText` (tokenized here; ``model_path`` locates the default
    tokenizer and the config files that give the KV-cache shapes).
    The session computes only what the targets need: its outputs are the target activations,
    and the nodes they do not depend on (an LLM's output head and its logits) are left out.
    """
    import onnxruntime as ort

    targets = target_activations(model, config)
    stats = {name: LayerStats(k) for name, k in targets.items()}
    if not targets:
        return stats
    specs = input_values(model)
    batches, total = _batches(model, calibration, model_path)
    values = {v.name for node in model.graph for v in node.outputs} | {v.name for v in model.graph.inputs}
    names = [n for n in targets if n in values]
    so = ort.SessionOptions()
    so.log_severity_level = 3
    # memory: no second, pre-packed copy of every weight, no arena kept at its high-water mark
    so.add_session_config_entry("session.disable_prepacking", "1")
    so.enable_cpu_mem_arena = False
    sess = inference_session(model, so, outputs=names)
    if progress:
        from tqdm import tqdm

        batches = tqdm(batches, desc="calibrating", unit="batch", total=total, leave=False)
    seen = 0
    for i, batch in enumerate(batches):
        feeds = check_feeds(batch, specs, f"model (calibration batch {i})")
        outs = sess.run(names, feeds)
        for name, x in zip(names, outs):
            stats[name].update(x)
        del outs
        seen += 1
    if not seen:
        raise ModelInputError("calibration data holds no batch")
    return stats


def _batches(model: ir.Model, calibration: Any, model_path: Any) -> tuple[Iterable[dict], int | None]:
    """The calibration batches (a lazy iterable) and their number when known."""
    from ..text import CalibrationText

    if isinstance(calibration, CalibrationText):
        from ..feeds import decoder_layout, make_feeds
        from ..folders import model_folder

        windows = calibration.windows(model_path)
        folder = model_folder(model_path) if model_path is not None else None
        layout = decoder_layout(model, folder)
        if layout.input_ids is None:
            raise ModelInputError("calibration text needs a model with an 'input_ids' input")
        return (make_feeds(model, input_ids=w[None], layout=layout) for w in windows), len(windows)
    total = len(calibration) if isinstance(calibration, (list, tuple)) else None
    return iter_batches(calibration), total
