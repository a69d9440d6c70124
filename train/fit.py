"""The training loop: stateful truncated BPTT (default) or the recipe's windowed training.

Run it as ``faultwatch train DATA.csv --out RUN_DIR``.

Stateful training runs contiguous chunks of every series, carrying the LSTM
state from one chunk to the next (detached), so the model learns to forecast
from a long-lived state, which is how the edge runtime uses it. Windowed
training (``--mode windowed``) is the reference recipe: independent
``look_back`` windows from a zero state, loss on the last step.

Validation is always *streamed*: the model runs each device's whole series
from a zero state, one call, and the error is taken on the validation part.
Early stopping keeps the best weights; the learning rate drops on plateaus.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import Prepared
from .model import Forecaster, ForecasterConfig


@dataclass
class TrainConfig:
    mode: str = "stateful"  # or "windowed"
    look_back: int = 60  # chunk length (stateful) or window length (windowed)
    batch_size: int = 32
    epochs: int = 100
    lr: float = 1e-3
    patience: int = 10  # early stopping, in epochs without improvement
    lr_patience: int = 5  # ReduceLROnPlateau patience, factor 0.1
    seed: int = 0


@dataclass
class TrainResult:
    model: Forecaster
    best_val_loss: float
    best_epoch: int
    epochs_run: int
    history: list[dict] = field(default_factory=list)
    seconds: float = 0.0


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
    return torch.from_numpy(np.stack([s[:shortest] for s in streams]))


def _windows(prepared: Prepared, look_back: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All windows of the training parts: inputs [W, L, F] and next readings [W, F]."""
    xs, ys = [], []
    for s in prepared.series:
        part = s.scaled[: s.split]
        for t in range(len(part) - look_back):
            xs.append(part[t:t + look_back])
            ys.append(part[t + look_back])
    if not xs:
        raise ValueError(f"training part is shorter than look_back={look_back}")
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))


@torch.no_grad()
def streamed_residuals(model: Forecaster, prepared: Prepared) -> list[np.ndarray]:
    """Per device, residuals [N_val, K] of the validation part, streamed from a zero state."""
    model.eval()
    idx = list(model.config.target_index)
    out = []
    for s in prepared.series:
        x = torch.from_numpy(s.scaled).unsqueeze(0)  # [1, N, F]
        forecast, _ = model(x)  # [1, N, K]: forecast[t] is for reading t + 1
        pred = forecast[0, s.split - 1:-1].numpy()
        out.append(s.scaled[s.split:, idx] - pred)
    return out


def fit(
    prepared: Prepared,
    model_config: ForecasterConfig,
    config: TrainConfig,
    progress: Callable[[dict], None] | None = None,
) -> TrainResult:
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model = Forecaster(model_config)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
        optimiser, factor=0.1, patience=config.lr_patience
    )
    loss_fn = nn.MSELoss()
    idx = model.target_index
    if config.mode == "stateful":
        data = _streams(prepared, config.batch_size, config.look_back)
    elif config.mode == "windowed":
        windows, nexts = _windows(prepared, config.look_back)
    else:
        raise ValueError(f"unknown training mode {config.mode!r} (stateful or windowed)")

    best = (math.inf, 0, None)
    history, started = [], time.monotonic()
    for epoch in range(1, config.epochs + 1):
        model.train()
        losses = []
        if config.mode == "stateful":
            # A random first-chunk offset per epoch so chunk boundaries move.
            state = None
            for t0 in range(int(rng.integers(config.look_back)), data.shape[1] - 1, config.look_back):
                x = data[:, t0:t0 + config.look_back]  # [S, L, F]
                y = data[:, t0 + 1:t0 + config.look_back + 1].index_select(2, idx)  # [S, L, K]
                x = x[:, : y.shape[1]]
                forecast, state = model(x, state)
                loss = loss_fn(forecast, y)
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                state = [(h.detach(), c.detach()) for h, c in state]
                losses.append(loss.item())
        else:
            order = torch.from_numpy(rng.permutation(len(windows)))
            for b in range(0, len(order), config.batch_size):
                pick = order[b:b + config.batch_size]
                forecast, _ = model(windows[pick])  # [b, L, K]; the recipe scores the last step
                loss = loss_fn(forecast[:, -1], nexts[pick].index_select(1, idx))
                optimiser.zero_grad()
                loss.backward()
                optimiser.step()
                losses.append(loss.item())
        residuals = np.concatenate(streamed_residuals(model, prepared))
        val_loss = float(np.mean(residuals**2))
        plateau.step(val_loss)
        row = {"epoch": epoch, "train_loss": float(np.mean(losses)), "val_loss": val_loss,
               "lr": optimiser.param_groups[0]["lr"]}
        history.append(row)
        if progress:
            progress(row)
        if val_loss < best[0]:
            best = (val_loss, epoch, {k: v.clone() for k, v in model.state_dict().items()})
        elif epoch - best[1] >= config.patience:
            break
    model.load_state_dict(best[2])
    model.eval()
    return TrainResult(model, best[0], best[1], len(history), history, time.monotonic() - started)
