"""Degradation prediction from discovered filters (paper Sec. 4.3 / 5.3, Eq. 8).

For an input x, its own filter set {filter_x} is the top ``fraction`` of its per-image FAIG scores
(Eq. 6, ``Attribution.image_scores``); {filter_D} is the top ``fraction`` of Eq. 7 on a discovery
set. OS(x, D) = |{filter_D} ∩ {filter_x}| / |{filter_x}| (Eq. 8) and x is predicted to carry D when
OS(x, D) ≥ T_D. Each T_D is calibrated on a validation split to maximise the accuracy of the binary
decision "is D" vs "is not D" (images of every other label, clean included, are the negatives).

The reproduction discovers on Set14, calibrates on the first half of the sorted BSD68 file names
and tests on the second half (the paper: Set14 / BSD100 / DIV2K-val).
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import torch

from faig_fast.core.attribution import Attribution, top_count
from faig_fast.errors import FAIGError, InvalidInputError

NONE_LABEL = "clean"


def _as_set(x: set | Iterable[int] | torch.Tensor) -> set[int]:
    if isinstance(x, torch.Tensor):
        return set(x.reshape(-1).tolist())
    return set(int(v) for v in x)


def overlap_score(image_top: set | torch.Tensor, degradation_top: set | torch.Tensor) -> float:
    """Eq. 8: |image set ∩ degradation set| / |image set|."""
    a, b = _as_set(image_top), _as_set(degradation_top)
    if not a:
        raise InvalidInputError("overlap_score: the image's filter set is empty")
    return len(a & b) / len(a)


def image_tops(attribution: Attribution, fraction: float = 0.01) -> list[torch.Tensor]:
    """Each image's own top ``fraction`` filters (needs ``keep_per_image=True``)."""
    if not attribution.image_scores:
        raise FAIGError("per-image scores were not kept: attribute(..., keep_per_image=True)")
    k = top_count(len(attribution.index), fraction)
    return [attribution.image_ranking(i)[:k] for i in range(len(attribution.image_scores))]


def overlap_scores(attribution: Attribution, degradation_tops: dict[str, torch.Tensor],
                   fraction: float = 0.01) -> list[dict[str, float]]:
    """OS(x, D) for every image x of ``attribution`` and every D of ``degradation_tops``."""
    return [{d: overlap_score(t, s) for d, s in degradation_tops.items()} for t in image_tops(attribution, fraction)]


def group_by_label(scores: Sequence[dict[str, float]], labels: Sequence[str]) -> dict[str, list[dict[str, float]]]:
    """{true label: [OS dict of each image with that label]}."""
    if len(scores) != len(labels):
        raise InvalidInputError(f"{len(scores)} score rows for {len(labels)} labels")
    out: dict[str, list[dict[str, float]]] = {}
    for s, l in zip(scores, labels):
        out.setdefault(l, []).append(s)
    return out


def _binary(scores_by_label: dict[str, list[dict[str, float]]], d: str) -> tuple[np.ndarray, np.ndarray]:
    vals, pos = [], []
    for label, rows in scores_by_label.items():
        for r in rows:
            vals.append(r[d])
            pos.append(label == d)
    return np.asarray(vals, dtype=np.float64), np.asarray(pos, dtype=bool)


def best_threshold(values: np.ndarray, positive: np.ndarray) -> tuple[float, float]:
    """(T, accuracy) maximising the accuracy of ``values >= T`` vs ``positive``.

    Candidates are midpoints between consecutive distinct values plus one below / above all;
    among equally accurate candidates the middle one is taken (the centre of the best margin).
    """
    if len(values) == 0:
        raise InvalidInputError("cannot calibrate a threshold on no images")
    u = np.unique(values)
    cands = np.concatenate([[u[0] - 0.5], (u[:-1] + u[1:]) / 2, [u[-1] + 0.5]])
    acc = np.array([np.mean((values >= t) == positive) for t in cands])
    best = np.flatnonzero(acc == acc.max())
    t = float(cands[best[len(best) // 2]])
    return t, float(acc.max())


def calibrate_thresholds(scores_by_label: dict[str, list[dict[str, float]]],
                         degradations: Sequence[str] | None = None) -> dict[str, float]:
    """T_D for each degradation D, maximising validation accuracy of "is D" vs "not D"."""
    if degradations is None:
        first = next((rows[0] for rows in scores_by_label.values() if rows), None)
        if first is None:
            raise InvalidInputError("calibrate_thresholds: no scores")
        degradations = list(first)
    return {d: best_threshold(*_binary(scores_by_label, d))[0] for d in degradations}


def predict(scores: Sequence[dict[str, float]], thresholds: dict[str, float]) -> list[str]:
    """Predicted label per image: the D with OS ≥ T_D (the largest OS − T_D if several), else ``clean``."""
    out = []
    for s in scores:
        hits = {d: s[d] - t for d, t in thresholds.items() if s[d] >= t}
        out.append(max(hits, key=hits.get) if hits else NONE_LABEL)
    return out


def accuracy(scores_by_label: dict[str, list[dict[str, float]]], thresholds: dict[str, float]) -> dict[str, float]:
    """Binary accuracy of "is D" per D, plus ``overall``: accuracy of :func:`predict` vs the true labels."""
    out = {}
    for d, t in thresholds.items():
        vals, pos = _binary(scores_by_label, d)
        out[d] = float(np.mean((vals >= t) == pos))
    rows = [(l, r) for l, rs in scores_by_label.items() for r in rs]
    preds = predict([r for _, r in rows], thresholds)
    out["overall"] = float(np.mean([p == l for p, (l, _) in zip(preds, rows)]))
    return out


def _protocol(cal: dict, tst: dict, degradations: Sequence[str], fixed: dict[str, float] | None = None) -> dict:
    thr = dict(fixed) if fixed is not None else calibrate_thresholds(cal, degradations)
    return {"thresholds": thr, "calibration_accuracy": accuracy(cal, thr), "test_accuracy": accuracy(tst, thr)}


def run_prediction(discover: Attribution, calibrate: Attribution, test: Attribution, *, fraction: float = 0.01,
                   degradations: Sequence[str] = ("blur", "noise"),
                   fixed_thresholds: dict[str, float] | None = None) -> dict:
    """The Sec. 5.3 protocol: {filter_D} from ``discover`` (Eq. 7), T_D on ``calibrate``, accuracy on
    ``test``. Returns a JSON-able dict (thresholds, accuracies, per-image scores and labels).

    The top-level thresholds/accuracies use every label of the splits (e.g. clean images as negatives
    for every D); ``protocols`` also holds ``degraded_only`` (only images labelled with one of
    ``degradations``) and, with ``fixed_thresholds`` (e.g. the paper's), ``fixed`` and
    ``fixed_degraded_only`` using those thresholds instead of calibrated ones.
    """
    tops = {d: discover.top(d, fraction) for d in degradations}
    cal = overlap_scores(calibrate, tops, fraction)
    tst = overlap_scores(test, tops, fraction)
    cal_g = group_by_label(cal, calibrate.image_labels)
    tst_g = group_by_label(tst, test.image_labels)

    def only(g: dict) -> dict:
        return {l: r for l, r in g.items() if l in degradations}
    protocols = {"all_labels": _protocol(cal_g, tst_g, degradations),
                 "degraded_only": _protocol(only(cal_g), only(tst_g), degradations)}
    if fixed_thresholds is not None:
        fixed = {d: fixed_thresholds[d] for d in degradations}
        protocols["fixed"] = _protocol(cal_g, tst_g, degradations, fixed)
        protocols["fixed_degraded_only"] = _protocol(only(cal_g), only(tst_g), degradations, fixed)
    main = protocols["all_labels"]
    mean_os = {l: {d: float(np.mean([r[d] for r in rows])) for d in degradations} for l, rows in tst_g.items()}
    return {
        "fraction": fraction, "degradations": list(degradations), **main, "protocols": protocols,
        "test_mean_overlap": mean_os,
        "calibration": {"names": calibrate.image_names, "labels": calibrate.image_labels, "scores": cal},
        "test": {"names": test.image_names, "labels": test.image_labels, "scores": tst,
                 "predicted": predict(tst, main["thresholds"])},
    }
