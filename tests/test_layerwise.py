"""Segment-by-segment calibration: the same statistics as one onnxruntime session over the whole
model, computed only when read and freed once used; and the progress of a long solve."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from ort_wq import WeightOnlyConfig
from ort_wq.algorithms import _progress
from ort_wq.algorithms.calibration import LayerwiseStats, target_activations
from ort_wq.demo import build_transformer
from ort_wq.feeds import make_feeds
from ort_wq.transforms import WeightOnlyQuantPass
from ort_wq.transforms.targets import find_targets

from .decoders import tiny_decoder
from .helpers import run_model

GPTQ = WeightOnlyConfig(algorithm="gptq", op_types=["MatMul", "Gemm"])


def _lm(layers: int = 3):
    model = build_transformer(layers=layers, hidden=64, vocab=200, seed=1)
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 200, (2, 16), dtype=np.int64)} for _ in range(3)]
    return model, batches


def _whole_model_xtx(model, batches, names):
    """X^T X in float64 from one onnxruntime session over the whole graph (the activations as its outputs)."""
    import onnxruntime as ort

    whole = copy.deepcopy(model)
    whole.graph.output.extend(onnx.ValueInfoProto(name=n) for n in names)
    sess = ort.InferenceSession(whole.SerializeToString(), providers=["CPUExecutionProvider"])
    out = {n: 0.0 for n in names}
    for b in batches:
        for n, x in zip(names, sess.run(names, b)):
            x2 = x.reshape(-1, x.shape[-1]).astype(np.float64)
            out[n] = out[n] + x2.T @ x2
    return out


def test_segments_give_the_statistics_of_one_session():
    model, batches = _lm(3)
    ir_model = ir.serde.deserialize_model(model)
    stats = LayerwiseStats(ir_model, batches, GPTQ, budget=1)
    names = list(stats)
    assert sorted(names) == sorted(target_activations(ir_model, GPTQ))
    assert stats.segments >= 6  # a cut after every layer's activations
    want = _whole_model_xtx(model, batches, names)
    for n in names:
        got = stats[n].xtx.astype(np.float64)
        np.testing.assert_allclose(got, want[n], rtol=2e-4, atol=2e-4 * np.abs(want[n]).max(), err_msg=n)
        assert stats[n].rows == 3 * 2 * 16


@pytest.mark.parametrize("budget", [1, 1 << 40], ids=["many segments", "one segment"])
def test_external_data_in_two_folders(tmp_path, budget):
    """Weights stored in two folders (a segment then cannot name one data folder): the same statistics."""
    model, batches = _lm(2)
    ir_model = ir.serde.deserialize_model(model)
    for i, (name, value) in enumerate(sorted(ir_model.graph.initializers.items())):
        array = value.const_value.numpy()
        if array.size < 64:
            continue
        folder = tmp_path / ("a" if i % 2 else "b")
        folder.mkdir(exist_ok=True)
        (folder / f"{i}.bin").write_bytes(np.ascontiguousarray(array).tobytes())
        value.const_value = ir.ExternalTensor(f"{i}.bin", 0, array.nbytes, value.const_value.dtype,
                                              shape=ir.Shape(array.shape), name=name, base_dir=str(folder))
    stats = LayerwiseStats(ir_model, batches, GPTQ, budget=budget)
    names = list(stats)
    want = _whole_model_xtx(model, batches, names)
    for n in names:
        np.testing.assert_allclose(stats[n].xtx.astype(np.float64), want[n], rtol=2e-4,
                                   atol=2e-4 * np.abs(want[n]).max(), err_msg=n)


def test_kv_cache_decoder_segments_match():
    model = tiny_decoder(layers=2)
    ir_model = ir.serde.deserialize_model(model)
    rng = np.random.default_rng(1)
    batches = [make_feeds(ir_model, input_ids=rng.integers(0, 50, (1, 12), dtype=np.int64)) for _ in range(2)]
    stats = LayerwiseStats(ir_model, batches, GPTQ, budget=1)
    names = list(stats)
    assert names and stats.segments >= 2
    want = _whole_model_xtx(model, batches, names)
    for n in names:
        np.testing.assert_allclose(stats[n].xtx, want[n], rtol=1e-4, atol=1e-4 * np.abs(want[n]).max())


def test_statistics_are_computed_when_read_and_freed_after_use():
    model, batches = _lm(3)
    ir_model = ir.serde.deserialize_model(model)
    stats = LayerwiseStats(ir_model, batches, GPTQ, budget=1)
    names = list(stats)
    first, last = names[0], names[-1]
    assert first in stats.held() and last not in stats.held()  # only the first segment ran
    stats[last]
    assert last in stats.held()
    readers = sum(1 for t in find_targets(ir_model, GPTQ).targets if t.activation is not None and t.activation.name == last)
    for _ in range(readers):
        stats.release(last)
    assert last not in stats.held()


def test_gptq_through_segments_matches_one_segment():
    model, batches = _lm(3)
    outs = []
    for budget in (1, 1 << 40):
        ir_model = ir.serde.deserialize_model(model)
        stats = LayerwiseStats(ir_model, batches, GPTQ, budget=budget)
        assert (stats.segments > 1) == (budget == 1)
        WeightOnlyQuantPass(GPTQ, stats=stats)(ir_model)
        assert not stats.held()  # every activation's statistics freed once its tensors were quantized
        outs.append(run_model(ir.serde.serialize_model(ir_model), batches[0])[0])
    ref = run_model(model, batches[0])[0]
    assert np.abs(outs[0] - outs[1]).max() <= 1e-3 * np.abs(ref).max()


def test_a_long_solve_shows_its_own_bar(monkeypatch, capsys):
    model, batches = _lm(1)
    monkeypatch.setattr(_progress, "MIN_ELEMENTS", 1)
    ir_model = ir.serde.deserialize_model(model)
    stats = LayerwiseStats(ir_model, batches, GPTQ)
    WeightOnlyQuantPass(GPTQ, stats=stats, progress=True)(ir_model)
    assert "solving" in capsys.readouterr().err
    monkeypatch.setattr(_progress, "MIN_ELEMENTS", 1 << 40)
    ir_model = ir.serde.deserialize_model(model)
    WeightOnlyQuantPass(GPTQ, stats=LayerwiseStats(ir_model, batches, GPTQ), progress=True)(ir_model)
    assert "solving" not in capsys.readouterr().err


@pytest.mark.parametrize("alg", ["awq", "imatrix"])
def test_other_calibrated_algorithms_free_their_statistics(alg):
    model, batches = _lm(2)
    config = WeightOnlyConfig(algorithm=alg, op_types=["MatMul", "Gemm"])
    ir_model = ir.serde.deserialize_model(model)
    stats = LayerwiseStats(ir_model, batches, config, budget=1)
    WeightOnlyQuantPass(config, stats=stats)(ir_model)
    assert not stats.held()
    q = run_model(ir.serde.serialize_model(ir_model), batches[0])[0]
    ref = run_model(model, batches[0])[0]
    assert np.isfinite(q).all() and np.abs(q - ref).max() < np.abs(ref).max()


def test_imatrix_calibrates_only_per_channel_energies():
    model, batches = _lm(2)
    config = WeightOnlyConfig(algorithm="imatrix", op_types=["MatMul", "Gemm"])
    ir_model = ir.serde.deserialize_model(model)
    stats = LayerwiseStats(ir_model, batches, config)
    names = list(stats)
    want = _whole_model_xtx(model, batches, names)
    for n in names:
        s = stats[n]
        assert s.xtx is None and s.sq_sum is not None  # no K x K matrix is accumulated
        np.testing.assert_allclose(s.energy, np.diag(want[n]) / s.rows, rtol=1e-5)
        with pytest.raises(ValueError, match="only per-channel"):
            s.hessian  # noqa: B018
