"""The command line: quantize, inspect and demo; one-line errors and exit codes; no partial output."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from ort_wq.cli import main

from .helpers import run_model
from .models import deq, matmul_model


@pytest.fixture()
def model_file(tmp_path):
    model, w = matmul_model(k=128, n=64)
    path = tmp_path / "model.onnx"
    onnx.save_model(model, path)
    return path, w


def test_quantize_ok(model_file, tmp_path, capsys):
    src, w = model_file
    out = tmp_path / "q.onnx"
    rc = main(["quantize", str(src), str(out), "--bits", "4", "--block-size", "64", "--asym", "--accuracy-level", "0"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "converted: 1" in text and "MatMulNBits" in text and "wrote" in text
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    (y,) = run_model(str(out), {"x": x})
    np.testing.assert_allclose(y, x @ deq(w, 4, 64, False), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("grid", ["mlas", "inc"])
def test_sym_grid(model_file, tmp_path, capsys, grid):
    src, w = model_file
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), str(out), "--sym", "--sym-grid", grid, "--accuracy-level", "0"]) == 0
    x = np.random.default_rng(0).standard_normal((3, 128)).astype(np.float32)
    (y,) = run_model(str(out), {"x": x})
    np.testing.assert_allclose(y, x @ deq(w, 4, 32, True, grid=grid), rtol=2e-4, atol=2e-4)
    other = deq(w, 4, 32, True, grid="inc" if grid == "mlas" else "mlas")
    assert not np.allclose(y, x @ other, rtol=2e-4, atol=2e-4)


def test_quantize_override_and_exclude(model_file, tmp_path, capsys):
    src, _ = model_file
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), str(out), "--override", "mm=bits:8,block:128,sym", "--quiet"]) == 0
    node = onnx.load(out).graph.node[0]
    assert {a.name: a.i for a in node.attribute}["bits"] == 8
    assert main(["quantize", str(src), str(out), "--exclude", "^mm$", "--verbose"]) == 0
    assert "excluded by pattern" in capsys.readouterr().out


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "make_input, args, message",
    [
        (lambda p: p / "missing.onnx", [], "no such file"),
        (lambda p: (p / "text.onnx").write_text("hello, not a model") and p / "text.onnx", [], "ONNX"),
        (lambda p: p / "model.onnx", ["--format", "fpq4", "--bits", "8"], "fpq4"),
        (lambda p: p / "model.onnx", ["--format", "fpq4", "--block-size", "64"], "blocks of 32"),
        (lambda p: p / "model.onnx", ["--override", "nonsense"], "override"),
        (lambda p: p / "model.onnx", ["--algorithm", "hqq", "--algorithm-option", "damp=0.1"], "its options"),
        (lambda p: p / "model.onnx", ["--algorithm-option", "oops"], "KEY=VALUE"),
        (lambda p: p / "model.onnx", ["--bits", "8", "--asym", "--zero-points", "float"], "float zero points"),
        (lambda p: p / "model.onnx", ["--sym", "--zero-points", "float"], "asym"),
        (lambda p: p / "model.onnx", ["--exclude", "("], "regular expression"),
        (lambda p: p / "model.onnx", ["--algorithm", "gptq"], "calibration"),
    ],
)
def test_bad_input_exit_2(model_file, tmp_path, capsys, make_input, args, message):
    src = make_input(tmp_path)
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(src), str(out), *args]) == 2
    assert message in _err(capsys)
    assert not out.exists()


def test_truncated_and_missing_external_data(tmp_path, capsys):
    model, _ = matmul_model(k=256, n=64)
    full = model.SerializeToString()
    trunc = tmp_path / "trunc.onnx"
    trunc.write_bytes(full[: len(full) // 2])
    assert main(["quantize", str(trunc), str(tmp_path / "o.onnx")]) == 2
    assert "trunc.onnx" in _err(capsys)
    ext = tmp_path / "ext.onnx"
    onnx.save_model(model, ext, save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    (tmp_path / "ext.onnx.data").unlink()
    assert main(["quantize", str(ext), str(tmp_path / "o.onnx")]) == 2
    assert "external data file" in _err(capsys)
    assert not (tmp_path / "o.onnx").exists()


def test_output_equal_to_input_refused(model_file, capsys):
    src, _ = model_file
    before = src.read_bytes()
    assert main(["quantize", str(src), str(src)]) == 2
    assert "input model" in _err(capsys)
    assert src.read_bytes() == before


def test_bad_usage_exit_2(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "a.onnx", "b.onnx", "--bits", "3"])
    assert exc.value.code == 2
    with pytest.raises(SystemExit) as exc:
        main(["quantize", "a.onnx", "b.onnx", "--block-size", "48"])
    assert exc.value.code == 2
    assert main([]) == 2


def test_failure_midway_leaves_no_output(model_file, tmp_path, capsys, monkeypatch):
    """The failure comes after the whole model was written (to the temporary folder): nothing appears."""
    from ort_wq import output_files

    real_sync, saved = output_files.fsync_file, []

    def sync_then_fail(path):  # the graph file, written last
        real_sync(path)
        saved.append(path)
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(output_files, "fsync_file", sync_then_fail)
    src, _ = model_file
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(src), str(out)]) == 1
    assert saved and "disk on fire" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_inspect(model_file, tmp_path, capsys):
    src, _ = model_file
    assert main(["inspect", str(src)]) == 0
    text = capsys.readouterr().out
    assert "quantizable" in text and "128" in text and "64" in text
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(src), str(out), "--quiet"]) == 0
    assert main(["inspect", str(out)]) == 0
    assert "quantized: 4-bit block 32 asym" in capsys.readouterr().out


def test_console_script_and_module(tmp_path):
    res = subprocess.run([sys.executable, "-m", "ort_wq", "--help"], capture_output=True, text=True)
    assert res.returncode == 0 and "quantize" in res.stdout and "demo" in res.stdout
    res = subprocess.run([sys.executable, "-m", "ort_wq", "quantize", "--help"], capture_output=True, text=True)
    assert "--block-size" in res.stdout and "--override" in res.stdout


def test_demo_runs(capsys):
    assert main(["demo", "--layers", "1", "--hidden", "128"]) == 0
    out = capsys.readouterr().out
    assert "cosine" in out and "MatMulNBits" in out and "latency" in out


def test_failure_midway_with_external_data_leaves_nothing(tmp_path, capsys, monkeypatch):
    """Quantized tensors stream into a temporary data file; a failure removes it and writes no output."""
    from ort_wq.transforms import emit_nbits

    model, _ = matmul_model(k=256, n=128)
    src = tmp_path / "in.onnx"
    onnx.save_model(model, src, save_as_external_data=True, location="in.onnx.data", size_threshold=0)
    calls = []
    real_pack = emit_nbits.pack

    def pack_then_fail(*a, **k):
        calls.append(1)
        real_pack(*a, **k)
        raise RuntimeError("failed after packing")

    monkeypatch.setattr(emit_nbits, "pack", pack_then_fail)
    out = tmp_path / "out.onnx"
    assert main(["quantize", str(src), str(out)]) == 1
    assert calls and "failed after packing" in _err(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.onnx", "in.onnx.data"]
