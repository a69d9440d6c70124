"""SlotArrays' snapshots: a field added after snapshots were first written loads at its initial
value; any other missing or misshapen field refuses the snapshot."""

from __future__ import annotations

import numpy as np
import pytest
from faultwatch.runtime.engine.devices import SlotArrays


def _arrays() -> SlotArrays:
    arrays = SlotArrays(capacity=4)
    arrays.declare("state", (3,), np.float32, on_reset=0.0)
    arrays.declare("since", dtype=np.int64, initial=7, added_later=True)
    return arrays


def test_a_snapshot_without_a_field_added_later_loads_it_at_its_initial_value():
    arrays = _arrays()
    arrays["since"][:] = 99
    saved = {"state": np.ones((2, 3), np.float32)}
    arrays.check_fits(saved, 2)
    arrays.load(np.array([1, 3]), saved)
    assert arrays["since"].tolist() == [99, 7, 99, 7]
    assert arrays["state"][[1, 3]].tolist() == [[1.0] * 3] * 2


@pytest.mark.parametrize("saved", [
    {"since": np.zeros(2, np.int64)},  # the state is missing: another model's snapshot
    {"state": np.ones((2, 4), np.float32)},  # the state is another width
    {"state": np.ones((3, 3), np.float32)},  # another number of rows
])
def test_a_snapshot_missing_or_misshaping_any_other_field_is_refused(saved):
    with pytest.raises(ValueError, match="does not fit"):
        _arrays().check_fits(saved, 2)
