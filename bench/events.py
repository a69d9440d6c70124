"""Event-wise scoring, as telemanom's evaluation does it (Hundman et al. 2018).

A *predicted sequence* is a run of rows with a fault active; a *labelled
sequence* is a run of labelled rows (or a labelled window). A labelled
sequence overlapped by any predicted one is a true positive (counted once,
however many predictions overlap it); one overlapped by none is a false
negative; a predicted sequence that overlaps no labelled one is a false
positive. One fault raised and cleared over and over inside one labelled
anomaly is still one true positive; the same outside any label is one false
positive per raise.

>>> pred = np.array([0, 1, 1, 0, 0, 0, 1, 0, 1, 1, 0, 0], bool)
>>> label = np.array([0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 0], bool)
>>> event_counts(pred, label)
{'tp': 2, 'fp': 1, 'fn': 0}
"""

from __future__ import annotations

import numpy as np


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, end) of each run of True, end inclusive."""
    edges = np.diff(np.concatenate([[0], np.asarray(mask, dtype=np.int8), [0]]))
    return list(zip(np.flatnonzero(edges == 1).tolist(), (np.flatnonzero(edges == -1) - 1).tolist(),
                    strict=True))


def event_counts(predicted: np.ndarray, labelled: np.ndarray,
                 windows: list[tuple[int, int]] | None = None) -> dict[str, int]:
    """TP/FP/FN over sequences. ``windows`` (inclusive row ranges) replace the runs of
    ``labelled`` when given (NAB's windows, telemanom's labelled ranges)."""
    truth = runs(labelled) if windows is None else [(int(a), int(b)) for a, b in windows]
    predictions = runs(predicted)
    covered = np.zeros(len(predicted) + 1, np.int64)  # prefix sums of predicted rows
    covered[1:] = np.cumsum(np.asarray(predicted, dtype=np.int64))
    tp = sum(1 for a, b in truth if covered[min(b, len(predicted) - 1) + 1] - covered[max(a, 0)] > 0)
    labelled_rows = np.zeros(len(predicted) + 1, np.int64)
    mask = np.zeros(len(predicted), bool)
    for a, b in truth:
        mask[max(a, 0):b + 1] = True
    labelled_rows[1:] = np.cumsum(mask)
    fp = sum(1 for a, b in predictions if labelled_rows[b + 1] - labelled_rows[a] == 0)
    return {"tp": tp, "fp": fp, "fn": len(truth) - tp}


def event_metrics(tp: int, fp: int, fn: int) -> dict[str, float | int]:
    """Precision, recall and F1 over events (1.0 where nothing could be wrong)."""
    precision = tp / (tp + fp) if tp + fp else 1.0
    recall = tp / (tp + fn) if tp + fn else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}
