"""Checks that fail when a setting is silently dropped on its way to the output."""

from __future__ import annotations

import re

import numpy as np
import onnx
import pytest
from onnx import helper

from ort_wq import WeightOnlyConfig, quantize
from ort_wq.algorithms import LayerStats, QuantSpec, get_algorithm
from ort_wq.cli import main

from .models import matmul_model


def _correlated_stats(k: int, seed: int = 0) -> LayerStats:
    rng = np.random.default_rng(seed)
    mix = rng.standard_normal((k, k)) * (rng.uniform(0, 1, k) ** 4)[None, :]
    stats = LayerStats(k)
    stats.update((rng.standard_normal((4 * k, k)) @ mix).astype(np.float32))
    return stats


def test_gptq_damp_changes_the_result():
    k, n = 128, 32
    w = np.random.default_rng(1).standard_normal((k, n)).astype(np.float32)
    stats = _correlated_stats(k)
    gptq = get_algorithm("gptq")[0]
    spec = QuantSpec(bits=4, block_size=32, symmetric=True)
    low, high = (gptq(w, spec, stats, damp=d) for d in (0.01, 100.0))
    assert not np.array_equal(low.q, high.q)
    h = stats.hessian
    err = {d: np.trace((w - r.dequantize()).T @ h @ (w - r.dequantize())) for d, r in ((0.01, low), (100.0, high))}
    assert err[0.01] < err[100.0]  # the weak dampening uses the Hessian, the strong one barely does


@pytest.mark.parametrize("level", [0, 1, 4])
def test_accuracy_level_reaches_the_node(level, tmp_path):
    model, _ = matmul_model()
    q = quantize(model, WeightOnlyConfig(accuracy_level=level))
    (node,) = [n for n in q.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("accuracy_level", 0) == level
    src, out = tmp_path / "m.onnx", tmp_path / "q.onnx"
    onnx.save_model(model, src)
    assert main(["quantize", str(src), str(out), "--accuracy-level", str(level), "--quiet"]) == 0
    (node,) = onnx.load(out).graph.node
    assert {a.name: helper.get_attribute_value(a) for a in node.attribute}.get("accuracy_level", 0) == level


def test_demo_prints_a_high_cosine(capsys):
    assert main(["demo", "--layers", "1", "--hidden", "128"]) == 0
    match = re.search(r"cosine (-?[0-9.]+)", capsys.readouterr().out)
    assert match and float(match.group(1)) > 0.95, match


def test_import_does_not_load_the_reference_ops():
    """onnxruntime-extensions (slow: it imports transformers/torch where installed) loads only when used."""
    import subprocess
    import sys

    code = ("import sys, ort_wq; from ort_wq.cli import build_parser; build_parser()\n"
            "assert 'onnxruntime_extensions' not in sys.modules\n"
            "so = ort_wq.ops.session_options(contrib=False)\n"
            "assert 'onnxruntime_extensions' in sys.modules\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_quantize_command_does_not_import_onnxruntime(tmp_path):
    """``ort-wq quantize`` needs neither onnxruntime nor the reference ops nor tqdm (with --quiet):
    they are imported where used; ``ort_wq.validate`` still names the function."""
    import subprocess
    import sys

    from .models import matmul_model

    model, _ = matmul_model(k=64, n=32)
    onnx.save_model(model, tmp_path / "m.onnx")
    code = ("import sys; from ort_wq.cli import main\n"
            f"assert main(['quantize', {str(tmp_path / 'm.onnx')!r}, {str(tmp_path / 'q.onnx')!r}, '--quiet']) == 0\n"
            "loaded = [m for m in ('onnxruntime', 'ort_wq.ops', 'ort_wq.validate', 'tqdm') if m in sys.modules]\n"
            "assert not loaded, loaded\n"
            "import ort_wq, ort_wq.validate as v\n"
            "from ort_wq.validate import ValidationReport\n"
            "assert callable(ort_wq.validate) and ort_wq.validate is v and ort_wq.ValidationReport is ValidationReport\n"
            "assert {'validate', 'ValidationReport', 'ops'} <= set(dir(ort_wq))\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
