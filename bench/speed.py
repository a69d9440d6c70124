"""``faultwatch bench``: side-by-side performance numbers, and how far they are from the limit.

Run it as::

    faultwatch bench                      # full run, < 10 min on 2 cores
    faultwatch bench --quick --json b.json   # CI smoke, < 1 min

Everything is measured in one run and, where two things are compared, in
alternating blocks (A B C, C B A, ...), so a ratio holds on a noisy machine.
Every inference contender runs on one thread: torch ``set_num_threads(1)``, the
onnxruntime session the daemon uses (``threads=1``), and numpy's BLAS in a
child process with ``OPENBLAS_NUM_THREADS=1``; the training section sets its
own thread counts per case.

Sections: (1) model step per reading at batch 1/64/1024, torch eager vs
onnxruntime in every precision export offers (fp32, int8, int8-static, fp16);
(2) the floor: FLOPs per step and achieved GFLOP/s beside numpy on the same
GEMM shapes; (3) streaming vs re-windowing over 60 readings; (4) peers per
reading (River's HalfSpaceTrees, a rolling z-score); (5) the daemon end to end
through a private Mosquitto (``bench_daemon``); (6) artifact size and forecast
RMSE of every precision; (7) stateful training rows/s per device and stream
count (CPU on one and all threads; CUDA in fp32 and bf16 when torch sees it).
The bench trains its own model of the reference size on simulator data (a few
epochs: speed doesn't depend on the weights) unless given ``--run-dir``.

The sections live in speed_common (timing, options), speed_model (1, 2, 6),
speed_window (3, 4), speed_daemon (5), speed_train (7) and speed_report (the
table). torch is imported lazily: the GEMM child process runs without it.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from faultwatch.bench.speed_common import (
    DAEMON_BATCH,
    WINDOW,
    BenchOptions,
    Counts,
    cpu_name,
    say,
)
from faultwatch.bench.speed_model import (
    bench_artifacts,
    bench_engine,
    bench_floor,
    bench_steps,
    prepare_models,
    scaled_readings,
)
from faultwatch.bench.speed_report import render
from faultwatch.bench.speed_train import bench_training, training_targets
from faultwatch.bench.speed_window import bench_peers, bench_window

__all__ = ["BenchOptions", "main", "run_bench"]


# -- run, targets, table -----------------------------------------------------------------


def targets(r: dict) -> list[dict]:
    """The issue's targets, each with its measured value and whether it is met."""
    s, w, d = r["step_us"], r["stateful_vs_window_detail"], r.get("daemon") or {}
    bound = w["batch1_bound"]

    def fp32_vs_int8(batch: int) -> float:
        return s["ort_fp32"][str(batch)] / s["ort_int8"][str(batch)]

    rows: list[tuple[Any, ...]] = [
        ("int8 vs torch eager, batch 1", s["torch"]["1"] / s["ort_int8"]["1"], ">=", 8.0, "×"),
        ("int8 vs fp32, batch 1", fp32_vs_int8(1), ">=", 1.4, "×", bound["int8_vs_fp32"]),
        ("int8 vs fp32, batch 64", fp32_vs_int8(64), ">=", 1.4, "×"),
        ("int8 vs fp32, batch 1024", fp32_vs_int8(1024), ">=", 1.4, "×"),
        ("streaming vs re-windowing, batch 1", w["ratio_batch1"], ">=", 30.0, "×", bound["stream_vs_window"]),
        (f"streaming vs re-windowing, batch {DAEMON_BATCH}", w[f"ratio_batch{DAEMON_BATCH}"],
         ">=", 30.0, "×"),
        ("int8 @1024 vs numpy GEMM rate", r["floor"]["int8_vs_gemm"], ">=", 0.5, "×"),
    ]
    if "readings_per_s" in d:
        rows += [
            ("daemon vs bare paho subscriber", d["readings_per_s"] / d["paho_baseline_per_s"],
             ">=", 0.8, "×"),
            ("daemon peak RSS, 1,000 devices", d["rss_mb_1k"], "<=", 100.0, " MB"),
            ("same, after draining the backlogs", d["rss_mb_drain"], "<=", 100.0, " MB"),
            ("cold start to first forecast", d["cold_start_s"], "<=", 1.5, " s"),
            ("torch loaded in the daemon", float(d["torch_loaded"]), "<=", 0.0, ""),
        ]
    rows += training_targets(r["training"])  # only where a GPU was measured
    # An optional sixth field is the best value reachable through session.run (batch1_bounds).
    return [{"name": name, "value": value, "op": op, "target": goal, "unit": unit,
             "met": bool(value >= goal if op == ">=" else value <= goal),
             **({"reachable": rest[0]} if rest else {})}
            for name, value, op, goal, unit, *rest in rows]


def run_bench(options: BenchOptions) -> dict:
    import torch

    counts = Counts.of(options.quick)
    started = time.monotonic()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="faultwatch-bench-") as tmp:
        workdir = options.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        models = prepare_models(options, counts, workdir)
        prepared_s = time.monotonic() - started
        readings = scaled_readings(models, 64, 4 * WINDOW, options.seed + 1)  # [64, 240, F]
        result: dict = {}
        result["step_us"], call_floor_us = bench_steps(models, counts, readings)
        result["engine_us"] = bench_engine(models, counts, options.seed + 3)
        result["floor"] = bench_floor(models, counts, result["step_us"], call_floor_us)
        window = bench_window(models, counts, readings, call_floor_us["1"])
        # The headline ratio is per reading at the daemon's micro-batch (many devices, one call);
        # batch 1 is in the detail, with the most any graph could reach there.
        result["stateful_vs_window"] = window[f"ratio_batch{DAEMON_BATCH}"]
        result["stateful_vs_window_batch"] = DAEMON_BATCH
        result["stateful_vs_window_detail"] = window
        result["peers_us"] = bench_peers(models, counts, readings)
        result["training"] = bench_training(options.quick, say)
        artifacts = bench_artifacts(models, counts, options.seed + 2)
        result["size_bytes"] = artifacts.pop("size_bytes")
        result["accuracy"] = artifacts
        if options.daemon:
            from faultwatch.bench.speed_daemon import DaemonCounts, bench_daemon

            result["daemon"] = bench_daemon(models.paths["ort_int8"], workdir / "daemon",
                                            DaemonCounts.of(options.quick), profile=options.profile)
        c = models.steps["ort_int8"].contract
        result["config"] = {
            "quick": options.quick, "hidden": list(c.hidden), "dense": models.torch_model.config.dense,
            "features": len(c.features), "targets": len(c.targets), "threads": 1, "window": WINDOW,
            "run_dir": str(options.run_dir) if options.run_dir else None,
            "train_and_export_s": round(prepared_s, 2),
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "onnxruntime": ort.__version__, "numpy": np.__version__},
            "machine": {"cpu": cpu_name(), "cores": os.cpu_count()},
        }
    result["targets"] = targets(result)
    result["seconds"] = round(time.monotonic() - started, 1)
    return result


def main(options: BenchOptions, json_path: Path | None = None) -> int:
    result = run_bench(options)
    print(render(result))
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    return 0
