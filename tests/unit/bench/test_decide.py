"""The baselines decide with the same raise/clear logic as the engine, cooldown included."""

import numpy as np
from faultwatch.bench.eval_file import decide
from faultwatch.runtime.engine.detector import DetectorSettings


def burst_after_clear(settings: DetectorSettings, gap: int) -> np.ndarray:
    """Scores: a burst that raises, calm readings that clear it, ``gap`` more calm, a second burst."""
    burst = [5.0] * settings.window_n
    calm = [0.1] * (settings.clear_m + gap)
    return np.array(burst + calm + burst + [0.1] * 5)


def test_no_second_raise_within_the_cooldown():
    settings = DetectorSettings(cooldown=50)
    scores = burst_after_clear(settings, gap=10)
    trace = decide(scores, np.ones(len(scores), bool), threshold=1.0, detector=settings)
    assert (trace.change == 1).sum() == 1 and (trace.change == -1).sum() == 1


def test_raises_again_after_the_cooldown():
    settings = DetectorSettings(cooldown=5)
    scores = burst_after_clear(settings, gap=10)
    trace = decide(scores, np.ones(len(scores), bool), threshold=1.0, detector=settings)
    assert (trace.change == 1).sum() == 2


def test_the_baselines_honour_the_severe_record():
    # One spike raises on itself; a second, no higher, after the clear and cooldown, does not.
    settings = DetectorSettings(severe=2.0, severe_record=0.13, cooldown=5)
    scores = np.array([0.1] * 5 + [5.0] + [0.1] * 30 + [5.0] + [0.1] * 5)
    trace = decide(scores, np.ones(len(scores), bool), threshold=1.0, detector=settings)
    assert np.flatnonzero(trace.change == 1).tolist() == [5]
    trace = decide(scores, np.ones(len(scores), bool), threshold=1.0,
                   detector=DetectorSettings(severe=2.0, severe_record=0.0, cooldown=5))
    assert np.flatnonzero(trace.change == 1).tolist() == [5, 36]
