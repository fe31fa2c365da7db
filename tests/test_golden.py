"""quant_tensor / qdq_tensor / pad_tensor match the reference implementation's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ort_wq import pad_tensor, qdq_tensor, quant_tensor

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
pytestmark = pytest.mark.skipif(not (GOLDEN / "seed_api_dev.npz").exists(), reason="../shared/golden is absent")


def _cases():
    if not (GOLDEN / "seed_api_dev_cases.json").exists():
        return []
    return json.loads((GOLDEN / "seed_api_dev_cases.json").read_text())


@pytest.fixture(scope="module")
def golden():
    return np.load(GOLDEN / "seed_api_dev.npz")


@pytest.mark.parametrize("case", _cases(), ids=lambda c: "-".join(map(str, c)))
def test_quant_tensor_matches_reference(golden, case):
    key, bits, group, scheme, dtype, ratio = case
    data = golden[f"{key}_data"]
    q, scale, zp = quant_tensor(data, bits, group, scheme, dtype, ratio)
    np.testing.assert_array_equal(q, golden[f"{key}_q"])
    np.testing.assert_array_equal(zp, golden[f"{key}_zp"])
    assert zp.dtype == golden[f"{key}_zp"].dtype
    np.testing.assert_allclose(scale, golden[f"{key}_scale"], rtol=1e-6, atol=0)
    np.testing.assert_allclose(qdq_tensor(data, bits, group, scheme, dtype, ratio), golden[f"{key}_qdq"], rtol=1e-5, atol=1e-12)


def test_pad_tensor_matches_reference(golden):
    keys = [k for k in golden.files if k.startswith("pad_") and k.endswith("_in")]
    assert keys
    for key in keys:
        _, k, g, _ = key.split("_")
        k, g = int(k), int(g)
        out = pad_tensor(golden[key], g, -(-k // g))
        np.testing.assert_array_equal(out, golden[key[:-3] + "_out"])
