"""The output file is no larger than onnxruntime's quantizer's at the same flags, byte for byte.

Both quantizers run here on the same model (MatMuls only: onnxruntime's quantizer leaves Gather
tables in float), each writing ``model.onnx`` + external data into its own folder; the total
bytes on disk are compared. Round-to-nearest gives the same quantized bytes under the same
initializer names, so what differs is only what surrounds them: names, value_info, metadata.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.packing import unpack_nbits_zero_points

S2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "smollm2-2l"
SETTINGS = [(32, True), (32, False), (128, True), (128, False)]
RULE_TAG = "pkg.onnxscript.rewriter.rule_name"


def _generated(folder: Path) -> Path:
    """A small decoder-shaped model, external data, named nodes, no value_info (as many exporters write)."""
    rng = np.random.default_rng(0)
    d, f, v = 256, 512, 1000
    inits = [numpy_helper.from_array(rng.standard_normal((v, d)).astype(np.float32), "embed.weight")]
    nodes = [helper.make_node("Gather", ["embed.weight", "ids"], ["h0"], name="/embed/Gather")]
    prev = "h0"
    for i in range(3):
        for proj, (k, n) in (("up", (d, f)), ("down", (f, d))):
            w = f"layers.{i}.{proj}.weight"
            inits.append(numpy_helper.from_array((rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32), w))
            nodes.append(helper.make_node("MatMul", [prev, w], [f"/layers.{i}/{proj}/output_0"], name=f"/layers.{i}/{proj}/MatMul"))
            prev = f"/layers.{i}/{proj}/output_0"
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["B", "S"])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, ["B", "S", d])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)
    path = folder / "model.onnx"
    onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
    return path


def _onnxruntime(src: Path, out: Path, block: int, sym: bool, monkeypatch) -> None:
    """``python -m onnxruntime.quantization.matmul_nbits_quantizer`` (DEFAULT), saved with external data."""
    from onnxruntime.quantization.matmul_nbits_quantizer import DefaultWeightOnlyQuantConfig, MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.ERROR)
    config = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=sym, accuracy_level=4, bits=4)
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=4, block_size=block, is_symmetric=sym, accuracy_level=4,
                             algo_config=config)
    q.process()
    monkeypatch.chdir(out.parent)  # onnx checks the data file's name against the working folder
    q.model.save_model_to_file(str(out), use_external_data_format=True)


def _total(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir())


def _compare(src: Path, tmp_path: Path, block: int, sym: bool, monkeypatch) -> None:
    ours, theirs = tmp_path / f"ours-{block}-{sym}", tmp_path / f"ort-{block}-{sym}"
    ours.mkdir()
    theirs.mkdir()
    cfg = WeightOnlyConfig(bits=4, block_size=block, symmetric=sym, accuracy_level=4, op_types=("MatMul",))
    quantize(str(src), cfg, output=ours / "model.onnx")
    _onnxruntime(src, theirs / "model.onnx", block, sym, monkeypatch)
    a = onnx.load(str(ours / "model.onnx"))
    b = onnx.load(str(theirs / "model.onnx"))
    qa = sorted(n.name for n in a.graph.node if n.op_type == "MatMulNBits")
    assert qa and qa == sorted(n.name for n in b.graph.node if n.op_type == "MatMulNBits")  # <node>_Q4
    inits_a = {t.name: numpy_helper.to_array(t) for t in a.graph.initializer}
    inits_b = {t.name: numpy_helper.to_array(t) for t in b.graph.initializer}
    assert inits_a.keys() == inits_b.keys()  # <weight>_Q4, _scales, _zero_points; the float weights gone
    for name, arr in inits_a.items():
        want = inits_b[name]
        if name.endswith("_zero_points") and arr.shape[1] * 2 > (kb := inits_a[name[:-12] + "_scales"].shape[1]):
            # the unused high nibble of a row's last byte: 0 here, 8 in onnxruntime's; never read
            arr, want = unpack_nbits_zero_points(arr, 4, kb), unpack_nbits_zero_points(want, 4, kb)
        np.testing.assert_array_equal(arr, want, err_msg=name)
    values = {v for n in a.graph.node for v in (*n.input, *n.output)} | {i.name for i in a.graph.input}
    assert all(v.name in values and v.name not in inits_a for v in a.graph.value_info)  # nothing stale or repeated
    assert not any(p.key == RULE_TAG for n in a.graph.node for p in n.metadata_props)
    assert _total(ours) <= _total(theirs), (block, sym, _total(ours), _total(theirs))


@pytest.mark.parametrize(("block", "sym"), SETTINGS)
def test_generated_model_no_larger_than_onnxruntime(tmp_path, monkeypatch, block, sym):
    src_dir = tmp_path / "src"
    src_dir.mkdir()
    _compare(_generated(src_dir), tmp_path, block, sym, monkeypatch)


@pytest.mark.skipif(not (S2 / "model.onnx").exists(), reason="../shared/models/smollm2-2l is absent")
@pytest.mark.parametrize(("block", "sym"), SETTINGS)
def test_smollm2_no_larger_than_onnxruntime(tmp_path, monkeypatch, block, sym):
    _compare(S2 / "model.onnx", tmp_path, block, sym, monkeypatch)
