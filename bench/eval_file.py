"""One benchmark file through ``faultwatch eval``: train, stream, decide, measure, plot.

:func:`evaluate_file` is what a worker process runs for one file and one
protocol. The forecaster is trained and exported by
:mod:`faultwatch.bench.eval_model` (imported here lazily: it needs torch),
then every row of the file — training rows first, so the device state is as
warm at the first test row as a running daemon's — goes through the runtime
:class:`~faultwatch.runtime.engine.engine.Engine` exactly as the daemon would run it.
The baselines score the same rows and decide with the same fault detector.
Only test rows are measured.
"""

from __future__ import annotations

import csv
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from faultwatch.bench import nab
from faultwatch.bench.baselines import half_space_trees, river_available, rolling_zscore
from faultwatch.bench.events import event_counts, runs
from faultwatch.bench.report import COLORS, Panel, render_page
from faultwatch.bench.telemanom import TARGET, Channel, channel_table
from faultwatch.runtime.engine.calibration import long_run_spread
from faultwatch.runtime.engine.detector import DetectorSettings
from faultwatch.runtime.engine.engine import Engine, EngineSettings, Reading
from faultwatch.runtime.engine.model import StepModel
from faultwatch.runtime.engine.scoring import FaultDetector, smoothed_scores
from faultwatch.runtime.offline.csvdata import Table, read_csv
from faultwatch.runtime.offline.replay import point_metrics, replay

#: The forecaster (deciding with the detector its model file carries) and the baselines.
DETECTORS = ("lstm", "zscore", "hst")
LABELS = {
    "lstm": "LSTM forecaster (the model's detector)",
    "zscore": "rolling z-score (baseline)",
    "hst": "River HalfSpaceTrees (baseline)",
}
KINDS = ("skab", "nab", "telemanom", "csv")


@dataclass(frozen=True)
class EvalOptions:
    """Everything a benchmark run decides, recorded in metrics.json."""

    train_rows: int = 400  # SKAB and csv: the first rows of each file train and calibrate
    train_fraction: float | None = None  # csv: instead, this fraction of each file's rows
    changepoint_window_s: float = 60.0  # SKAB: NAB window after each true changepoint
    # Written into every exported model: the engine, the baselines' fault logic and
    # `faultwatch replay` of that model all decide with it.
    detector: DetectorSettings = field(default_factory=DetectorSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)  # non-decision settings only
    spec: dict = field(default_factory=dict)  # overrides of bench.eval_model.BenchSpec
    zscore_window: int = 120
    baselines: bool = True
    reports: bool = True
    # An earlier run's OUT: score the models it exported (OUT/models/NAME.onnx) instead of
    # training, with this run's detector (see bench.eval_model.reuse_and_calibrate).
    models: str | None = None


@dataclass(frozen=True)
class FileJob:
    kind: str  # one of KINDS
    path: Path  # the CSV, or for telemanom the channel's test array
    name: str  # how the file is called in tables and paths, e.g. "valve1/3"
    protocol: str  # "per-file" or "pretrain"
    out: Path
    options: EvalOptions
    init: Path | None = None  # a pretrained run to fine-tune
    windows: tuple[tuple[float, float], ...] = ()  # NAB: labelled windows (start, end) in epoch s
    channel: Channel | None = None  # telemanom: the channel's arrays and labelled sequences

    @property
    def stem(self) -> str:
        """File-name-safe name; per-file outputs go to OUT/{models,rows,reports}/STEM.*"""
        safe = self.name.replace("/", "_")
        return safe if self.protocol == "per-file" else f"{self.protocol}/{safe}"


@dataclass
class Trace:
    """Per row of a file, what one detector did."""

    score: np.ndarray
    threshold: np.ndarray
    active: np.ndarray  # fault active after this row
    change: np.ndarray  # +1 raised, -1 cleared, 0 none
    anomalous: np.ndarray | None = None  # the row's verdict (score above threshold, outside warm-up)


def sorted_table(table: Table) -> Table:
    order = np.argsort(table.timestamps, kind="stable")
    return replace(table, timestamps=table.timestamps[order], devices=table.devices[order],
                   values=table.values[order], labels={k: v[order] for k, v in table.labels.items()})


def decide(scores: np.ndarray, ready: np.ndarray, threshold: float, detector: DetectorSettings) -> Trace:
    """A baseline's scores through the same raise/clear logic the engine uses."""
    det = FaultDetector(detector.raise_k, detector.window_n, detector.clear_m, 1,
                        cooldown=detector.cooldown, severe=detector.severe, record=detector.severe_record)
    n = len(scores)
    active, change = np.zeros(n, bool), np.zeros(n, np.int8)
    slot = np.zeros(1, np.int64)
    for t in range(n):
        anomalous = bool(ready[t] and scores[t] > threshold)
        calm = bool(ready[t] and scores[t] < detector.clear_ratio * threshold)
        severe = det.severe_flags(slot, scores[t:t + 1], threshold, ready[t:t + 1])
        change[t] = det.update(slot, np.array([anomalous]), np.array([calm]), severe)[0]
        active[t] = det.active[0]
    return Trace(scores, np.full(n, threshold), active, change)


def engine_trace(model: StepModel, settings: EngineSettings,
                 readings: list[Reading]) -> tuple[Trace, np.ndarray]:
    """Stream the readings; returns the trace and the forecast made for each row [N, K] (NaN: none)."""
    engine = Engine(model, settings)
    n, k = len(readings), len(model.contract.targets)
    score, thr = np.zeros(n), np.full(n, np.nan)
    active, change, anomalous = np.zeros(n, bool), np.zeros(n, np.int8), np.zeros(n, bool)
    expected = np.full((n, k), np.nan)
    prev = None
    for t, out in enumerate(replay(engine, readings)):
        if out is None:  # dropped (a repeated timestamp): the decision stands
            active[t] = active[t - 1] if t else False
            score[t] = score[t - 1] if t else 0.0
            continue
        score[t], thr[t], active[t] = out.score, out.threshold, out.fault_active
        anomalous[t] = out.anomalous
        change[t] = 0 if out.event is None else (1 if out.event.state == "raised" else -1)
        if prev is not None:
            expected[t] = prev
        prev = out.forecast
    return Trace(score, thr, active, change, anomalous), expected


def write_rows(path: Path, ts: np.ndarray, trace: Trace) -> None:
    """Per-row decisions (``ts,score,anomalous,fault``), the columns ``faultwatch replay`` writes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    anomalous = trace.anomalous if trace.anomalous is not None else np.zeros(len(ts), bool)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["ts", "score", "anomalous", "fault"])
        for row in zip(ts, trace.score, anomalous, trace.active, strict=True):
            writer.writerow([repr(float(row[0])), f"{row[1]:.6g}", int(row[2]), int(row[3])])


def baseline_threshold(train_scores: np.ndarray, quantile: float, factor: float, bounded: bool) -> float:
    """The forecaster's rule (quantile × factor) for an unbounded score; for a score bounded
    by 1 (HST), the same margin applied above the median instead."""
    q = float(np.quantile(train_scores, quantile))
    if not bounded:
        return q * factor
    median = float(np.median(train_scores))
    return median + factor * (q - median)


def confusion(pred: np.ndarray, label: np.ndarray) -> dict:
    return {"tp": int((pred & label).sum()), "fp": int((pred & ~label).sum()),
            "fn": int((~pred & label).sum()), "tn": int((~pred & ~label).sum())}


def _delays(trace: Trace, label: np.ndarray, ts: np.ndarray, test: np.ndarray) -> list[float]:
    """Seconds from the start of each labelled test segment to the first fault raised in it."""
    out = []
    edges = np.diff(np.concatenate([[0], (label & test).astype(np.int8), [0]]))
    for a, b in zip(np.flatnonzero(edges == 1), np.flatnonzero(edges == -1), strict=True):
        # A fault already active when the segment starts counts as detected at once.
        if trace.active[a - 1] if a else False:
            out.append(0.0)
            continue
        hits = np.flatnonzero(trace.change[a:b] > 0)
        if len(hits):
            out.append(float(ts[a + hits[0]] - ts[a]))
    return out


def load_job(job: FileJob) -> tuple[Table, int, np.ndarray, tuple[str, ...] | None]:
    """(table in time order, rows that train, label per row, forecast targets or None = all)."""
    options = job.options
    if job.kind == "telemanom":
        assert job.channel is not None
        table, n_train = channel_table(job.channel)
        return table, n_train, table.labels["anomaly"], (TARGET,)
    table = sorted_table(read_csv(job.path, evenly_spaced=job.kind == "csv"))
    n = len(table.timestamps)
    if job.kind == "nab":
        label = np.zeros(n, bool)
        for lo, hi in nab.windows_from_times(table.timestamps, job.windows):
            label[lo:hi + 1] = True
        return table, nab.probationary_length(n), label, None
    if "anomaly" not in table.labels:
        raise ValueError(f"{job.path}: no 'anomaly' column")
    n_train = options.train_rows
    if job.kind == "csv" and options.train_fraction is not None:
        n_train = round(options.train_fraction * n)
    return table, n_train, table.labels["anomaly"], None


def evaluate_file(job: FileJob) -> dict:
    from faultwatch.bench.eval_model import BenchSpec, fit_and_export, head, reuse_and_calibrate

    started = time.monotonic()
    options = job.options
    spec = BenchSpec(**options.spec)
    detector = options.detector
    table, n_train, label, targets = load_job(job)
    features = tuple(table.columns)
    n = len(table.timestamps)
    if n <= n_train + 10 or n_train < 20:
        raise ValueError(f"{job.path}: {n} rows with {n_train} to train; need at least 20 to train "
                         "and 10 to test")
    model_path = job.out / "models" / f"{job.stem}.onnx"
    if options.models is None:
        info = fit_and_export(head(table, n_train), model_path, spec, features, job.init, detector, targets)
    else:
        source = Path(options.models) / "models" / f"{job.stem}.onnx"
        info = reuse_and_calibrate(source, head(table, n_train), model_path, spec, features, detector,
                                   targets)

    model = StepModel(model_path)
    values = table.select(features)
    readings = [Reading("device-0", float(table.timestamps[i]), values[i]) for i in range(n)]
    traces: dict[str, Trace] = {}
    traces["lstm"], expected = engine_trace(model, options.engine, readings)
    write_rows(job.out / "rows" / f"{job.stem}.csv", table.timestamps, traces["lstm"])
    if options.baselines:
        d = detector
        z = rolling_zscore(values, options.zscore_window)
        first = max(options.zscore_window // 4, 2)
        spread = long_run_spread([np.nan_to_num(z[first:n_train])], d.score_span)
        zs = smoothed_scores(np.where(np.isfinite(z), z, np.nan), np.maximum(spread, 1e-6), d.score_span)
        ready = np.arange(n) >= first + d.warmup
        thr = baseline_threshold(zs[:n_train][ready[:n_train]], d.quantile, d.factor, bounded=False)
        traces["zscore"] = decide(zs, ready, thr, d)
        if river_available():
            window = min(250, n_train // 2)
            h = half_space_trees(values, n_train, window_size=window)
            ready = np.arange(n) >= window
            thr = baseline_threshold(h[:n_train][ready[:n_train]], d.quantile, d.factor, bounded=True)
            traces["hst"] = decide(h, ready, thr, d)

    test = np.arange(n) >= n_train
    ts = table.timestamps
    results = {}
    for name, trace in traces.items():
        c = confusion(trace.active[test], label[test])
        if job.kind == "skab":
            cps = ts[test][table.labels.get("changepoint", np.zeros(n, bool))[test]]
            windows = nab.windows_from_times(ts[test], [(t, t + options.changepoint_window_s) for t in cps])
            detections = trace.change[test] != 0  # a changepoint detector flags both state changes
            scores = nab.score_all_profiles(detections, windows, probation=0)
        elif job.kind == "nab":
            windows = nab.windows_from_times(ts, job.windows)
            scores = nab.score_all_profiles(trace.change > 0, windows)  # NAB default probation
        else:  # no changepoints: NAB over the labelled runs of the test rows, as windows
            scores = nab.score_all_profiles(trace.change[test] > 0, runs(label[test]), probation=0)
        results[name] = c | point_metrics(**c) | {
            "events": event_counts(trace.active[test], label[test]),
            "nab": {p: r.__dict__ for p, r in scores.items()},
            "faults_raised": int((trace.change[test] > 0).sum()),
            "delays_s": _delays(trace, label, ts, test),
        }
    report_path = None
    if options.reports:
        report_path = job.out / "reports" / f"{job.stem}.html"
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(_page(job, table, features, model, expected, traces, results, label,
                                     ts[n_train]))
    return {"name": job.name, "file": str(job.path), "protocol": job.protocol, "rows": n,
            "train_rows": n_train, "test_rows": int(test.sum()),
            "anomalous_test_rows": int(label[test].sum()),
            "train": info, "detectors": results, "seconds": round(time.monotonic() - started, 2),
            "report": str(report_path) if report_path else None, "model": str(model_path),
            "rows_csv": str(job.out / "rows" / f"{job.stem}.csv")}


def _page(job: FileJob, table: Table, features: tuple[str, ...], model: StepModel, expected: np.ndarray,
          traces: dict[str, Trace], results: dict, label: np.ndarray, split_ts: float) -> str:
    ts = table.timestamps
    values = table.select(features)
    targets = model.contract.targets
    panels = []
    for j, name in enumerate(features):
        lines = [(values[:, j], COLORS["reading"], "reading")]
        if name in targets:
            lines.append((expected[:, targets.index(name)], COLORS["forecast"], "forecast"))
        panels.append(Panel(name, lines, height=90))
    main = traces["lstm"]
    panels.append(Panel("LSTM score (log scale)", [
        (main.score, COLORS["score"], "score"), (main.threshold, COLORS["threshold"], "threshold")],
        height=130, log=True))
    for name in ("zscore", "hst"):
        if name in traces:
            panels.append(Panel(LABELS[name], [(traces[name].score, COLORS["score"], "score"),
                                               (traces[name].threshold, COLORS["threshold"], "threshold")],
                                height=90))
    marks = [(float(ts[t]), "raised" if main.change[t] > 0 else "cleared")
             for t in np.flatnonzero(main.change)]
    rows = [{"detector": LABELS[d], "F1": f"{r['f1']:.3f}", "FAR %": f"{100 * r['far']:.1f}",
             "MAR %": f"{100 * r['mar']:.1f}", "TP": r["tp"], "FP": r["fp"], "FN": r["fn"], "TN": r["tn"],
             "NAB standard": f"{nab.NabResult(**r['nab']['standard']).normalized:.1f}",
             "events TP/FP/FN": "{tp}/{fp}/{fn}".format(**r["events"]),
             "faults raised": r["faults_raised"]} for d, r in results.items()]
    d = model.contract.decisions
    subtitle = (f"{job.kind.upper()} {job.name}, protocol {job.protocol}: rows before the dashed line "
                f"train and calibrate ({model.contract.quantization} model, score span "
                f"{d.score_span}, {d.policy} threshold, calibrated "
                f"{model.contract.calibration.threshold:.3g}); the rest are scored. Shading: labelled "
                f"anomaly (red), fault active for the {LABELS['lstm']} (amber).")
    return render_page(f"faultwatch eval — {job.name} ({job.protocol})", subtitle, rows, panels, ts, label,
                       main.active, marks, split_ts)
