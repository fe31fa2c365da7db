"""The shared real models (skipped cleanly when ../shared is absent)."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from ort_wq import WeightOnlyConfig, quantize

from .helpers import run_model

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCH))
import _minilm as M  # noqa: E402

MAGIKA = M.SHARED / "models" / "magika" / "model.onnx"

# measured: default settings (4-bit asym block 32, rtn) give 0.9716 mean cosine on rows 128-255
MINILM_MIN_COSINE = 0.965


@pytest.mark.skipif(not M.available(), reason="../shared/models/minilm is absent")
def test_minilm_default_quality(tmp_path):
    feeds = M.inputs(slice(128, 256))
    ref = M.embed(M.MINILM, feeds)
    out = tmp_path / "q.onnx"
    _, report = quantize(str(M.MINILM), WeightOnlyConfig(), output=out, return_report=True)
    assert sum(c.new_op == "MatMulNBits" for c in report.converted) == 36
    assert sum(c.new_op == "GatherBlockQuantized" for c in report.converted) == 3  # word, position, type
    assert (tmp_path / "q.onnx.data").is_file()  # the input had external data
    cos, nn = M.quality(ref, M.embed(out, feeds))
    assert cos >= MINILM_MIN_COSINE, cos
    assert nn >= 0.8


@pytest.mark.skipif(not MAGIKA.exists(), reason="../shared/models/magika is absent")
def test_magika_padding_k_257(tmp_path):
    model = onnx.load(MAGIKA)
    q, report = quantize(model, WeightOnlyConfig(accuracy_level=0), return_report=True)
    assert any(c.k == 257 for c in report.converted)
    rng = np.random.default_rng(0)
    name = model.graph.input[0].name
    x = rng.integers(0, 257, size=(16, 2048)).astype(np.int32)
    ref = run_model(model, {name: x})[0]
    out = run_model(q, {name: x})[0]
    assert np.mean(ref.argmax(-1) == out.argmax(-1)) >= 0.9
    assert np.abs(out - ref).max() < 0.1 * np.abs(ref).max() + 0.05
