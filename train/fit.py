"""The training loop: stateful truncated BPTT (default) or the recipe's windowed training.

Run it as ``faultwatch train DATA.csv --out RUN_DIR``.

Stateful training (``--stateful``, the default) runs contiguous chunks of every
series, carrying the recurrent state from one chunk to the next (detached), so
the model learns to forecast from a long-lived state, which is how the edge
runtime uses it. Windowed training (``--windowed``) is the reference recipe:
independent ``look_back`` windows from a zero state, loss on the last step.

Validation is measured two ways. *Streamed*: the model runs each device's whole
series from a zero state in one call, and the error is taken on the validation
part — what the daemon will see. *Windowed*: each validation reading is
forecast from the ``look_back`` readings before it, from a zero state — what
the recipe measures. Early stopping watches the streamed error (the windowed one
for a bidirectional model, which cannot stream), keeps the best weights, and
the learning rate drops tenfold on plateaus.

Devices (``--device``, :mod:`faultwatch.train.device`): the training data go to
the device once, before the first epoch; the loss is summed on the device and
read once per epoch (and every ``PROGRESS_EVERY`` batches for the progress
bar), so a GPU is never stalled by a host round trip per batch. On CUDA the
plain LSTM/GRU layers run cuDNN's fused kernels. The best weights come back on
the CPU, so checkpoints and export never see a device.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from faultwatch.train.data import Prepared
from faultwatch.train.device import autocast, model_device, resolve_device
from faultwatch.train.model import Forecaster, ForecasterConfig
from faultwatch.train.options import TrainOptions
from torch import nn

MODES = ("stateful", "windowed")
#: The progress bar hears about every this many batches (each read is one host sync on a GPU).
PROGRESS_EVERY = 32


@dataclass
class TrainConfig:
    """The loop's settings; defaults and meanings are TrainOptions' (faultwatch.train.options)."""

    mode: str = TrainOptions.mode  # or "windowed"
    look_back: int = TrainOptions.look_back  # chunk length (stateful) or window length (windowed)
    batch_size: int = TrainOptions.batch_size  # stateful: the stream count
    epochs: int = TrainOptions.epochs
    lr: float = TrainOptions.lr
    patience: int = TrainOptions.patience  # early stopping, in epochs without improvement
    lr_patience: int = TrainOptions.lr_patience  # ReduceLROnPlateau patience, factor 0.1
    seed: int = TrainOptions.seed
    max_norm: float = TrainOptions.max_norm  # > 0: each weight row's L2 norm is clipped after every step
    #: torch intra-op threads while training (0 = torch's default). One is the default because these
    #: models are small: on this 2-core machine, under load, 2 threads made an epoch 8× slower.
    threads: int = TrainOptions.threads
    device: str = TrainOptions.device  # auto, cpu, cuda, cuda:N
    precision: str = TrainOptions.precision  # fp32, or bf16 autocast (CUDA only)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"unknown training mode {self.mode!r} (stateful or windowed)")


@dataclass
class TrainResult:
    model: Forecaster
    best_val_loss: float  # the early-stopping criterion (streamed, or windowed if bidirectional)
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    val_loss_streamed: float | None = None  # of the best weights; None for a bidirectional model
    val_loss_windowed: float | None = None
    device: str = "cpu"  # where it trained (the model itself is returned on the CPU)


def _streams(prepared: Prepared, batch_size: int, chunk: int) -> torch.Tensor:
    """Cut the training parts into ``S`` equal contiguous streams: [S, L, F].

    More streams than devices when the series are long, so a batch has
    ``batch_size`` rows; each stream stays at least a few chunks long.
    """
    parts = [s.scaled[: s.split] for s in prepared.series]
    total = sum(len(p) for p in parts)
    per_stream = max(4 * chunk, total // max(batch_size, 1))
    streams = []
    for p in parts:
        n = max(1, len(p) // per_stream)
        length = len(p) // n
        streams += [p[i * length:(i + 1) * length] for i in range(n)]
    shortest = min(len(s) for s in streams)
    if shortest < 2:
        raise ValueError("training part is too short for stateful training")
    return torch.from_numpy(np.stack([s[:shortest] for s in streams]))


def _windows(prepared: Prepared, look_back: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of the training parts: inputs [W, L, F] and next readings [W, F]."""
    xs, ys = [], []
    for s in prepared.series:
        part = s.scaled[: s.split]
        if len(part) > look_back:
            xs.append(np.lib.stride_tricks.sliding_window_view(part[:-1], look_back, axis=0))  # [W, F, L]
            ys.append(part[look_back:])
    if not xs:
        raise ValueError(f"training part is shorter than look_back={look_back}")
    x = np.concatenate(xs).transpose(0, 2, 1)  # [W, L, F]
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.concatenate(ys))


@torch.no_grad()
def streamed_residuals(model: Forecaster, prepared: Prepared) -> list[np.ndarray]:
    """Per device, residuals [N_val, K] of the validation part, streamed from a zero state."""
    model.eval()
    idx = list(model.config.target_index)
    out = []
    device = model_device(model)
    for s in prepared.series:
        x = torch.from_numpy(s.scaled).unsqueeze(0).to(device)  # [1, N, F]
        forecast, _ = model(x)  # [1, N, K]: forecast[t] is for reading t + 1
        pred = forecast[0, s.split - 1:-1].float().cpu().numpy()
        out.append(s.scaled[s.split:, idx] - pred)
    return out


@torch.no_grad()
def windowed_residuals(model: Forecaster, prepared: Prepared, look_back: int,
                       batch: int = 2048) -> list[np.ndarray]:
    """Per device, residuals of the validation readings that have ``look_back`` readings before
    them, each forecast from exactly those readings and a zero state (the recipe's evaluation)."""
    model.eval()
    idx = list(model.config.target_index)
    device = model_device(model)
    out = []
    for s in prepared.series:
        first = max(s.split, look_back)  # first validation reading with a full window
        if first >= len(s.scaled):
            continue
        windows = np.lib.stride_tricks.sliding_window_view(s.scaled[first - look_back:-1], look_back, axis=0)
        preds = []
        for b in range(0, len(windows), batch):
            x = torch.from_numpy(np.ascontiguousarray(windows[b:b + batch].transpose(0, 2, 1)))  # [b, L, F]
            preds.append(model(x.to(device))[0][:, -1].float().cpu().numpy())
        out.append(s.scaled[first:, idx] - np.concatenate(preds))
    if not out:
        raise ValueError(f"no validation reading has look_back={look_back} readings before it")
    return out


def _mse(residuals: list[np.ndarray]) -> float:
    return float(np.mean(np.concatenate(residuals) ** 2))


def validation_losses(model: Forecaster, prepared: Prepared, look_back: int) -> tuple[float | None, float]:
    """(streamed, windowed) validation MSE in scaled units; streamed is None when bidirectional."""
    streamed = None if model.config.bidirectional else _mse(streamed_residuals(model, prepared))
    return streamed, _mse(windowed_residuals(model, prepared, look_back))


def _apply_max_norm(model: Forecaster, max_norm: float) -> None:
    """Keras' MaxNorm on every weight matrix: each unit's incoming weight vector (a row) ≤ max_norm."""
    with torch.no_grad():
        for w in model.weight_matrices():
            w.copy_(torch.renorm(w, p=2, dim=0, maxnorm=max_norm))


def _validation_loss(model: Forecaster, prepared: Prepared, config: TrainConfig) -> float:
    """What early stopping watches: streamed error, or windowed for a bidirectional model."""
    if model.config.bidirectional:
        return _mse(windowed_residuals(model, prepared, config.look_back))
    return _mse(streamed_residuals(model, prepared))


def make_step(model: Forecaster, optimiser: torch.optim.Optimizer,
              max_norm: float) -> Callable[[torch.Tensor], None]:
    """One optimiser step from a loss (backward outside autocast, as torch.amp asks)."""
    def step(loss: torch.Tensor) -> None:
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if max_norm > 0:
            _apply_max_norm(model, max_norm)
    return step


def stateful_pass(model: Forecaster, data: torch.Tensor, starts: range, look_back: int,
                  step: Callable[[torch.Tensor], None], precision: str = "fp32",
                  on_batch: Callable[[int, int, float], None] | None = None) -> torch.Tensor:
    """Truncated BPTT over ``data`` [S, N, F] (S streams, on the model's device), one chunk of
    ``look_back`` steps from each of ``starts``, the state carried (detached) from chunk to chunk.

    Returns the summed chunk losses as a float64 tensor on the device: nothing here waits for
    the device, except ``on_batch`` every ``PROGRESS_EVERY`` chunks and after the last.
    """
    loss_fn, idx = nn.MSELoss(), model.target_index
    total = torch.zeros((), dtype=torch.float64, device=data.device)
    state = None
    for done, t0 in enumerate(starts, 1):
        x = data[:, t0:t0 + look_back]  # [S, L, F]
        y = data[:, t0 + 1:t0 + look_back + 1].index_select(2, idx)  # [S, L, K]
        with autocast(data.device, precision):
            forecast, state = model(x[:, : y.shape[1]], state)  # [S, L, K]
            loss = loss_fn(forecast, y)
        step(loss)
        state = [tuple(t.detach() for t in layer) for layer in state]
        total += loss.detach()
        if on_batch and (done % PROGRESS_EVERY == 0 or done == len(starts)):
            on_batch(done, len(starts), float(total) / done)
    return total


def _windowed_pass(model: Forecaster, windows: torch.Tensor, nexts: torch.Tensor, order: torch.Tensor,
                   config: TrainConfig, step: Callable[[torch.Tensor], None],
                   on_batch: Callable[[int, int, float], None] | None) -> torch.Tensor:
    """One epoch of the recipe: batches of ``windows`` [W, L, F] in ``order``, loss on the last step."""
    loss_fn, idx = nn.MSELoss(), model.target_index
    total = torch.zeros((), dtype=torch.float64, device=windows.device)
    n_batches = math.ceil(len(order) / config.batch_size)
    for done, b in enumerate(range(0, len(order), config.batch_size), 1):
        pick = order[b:b + config.batch_size]
        with autocast(windows.device, config.precision):
            forecast, _ = model(windows[pick])  # [b, L, K]; the recipe scores the last step
            loss = loss_fn(forecast[:, -1], nexts[pick].index_select(1, idx))
        step(loss)
        total += loss.detach()
        if on_batch and (done % PROGRESS_EVERY == 0 or done == n_batches):
            on_batch(done, n_batches, float(total) / done)
    return total


def fit(
    prepared: Prepared,
    model_config: ForecasterConfig,
    config: TrainConfig,
    progress: Callable[[dict], None] | None = None,
    on_batch: Callable[[int, int, float], None] | None = None,
    init: Forecaster | None = None,
) -> TrainResult:
    """Train; ``progress(row)`` after every epoch (it may raise to stop, as tune's pruner does),
    ``on_batch(done, total, mean loss so far)`` every ``PROGRESS_EVERY`` batches and after the last.

    ``init``: fine-tune this model instead of starting from random weights; its own
    validation loss is the one to beat, so fine-tuning never returns a worse model.
    The returned model is on the CPU, whatever ``config.device``.
    """
    device = resolve_device(config.device, config.precision)
    previous_threads = torch.get_num_threads()
    if config.threads > 0:
        torch.set_num_threads(config.threads)
    try:
        return _fit(prepared, model_config, config, device, progress, on_batch, init)
    finally:
        torch.set_num_threads(previous_threads)


def _fit(prepared, model_config, config, device, progress, on_batch, init) -> TrainResult:
    if model_config.bidirectional and config.mode == "stateful":
        raise ValueError("a bidirectional model trains on windows (--windowed): carrying its state "
                         "across chunks would need the backward pass to see readings from the future")
    torch.manual_seed(config.seed)  # seeds CUDA's generators too
    rng = np.random.default_rng(config.seed)
    # Weights are initialised on the CPU, then moved: the same seed starts from the same weights
    # on every device.
    model = (init if init is not None else Forecaster(model_config)).to(device)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimiser, factor=0.1, patience=config.lr_patience)
    step = make_step(model, optimiser, config.max_norm)
    # The training data go to the device once: [S, N, F] streams, or [W, L, F] windows + [W, F].
    if config.mode == "stateful":
        data = _streams(prepared, config.batch_size, config.look_back).to(device)
    else:
        windows, nexts = (t.to(device) for t in _windows(prepared, config.look_back))

    best: tuple[float, int, dict[str, torch.Tensor] | None] = (math.inf, 0, None)
    if init is not None:
        best = (_validation_loss(model, prepared, config), 0,
                {k: v.clone() for k, v in model.state_dict().items()})
    history, started = [], time.monotonic()
    for epoch in range(1, config.epochs + 1):
        model.train()
        if config.mode == "stateful":
            # A random first-chunk offset per epoch so chunk boundaries move.
            starts = range(int(rng.integers(config.look_back)), data.shape[1] - 1, config.look_back)
            loss_sum, batches = stateful_pass(model, data, starts, config.look_back, step,
                                              config.precision, on_batch), len(starts)
        else:
            order = torch.from_numpy(rng.permutation(len(windows))).to(device)
            loss_sum = _windowed_pass(model, windows, nexts, order, config, step, on_batch)
            batches = math.ceil(len(order) / config.batch_size)
        val_loss = _validation_loss(model, prepared, config)
        plateau.step(val_loss)
        row = {"epoch": epoch, "train_loss": float(loss_sum) / batches, "val_loss": val_loss,
               "lr": optimiser.param_groups[0]["lr"]}
        history.append(row)
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        if progress:
            progress(row)
        if epoch - best[1] >= config.patience:
            break
    if best[2] is None:
        raise ValueError("validation loss was never finite: lower --lr or check the data")
    model.load_state_dict(best[2])
    model.eval()
    streamed, windowed = validation_losses(model, prepared, config.look_back)
    return TrainResult(model.cpu(), best[0], best[1], len(history), history, time.monotonic() - started,
                       val_loss_streamed=streamed, val_loss_windowed=windowed, device=str(device))
