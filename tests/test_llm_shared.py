"""The LLM workflow on the shared smollm2-2l folder (real SmolLM2 weights, GroupQueryAttention,
KV cache); skipped cleanly when ../shared is absent."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from ort_wq import evaluate
from ort_wq.cli import main

S2 = Path(__file__).resolve().parents[1] / ".." / "shared" / "models" / "smollm2-2l"
pytestmark = pytest.mark.skipif(not (S2 / "model.onnx").exists(), reason="../shared/models/smollm2-2l is absent")
needs_tokenizers = pytest.mark.skipif(importlib.util.find_spec("tokenizers") is None,
                                      reason="tokenizers (ort-wq[llm]) not installed")  # fmt: skip


@pytest.fixture(scope="module")
def q4(tmp_path_factory):
    """ort-wq's default quantization of the folder, folder to folder."""
    out = tmp_path_factory.mktemp("s2") / "q4"
    assert main(["quantize", str(S2), str(out), "--quiet"]) == 0
    return out


def test_folder_output_is_complete(q4):
    side = {p.name for p in S2.iterdir()} - {"model.onnx", "model.onnx.data"}
    (data,) = [p for p in q4.iterdir() if p.name.startswith("model.onnx") and p.name.endswith(".data")]
    assert {p.name for p in q4.iterdir()} == side | {"model.onnx", data.name}
    assert (q4 / "genai_config.json").read_bytes() == (S2 / "genai_config.json").read_bytes()
    assert data.stat().st_size < (S2 / "model.onnx.data").stat().st_size


def test_validate_defaults_pass(q4, tmp_path, capsys):
    assert main(["validate", str(S2), str(q4), "--report-json", str(tmp_path / "v.json")]) == 0
    out = capsys.readouterr().out
    assert "present.0.key" not in out and "4 KV-cache output(s) not compared" in out
    report = json.loads((tmp_path / "v.json").read_text())
    (logits,) = report["report"]["outputs"]
    assert logits["name"] == "logits" and logits["cosine"] > 0.99 and logits["top1_agreement"] > 0.5


@needs_tokenizers
def test_eval_4bit_and_unquantized_copy(q4):
    text = S2 / "dev_text.txt"
    res = evaluate(S2, q4, text, seq_len=128, windows=2)
    assert math.isfinite(res.original.perplexity) and math.isfinite(res.quantized.perplexity)
    assert 1e-4 < res.kl_divergence < 1.0 and res.top1_agreement > 0.6
    # the fp32 NLL on the same tokens as dev_tokens.npz's first row (256 tokens, no special tokens)
    ids = np.load(S2 / "dev_tokens.npz")["input_ids"]
    assert res.tokens == 2 * 127 and ids.shape == (8, 256)
    same = evaluate(S2, S2, text, seq_len=128, windows=1)
    assert same.kl_divergence == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0


@needs_tokenizers
def test_calibrate_from_dev_text(tmp_path):
    out = tmp_path / "gptq"
    assert main(["quantize", str(S2), str(out), "--algorithm", "gptq", "--calibration-text", str(S2 / "dev_text.txt"),
                 "--calibration-seq-len", "64", "--calibration-batches", "2", "--sym",
                 "--report-json", str(tmp_path / "q.json"), "--quiet"]) == 0  # fmt: skip
    report = json.loads((tmp_path / "q.json").read_text())
    matmuls = [c for c in report["report"]["converted"] if c["new_op"] == "MatMulNBits"]
    assert len(matmuls) == 11  # the tied head also feeds the embedding Gather: rtn there by design
    assert {c["algorithm"] for c in matmuls if c["weight"] != "lm_head.MatMul.weight"} == {"gptq"}
    assert main(["validate", str(S2), str(out)]) == 0


@pytest.mark.skipif(importlib.util.find_spec("onnxruntime_genai") is None, reason="onnxruntime-genai not installed")
def test_onnxruntime_genai_generates_with_the_output(q4):
    import onnxruntime_genai as og

    model = og.Model(str(q4))
    tok = og.Tokenizer(model)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=32, do_sample=False)
    gen = og.Generator(model, params)
    prompt = tok.encode("The GNU General Public License is")
    gen.append_tokens(prompt)
    steps = 0
    while not gen.is_done() and steps < 8:
        gen.generate_next_token()
        steps += 1
    seq = gen.get_sequence(0)
    assert len(seq) == len(prompt) + steps and steps == 8
    assert isinstance(tok.decode(seq), str)


SHARED = S2.parent
OTHERS = [SHARED / "minilm" / "minilm_l6.onnx", SHARED / "magika" / "model.onnx"]


@pytest.mark.parametrize("model", OTHERS, ids=["minilm", "magika"])
def test_validate_defaults_pass_the_default_output(model, tmp_path):
    """The tool's own default quantization passes its own default validation (exit 0)."""
    if not model.exists():
        pytest.skip(f"{model} is absent")
    out = tmp_path / "q.onnx"
    assert main(["quantize", str(model), str(out), "--quiet"]) == 0
    assert main(["validate", str(model), str(out)]) == 0
