"""``faultwatch bench --quick``: every number is there and sane. Behaviour, not speed: no timing asserts."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.torch


def _positive(value) -> bool:
    number = isinstance(value, int | float) and not isinstance(value, bool)
    return number and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench(tmp_path_factory) -> dict:
    pytest.importorskip("torch")
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "faultwatch.runtime.cli", "bench", "--quick", "--json", str(out)],
        capture_output=True, text=True, timeout=600, check=False,
    )
    assert proc.returncode == 0, f"bench failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    assert "targets" in proc.stdout and "1. model step" in proc.stdout  # the table went to stdout
    return json.loads(Path(out).read_text())


def test_step_times_per_mode_and_batch(bench):
    for mode in ("torch", "ort_fp32", "ort_int8", "ort_int8_static", "ort_fp16"):
        for batch in ("1", "64", "1024"):
            assert _positive(bench["step_us"][mode][batch]), (mode, batch)


def test_whole_engine_step_per_batch(bench):
    assert set(bench["engine_us"]) == {"1", "64", "1024"}
    assert all(_positive(v) for v in bench["engine_us"].values())


def test_floor(bench):
    floor = bench["floor"]
    assert floor["flops_per_step"] > 0
    assert _positive(floor["model_gflops"]) and _positive(floor["gemm_gflops"])
    assert all(_positive(v) for v in floor["call_floor_us"].values())


def test_streaming_matches_rewindowing_from_the_same_state(bench):
    assert _positive(bench["stateful_vs_window"])  # the headline: per reading at the daemon's batch
    w = bench["stateful_vs_window_detail"]
    assert bench["stateful_vs_window"] == w[f"ratio_batch{bench['stateful_vs_window_batch']}"]
    assert w["window"] == 60
    assert _positive(w["ratio_batch1"]) and _positive(w["ratio_batch64"])
    # What batch 1 could reach at best, computed from the same run's numbers.
    bound = w["batch1_bound"]
    assert _positive(bound["stream_vs_window"]) and _positive(bound["int8_vs_fp32"])
    assert w["equal"] is True, w["max_abs_diff"]
    assert w["max_abs_diff"]["ort_fp32"] <= 1e-5
    assert w["int8_within_export_tolerance"] is True


def test_peers(bench):
    peers = bench["peers_us"]
    assert _positive(peers["rolling_zscore"]) and _positive(peers["ort_int8_batch1"])
    # River is optional: a number when installed, None with a note when not.
    assert peers["half_space_trees"] is None or _positive(peers["half_space_trees"])


def test_daemon_end_to_end(bench):
    d = bench["daemon"]
    for key in ("readings_per_s", "paho_baseline_per_s", "p50_ms", "p99_ms", "rss_mb_1k", "rss_mb_10k",
                "cold_start_s", "daemon_p50_ms", "delivery_p50_ms", "big_p50_ms", "first_seen_s"):
        assert _positive(d[key]), key
    assert d["p50_ms"] <= d["p99_ms"] and d["big_p50_ms"] <= d["big_p99_ms"]
    assert d["rss_mb_1k"] <= d["rss_mb_10k"]
    assert d["torch_loaded"] is False
    assert d["latency_missing"] == 0 and d["big_latency_missing"] == 0


def test_artifacts(bench):
    sizes = bench["size_bytes"]
    modes = ("ort_fp32", "ort_int8", "ort_int8_static", "ort_fp16")
    assert all(_positive(sizes[m]) for m in modes)
    # Weights dominate the reference-size model: int8 files are about a quarter, fp16 half.
    assert sizes["ort_int8"] < sizes["ort_fp16"] < sizes["ort_fp32"]
    assert sizes["ort_int8_static"] < sizes["ort_fp16"]
    rmse = bench["accuracy"]["rmse"]
    assert all(_positive(rmse[m]) for m in ("torch", *modes))


def test_training_rows_per_device_and_stream_count(bench):
    t = bench["training"]
    assert t["network"] == {"hidden": [128, 64], "dense": 32, "features": 8, "chunk": 60}
    cases = {(r["device"].split(":")[0], r["threads"], r["streams"], r["precision"]) for r in t["rows"]}
    for threads in {1, t["cpu_threads_all"]}:
        assert {("cpu", threads, 32, "fp32"), ("cpu", threads, 256, "fp32")} <= cases
    for r in t["rows"]:
        assert _positive(r["rows_per_s"]) and _positive(r["seconds"]) and math.isfinite(r["loss"]), r
        assert r["rows"] == r["streams"] * 60 * r["chunks"]
    cuda = [c for c in cases if c[0] == "cuda"]
    if t["cuda_device"] is None:  # CUDA is measured exactly where torch sees it
        assert cuda == [] and "no CUDA device" in t["cuda_note"]
    else:
        expected = {(s, p) for s in (32, 256, 1024, 4096) for p in ("fp32", "bf16")}
        assert {(s, p) for _, _, s, p in cuda} == expected
        names = [x["name"] for x in bench["targets"]]
        assert "training, CUDA 1,024 streams" in names


def test_targets_are_reported(bench):
    names = [t["name"] for t in bench["targets"]]
    assert len(names) >= 9
    assert all(isinstance(t["met"], bool) for t in bench["targets"])
    reachable = {t["name"]: t["reachable"] for t in bench["targets"] if "reachable" in t}
    assert set(reachable) == {"int8 vs fp32, batch 1", "streaming vs re-windowing, batch 1"}


def test_batch1_bounds_follow_from_the_call_floor():
    from faultwatch.bench.speed_window import batch1_bounds

    # floor 7 µs per call, 3 µs (fp32) and 1.5 µs (int8) per step inside it:
    # re-windowing 7 + 60 × 1.5 = 97 vs streaming 8.5; fp32 10 vs int8 8.5.
    bound = batch1_bounds(7.0, {"ort_fp32": 3.0, "ort_int8": 1.5})
    assert bound["stream_vs_window"] == pytest.approx(97 / 8.5)
    assert bound["int8_vs_fp32"] == pytest.approx(10 / 8.5)
    # No fixed cost at all: the ratios are the per-step ones.
    bound = batch1_bounds(0.0, {"ort_fp32": 3.0, "ort_int8": 1.5})
    assert bound["stream_vs_window"] == pytest.approx(60) and bound["int8_vs_fp32"] == pytest.approx(2)
