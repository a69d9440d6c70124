"""Three numpy idioms of the per-reading hot path (scorer, detector, likelihood, batch step).

At batch 1 the engine's numpy calls work on one-row arrays, where a call's fixed cost is most of
its cost. Three habits measurably cut it, with the same numbers:

- a check that every flag is set counts them (:func:`all_set`) instead of calling ``.all()``;
- a constant of the arithmetic is held as a numpy array of one element (:func:`operands`): a
  ufunc given a Python number converts it on every call, ~1 µs more than an array operand;
- rows of a 2-D per-device array are written through :func:`rows_of`: one slot's row as a slice,
  since a fancy-indexed write of one row [1, W] costs three times a slice's (~1.9 against
  0.6 µs; seven such writes a reading: the four LSTM states, the forecast, the scaled reading
  and the smoothed errors).

>>> bool(all_set(np.array([True, True]))), bool(all_set(np.array([True, False])))
(True, False)
>>> alpha, beta = operands(0.25, 0.75)
>>> (alpha * np.array([2.0]) + beta).tolist(), alpha.dtype.name
([1.25], 'float64')
>>> rows_of(np.array([4])), rows_of(np.array([4, 2])).tolist()
(slice(4, 5, None), [4, 2])
"""

from __future__ import annotations

import numpy as np


def all_set(flags: np.ndarray) -> bool:
    """``flags.all()`` for the checks every call makes: count_nonzero costs a fifth of it on a few
    rows (``.all()`` and ``.any()`` go through Python wrappers; at batch 1 they were 15 % of a step)."""
    return np.count_nonzero(flags) == flags.size


def operands(*values: float, dtype=np.float64) -> tuple[np.ndarray, ...]:
    """Each value as an array of one element of ``dtype``: a constant for per-reading ufuncs."""
    return tuple(np.array([v], dtype) for v in values)


def rows_of(slots: np.ndarray) -> slice | np.ndarray:
    """``slots`` [B] as the index of a write to a 2-D per-device array: a slice for one slot (the
    same row, at a third of the cost), else the slots themselves. For writes only: a slice reads
    a view, which a later write would change under the reader."""
    if len(slots) == 1:
        slot = int(slots[0])
        return slice(slot, slot + 1)
    return slots
