"""``faultwatch eval``: the runtime engine on public benchmarks, with baselines, in one run.

    faultwatch eval skab DIR --out OUT [--pretrain]
    faultwatch eval nab CSV... --windows windows.json --out OUT
    faultwatch eval telemanom DIR --out OUT
    faultwatch eval csv CSV... (--train-rows N | --train-fraction F) --out OUT

SKAB (Skoltech Anomaly Benchmark), its published protocol: every labelled CSV
under DIR on its own; its first 400 rows train the forecaster and calibrate
the threshold, the rest are the test set. Outlier detection is scored point
by point on test rows (TP, FP, FN, TN summed over all files, then F1, FAR,
MAR), changepoint detection with NAB in a 60 s window after each true
changepoint. ``--pretrain`` adds a second protocol: one model trained on
``anomaly-free.csv`` and fine-tuned per file on the same 400 rows.

NAB: each series trains on its probationary period (the first
min(⌊0.15·N⌋, 750) rows) and streams the rest; detections are the faults
raised, scored with NAB's standard, reward-low-FP and reward-low-FN profiles.

telemanom (NASA SMAP/MSL layout, see ``bench.telemanom``): one model per
channel, trained on its train array, forecasting column 0 from every column,
then streamed over train and test; csv: any CSVs with an ``anomaly`` column,
the first rows (``--train-rows``) or fraction (``--train-fraction``) train.

Every model is exported with the same :class:`DetectorSettings` written into
it, and the engine decides with what the file carries, as ``faultwatch run``
and ``replay`` do. Every benchmark is also scored event-wise as telemanom
scores (``bench.events``): ``metrics.json`` has ``events``.

Files are processed in parallel worker processes (``--jobs``, one per core
by default), each training with one torch thread. Output: ``OUT/metrics.json``,
a table on stdout, ``OUT/index.html`` and an HTML page per file under
``OUT/reports/``, the exported models under ``OUT/models/NAME.onnx`` and each
row's decision under ``OUT/rows/NAME.csv`` (``ts,score,anomalous,fault``:
``faultwatch replay OUT/models/NAME.onnx FILE`` gives the same ``fault``).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
from faultwatch.bench import nab
from faultwatch.bench.eval_file import DETECTORS, LABELS, EvalOptions, FileJob, evaluate_file
from faultwatch.bench.events import event_metrics
from faultwatch.bench.telemanom import find_channels
from faultwatch.runtime.offline.csvdata import read_csv
from faultwatch.runtime.offline.replay import point_metrics

ANOMALY_FREE = "anomaly-free.csv"


class EvalError(ValueError):
    """The benchmark input can't be used; one line, names the file."""


def _natural(path: Path) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", str(path))]


def find_skab_files(root: Path) -> tuple[list[Path], Path | None]:
    """Labelled CSVs under ``root`` (recursively, natural order) and ``anomaly-free.csv`` if there."""
    if not root.is_dir():
        raise EvalError(f"{root}: not a directory")
    files = sorted(root.rglob("*.csv"), key=_natural)
    free = next((f for f in files if f.name == ANOMALY_FREE), None)
    labelled = [f for f in files if f.name != ANOMALY_FREE]
    if not labelled:
        raise EvalError(f"{root}: no labelled CSV files")
    return labelled, free


def default_jobs() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def run_jobs(jobs: list[FileJob], workers: int, on_done: Callable[[dict], None]) -> list[dict]:
    """Evaluate the files, in ``workers`` spawned processes (torch and fork do not mix)."""
    results = []
    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            results.append(_guarded(job))
            on_done(results[-1])
        return results
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=context) as pool:
        futures = [pool.submit(_guarded, job) for job in jobs]
        for future in as_completed(futures):
            results.append(future.result())
            on_done(results[-1])
    order = {(j.protocol, j.name): i for i, j in enumerate(jobs)}
    return sorted(results, key=lambda r: order[(r["protocol"], r["name"])])


def _guarded(job: FileJob) -> dict:
    """evaluate_file, with a failure (e.g. export refusing a model that fails int8 parity) recorded
    for that file instead of ending the run: the table and metrics.json say how many failed."""
    try:
        return evaluate_file(job)
    except Exception as exc:  # one bad file must not lose the other 33
        return {"name": job.name, "file": str(job.path), "protocol": job.protocol,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}


def aggregate(files: list[dict], detector: str) -> dict | None:
    """Sum one detector's confusion counts and NAB scores over files, then divide."""
    rows = [f["detectors"][detector] for f in files if detector in f.get("detectors", {})]
    if not rows:
        return None
    counts = {k: sum(r[k] for r in rows) for k in ("tp", "fp", "fn", "tn")}
    nab_total = {}
    for profile in nab.PROFILES:
        total = nab.NabResult(0.0, 0.0, 0.0, 0, 0, 0)
        for r in rows:
            total = total + nab.NabResult(**r["nab"][profile])
        nab_total[profile] = total
    delays = [d for r in rows for d in r["delays_s"]]
    events = event_metrics(**{k: sum(r["events"][k] for r in rows) for k in ("tp", "fp", "fn")})
    return counts | point_metrics(**counts) | {
        "events": events,
        "nab": {p: round(t.normalized, 2) for p, t in nab_total.items()},
        "nab_raw": {p: asdict(t) for p, t in nab_total.items()},
        "faults_raised": sum(r["faults_raised"] for r in rows),
        "median_delay_s": float(np.median(delays)) if delays else None,
        "files": len(rows),
    }


def summary_table(results: dict[str, dict[str, dict]]) -> list[dict]:
    rows = []
    for protocol, by_detector in results.items():
        for detector, m in by_detector.items():
            rows.append({
                "protocol": protocol, "detector": LABELS[detector], "F1": f"{m['f1']:.3f}",
                "FAR %": f"{100 * m['far']:.2f}", "MAR %": f"{100 * m['mar']:.2f}",
                "ev P": f"{m['events']['precision']:.3f}", "ev R": f"{m['events']['recall']:.3f}",
                "ev F1": f"{m['events']['f1']:.3f}",
                "NAB std": f"{m['nab']['standard']:.1f}", "low FP": f"{m['nab']['reward_low_FP']:.1f}",
                "low FN": f"{m['nab']['reward_low_FN']:.1f}", "faults": m["faults_raised"],
                "TP": m["tp"], "FP": m["fp"], "FN": m["fn"], "TN": m["tn"],
            })
    return rows


def format_table(rows: list[dict]) -> str:
    if not rows:
        return ""
    keys = list(rows[0])
    widths = {k: max(len(k), *(len(str(r[k])) for r in rows)) for k in keys}
    left = {"protocol", "detector"}

    def line(values: dict) -> str:
        return "  ".join(str(values[k]).ljust(widths[k]) if k in left else str(values[k]).rjust(widths[k])
                         for k in keys)

    return "\n".join([line({k: k for k in keys}), "  ".join("-" * widths[k] for k in keys),
                      *(line(r) for r in rows)])


def _write_outputs(out: Path, benchmark: str, subtitle: str, files: list[dict], options: EvalOptions,
                   protocols: list[str], started: float, extra: dict, say: Callable[[str], None]) -> dict:
    from faultwatch.bench.report import render_index

    failed = [{k: f[k] for k in ("name", "protocol", "error")} for f in files if "error" in f]
    files = [f for f in files if "error" not in f]
    if not files:
        # One line: the first reason in full (each file's was printed as it failed).
        more = f" (and {len(failed) - 1} more, listed above)" if len(failed) > 1 else ""
        raise EvalError(f"every file failed; {failed[0]['name']}: {failed[0]['error']}{more}")
    results = {p: {d: m for d in DETECTORS if (m := aggregate([f for f in files if f["protocol"] == p], d))}
               for p in protocols}
    results = {p: r for p, r in results.items() if r}
    head_protocol = protocols[0] if protocols[0] in results else next(iter(results))
    head = results[head_protocol]["lstm"]
    metrics = {
        "benchmark": benchmark,
        "headline": {"protocol": head_protocol, "detector": "lstm", "label": LABELS["lstm"],
                     "quantize": options.spec.get("quantize", "int8")},
        **{k: head[k] for k in ("f1", "far", "mar", "tp", "fp", "fn", "tn", "nab", "events")},
        "results": results,
        "files": files,
        "failed": failed,
        "options": {"train_rows": options.train_rows, "train_fraction": options.train_fraction,
                    "changepoint_window_s": options.changepoint_window_s,
                    "detector": options.detector.to_dict(), "engine": asdict(options.engine),
                    "spec": options.spec, "zscore_window": options.zscore_window},
        "seconds": round(time.monotonic() - started, 1),
    } | extra
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, default=float) + "\n")
    table = summary_table(results)
    links = [(f"{f['name']} ({f['protocol']})", os.path.relpath(f["report"], out))
             for f in files if f.get("report")]
    (out / "index.html").write_text(render_index(f"faultwatch eval {benchmark}", subtitle, table, links))
    say("")
    say(subtitle)
    say(format_table(table))
    say(f"headline (metrics.json top level): {head_protocol} protocol, {LABELS['lstm']}")
    for f in failed:
        say(f"FAILED, not counted above: {f['name']} ({f['protocol']}): {f['error']}")
    say(f"metrics → {out / 'metrics.json'}; report → {out / 'index.html'} "
        f"({metrics['seconds']:.0f} s)")
    return metrics


def _progress(say: Callable[[str], None], detector: str) -> Callable[[dict], None]:
    def done(r: dict) -> None:
        if "error" in r:
            say(f"  {r['name']:<24} {r['protocol']:<9} FAILED: {r['error']}")
            return
        m = r["detectors"][detector]
        ev = m["events"]
        say(f"  {r['name']:<24} {r['protocol']:<9} F1 {m['f1']:.3f}  FAR {100 * m['far']:5.1f}%  "
            f"MAR {100 * m['mar']:5.1f}%  events TP {ev['tp']} FP {ev['fp']} FN {ev['fn']}  "
            f"faults {m['faults_raised']}  ({r['seconds']:.1f} s)")
    return done


def run_skab(root: Path, out: Path, options: EvalOptions, *, pretrain: bool = False, jobs: int = 0,
             say: Callable[[str], None] = print) -> dict:
    started = time.monotonic()
    files, free = find_skab_files(root)
    protocols = ["per-file"]
    init = None
    if pretrain:
        if free is None:
            raise EvalError(f"--pretrain needs {ANOMALY_FREE} under {root}")
        from faultwatch.bench.eval_model import BenchSpec
        from faultwatch.bench.eval_model import pretrain as pretrain_model

        if options.models is None:  # (with --models the fine-tuned models are reused as they are)
            features = tuple(read_csv(files[0]).columns)
            say(f"pretraining on {free} ...")
            init = pretrain_model(read_csv(free), out / "models" / "pretrain-base",
                                  BenchSpec(**options.spec), features)
        protocols.append("pretrain")
    names = {f: str(f.relative_to(root).with_suffix("")) for f in files}
    job_list = [FileJob("skab", f, names[f], "per-file", out, options) for f in files]
    if pretrain:
        # The baselines train no network: the pretrain protocol would repeat them exactly.
        no_baselines = replace(options, baselines=False)
        job_list += [FileJob("skab", f, names[f], "pretrain", out, no_baselines, init=init) for f in files]
    workers = jobs or default_jobs()
    say(f"SKAB: {len(files)} files under {root}, {len(protocols)} protocol(s), {workers} worker(s); "
        f"per file: {LABELS['lstm']}")
    results = run_jobs(job_list, workers, _progress(say, "lstm"))
    n_test = sum(r.get("test_rows", 0) for r in results if r["protocol"] == "per-file")
    subtitle = (f"SKAB, {len(files)} files, {n_test:,} test rows; per-file protocol: first "
                f"{options.train_rows} rows of each file train + calibrate")
    if pretrain:
        subtitle += f"; pretrain protocol: base model on {ANOMALY_FREE}, fine-tuned per file on the same rows"
    return _write_outputs(out, "skab", subtitle, results, options, protocols, started, {}, say)


def _epoch_s(stamp: str) -> float:
    """NAB's window timestamps ("2014-02-19 10:50:00.000000") as epoch seconds."""
    return float(np.datetime64(stamp.strip().replace(" ", "T"), "ms").astype(np.int64)) / 1000.0


def load_windows(path: Path) -> dict[str, list[tuple[float, float]]]:
    """NAB's windows file (``{"dir/name.csv": [[start, end], ...]}``) → by file name, epoch seconds."""
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise EvalError(f"{path}: cannot read windows: {exc}") from None
    out = {}
    for key, windows in raw.items():
        try:
            pairs = [(_epoch_s(start), _epoch_s(end)) for start, end in windows]
        except (ValueError, AttributeError, TypeError):
            raise EvalError(f"{path}: unreadable window timestamps for {key!r}") from None
        out[Path(key).name] = pairs
    return out


def run_nab(csvs: list[Path], windows_path: Path, out: Path, options: EvalOptions, *, jobs: int = 0,
            say: Callable[[str], None] = print) -> dict:
    started = time.monotonic()
    windows = load_windows(windows_path)
    missing = [c for c in csvs if c.name not in windows]
    if missing:
        raise EvalError(f"{missing[0]}: no windows for it in {windows_path}")
    job_list = [FileJob("nab", c, c.stem, "per-file", out, options, windows=tuple(windows[c.name]))
                for c in csvs]
    workers = jobs or default_jobs()
    say(f"NAB: {len(csvs)} series, {workers} worker(s); per series: {LABELS['lstm']}")
    results = run_jobs(job_list, workers, _progress(say, "lstm"))
    subtitle = (f"NAB, {len(csvs)} series; each trains on its probationary period and streams the rest; "
                "detections are faults raised (normalised: null detector 0, perfect 100)")
    return _write_outputs(out, "nab", subtitle, results, options, ["per-file"], started, {}, say)


def run_telemanom(root: Path, out: Path, options: EvalOptions, *, jobs: int = 0,
                  say: Callable[[str], None] = print) -> dict:
    """One model per channel of a telemanom folder; scored point-wise and event-wise."""
    started = time.monotonic()
    try:
        channels = find_channels(root)
    except ValueError as exc:
        raise EvalError(str(exc)) from None
    job_list = [FileJob("telemanom", c.test, c.name, "per-file", out, options, channel=c) for c in channels]
    workers = jobs or default_jobs()
    say(f"telemanom: {len(channels)} channels under {root}, {workers} worker(s); "
        f"per channel: {LABELS['lstm']}")
    results = run_jobs(job_list, workers, _progress(say, "lstm"))
    sequences = sum(len(c.sequences) for c in channels)
    subtitle = (f"telemanom layout, {len(channels)} channels, {sequences} labelled sequences; each trains "
                "on its train array (forecasting column 0) and streams train then test")
    return _write_outputs(out, "telemanom", subtitle, results, options, ["per-file"], started, {}, say)


def run_csv(csvs: list[Path], out: Path, options: EvalOptions, *, jobs: int = 0,
            say: Callable[[str], None] = print) -> dict:
    """Any labelled CSVs (an ``anomaly`` column; timestamps optional), each on its own."""
    started = time.monotonic()
    missing = [c for c in csvs if not c.is_file()]
    if missing:
        raise EvalError(f"{missing[0]}: no such file")
    names = [c.stem for c in csvs]
    if len(set(names)) != len(names):  # same stem in two folders: keep the folder in the name
        names = [str(c.with_suffix("")).strip("/").replace("/", "_") for c in csvs]
    job_list = [FileJob("csv", c, n, "per-file", out, options) for c, n in zip(csvs, names, strict=True)]
    workers = jobs or default_jobs()
    split = (f"first {100 * options.train_fraction:g}% of rows" if options.train_fraction is not None
             else f"first {options.train_rows} rows")
    say(f"csv: {len(csvs)} file(s), {workers} worker(s); per file: {LABELS['lstm']}")
    results = run_jobs(job_list, workers, _progress(say, "lstm"))
    subtitle = (f"{len(csvs)} labelled CSV file(s); the {split} of each train and calibrate, "
                "the rest is scored")
    return _write_outputs(out, "csv", subtitle, results, options, ["per-file"], started, {}, say)
