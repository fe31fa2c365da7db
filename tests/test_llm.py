"""The shared real LLM (smollm2-2l: SmolLM2-135M cut to 2 layers, onnxruntime-genai layout, tied table).

Skipped cleanly when ../shared is absent. (Generation in onnxruntime-genai with a quantized folder:
tests/test_llm_shared.py.)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest

from ort_wq import WeightOnlyConfig, quantize

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-2l"
pytestmark = pytest.mark.skipif(not (SMOLLM / "model.onnx").exists(), reason="../shared/models/smollm2-2l is absent")


def _logits(path: Path, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    from ort_wq.feeds import make_feeds
    from ort_wq.model_io import load_model

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(["logits"], make_feeds(load_model(path), input_ids=ids, folder=path.parent))[0]


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    out = tmp_path_factory.mktemp("smollm2") / "model"
    out.mkdir()
    for f in SMOLLM.iterdir():  # the side files onnxruntime-genai reads
        if f.suffix in (".json", ".jinja"):
            shutil.copy(f, out / f.name)
    _, report = quantize(str(SMOLLM / "model.onnx"), WeightOnlyConfig(), output=out / "model.onnx", return_report=True)
    return out, report


def test_default_output_stores_the_tied_table_once_and_no_large_float(quantized):
    out, report = quantized
    model = onnx.load(out / "model.onnx")
    big_floats = [t.name for t in model.graph.initializer
                  if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16) and np.prod(t.dims) > 1_000_000]
    assert big_floats == []
    tied = [t for t in report.tensors if len(t.consumers) == 2]
    assert [t.name for t in tied] == ["lm_head.MatMul.weight"] and not tied[0].float_kept
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 11 and ops.count("GatherBlockQuantized") == 1
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    fp32 = sum(f.stat().st_size for f in SMOLLM.iterdir() if f.name.startswith("model.onnx"))
    assert size < fp32 / 5  # 144 MB of fp32 -> ~23 MB: the table is not kept twice
    assert report.weight_bytes_after == sum(t.bytes_after for t in report.tensors) < 0.2 * report.weight_bytes_before
    assert [i.name for i in model.graph.input] == [i.name for i in onnx.load(SMOLLM / "model.onnx").graph.input]


def test_default_output_follows_the_original(quantized):
    out, _ = quantized
    ids = np.load(SMOLLM / "dev_tokens.npz")["input_ids"][:2, :64]
    ref = _logits(SMOLLM / "model.onnx", ids)
    got = _logits(out / "model.onnx", ids)
    agree = np.mean(ref.argmax(-1) == got.argmax(-1))
    assert np.isfinite(got).all() and agree > 0.5, agree
