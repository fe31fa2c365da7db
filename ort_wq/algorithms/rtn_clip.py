"""RTN+ ("rtn-clip"): round to nearest with a per-group range search and refit. No calibration.

For every group (``block_size`` consecutive K values of one output column), after llama.cpp's
k-quants without an importance matrix (``make_qx_quants`` / ``make_qkx2_quants``):

1. candidates: the range shrunk by each ratio of a grid (1.0 down to ``min_ratio``; the
   ``"inc"`` symmetric grid also tries ratios slightly above 1 so a positive maximum can be hit
   exactly), codes by rounding to nearest;
2. (``refine``, default) for each candidate but ratio 1, the weighted least-squares parameters
   for its codes: ``s = sum u w c / sum u c^2`` (``c = q - z``, symmetric), or the joint fit of
   ``w ~ a q + b`` with the integer zero point re-rounded and the scale refitted for it
   (asymmetric); see :func:`.imatrix.refit`;
3. the candidate with the smallest weighted error ``sum u (w - s (q - z))^2`` is kept. Ratio 1
   is rtn's range, so no group reconstructs worse than rtn under that error (asymmetric integer
   zero points: range widened to include 0, see :mod:`._common`).

The weight ``u`` (:mod:`._importance`) is the calibration-free stand-in for output error:

- any weight: ``1 + w^2 / sigma2`` (``objective="magnitude"``; ``sigma2`` the column's mean
  square), llama.cpp's ``sigma2 + x^2``. The plain squared error (``"mse"``) trades a head's few
  large weights -- the ones that make its top logits -- for its many small ones.
- output heads (``head_rule``, :func:`._importance.looks_like_output_head`): no weight-space
  error found predicts a head's logit error, so the head gets imatrix's search
  (:mod:`.imatrix`: candidates around ratio 1 and, on the MLAS grid, mirrored; ``sqrt(1 + w^2 /
  sigma2)`` times an input energy) with, in place of the measured activation energy, the mean
  of :func:`._importance.vocabulary_energy` -- the channel energy of the head's own columns --
  and, where the transform finds the norm before the head (``input_gain``,
  :mod:`ort_wq.transforms.norms`), :func:`._importance.gain_energy` -- its gain^4 (the
  measurements are there: SmolLM2-135M at block 128 sym 45.56 with both, 45.84 with the
  vocabulary energy alone). With both proxies a group keeps the searched range only where it
  reconstructs at least as well as rtn's under each proxy alone (``Objective.guards``); the
  others keep rtn's range (on SmolLM2's head 64-68 % of the groups keep the search).

Measured on SmolLM2-135M (perplexity / KL to fp32 on 8 x 256 tokens, fp32 28.36; the table
lives in ``benchmarks/README.md``), parts quantized separately, block 128 sym:

| part quantized | rtn | clip search (before) | + refit | head: vocabulary energy |
| --- | --- | --- | --- | --- |
| 30 layers only | 37.03 / 0.451 | 35.70 / 0.443 | 35.52 / 0.415 | |
| head only | 35.99 / 0.236 | 36.47 / 0.246 | 36.59 / 0.242 | 34.96 / 0.178 |

Every MatMul 4-bit (``python benchmarks/bench_algorithms.py``; before = the clip search
without refit, rtn's range on the head; head by vocabulary energy; mean = the head by the
mean of vocabulary energy and the final norm's gain^4; rtn-clip = the mean, each group
guarded by both proxies):

| setting | rtn | before | head by vocabulary energy | mean | rtn-clip |
| --- | --- | --- | --- | --- | --- |
| block 32 sym | 37.91 / 0.405 | 36.34 / 0.389 | 36.54 / 0.372 | 36.01 / 0.361 | 35.96 / 0.364 |
| block 128 sym | 48.39 / 0.722 | 47.77 / 0.738 | 45.84 / 0.642 | 45.56 / 0.643 | 45.53 / 0.646 |
| block 128 asym | 40.25 / 0.565 | 40.65 / 0.562 | 42.42 / 0.548 | 41.85 / 0.533 | 40.39 / 0.510 |

Why the guard: the mean of two proxies that disagree moves a group's error onto channels that
one of them rates low, and the real head input energy is concentrated (on SmolLM2 three
channels hold 119x, 91x and 66x the mean, and the mean proxy rates them 2.6-6x). At block 128
asym the unguarded search made the predictions flatter (entropy 3.50 nats vs rtn's 3.34, fp32
2.95), lowering the KL but raising the perplexity (head alone: 41.72 / 0.548 vs rtn 40.25 /
0.565; guarded: 40.10 / 0.521; the measured energy, for reference: 37.91 / 0.477). Per token the
guarded rtn-clip's NLL is 0.004 nats above rtn's (standard error 0.013 over the 8 windows), the
unguarded one's 0.039. On smollm2-2l (KL, block 128) the guard costs a little: sym 0.139 vs
0.136, asym 0.131 vs 0.129 (rtn 0.154 / 0.177).

Asymmetric (integer zero points), the layers' search lowers the KL but, on the dev text, not
the perplexity (every MatMul, the head at rtn: 40.44 / 0.552 vs rtn 40.25 / 0.565); on the
held-out text (``bench_algorithms.py --llm-text held-out``) it lowers both (37.91 / 0.657 vs
38.49 / 0.674; with the guarded head 37.05 / 0.617). On the 30 layers alone at block 128 rtn
gives 35.14 / 0.394, the refitted search 36.01 / 0.408 with
saturation allowed and 35.50 / 0.387 without (hence ``saturate`` defaults to off for
asymmetric), the search without refit 35.79 / 0.406, ends shrunk independently 35.55 / 0.390.
Guarding the layers' groups too (with the head at rtn, every MatMul: 40.44 / 0.552 unguarded)
by their input norm's gain^2 gave 40.39 / 0.556, by the plain squared error 40.48 / 0.557: not
adopted.

Float zero points: honoured when called with ``spec.float_zero_points`` (asymmetric groups then
map ``[min, max]`` exactly), but the algorithm is registered without ``float_zero_points`` so
the transform asks it for uint8 zero points: on MiniLM (4-bit asym) float zero points lowered
the per-layer error but did not consistently raise the end-to-end cosine (block 32: 0.9715 vs
0.9754, block 128: 0.9439 vs 0.9566); with an integer zero point 0 stays exactly representable,
and the near-zero majority of the weights gets no common offset.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ._common import check_weight, finalize, group_view, out_dtype
from ._importance import (
    GAIN_NOTE,
    HEAD_NOTE,
    OBJECTIVES,
    Weights,
    energy_weighted,
    gain_energy,
    looks_like_output_head,
    objective_weights,
    vocabulary_energy,
)
from ._search import clip_ratios, default_min_ratio, keep_unless_worse
from .base import LayerStats, OptionSpec, QuantizedWeight, QuantSpec, register


def _ones(xc: np.ndarray, c0: int, c1: int) -> np.ndarray:
    return np.ones_like(xc)


@dataclass(frozen=True)
class Objective:
    """What a calibration-free search minimises for one weight (:func:`search_objective`).

    ``weights``: the per-element importance (``None``: plain squared error); ``note``: set when
    the weight is searched as an output head; ``guards``: importances under each of which a group
    must reconstruct at least as well as rtn's range, or gets rtn's range back.
    """

    weights: Weights | None
    note: str | None = None
    guards: tuple[Weights, ...] = ()


def search_objective(w: np.ndarray, spec: QuantSpec, objective: str, head_rule: bool,
                     input_gain: np.ndarray | None = None) -> Objective:
    """The error the calibration-free searches minimise for ``w`` (module doc)."""
    if head_rule and looks_like_output_head(*w.shape):
        energy = vocabulary_energy(w, spec.block_size)
        if input_gain is None or np.asarray(input_gain).size != w.shape[0]:
            return Objective(energy_weighted(energy), HEAD_NOTE)
        gain = gain_energy(input_gain, w.shape[0], spec.block_size)
        both = (energy + gain) * np.float32(0.5)  # either proxy may mark a channel
        return Objective(energy_weighted(both), GAIN_NOTE, (energy_weighted(energy), energy_weighted(gain)))
    return Objective(objective_weights(objective))


def guard(x: np.ndarray, mask: np.ndarray | None, spec: QuantSpec, dtype, scale: np.ndarray, zp: np.ndarray,
          objective: Objective) -> list[str]:
    """Apply ``objective.guards`` to a search's ``(scale, zp)`` in place; the note saying how many
    groups kept the searched range (none without guards)."""
    if not objective.guards:
        return []
    kept = keep_unless_worse(x, mask, spec, dtype, scale, zp, objective.guards)
    return [f"output head: {kept:.0%} of the groups keep the searched range (better than rtn's under each "
            "proxy), the rest keep rtn's"]


def clip_search(
    x: np.ndarray,
    mask: np.ndarray | None,
    spec: QuantSpec,
    dtype,
    objective: Objective,
    *,
    grid: int = 20,
    min_ratio: float | None = None,
    saturate: bool | None = None,
    refine: bool = True,
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """rtn-clip's parameters for the group view ``x``: ``(scale, zp, notes)``.

    ``objective`` comes from :func:`search_objective`, so that a caller refining the result (HQQ)
    judges its iterates by the same error. See the module doc.
    """
    from .imatrix import candidate_ratios, weighted_search

    if objective.note:
        scale, zp = weighted_search(x, mask, spec, dtype, objective.weights, candidate_ratios(spec, 12, 0.3), True)
        return scale, zp, [objective.note, *guard(x, mask, spec, dtype, scale, zp, objective)]
    ratios = clip_ratios(spec, grid, default_min_ratio(spec) if min_ratio is None else float(min_ratio))
    if saturate is None:
        saturate = spec.symmetric
    scale, zp = weighted_search(x, mask, spec, dtype, objective.weights or _ones, list(ratios), refine, not saturate)
    return scale, zp, []


@register("rtn-clip", input_gain=True, options={
    "grid": OptionSpec(int, min=1), "min_ratio": OptionSpec(float, min=0, min_open=True, max=1),
    "objective": OptionSpec(str, choices=OBJECTIVES), "saturate": OptionSpec(bool), "refine": OptionSpec(bool),
    "head_rule": OptionSpec(bool)})
def rtn_clip(
    w: np.ndarray,
    spec: QuantSpec,
    stats: LayerStats | None = None,
    *,
    grid: int = 20,
    min_ratio: float | None = None,
    objective: str = "magnitude",
    saturate: bool | None = None,
    refine: bool = True,
    head_rule: bool = True,
    input_gain: np.ndarray | None = None,
) -> QuantizedWeight:
    """Round to nearest with the per-group range minimising the group's weighted error.

    ``grid`` steps from ratio 1.0 to ``min_ratio`` (``grid=0``: min/max only; default 0.5
    symmetric, 0.97 asymmetric, see :func:`._search.default_min_ratio`); ``objective``
    ``"magnitude"`` or ``"mse"``; ``saturate``: whether a candidate may clip a weight past half a
    step (default: symmetric yes, asymmetric no -- measured, see the module doc); ``refine=False``: no weighted least-squares refit of the candidates; ``head_rule=False``:
    output heads are searched like any weight. ``input_gain`` (set by the transform): the gain of
    the norm producing the input, which weights an output head's search. ``stats`` is ignored.
    """
    w = check_weight(w, spec)
    dtype = out_dtype(w)
    x, mask = group_view(w, spec.block_size)
    scale, zp, notes = clip_search(x, mask, spec, dtype, search_objective(w, spec, objective, head_rule, input_gain),
                                   grid=grid, min_ratio=min_ratio,
                                   saturate=saturate, refine=refine)
    result = finalize(x, scale, zp, spec, w.shape[0], dtype)
    result.notes.extend(notes)
    return result
