"""Weights that are not finite, or so large that a block's range overflows float32, on the command line."""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from ort_wq.cli import main

from .helpers import run_model
from .models import matmul_model


def _model(tmp_path, values):
    model, w = matmul_model(k=64, n=16)
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(values(w).astype(np.float32), "W"))
    src = tmp_path / "m.onnx"
    onnx.save_model(model, src)
    return src


@pytest.mark.parametrize("values", [
    lambda w: np.where(np.abs(w) > 1.5, np.nan, w),
    lambda w: np.where(w > 1.5, np.inf, w),
])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, capsys, values):
    src = _model(tmp_path, values)
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    assert main(["quantize", str(src), str(tmp_path / "q.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "'W'" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert hashlib.sha256(src.read_bytes()).hexdigest() == before


@pytest.mark.parametrize("asym", [False, True])
def test_weights_near_float32_max_give_a_finite_model(tmp_path, capsys, asym):
    src = _model(tmp_path, lambda w: w / np.abs(w).max() * np.float32(1e38))  # (scaled after: no inf)
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), str(out), "--asym" if asym else "--sym", "--accuracy-level", "0", "--quiet"]) == 0
    w = numpy_helper.to_array(onnx.load(src).graph.initializer[0]).astype(np.float64)
    x = np.random.default_rng(0).standard_normal((2, 64)).astype(np.float32) * np.float32(1e-30)
    (y,) = run_model(out, {"x": x})
    assert np.isfinite(y).all()
    ref = x.astype(np.float64) @ w
    assert np.linalg.norm(y - ref) / np.linalg.norm(ref) < 0.2
