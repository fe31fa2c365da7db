"""The LLM workflow on a tiny decoder with a KV cache built here: model folders, generated
decoder inputs, calibration from text, eval (perplexity / KL), JSON reports, -1 and batch-1 models."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import onnx
import pytest

from ort_wq import CalibrationText, WeightOnlyConfig, evaluate, quantize, validate
from ort_wq.cli import main
from ort_wq.feeds import decoder_layout, make_feeds
from ort_wq.model_io import load_model

from .decoders import HEAD, HEADS, batch1_model, decoder_folder, dynamic_k_model, tiny_decoder, write_text
from .helpers import run_model

needs_tokenizers = pytest.mark.skipif(
    __import__("importlib").util.find_spec("tokenizers") is None, reason="tokenizers (ort-wq[llm]) not installed"
)


@pytest.fixture
def folder(tmp_path):
    return decoder_folder(tmp_path / "in")


def test_decoder_inputs_are_consistent(folder):
    model = load_model(folder / "model.onnx")
    layout = decoder_layout(model, folder)
    assert (layout.kv_heads, layout.head_size) == (HEADS, HEAD)  # head size from genai_config.json
    feeds = make_feeds(model, folder=folder)
    assert feeds["past_key_values.0.key"].shape == (2, HEADS, 0, HEAD)
    assert feeds["attention_mask"].shape == feeds["input_ids"].shape == (2, 8)
    np.testing.assert_array_equal(feeds["position_ids"][1], np.arange(8))
    outs = run_model(tiny_decoder(), feeds)
    assert outs[0].shape == (2, 8, 64) and outs[1].shape == (2, HEADS, 8, HEAD)
    fixed = tiny_decoder(head_dim=HEAD)  # optimum-style fixed head size: no config needed
    assert make_feeds(load_model_proto(fixed))["past_key_values.0.value"].shape == (2, HEADS, 0, HEAD)


def load_model_proto(proto):
    import onnx_ir as ir

    return ir.serde.deserialize_model(proto)


def test_quantize_folder_to_folder(folder, tmp_path):
    out = tmp_path / "out"
    assert main(["quantize", str(folder), str(out), "--quiet", "--report-json", str(tmp_path / "q.json")]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(p.name for p in folder.iterdir())  # same model name, side files copied
    assert (out / "genai_config.json").read_text() == (folder / "genai_config.json").read_text()
    ops = {n.op_type for n in onnx.load(out / "model.onnx").graph.node}
    assert "MatMulNBits" in ops and "MatMul" not in ops
    report = json.loads((tmp_path / "q.json").read_text())
    assert report["command"] == "quantize" and report["counts"]["MatMulNBits/4"] == 4
    assert len(report["report"]["converted"]) == sum(report["counts"].values())
    assert report["weight_bytes_after"] < report["weight_bytes_before"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    assert main(["quantize", str(folder), str(out), "--quiet"]) == 0  # a previous output is replaced


@pytest.mark.parametrize("where", ["same", "inside"])
def test_folder_output_inside_input_is_refused(folder, where, capsys):
    out = folder if where == "same" else folder / "q"
    assert main(["quantize", str(folder), str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "input folder or inside it" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in folder.iterdir()) == ["chat_template.jinja", "genai_config.json", "model.onnx",
                                                        *(["tokenizer.json"] if (folder / "tokenizer.json").exists() else [])]  # fmt: skip


def test_failed_folder_quantization_leaves_nothing(folder, tmp_path, monkeypatch):
    import ort_wq.folders as folders

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(folders.shutil, "copyfile", boom)
    with pytest.raises(OSError):
        quantize(str(folder), output=tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]


def test_validate_folders_with_defaults_and_outputs(folder, tmp_path, capsys):
    out = tmp_path / "out"
    quantize(str(folder), output=out)
    assert main(["validate", str(folder), str(out), "--report-json", str(tmp_path / "v.json")]) == 0
    text = capsys.readouterr().out
    assert "logits" in text and "present.0.key " not in text and "2 KV-cache output(s) not compared" in text
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] is True and [o["name"] for o in report["report"]["outputs"]] == ["logits"]
    assert report["report"]["outputs"][0]["top1_agreement"] > 0.5
    assert main(["validate", str(folder), str(out), "--outputs", "present.0.key,logits"]) == 0
    rows = capsys.readouterr().out
    assert "present.0.key" in rows
    assert next(r for r in rows.splitlines() if r.startswith("present.0.key")).split()[-1] == "-"  # no top-1
    assert main(["validate", str(folder), str(out), "--outputs", "nope"]) == 2


def test_validate_fails_wrongly_packed_weights(folder, tmp_path):
    """The defaults pass the right bytes and fail the same model with the nibbles of B swapped."""
    out = tmp_path / "out"
    quantize(str(folder), output=out)
    model = onnx.load(out / "model.onnx")
    packed = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    inits = [i for i in model.graph.initializer if i.name in packed]
    assert len(inits) == 4
    for init in inits:
        raw = onnx.numpy_helper.to_array(init)
        init.CopyFrom(onnx.numpy_helper.from_array(((raw >> 4) | (raw << 4)).astype(np.uint8), init.name))
    onnx.save(model, out / "bad.onnx")
    assert not validate(folder / "model.onnx", out / "bad.onnx").passed()
    assert validate(folder / "model.onnx", out / "model.onnx").passed()


def test_batch1_only_model_is_fed_batch_1(tmp_path):
    onnx.save(batch1_model(), tmp_path / "m.onnx")
    quantize(str(tmp_path / "m.onnx"), output=tmp_path / "q.onnx")
    report = validate(tmp_path / "m.onnx", tmp_path / "q.onnx")
    assert report.passed() and report.outputs[0].shape == (1, 32)
    assert any("batch 1" in n for n in report.notes)


def test_minus_one_dims_calibration_and_validate(tmp_path):
    model = dynamic_k_model()
    onnx.save(model, tmp_path / "m.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((16, 64)).astype(np.float32))
    assert main(["quantize", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--algorithm", "gptq",
                 "--calibration", str(tmp_path / "c.npz"), "--quiet"]) == 0  # fmt: skip
    assert main(["validate", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx")]) == 0
    np.savez(tmp_path / "v.npz", x=rng.standard_normal((5, 64)).astype(np.float32))
    assert main(["validate", str(tmp_path / "m.onnx"), str(tmp_path / "q.onnx"), "--inputs", str(tmp_path / "v.npz")]) == 0


@needs_tokenizers
@pytest.mark.parametrize("ids_shape", [("batch_size", "sequence_length"), (-1, -1)])
def test_calibrate_from_text_and_eval(tmp_path, ids_shape):
    folder = decoder_folder(tmp_path / "in", ids_shape=ids_shape)
    text = write_text(tmp_path / "t.txt")
    out = tmp_path / "out"
    assert main(["quantize", str(folder), str(out), "--algorithm", "gptq", "--calibration-text", str(text),
                 "--calibration-seq-len", "64", "--calibration-batches", "3", "--quiet"]) == 0  # fmt: skip
    assert main(["eval", str(folder), str(out), "--text", str(text), "--seq-len", "64", "--windows", "4",
                 "--report-json", str(tmp_path / "e.json"), "--quiet"]) == 0  # fmt: skip
    r = json.loads((tmp_path / "e.json").read_text())
    assert math.isfinite(r["original"]["perplexity"]) and math.isfinite(r["quantized"]["perplexity"])
    assert r["kl_divergence"] > 0 and 0.5 < r["top1_agreement"] <= 1 and len(r["windows"]) == 4
    assert r["tokens"] == 4 * 63
    same = evaluate(folder, folder, text, seq_len=64, windows=2)
    assert same.kl_divergence == pytest.approx(0, abs=1e-9) and same.top1_agreement == 1.0
    # the Python API: calibration=CalibrationText
    q, report = quantize(str(folder / "model.onnx"), WeightOnlyConfig(algorithm="awq"), output=tmp_path / "a.onnx",
                         calibration=CalibrationText(text, seq_len=32, batches=2), return_report=True)  # fmt: skip
    matmuls = [c for c in report.converted if c.new_op == "MatMulNBits"]
    assert len(matmuls) == 4 and all(c.algorithm == "awq" for c in matmuls)


@needs_tokenizers
def test_eval_matches_numpy_on_one_window(folder, tmp_path):
    """Perplexity/KL from the command equal a direct numpy computation from onnxruntime's logits."""
    text = write_text(tmp_path / "t.txt", words=40)
    out = tmp_path / "out"
    quantize(str(folder), WeightOnlyConfig(bits=2), output=out)
    res = evaluate(folder, out, text, seq_len=40)
    from tokenizers import Tokenizer

    ids = np.array(Tokenizer.from_file(str(folder / "tokenizer.json")).encode(text.read_text(), add_special_tokens=False).ids)
    feeds = {"input_ids": ids[None], "attention_mask": np.ones((1, 40), np.int64), "position_ids": np.arange(40)[None]}
    feeds.update({f"past_key_values.0.{k}": np.zeros((1, HEADS, 0, HEAD), np.float32) for k in ("key", "value")})
    lo = run_model(onnx.load(folder / "model.onnx"), feeds)[0][0, :-1].astype(np.float64)
    lq = run_model(onnx.load(out / "model.onnx"), feeds)[0][0, :-1].astype(np.float64)
    lso = lo - np.log(np.exp(lo - lo.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lo.max(-1, keepdims=True)
    lsq = lq - np.log(np.exp(lq - lq.max(-1, keepdims=True)).sum(-1, keepdims=True)) - lq.max(-1, keepdims=True)
    nll = -lso[np.arange(39), ids[1:]].mean()
    kl = (np.exp(lso) * (lso - lsq)).sum(-1).mean()
    assert res.original.perplexity == pytest.approx(math.exp(nll), rel=1e-6)
    assert res.kl_divergence == pytest.approx(kl, rel=1e-6) and res.kl_divergence > 1e-4


def test_missing_tokenizers_names_the_extra(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    text = write_text(tmp_path / "t.txt")
    code = main(["quantize", str(folder), str(tmp_path / "o"), "--algorithm", "gptq", "--calibration-text", str(text)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "pip install 'ort-wq[llm]'" in err and len(err.splitlines()) == 1
    assert main(["eval", str(folder), str(folder), "--text", str(text)]) == 2
    assert "ort-wq[llm]" in capsys.readouterr().err


def test_inspect_folder_report_json(folder, tmp_path, capsys):
    assert main(["inspect", str(folder), "--report-json", str(tmp_path / "i.json")]) == 0
    r = json.loads((tmp_path / "i.json").read_text())
    assert r["command"] == "inspect" and {n["node"] for n in r["nodes"]} >= {"lm_head", "mlp.up"}


def test_validate_defaults_pass_the_demo(tmp_path):
    from ort_wq.demo import run_demo

    run_demo(layers=2, hidden=256, save_dir=str(tmp_path))
    assert main(["validate", str(tmp_path / "original.onnx"), str(tmp_path / "quantized.onnx")]) == 0
