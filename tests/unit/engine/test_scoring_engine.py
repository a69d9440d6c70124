"""The engine's scoring path with an int8 model trained in this session: a slow fault is one episode.

Gaps bridged and thresholds reported run on the committed tiny model (test_scoring_stream.py).
"""

from __future__ import annotations

import pytest
from engine_streams import readings
from faultwatch.runtime.devtools.simulator import Fault
from faultwatch.runtime.engine.engine import Engine
from faultwatch.runtime.engine.model import StepModel
from model_fixtures import TrainedModels


@pytest.fixture(scope="module")
def int8(trained: TrainedModels) -> StepModel:
    return StepModel(trained.int8)


@pytest.mark.parametrize("seed", [32, 33, 35])
def test_a_slowly_growing_fault_is_one_episode(int8: StepModel, seed: int):
    """Bearing wear grows slowly: its score creeps up through the threshold and hovers there, the case
    that made faults flap. With hysteresis: one raise, and at most one clear, per device."""
    fault = Fault("bearing_wear", "pump-000", start=300, duration=700)
    outs = Engine(int8).process(readings(1100, seed=seed, faults=[fault]))
    events = [o.event for o in outs if o.event is not None]
    raised = [e for e in events if e.state == "raised"]
    cleared = [e for e in events if e.state == "cleared"]
    assert len(raised) == 1, [(e.state, e.ts) for e in events]
    assert len(cleared) <= 1
    assert raised[0].ts >= outs[0].ts + 300 * 1.0 * int8.contract.sample_period_s
