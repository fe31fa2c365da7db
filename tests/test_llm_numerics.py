"""The algorithms on a real LLM: smollm2-2l (SmolLM2-135M cut to 2 layers, genai layout).

KL divergence of the quantized model's next-token distribution from its own fp32 one, on rows
4-7 of ``dev_tokens.npz`` (calibration: rows 0-1). Every search must do at least as well as
rtn at the same setting, and AWQ's scales must fold into the genai builder's
SkipSimplifiedLayerNormalization. Skipped cleanly when ../shared is absent.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ort_wq import WeightOnlyConfig, quantize

SMOLLM = Path(__file__).resolve().parents[2] / "shared" / "models" / "smollm2-2l"
pytestmark = pytest.mark.skipif(not (SMOLLM / "model.onnx").exists(), reason="../shared/models/smollm2-2l is absent")
MATMULS = ("MatMul", "Gemm", "FusedMatMul")  # the tied table stays float for its Gather, as onnxruntime's quantizer does


def _feeds(ids: np.ndarray) -> dict[str, np.ndarray]:
    cfg = json.loads((SMOLLM / "genai_config.json").read_text())["model"]["decoder"]
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for i in range(cfg["num_hidden_layers"]):
        for kv in ("key", "value"):
            feeds[f"past_key_values.{i}.{kv}"] = np.zeros((ids.shape[0], cfg["num_key_value_heads"], 0, cfg["head_size"]),
                                                          np.float32)
    return feeds


def _log_probs(model, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    src = model.SerializeToString() if hasattr(model, "SerializeToString") else str(model)
    logits = ort.InferenceSession(src, providers=["CPUExecutionProvider"]).run(["logits"], _feeds(ids))[0]
    logits = logits.astype(np.float64)
    logits -= logits.max(-1, keepdims=True)
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


@pytest.fixture(scope="module")
def setting():
    ids = np.load(SMOLLM / "dev_tokens.npz")["input_ids"]
    calib = [_feeds(ids[i : i + 1, :128]) for i in range(2)]
    evals = ids[4:8, :128]
    import onnx

    model = onnx.load(SMOLLM / "model.onnx")
    return model, calib, evals, _log_probs(model, evals)


def _kl(setting, algorithm: str, exclude=(), include=(), symmetric=True, **options) -> tuple[float, object]:
    model, calib, evals, ref = setting
    cfg = WeightOnlyConfig(bits=4, block_size=128, symmetric=symmetric, algorithm=algorithm, accuracy_level=0,
                           op_types=MATMULS, algorithm_options=options, exclude=list(exclude), include=list(include))
    q, report = quantize(model, cfg, calibration=calib if algorithm in ("imatrix", "awq", "gptq") else None,
                         return_report=True)
    lp = _log_probs(q, evals)
    return float((np.exp(ref) * (ref - lp)).sum(-1).mean()), report


def test_searches_never_lose_to_rtn_and_data_aware_ones_win(setting):
    kl = {alg: _kl(setting, alg)[0] for alg in ("rtn", "rtn-clip", "hqq", "imatrix")}
    assert kl["rtn-clip"] <= kl["rtn"] and kl["hqq"] <= kl["rtn"], kl
    assert kl["imatrix"] < 0.85 * kl["rtn"], kl


def test_asymmetric_searches_never_lose_to_rtn(setting):
    """Asymmetric, integer zero points (block 128): both calibration-free searches, head guard
    included, keep a clear margin over rtn."""
    kl = {alg: _kl(setting, alg, symmetric=False)[0] for alg in ("rtn", "rtn-clip", "hqq")}
    assert kl["rtn-clip"] < 0.9 * kl["rtn"] and kl["hqq"] < 0.9 * kl["rtn"], kl


@pytest.mark.parametrize("algorithm", ["rtn-clip", "hqq"])
def test_output_head_search_follows_the_logits(setting, algorithm):
    """The head alone (576 x 49152, the tied table): the search weighted by the vocabulary's channel
    energy must beat rtn clearly."""
    head = ["lm_head"]
    base, _ = _kl(setting, "rtn", include=head)
    kl, _ = _kl(setting, algorithm, include=head)
    assert kl < 0.9 * base, (kl, base)


def test_awq_scales_fold_into_skip_simplified_layer_norm_and_beat_rtn(setting):
    head = ["lm_head"]  # (the head's clip search dominates AWQ's time; its input cannot be scaled anyway)
    base, _ = _kl(setting, "rtn", head)
    kl, report = _kl(setting, "awq", head)
    notes = [n for c in report.converted for n in c.notes]
    folded = [n for n in notes if "folded into SkipSimplifiedLayerNormalization" in n]
    assert len(folded) >= 3, notes  # layer 1's qkv, both layers' gate/up (layer 0's qkv: SimplifiedLayerNorm)
    assert any("folded into SimplifiedLayerNormalization" in n for n in notes), notes
    assert kl < 0.85 * base, (kl, base)
    clip_only, report = _kl(setting, "awq", head, allow_input_scale=False)
    assert not any("folded" in n for c in report.converted for n in c.notes)
    assert clip_only < base
