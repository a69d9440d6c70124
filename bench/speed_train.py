"""``faultwatch bench`` section (7): stateful training throughput, rows/s per device and stream count.

The reference network (LSTM 128 → 64, dense 32, 8 channels in and out) trained
the way ``faultwatch train`` trains by default: truncated BPTT over 60-step
chunks with the state carried between them, Adam, MSE, through the same
:func:`faultwatch.train.fit.stateful_pass` the trainer runs. The stream count
is the batch. A row is one reading of one stream trained on, so rows/s =
streams × 60 × chunks / seconds. The data are uniform noise already on the
device (the speed of a step doesn't depend on the values), and the clock stops
after the device has finished (the summed loss is read once, at the end).

Cases: the CPU on one thread and on all of them, at 32 and 256 streams (fp32);
with CUDA, also 32 / 256 / 1,024 / 4,096 streams in fp32 and in bf16 autocast.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass

from faultwatch.train.options import TrainOptions

CHUNK = 60  # the recipe's look-back: steps per chunk
FEATURES = 8
HIDDEN = TrainOptions.hidden  # the reference network is the recipe's: 128 → 64, dense 32
DENSE = TrainOptions.dense
CPU_STREAMS = (32, 256)
CUDA_STREAMS = (32, 256, 1024, 4096)


@dataclass(frozen=True)
class TrainCase:
    device: str  # "cpu" or "cuda:0"
    threads: int  # torch CPU threads (on CUDA: those of the host side)
    streams: int  # the batch: series trained side by side, each with its carried state
    precision: str  # "fp32" or "bf16"


def training_cases(cuda: bool, all_threads: int) -> list[TrainCase]:
    threads = sorted({1, all_threads})
    cases = [TrainCase("cpu", t, s, "fp32") for t in threads for s in CPU_STREAMS]
    if cuda:
        cases += [TrainCase("cuda:0", 1, s, p) for p in ("fp32", "bf16") for s in CUDA_STREAMS]
    return cases


def time_case(case: TrainCase, chunks: int, warmup: int, seed: int = 0) -> dict:
    """Train ``warmup`` chunks (kernel choice, allocator), then time ``chunks`` more."""
    import torch
    from faultwatch.train.device import synchronize
    from faultwatch.train.fit import make_step, stateful_pass
    from faultwatch.train.model import Forecaster, ForecasterConfig

    previous = torch.get_num_threads()
    torch.set_num_threads(case.threads)
    try:
        torch.manual_seed(seed)
        device = torch.device(case.device)
        config = ForecasterConfig(n_features=FEATURES, target_index=tuple(range(FEATURES)),
                                  hidden=HIDDEN, dense=DENSE)
        model = Forecaster(config).to(device).train()
        step = make_step(model, torch.optim.Adam(model.parameters(), lr=1e-3), max_norm=0.0)
        data = torch.rand(case.streams, (warmup + chunks) * CHUNK + 1, FEATURES, device=device)  # [S, N, F]
        if warmup:
            warm = data[:, : warmup * CHUNK + 1]
            float(stateful_pass(model, warm, range(0, warmup * CHUNK, CHUNK), CHUNK, step, case.precision))
        timed = data[:, warmup * CHUNK:]
        synchronize(device)
        started = time.perf_counter()
        total = stateful_pass(model, timed, range(0, chunks * CHUNK, CHUNK), CHUNK, step, case.precision)
        loss = float(total)  # waits for the device: the clock stops after its last kernel
        seconds = time.perf_counter() - started
    finally:
        torch.set_num_threads(previous)
    rows = case.streams * CHUNK * chunks
    return asdict(case) | {"chunks": chunks, "rows": rows, "seconds": seconds, "rows_per_s": rows / seconds,
                           "loss": loss / chunks}


def bench_training(quick: bool, say=print) -> dict:
    """Every case of :func:`training_cases` on this machine; CUDA only where torch sees it."""
    import torch

    cuda = torch.cuda.is_available()
    all_threads = os.cpu_count() or 1
    rows = []
    for case in training_cases(cuda, all_threads):
        # A CPU chunk at 256 streams is ~15,000 rows (~0.1-0.3 s); a GPU one a few ms, after its
        # first call (cuDNN plans, the allocator) is left out of the timing.
        if case.device.startswith("cuda"):
            chunks, warmup = (5, 1) if quick else (50, 2)
        else:
            chunks, warmup = (1, 0) if quick else (5, 1)
        row = time_case(case, chunks=chunks, warmup=warmup)
        say(f"training {case.device} {case.threads} thread(s) {case.streams} streams {case.precision}: "
            f"{row['rows_per_s']:,.0f} rows/s")
        rows.append(row)
    return {
        "network": {"hidden": list(HIDDEN), "dense": DENSE, "features": FEATURES, "chunk": CHUNK},
        "cpu_threads_all": all_threads,
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_note": None if cuda else "no CUDA device (torch.cuda.is_available() is False): not measured",
        "rows": rows,
    }


def training_rate(t: dict, device: str, streams: int, precision: str = "fp32",
                  threads: int | None = None) -> float | None:
    """rows/s of one case of a :func:`bench_training` result, or None if it wasn't run."""
    for r in t["rows"]:
        if (r["device"].split(":")[0] == device and r["streams"] == streams and r["precision"] == precision
                and (threads is None or r["threads"] == threads)):
            return float(r["rows_per_s"])
    return None


def training_targets(t: dict) -> list[tuple[str, float, str, float, str]]:
    """Issue 13's GPU targets, where there is a GPU: ≥ 10 M rows/s at 1,024 streams, ≥ 20× the CPU
    on all its threads (its best stream count) in the same run."""
    gpu = training_rate(t, "cuda", 1024)
    if gpu is None:
        return []
    cpu = max(r["rows_per_s"] for r in t["rows"]
              if r["device"] == "cpu" and r["threads"] == t["cpu_threads_all"])
    return [("training, CUDA 1,024 streams", gpu / 1e6, ">=", 10.0, " M rows/s"),
            ("training, CUDA 1,024 vs CPU all threads", gpu / cpu, ">=", 20.0, "×")]


def render_training(t: dict) -> list[str]:
    net = t["network"]
    streams = sorted({r["streams"] for r in t["rows"]})
    lines = [f"7. stateful training, rows/s (LSTM {'→'.join(map(str, net['hidden']))}, dense {net['dense']}, "
             f"{net['features']} channels, {net['chunk']}-step chunks, Adam)",
             f"   {'device':<8} {'threads':>7} {'precision':>9} "
             + " ".join(f"{f'{s:,} streams':>15}" for s in streams)]
    groups: dict[tuple, dict[int, float]] = {}
    for r in t["rows"]:
        groups.setdefault((r["device"], r["threads"], r["precision"]), {})[r["streams"]] = r["rows_per_s"]
    for (device, threads, precision), rates in groups.items():
        cells = [f"{rates[s]:>15,.0f}" if s in rates else f"{'':>15}" for s in streams]
        lines.append(f"   {device:<8} {threads:>7} {precision:>9} " + " ".join(cells))
    lines.append(f"   CUDA: {t['cuda_device'] or t['cuda_note']}")
    return lines
