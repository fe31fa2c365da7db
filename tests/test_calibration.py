"""Calibration statistics, the calibration algorithms end to end, and AWQ's graph folding."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.algorithms.calibration import collect_stats, npz_batches
from ort_wq.cli import main
from ort_wq.demo import build_transformer
from ort_wq.transforms._context import QuantContext
from ort_wq.transforms.awq_fold import fold_awq_scales

from .helpers import run_model
from .models import matmul_model

VOCAB = 300
MATMULS = ("MatMul", "Gemm")  # algorithm comparisons: the tied embedding table is tested on its own


def _lm(outliers: int):
    model = build_transformer(layers=2, hidden=128, vocab=VOCAB, outlier_channels=outliers, seed=3)
    rng = np.random.default_rng(0)
    calib = [{"input_ids": rng.integers(0, VOCAB, (4, 32), dtype=np.int64)} for _ in range(6)]
    evaluation = {"input_ids": rng.integers(0, VOCAB, (6, 32), dtype=np.int64)}
    return model, calib, evaluation


@pytest.fixture(scope="module")
def lm():
    return _lm(0)


@pytest.fixture(scope="module")
def lm_outliers():
    return _lm(4)


def test_stats_are_x_transpose_x():
    model, _ = matmul_model(k=64, n=16)
    rng = np.random.default_rng(0)
    batches = [{"x": rng.standard_normal((5, 64)).astype(np.float32)} for _ in range(3)]
    stats = collect_stats(ir.serde.deserialize_model(model), batches, WeightOnlyConfig())
    x = np.concatenate([b["x"] for b in batches]).astype(np.float64)
    assert stats["x"].rows == 15
    np.testing.assert_allclose(stats["x"].xtx, x.T @ x, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(stats["x"].abs_mean, np.abs(x).mean(0), rtol=1e-6)


def _rel_error(model, q, feeds):
    (ref,) = run_model(model, feeds)
    (out,) = run_model(q, feeds)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


@pytest.mark.parametrize("sym", [True, False])
def test_every_algorithm_beats_rtn_and_runs(lm, sym):
    model, calib, feeds = lm
    errors = {}
    for alg in ("rtn", "rtn-clip", "hqq", "imatrix", "gptq", "awq"):
        cfg = WeightOnlyConfig(bits=4, block_size=32, symmetric=sym, algorithm=alg, accuracy_level=0, op_types=MATMULS)
        q, report = quantize(model, cfg, calibration=calib, return_report=True)
        assert {c.algorithm for c in report.converted} == {alg}
        assert sum(n.op_type == "MatMulNBits" for n in q.graph.node) == len(report.converted) == 13
        errors[alg] = _rel_error(model, q, feeds)
    for alg in ("rtn-clip", "hqq", "imatrix", "gptq", "awq"):
        assert errors[alg] < errors["rtn"], errors
    assert errors["gptq"] < 0.85 * errors["rtn"], errors


def test_activation_aware_beat_rtn_with_outlier_channels(lm_outliers):
    model, calib, feeds = lm_outliers
    errors = {}
    for alg in ("rtn", "gptq", "awq"):
        cfg = WeightOnlyConfig(bits=4, block_size=128, symmetric=True, algorithm=alg, accuracy_level=0, op_types=MATMULS)
        errors[alg] = _rel_error(model, quantize(model, cfg, calibration=calib), feeds)
    assert errors["gptq"] < 0.85 * errors["rtn"] and errors["awq"] < 0.85 * errors["rtn"], errors


@pytest.mark.parametrize("alg", ["gptq", "awq", "imatrix"])
def test_tied_table_read_by_a_gather(lm_outliers, alg):
    """GPTQ would move the head's rounding error into the embedding rows the Gather reads as they
    are: the tied table gets rtn. Algorithms that only choose each block's range keep the table."""
    model, calib, feeds = lm_outliers
    cfg = WeightOnlyConfig(bits=4, block_size=128, symmetric=True, algorithm=alg, accuracy_level=0)
    q, report = quantize(model, cfg, calibration=calib, return_report=True)
    tied = [t for t in report.tensors if any(c.startswith("Gather ") for c in t.consumers)]
    assert len(tied) == 1 and len(tied[0].consumers) == 2
    replaced = any(f"{alg} replaced by rtn" in n for n in tied[0].notes)
    assert replaced == (alg == "gptq")
    table_algorithms = {c.algorithm for c in report.converted if c.weight == tied[0].name}
    assert table_algorithms == {"rtn" if alg == "gptq" else alg}
    others = {c.algorithm for c in report.converted if c.weight != tied[0].name}
    assert others == {alg}
    # still better than rtn everywhere
    rtn = quantize(model, cfg.with_(algorithm="rtn"))
    assert _rel_error(model, q, feeds) < _rel_error(model, rtn, feeds)


def test_hqq_integer_zero_points_unless_float_asked(lm):
    model, _, feeds = lm
    q = quantize(model, WeightOnlyConfig(algorithm="hqq", symmetric=False, accuracy_level=0, op_types=MATMULS))
    nodes = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: i for i in q.graph.initializer}
    assert all(inits[n.input[3]].data_type == onnx.TensorProto.UINT8 for n in nodes)
    assert _rel_error(model, q, feeds) < 0.2
    q = quantize(model, WeightOnlyConfig(algorithm="hqq", symmetric=False, accuracy_level=0, zero_points="float",
                                         op_types=MATMULS))
    nodes = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    inits = {i.name: i for i in q.graph.initializer}
    assert all(inits[n.input[3]].data_type == onnx.TensorProto.FLOAT for n in nodes)
    q8 = quantize(model, WeightOnlyConfig(algorithm="hqq", symmetric=False, bits=8, accuracy_level=0, op_types=MATMULS))
    inits8 = {i.name: i for i in q8.graph.initializer}
    assert all(inits8[n.input[3]].data_type == onnx.TensorProto.UINT8 for n in q8.graph.node if n.op_type == "MatMulNBits")
    assert _rel_error(model, q, feeds) < 0.2


def test_awq_folding_is_exact(lm_outliers):
    model, calib, feeds = lm_outliers
    ir_model = ir.serde.deserialize_model(model)
    cfg = WeightOnlyConfig(algorithm="awq")
    stats = collect_stats(ir_model, calib, cfg)
    ctx = QuantContext(cfg)
    ctx.setup(ir_model)
    notes = fold_awq_scales(ir_model, cfg, stats, ctx)
    folded = [n for n, msgs in notes.items() if any("folded into LayerNormalization" in m for m in msgs)]
    assert len(folded) == 8  # q, k, v and mlp.up of both layers
    assert any("not foldable" in m for msgs in notes.values() for m in msgs)  # Gelu -> down, attention -> o
    (ref,) = run_model(model, feeds)
    (out,) = run_model(ir.serde.serialize_model(ir_model), feeds)
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3 * np.abs(ref).max())


def test_cli_calibration(tmp_path, lm, capsys):
    model, calib, feeds = lm
    src, out = tmp_path / "lm.onnx", tmp_path / "q.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)  # saving with external data rewrites the proto it is given
    onnx.save_model(copy, src, save_as_external_data=True, location="lm.onnx.data", size_threshold=0)
    npz = tmp_path / "calib.npz"
    np.savez(npz, input_ids=np.concatenate([b["input_ids"] for b in calib]))
    rc = main(["quantize", str(src), str(out), "--algorithm", "gptq", "--calibration", str(npz),
               "--calibration-batches", "3", "--calibration-batch-size", "4", "--accuracy-level", "0"])
    assert rc == 0
    assert "algorithm: gptq" in capsys.readouterr().out
    assert _rel_error(model, str(out), feeds) < 0.5
    bad = tmp_path / "bad.npz"
    np.savez(bad, ids=np.zeros((4, 8), np.int64))
    assert main(["quantize", str(src), str(out), "--algorithm", "awq", "--calibration", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "ids" in err and "input_ids" in err and len(err.strip().splitlines()) == 1
    floats = tmp_path / "floats.npz"
    np.savez(floats, input_ids=np.zeros((4, 8), np.float32))
    assert main(["quantize", str(src), str(out), "--algorithm", "awq", "--calibration", str(floats)]) == 2
    assert "float32" in capsys.readouterr().err


def test_npz_batches(tmp_path):
    f = tmp_path / "c.npz"
    np.savez(f, a=np.zeros((10, 3)), b=np.ones((10, 2)))
    batches = npz_batches(f, 4)
    assert [len(b["a"]) for b in batches] == [4, 4, 2]
    assert len(npz_batches(f, 4, 2)) == 2
    np.savez(f, a=np.zeros((10, 3)), b=np.ones((9, 2)))
    with pytest.raises(ValueError, match="same batch size"):
        npz_batches(f)


def test_algorithm_options_reach_the_algorithm(lm):
    model, calib, feeds = lm
    base = dict(bits=4, block_size=32, symmetric=True, algorithm="gptq", accuracy_level=0)
    default = quantize(model, WeightOnlyConfig(**base), calibration=calib)
    changed = quantize(model, WeightOnlyConfig(**base, algorithm_options={"act_order": False, "damp": 0.5}),
                       calibration=calib)
    weights = lambda m: {i.name: onnx.numpy_helper.to_array(i) for i in m.graph.initializer if "_Q4" in i.name}  # noqa: E731
    a, b = weights(default), weights(changed)
    assert a.keys() == b.keys() and any(not np.array_equal(a[k], b[k]) for k in a)
    assert _rel_error(model, changed, feeds) < 0.5
    with pytest.raises(ValueError, match="act_order"):
        WeightOnlyConfig(algorithm="gptq", algorithm_options={"bogus": 1})


@pytest.mark.parametrize("sym", [True, False])
def test_gptq_group_ranges_follow_the_output_error(lm_outliers, sym):
    """Static groups' ranges chosen by e^T H_gg e beat ranges chosen by the weight error."""
    model, calib, feeds = lm_outliers
    errors = {}
    for objective in ("weight", "output"):
        cfg = WeightOnlyConfig(bits=4, block_size=128, symmetric=sym, algorithm="gptq", accuracy_level=0,
                               op_types=MATMULS, algorithm_options={"group_objective": objective})
        errors[objective] = _rel_error(model, quantize(model, cfg, calibration=calib), feeds)
    assert errors["output"] < errors["weight"], errors


def test_algorithm_notes_reach_the_report_once(lm):
    model, calib, _ = lm
    _, report = quantize(model, WeightOnlyConfig(algorithm="gptq", op_types=MATMULS), calibration=calib,
                         return_report=True)
    assert all(any(n.startswith("gptq: damp=") for n in t.notes) for t in report.tensors)
    # per tensor only, whichever finished first: the nodes carry what the rewrite knew
    assert not any(n.startswith("gptq: damp=") for c in report.converted for n in c.notes)
    lines = [ln for ln in report.to_text().splitlines() if "gptq: damp=" in ln]
    assert len(lines) == 1 and f"{len(report.tensors)} tensors/nodes" in lines[0]
    assert sum("gptq: damp=" in ln for ln in report.to_text(verbose=True).splitlines()) == len(report.tensors)
