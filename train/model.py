"""The forecaster: stacked LSTM → dense head, forecasting the next reading of every target.

The model is written for streaming. ``forward`` takes and returns the state of
every recurrent layer, so running a sequence in one call and running it one
step at a time from the carried state give the same forecasts; that is what
the exported step graph does on the edge.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

State = list[tuple[torch.Tensor, torch.Tensor]]  # per layer (h, c), each [1, B, H_i]


@dataclass
class ForecasterConfig:
    """Constructor arguments; saved in the checkpoint as plain data (``asdict``)."""

    n_features: int
    target_index: tuple[int, ...]  # position of each forecast target among the features
    hidden: tuple[int, ...] = (128, 64)
    dense: int = 32  # 0 = no hidden dense layer
    dropout: float = 0.3
    cell: str = "lstm"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_index"] = list(self.target_index)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ForecasterConfig:
        d = dict(d)
        d["target_index"] = tuple(d["target_index"])
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


class Forecaster(nn.Module):
    """Next-step forecaster.

    The head predicts the *change* from the current reading of each target
    (a skip connection from the input): the next reading is mostly the
    current one, so an untrained model is a persistence forecaster and the
    LSTM only has to learn the dynamics.
    """

    def __init__(self, config: ForecasterConfig):
        super().__init__()
        if config.cell != "lstm":
            raise ValueError(f"cell {config.cell!r} is not supported yet (only 'lstm')")
        self.config = config
        sizes = (config.n_features, *config.hidden)
        self.lstms = nn.ModuleList(
            nn.LSTM(sizes[i], sizes[i + 1], batch_first=True) for i in range(len(config.hidden))
        )
        self.dropout = nn.Dropout(config.dropout)
        n_targets = len(config.target_index)
        if config.dense > 0:
            self.head = nn.Sequential(
                nn.Linear(config.hidden[-1], config.dense),
                nn.ReLU(),
                nn.Linear(config.dense, n_targets),
            )
        else:
            self.head = nn.Linear(config.hidden[-1], n_targets)
        self.register_buffer("target_index", torch.tensor(config.target_index, dtype=torch.long))

    def zero_state(self, batch: int) -> State:
        return [(torch.zeros(1, batch, h), torch.zeros(1, batch, h)) for h in self.config.hidden]

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: [B, T, F] scaled readings → forecast [B, T, K] of the next reading, new state."""
        if state is None:
            state = self.zero_state(x.shape[0])
        out, new_state = x, []
        for lstm, (h, c) in zip(self.lstms, state, strict=True):
            out, (h, c) = lstm(out, (h, c))  # out: [B, T, H_i]
            new_state.append((h, c))
            out = self.dropout(out)
        last = x.index_select(2, self.target_index)  # [B, T, K] current reading of each target
        return last + self.head(out), new_state

    def parameter_table(self) -> list[tuple[str, int]]:
        """(layer name, parameter count) per top-level layer, for the training report."""
        rows = [(f"lstm{i} ({lstm.input_size}→{lstm.hidden_size})",
                 sum(p.numel() for p in lstm.parameters())) for i, lstm in enumerate(self.lstms)]
        rows.append(("head", sum(p.numel() for p in self.head.parameters())))
        return rows
