"""The stdout table of ``faultwatch bench``, from the JSON-ready result."""

from __future__ import annotations

from faultwatch.bench.speed_common import (
    BATCHES,
    MODES,
    STEP_MODES,
    WINDOW,
    label,
)
from faultwatch.bench.speed_train import render_training


def render(r: dict) -> str:
    """The stdout table."""
    cfg, s, fl, w, p = r["config"], r["step_us"], r["floor"], r["stateful_vs_window_detail"], r["peers_us"]
    head = (f"faultwatch bench{' --quick' if cfg['quick'] else ''}: LSTM {cfg['hidden']} → dense "
            f"{cfg['dense']}, {cfg['features']} features; {cfg['machine']['cpu']}, "
            f"{cfg['machine']['cores']} cores; one thread per contender")
    names = {m: label(m) for m in STEP_MODES}
    lines = [head, "", "1. model step, µs per reading (= per device per step)",
             f"   {'batch':>6} " + " ".join(f"{names[m]:>11}" for m in STEP_MODES)
             + f" {'torch/int8':>11} {'fp32/int8':>10} {'call floor':>11}"]
    for b in BATCHES:
        k = str(b)
        t, f32, i8 = s["torch"][k], s["ort_fp32"][k], s["ort_int8"][k]
        lines.append(f"   {b:>6} " + " ".join(f"{s[m][k]:>11.2f}" for m in STEP_MODES)
                     + f" {t / i8:>10.1f}× {f32 / i8:>9.2f}× {fl['call_floor_us'][k] / b:>10.2f}")
    g, kern = fl["model_gflops_by_mode"], fl["kernel_us_batch1"]
    lines += [
        "   call floor: session.run of an identity graph with the step's inputs and outputs",
        "   the daemon's whole step per reading (int8; scaling, scoring, thresholds, fault logic): "
        + ", ".join(f"batch {b} {us:.1f} µs" for b, us in r["engine_us"].items()),
        f"   at batch 1, step minus floor: fp32 {kern['ort_fp32']:.1f} µs, int8 {kern['ort_int8']:.1f} µs "
        f"({kern['ort_fp32'] / max(kern['ort_int8'], 1e-9):.2f}×)",
        "",
        f"2. floor at batch {fl['batch']}: {fl['flops_per_step']:,} FLOPs per step per device (GEMMs)",
        "   achieved GFLOP/s: " + ", ".join(f"{names[m]} {g[m]:.1f}" for m in STEP_MODES),
        f"   numpy, same GEMM shapes, 1 thread: {fl['gemm_gflops']:.1f} GFLOP/s "
        f"({fl['gemm_us_per_reading']:.2f} µs/reading, {fl['blas']})",
        f"   int8 step reaches {100 * fl['int8_vs_gemm']:.0f}% of the numpy GEMM rate",
    ]
    u = w["us_per_reading"]
    lines += ["", f"3. streaming vs re-windowing the last {w['window']} readings, µs per reading"]
    for b, t in u.items():
        pairs = [(m, t[m + "_stream"], t[m + "_window"]) for m in MODES]
        lines.append(f"   batch {b:>3}: " + "; ".join(
            f"{m} {st:.2f} vs {wi:.1f} (×{wi / st:.0f})" for m, st, wi in pairs))
    fx, ps = w["batch1_fixed_us"], w["batch1_per_step_us"]
    lines.append("   batch 1, a call = fixed + steps × per-step: " + "; ".join(
        f"{m} {fx[m]:.1f} + T × {ps[m]:.2f}" for m in MODES))
    bd = w["batch1_bound"]
    lines.append(f"   batch 1 through session.run, with a graph of no fixed cost beyond the "
                 f"{w['batch1_call_floor_us']:.1f} µs call floor: at most ×{bd['stream_vs_window']:.1f} "
                 f"streaming vs re-windowing, ×{bd['int8_vs_fp32']:.2f} int8 vs fp32")
    d = w["max_abs_diff"]
    lines.append(f"   same forecasts from the same state: max |diff| fp32 {d['ort_fp32']:.1e}, "
                 f"torch {d['torch']:.1e} → {'equal' if w['equal'] else 'NOT EQUAL'}; "
                 f"int8 {d['ort_int8']:.1e} (activations quantized per call)")
    hst = p["half_space_trees"]
    lines += ["", f"4. peers per reading ({p['readings']} readings), µs",
              f"   River HalfSpaceTrees score_one + learn_one: "
              f"{'not installed' if hst is None else f'{hst:.1f}'}",
              f"   rolling z-score ({WINDOW}): {p['rolling_zscore']:.1f}; batched ×{p['batched_at']}: "
              f"{p['rolling_zscore_batched']:.2f}",
              f"   faultwatch int8 step: {p['ort_int8_batch1']:.1f}; batched ×{p['batched_at']}: "
              f"{p['ort_int8_batched']:.2f}"]
    lines += ["", "5. daemon end to end (int8 model, its own Mosquitto on loopback, QoS 1)"]
    lines += _render_daemon(r.get("daemon"))
    sz, acc = r["size_bytes"], r["accuracy"]
    lines += ["", "6. artifacts, and forecasts on "
              f"{acc['rmse_readings']:,} fresh readings (scaled units)",
              f"   {'':>11} {'size, B':>9} {'vs fp32':>8} {'RMSE':>9} {'vs fp32':>8} "
              f"{'RMS diff to fp32':>17}"]
    for m in STEP_MODES:
        size = sz[m]
        lines.append(f"   {names[m]:>11} {size:>9,} {100 * size / sz['ort_fp32']:>7.0f}% "
                     f"{acc['rmse'][m]:>9.5f} {100 * acc['rmse_rel_vs_fp32'][m]:>+7.2f}% "
                     f"{acc['rms_diff_vs_fp32'][m]:>17.1e}")
    lines.append("   (torch: the serialized state_dict)")
    lines += ["", *render_training(r["training"])]
    lines += ["", "targets"]
    for t in r["targets"]:
        op = "≥" if t["op"] == ">=" else "≤"
        reach = (f"; reachable through session.run ≤ {t['reachable']:.2f}{t['unit']}"
                 if "reachable" in t else "")
        lines.append(f"   {'met   ' if t['met'] else 'MISSED'} {t['name']:<38} {t['value']:>8.2f} "
                     f"(target {op} {t['target']:g}{t['unit']}{reach})")
    lines.append(f"\n{r['seconds']:.0f} s in all, {cfg['train_and_export_s']:.0f} s of it training "
                 "and export")
    return "\n".join(lines)


def _render_daemon(dm: dict | None) -> list[str]:
    if not dm:
        return ["   skipped (--no-daemon)"]
    if "skipped" in dm:
        return [f"   skipped: {dm['skipped']}"]
    lines = [
        f"   throughput, {dm['devices']:,} devices, median of {dm['drain_rounds']} rounds of "
        f"{dm['drain_readings']:,} queued readings: daemon {dm['readings_per_s']:,.0f}/s, "
        f"bare paho subscriber {dm['paho_baseline_per_s']:,.0f}/s "
        f"({100 * dm['readings_per_s'] / dm['paho_baseline_per_s']:.0f}%)",
        "   latency, ms p50 / p99     readings/s   publish → forecast   = publish → delivered"
        "   + delivered → forecast",
    ]
    for who, key in ((f"{dm['devices']:,} devices", ""), (f"{dm['big_devices']:,} devices", "big_")):
        cells = [f"{dm[f'{key}{part}p50_ms']:.1f} / {dm[f'{key}{part}p99_ms']:.1f}"
                 for part in ("", "delivery_", "daemon_")]
        lines.append(f"   {who:<22} {dm[key + 'paced_rate']:>11,.0f}   {cells[0]:>18}   {cells[1]:>19}"
                     f"   {cells[2]:>19}")
    lines += [
        f"   bare paho publish → receive at 1,000/s: p50 {dm['paho_p50_ms']:.1f} ms, "
        f"p99 {dm['paho_p99_ms']:.1f} ms",
        f"   first reading of every device (new slot, discovery): {dm['first_seen_s']:.2f} s for "
        f"{dm['devices']:,}, {dm['big_first_seen_s']:.2f} s for {dm['big_devices']:,}",
        f"   peak RSS: {dm['rss_mb_1k']:.1f} MB at {dm['devices']:,} devices "
        f"({dm['rss_mb_drain']:.1f} MB after the queued bursts), {dm['rss_mb_10k']:.1f} MB at "
        f"{dm['big_devices']:,} devices; torch loaded: {'YES' if dm['torch_loaded'] else 'no'}",
        f"   cold start, launch → first forecast: {dm['cold_start_s']:.2f} s "
        f"(each launch: {', '.join(f'{v:.2f}' for v in dm['cold_starts_s'])})",
    ]
    if dm.get("profile"):
        lines.append(f"   py-spy of a daemon drain (collapsed stacks): {dm['profile']}")
    return lines
