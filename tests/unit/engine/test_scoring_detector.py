"""The scorer (per-channel EWMA of signed errors, combined), its calibration, and the fault detector."""

from __future__ import annotations

import numpy as np
import pytest
from faultwatch.runtime.engine.calibration import calibrate, long_run_spread
from faultwatch.runtime.engine.scoring import FaultDetector, Scorer, smoothed_scores


def white(n: int, k: int, seed: int = 0, std: float = 0.1) -> np.ndarray:
    return std * np.random.default_rng(seed).standard_normal((n, k))


def test_normal_errors_score_about_one_whatever_the_span():
    r = white(20_000, 4)
    for span in (1, 5, 20):
        spread = long_run_spread([r], span)
        scores = smoothed_scores(r, spread, span)[3 * span:]
        assert np.sqrt(np.mean(scores**2)) == pytest.approx(1.0, rel=0.05)


def test_a_small_bias_stands_out_only_once_smoothed():
    k = 8
    r = white(3000, k, seed=1)
    r[2000:, 0] += 0.1  # one channel, biased by one noise width: invisible reading by reading
    spread = long_run_spread([r[:2000]], 20)
    smooth = smoothed_scores(r, spread, 20)
    raw = smoothed_scores(r, long_run_spread([r[:2000]], 1), 1)
    # Unsmoothed, the biased part scores barely more than the normal part ...
    assert raw[2100:].mean() < 1.15 * raw[100:2000].mean()
    # ... smoothed, it stands out: one channel of eight at ~4.4 noise widths (span 20).
    assert smooth[2100:].mean() > 1.6 * smooth[100:2000].mean()


def test_autocorrelated_errors_get_a_larger_long_run_spread():
    rng = np.random.default_rng(2)
    e = rng.standard_normal(20_000)
    ar = np.empty_like(e)
    ar[0] = e[0]
    for t in range(1, len(e)):
        ar[t] = 0.8 * ar[t - 1] + e[t]
    ar *= 0.1 / ar.std()  # same marginal spread as the white channel
    r = np.c_[0.1 * rng.standard_normal(20_000), ar]
    spread = long_run_spread([r], 20)
    assert spread[0] == pytest.approx(0.1, rel=0.05)
    assert spread[1] > 2 * spread[0]  # AR(1) φ=0.8: long-run sd ≈ 0.1·√(1.8/0.2) = 0.3
    # Normalised by it, both channels weigh the same in the score.
    scorer = Scorer(spread, span=20, warmup=0, capacity=1)
    shares = np.zeros(2)
    for row in r[100:]:
        _, contrib, _ = scorer.update([0], row[None])
        shares += contrib[0]
    assert shares[0] / shares[1] == pytest.approx(1.0, rel=0.25)


def test_unmeasured_channels_are_neither_smoothed_nor_scored():
    scorer = Scorer([1.0, 1.0], span=1, warmup=0, capacity=1)
    score, contrib, _ = scorer.update([0], np.array([[np.nan, 3.0]]))
    assert score[0] == pytest.approx(3.0) and np.isnan(contrib[0, 0])
    assert scorer.smoothed[0, 0] == 0.0
    score, _, _ = scorer.update([0], np.array([[np.nan, np.nan]]))
    assert score[0] == pytest.approx(3.0)  # nothing measured: the score stays
    assert scorer.seen[0] == 1


def test_calibrated_threshold_is_the_quantile_times_the_factor():
    r = white(5000, 3, seed=3)
    cal = calibrate([r], span=10, warmup=30, quantile=0.99, factor=2.0)
    scores = smoothed_scores(r, cal.residual_std, 10)[30:]
    assert cal.threshold == pytest.approx(2.0 * np.quantile(scores, 0.99))
    assert cal.n_scores == len(scores) and cal.score_span == 10


# -- the detector ----------------------------------------------------------------------


def run(det: FaultDetector, score: np.ndarray, threshold: float, ratio: float) -> np.ndarray:
    out = []
    for s in score:
        out.append(det.update([0], np.array([s > threshold]), np.array([s < ratio * threshold]))[0])
    return np.array(out)


def test_a_score_hovering_at_the_threshold_raises_once_and_never_storms():
    # A smoothed score wanders slowly around the threshold during a real episode.
    t = np.arange(2000)
    score = np.r_[np.full(100, 0.3), 1.0 + 0.1 * np.sin(2 * np.pi * t / 60), np.full(100, 0.3)]
    changes = run(FaultDetector(3, 5, 10, 1), score, 1.0, 0.8)
    assert (changes == 1).sum() == 1 and (changes == -1).sum() == 1
    assert np.flatnonzero(changes == -1)[0] == 2100 + 9  # 10 calm readings after the episode
    # Without the lower clearing level (ratio 1), the same episode flaps: the storm the
    # hysteresis exists to prevent.
    flapping = run(FaultDetector(3, 5, 10, 1), score, 1.0, 1.0)
    assert (flapping == 1).sum() > 5


def test_clearing_needs_calm_readings_in_a_row():
    det = FaultDetector(2, 3, 3, 1)
    score = np.array([2, 2, 0, 0, 0.9, 0, 0, 0, 0])
    changes = run(det, score, 1.0, 0.8)
    # raised at the 2nd; the 0.9 (between the levels) breaks the calm run; cleared at the 3rd calm after it.
    assert changes.tolist() == [0, 1, 0, 0, 0, 0, 0, -1, 0]


def test_reset_forgets_verdicts_but_keeps_an_active_fault():
    det = FaultDetector(2, 3, 2, 2)
    for _ in range(2):
        det.update([0, 1], np.array([True, True]), np.array([False, False]))
    assert det.active.tolist() == [True, True]
    det.reset([0])
    assert det.active[0] and det.history[0] == 0 and det.normal_run[0] == 0
    with pytest.raises(ValueError):
        FaultDetector(4, 3, 1, 1)


def test_a_severe_reading_raises_at_once_but_not_in_a_cooldown():
    det = FaultDetector(raise_k=3, window_n=5, clear_m=2, capacity=1, cooldown=3)

    def step(anomalous: bool, calm: bool = False, severe: bool = False) -> int:
        return int(det.update([0], np.array([anomalous]), np.array([calm]), np.array([severe]))[0])

    assert step(True) == 0  # one anomalous reading: 1 of 5, not enough
    assert step(True, severe=True) == 1  # the next one is severe: raised on it
    assert [step(False, calm=True) for _ in range(2)] == [0, -1]
    assert step(True, severe=True) == 0  # in the cooldown: not even a severe reading raises
    assert [step(False, calm=True) for _ in range(3)] == [0, 0, 0]
    assert step(True, severe=True) == 1  # after it, it does
    # "severe" counts only where the reading is also anomalous (below the threshold: never).
    det2 = FaultDetector(raise_k=3, window_n=5, clear_m=2, capacity=1)
    assert int(det2.update([0], np.array([False]), None, np.array([True]))[0]) == 0


def test_a_severe_reading_raises_at_once_only_when_it_beats_its_devices_record():
    """DetectorSettings.severe_record: a spike no higher than one the device already made (MSL's
    channels spike in normal operation, again and again) waits for the raise_k-of-window_n rule;
    one 13 % above anything before raises on itself, as without the record."""
    def severe(record: float, scores: list[float], ready: list[bool] | None = None) -> list[bool]:
        det = FaultDetector(raise_k=3, window_n=5, clear_m=2, capacity=2, severe=2.0, record=record)
        ready = [True] * len(scores) if ready is None else ready
        # device 0 gets the scores, device 1 stays quiet beside it (a record is per device)
        return [bool(det.severe_flags([0, 1], np.array([s, 0.1]), 1.0, np.array([r, True]))[0])
                for s, r in zip(scores, ready, strict=True)]

    spikes = [0.5, 3.0, 0.5, 3.2, 0.5, 3.7, 0.5, 1.9]  # each score joins the record: 3.7 > 1.13 × 3.2
    assert severe(0.0, spikes) == [False, True, False, True, False, True, False, False]
    assert severe(0.13, spikes) == [False, True, False, False, False, True, False, False]  # 3.2 < 1.13 × 3
    # Only ready readings (warmed up, not re-warming) set the record.
    assert severe(0.13, [9.0, 3.0], ready=[False, True]) == [True, True]
    with pytest.raises(ValueError):
        FaultDetector(3, 5, 2, 1, severe=2.0, record=-0.1)


def test_the_default_detector_clears_after_15_calm_readings_and_then_cools_down_for_100():
    """Issue 11's measurement (DetectorSettings' docstring): a fault that outlasted its
    disturbance by 20 calm readings cost SKAB its FAR target, and a disturbance re-raised 50+
    readings after its clear was most of MSL's extra false runs."""
    from faultwatch.runtime.engine.detector import DetectorSettings

    d = DetectorSettings()
    det = FaultDetector(d.raise_k, d.window_n, d.clear_m, capacity=1, cooldown=d.cooldown)

    def feed(anomalous: bool, n: int) -> list[int]:
        a = np.array([anomalous])
        return [int(det.update([0], a, ~a)[0]) for _ in range(n)]

    assert 1 in feed(True, 10)
    calm = feed(False, 20)
    assert calm.index(-1) == 14  # cleared by the 15th calm reading (the 20th, before)
    # A burst 75 readings after the clear: still in the cooldown (over, at 50 before).
    feed(False, 75 - 6)
    assert 1 not in feed(True, 10)
    feed(False, 30)
    assert 1 in feed(True, 10)  # after the cooldown, the next disturbance raises again
