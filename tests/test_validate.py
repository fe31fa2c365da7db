"""ort_wq.validate and the ``ort-wq validate`` command on small real models run by onnxruntime."""

from __future__ import annotations

import argparse

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from ort_wq import make_matmul_weight_only_node, pad_tensor, quant_tensor
from ort_wq.model_io import load_model, save_model
from ort_wq.packing import pack_nbits_zero_points
from ort_wq.validate import (
    ValidationInputError,
    add_validate_arguments,
    generate_inputs,
    run_validate_command,
    validate,
)

VOCAB, DIM, HIDDEN = 50, 64, 96


def tiny_lm(with_mask: bool = False) -> onnx.ModelProto:
    """ids -> embedding Gather -> MatMul -> Relu -> MatMul -> logits (vocabulary 50)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, DIM)).astype(np.float32), "E"),
        numpy_helper.from_array((rng.standard_normal((DIM, HIDDEN)) / 8).astype(np.float32), "W1"),
        numpy_helper.from_array((rng.standard_normal((HIDDEN, VOCAB)) / 10).astype(np.float32), "W2"),
    ]
    nodes = [
        helper.make_node("Gather", ["E", "ids"], ["x"]),
        helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
        helper.make_node("Relu", ["h"], ["r"]),
        helper.make_node("MatMul", ["r", "W2"], ["logits"], name="fc2"),
    ]
    inputs = [helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "seq"])]
    if with_mask:  # multiplies the logits: ones keep them
        inputs.append(helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"]))
        nodes[-1].output[0] = "raw"
        nodes += [
            helper.make_node("Cast", ["attention_mask"], ["m"], to=TensorProto.FLOAT),
            helper.make_node("Unsqueeze", ["m", "ax"], ["m3"]),
            helper.make_node("Mul", ["raw", "m3"], ["logits"]),
        ]
        inits.append(numpy_helper.from_array(np.array([-1], np.int64), "ax"))
    logits = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])
    graph = helper.make_graph(nodes, "lm", inputs, [logits], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def quantize(model, bits=4, op_type="MatMulNBits", accuracy_level=0, bs=32):
    """Every MatMul to a weight-only node (asymmetric, uint8 zero points)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    weights = {i.name: numpy_helper.to_array(i) for i in out.graph.initializer}
    nodes = []
    for node in out.graph.node:
        if node.op_type != "MatMul":
            nodes.append(node)
            continue
        w = weights[node.input[1]]
        k, n = w.shape
        kb = -(-k // bs)
        q, scale, zp = quant_tensor(pad_tensor(w, bs, kb).T, bits, bs, "asym", "uint")
        new, inits = make_matmul_weight_only_node(node, (k, n), bits, bs, kb, q, scale, zp, accuracy_level,
                                                  op_type=op_type)  # fmt: skip
        nodes.append(new)
        out.graph.initializer.extend(inits)
    keep = [i for i in out.graph.initializer if i.name not in ("W1", "W2")]
    out.graph.ClearField("node")
    out.graph.node.extend(nodes)
    out.graph.ClearField("initializer")
    out.graph.initializer.extend(keep)
    out.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return out


def replace_init(model, name, array):
    init = next(i for i in model.graph.initializer if i.name == name)
    init.CopyFrom(numpy_helper.from_array(array, name))


def swap_nibbles(model, node_name="fc1_Q4"):
    """Tamper with a 4-bit weight: swap the two values of every byte."""
    name = next(n for n in model.graph.node if n.name == node_name).input[1]
    b = numpy_helper.to_array(next(i for i in model.graph.initializer if i.name == name))
    replace_init(model, name, ((b >> 4) | (b << 4)).astype(np.uint8))
    return model


def test_faithful_model_passes_and_tampered_packing_fails():
    orig = tiny_lm()
    good = validate(orig, quantize(orig, bits=8))
    assert good.passed(), good.format_table()
    m = good.outputs[0]
    assert m.name == "logits" and m.shape == (2, 8, VOCAB)
    assert m.rel_l2_error < 0.02 and m.cosine > 0.999 and m.top1_agreement > 0.9 and m.max_abs_error > 0

    q4 = quantize(orig, bits=4)
    assert validate(orig, q4).passed(max_rel_error=0.2, min_cosine=0.98)
    bad = validate(orig, swap_nibbles(q4), reference=True)
    assert not bad.passed(max_rel_error=0.2, min_cosine=0.98)
    assert bad.outputs[0].rel_l2_error > 0.5
    # the built-in kernel and the reference read the same swapped bytes alike: only the outputs show it
    assert all(n.ok for n in bad.nodes) and len(bad.nodes) == 2
    assert "FAIL" in bad.format_table(0.2, 0.98) and "relative L2 error" in bad.format_table(0.2, 0.98)


def test_reference_check_compares_each_node_with_the_builtin_kernel():
    orig = tiny_lm()
    exact = validate(orig, quantize(orig, bits=4), reference=True)
    assert [n.name for n in exact.nodes] == ["fc1_Q4", "fc2_Q4"]
    assert all(n.ok and n.rel_l2_error < 1e-5 and n.limit == 1e-3 for n in exact.nodes)
    assert exact.reference_outputs[0].rel_l2_error < 1e-5
    # accuracy_level 4 quantizes activations to int8: a real, small, per-node difference
    fast = validate(orig, quantize(orig, bits=4, accuracy_level=4), reference=True)
    assert all(n.ok and 1e-5 < n.rel_l2_error < n.limit for n in fast.nodes), fast.format_table()
    assert "per quantized node" in fast.format_table()


def test_zero_points_packed_across_rows_are_caught():
    """The classic packing bug (zero points packed flat across rows) with an odd number of blocks."""
    orig = tiny_lm()
    q = quantize(orig, bits=4)
    node = next(n for n in q.graph.node if n.name == "fc2_Q4")  # K=96, block 32: 3 blocks
    zp = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == node.input[3]))
    per_row = np.stack([zp[:, 0] & 0xF, zp[:, 0] >> 4, zp[:, 1] & 0xF], axis=1)  # [N, 3]
    replace_init(q, node.input[3], pack_nbits_zero_points(per_row.reshape(1, -1), 4).reshape(-1))
    report = validate(orig, q, reference=True)
    assert not report.passed()
    assert report.quantized_runtime.startswith("the reference ops")
    assert any("fc2_Q4" in f and "flat across rows" in f for f in report.failures())


def test_runs_on_the_reference_ops_where_the_builtin_kernel_is_missing():
    """8-bit weights with float zero points: valid MatMulNBits the CPU kernel refuses to load."""
    orig = tiny_lm()
    q = quantize(orig, bits=8)
    for node in q.graph.node:
        if node.op_type == "MatMulNBits":
            zp = numpy_helper.to_array(next(i for i in q.graph.initializer if i.name == node.input[3]))
            replace_init(q, node.input[3], zp.astype(np.float32))
    report = validate(orig, q, reference=True)
    assert report.quantized_runtime.startswith("the reference ops") and "8-bit" in report.quantized_runtime
    assert report.passed(), report.format_table()
    assert not report.nodes and any("skipped" in n for n in report.notes)


def test_generated_inputs_respect_the_signature():
    feeds = generate_inputs(tiny_lm(with_mask=True), seed=1)
    assert set(feeds) == {"ids", "attention_mask"}
    assert feeds["ids"].shape == feeds["attention_mask"].shape == (2, 8)
    assert feeds["ids"].dtype == np.int64 and 0 <= feeds["ids"].min() and feeds["ids"].max() < VOCAB
    assert feeds["ids"].max() > 0 and (feeds["attention_mask"] == 1).all()
    report = validate(tiny_lm(with_mask=True), quantize(tiny_lm(with_mask=True), bits=8))
    assert report.passed()


def test_inputs_and_data_reader():
    orig, q = tiny_lm(), quantize(tiny_lm(), bits=8)
    ids = np.arange(12, dtype=np.int64).reshape(3, 4) % VOCAB
    report = validate(orig, q, inputs={"ids": ids})
    assert report.outputs[0].shape == (3, 4, VOCAB) and report.batches == 1

    class Reader:
        def __init__(self):
            self.batches, self.i = [{"ids": ids[:1]}, {"ids": ids[1:]}, {"ids": ids}], 0

        def get_next(self):
            self.i += 1
            return self.batches[self.i - 1] if self.i <= len(self.batches) else None

        def rewind(self):
            self.i = 0

    reader = Reader()
    assert validate(orig, q, data_reader=reader).batches == 3 and reader.i == 0


@pytest.mark.parametrize(
    "feeds, match",
    [
        ({"idz": np.zeros((1, 2), np.int64)}, r"missing 'ids'; unexpected 'idz'"),
        ({"ids": np.zeros((1, 2), np.float32)}, r"input 'ids' is float32 but the original model expects int64"),
        ({"ids": np.zeros((2,), np.int64)}, r"input 'ids' has shape \[2\]; the original model expects \[batch, seq\]"),
    ],
)
def test_mismatched_inputs_are_named(feeds, match):
    with pytest.raises(ValidationInputError, match=match):
        validate(tiny_lm(), quantize(tiny_lm(), bits=8), inputs=feeds)


def test_external_data_models(tmp_path):
    """Paths and in-memory models whose weights live in external data files."""
    orig, q = tiny_lm(), quantize(tiny_lm(), bits=8)
    paths = []
    for name, model in (("orig", orig), ("quant", q)):
        folder = tmp_path / name
        folder.mkdir()
        save_model(ir.serde.deserialize_model(model), folder / "model.onnx", external_data=True)
        assert (folder / "model.onnx.data").stat().st_size > 1000
        paths.append(folder / "model.onnx")
    by_path = validate(*paths, reference=True)
    assert by_path.passed() and all(n.ok for n in by_path.nodes)
    in_memory = validate(load_model(paths[0]), load_model(paths[1]), reference=True)  # external tensors, no copy
    assert in_memory.outputs[0].rel_l2_error == pytest.approx(by_path.outputs[0].rel_l2_error)


def cli(*argv):
    parser = argparse.ArgumentParser(prog="ort-wq validate")
    add_validate_arguments(parser)
    return run_validate_command(parser.parse_args([str(a) for a in argv]))


def test_cli_exit_codes(tmp_path, capsys):
    orig, q8 = tiny_lm(), quantize(tiny_lm(), bits=8)
    bad = swap_nibbles(quantize(tiny_lm(), bits=4))
    for name, model in (("orig", orig), ("q8", q8), ("bad", bad)):
        onnx.save(model, tmp_path / f"{name}.onnx")
    o, good, tampered = tmp_path / "orig.onnx", tmp_path / "q8.onnx", tmp_path / "bad.onnx"

    assert cli(o, good, "--reference") == 0
    out = capsys.readouterr().out
    assert "result: PASS" in out and "logits" in out and "fc1_Q8" in out

    assert cli(o, tampered) == 1
    assert "result: FAIL" in capsys.readouterr().out

    np.savez(tmp_path / "in.npz", ids=np.ones((1, 5), np.int64))
    assert cli(o, good, "--inputs", tmp_path / "in.npz", "--min-cosine", "0.999") == 0
    assert "[1, 5, 50]" in capsys.readouterr().out

    np.savez(tmp_path / "wrong.npz", input_ids=np.ones((1, 5), np.int64))
    for argv, message in (
        ((tmp_path / "missing.onnx", good), "missing.onnx: no such file"),
        ((o, good, "--inputs", tmp_path / "wrong.npz"), "missing 'ids'; unexpected 'input_ids'"),
        ((o, good, "--inputs", tmp_path / "nope.npz"), "nope.npz: no such file"),
        ((o, good, "--inputs", o), "not a .npz archive"),
        ((o, good, "--max-rel-error", "-1"), "--max-rel-error must be >= 0"),
    ):
        assert cli(*argv) == 2
        captured = capsys.readouterr()
        assert captured.err.startswith("ort-wq validate: error: ") and message in captured.err
        assert captured.err.count("\n") == 1 and "Traceback" not in captured.err
