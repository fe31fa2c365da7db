"""prepare_inputs reads every calibration batch and gives session options with the extensions library."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnxruntime.quantization import CalibrationDataReader

from ort_wq import prepare_inputs

from .models import matmul_model


class Reader(CalibrationDataReader):
    def __init__(self, n):
        self.data = [{"x": np.full((2, 64), i, np.float32)} for i in range(n)]
        self.pos = 0
        self.rewound = 0

    def get_next(self):
        if self.pos >= len(self.data):
            return None
        self.pos += 1
        return self.data[self.pos - 1]

    def rewind(self):
        self.pos = 0
        self.rewound += 1


@pytest.mark.parametrize("kind", ["proto", "ir", "path"])
def test_reads_all_batches(tmp_path, kind):
    model, _ = matmul_model()
    if kind == "ir":
        model = ir.serde.deserialize_model(model)
    elif kind == "path":
        path = tmp_path / "m.onnx"
        onnx.save_model(model, path, save_as_external_data=True, location="m.onnx.data", size_threshold=0)
        model = str(path)
    reader = Reader(3)
    reader.get_next()  # a partly consumed reader is rewound first
    inputs, so = prepare_inputs(model, reader, ["CPUExecutionProvider"])
    assert [float(b["x"][0, 0]) for b in inputs] == [0.0, 1.0, 2.0]
    assert isinstance(so, ort.SessionOptions)
    assert reader.rewound == 2 and reader.pos == 0


def test_session_options_run_extension_ops():
    """The options carry onnxruntime-extensions: a graph with one of its ops loads and runs."""
    from onnx import TensorProto, helper

    node = helper.make_node("StringLower", ["s"], ["t"], domain="ai.onnx.contrib")
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("s", TensorProto.STRING, [None])],
                              [helper.make_tensor_value_info("t", TensorProto.STRING, [None])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.contrib", 1)])
    _, so = prepare_inputs(model, Reader(0), None)
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    assert sess.run(None, {"s": np.array(["AbC"])})[0].tolist() == ["abc"]


def test_bad_reader():
    with pytest.raises(ValueError, match="CalibrationDataReader"):
        prepare_inputs(matmul_model()[0], object(), None)
