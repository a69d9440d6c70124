"""The forecaster: stacked recurrent layers → dense head, forecasting the next reading of every target.

The model is written for streaming. ``forward`` takes and returns the state of
every recurrent layer, so running a sequence in one call and running it one
step at a time from the carried state give the same forecasts; that is what
the exported step graph does on the edge.

Cells: ``lstm`` (default), ``gru``, and the peephole LSTM (``peephole=True``),
whose input and forget gates also see the previous cell state and whose output
gate sees the new one — the formula of the ONNX ``LSTM`` op's ``P`` input::

    i = σ(W_i x + R_i h + P_i ⊙ c_prev + b_i)      g = tanh(W_g x + R_g h + b_g)
    f = σ(W_f x + R_f h + P_f ⊙ c_prev + b_f)      c = f ⊙ c_prev + i ⊙ g
    o = σ(W_o x + R_o h + P_o ⊙ c + b_o)           h = o ⊙ tanh(c)

Every layer keeps its weights in a torch ``nn.LSTM``/``nn.GRU`` (two bias vectors
per gate set, as torch does), so export can hand the fused op to ONNX. The
cell is written out step by step (:meth:`Recurrent._unrolled`) only where torch's
fused kernel can't do the job: peepholes, and, while training, recurrent
(variational) dropout and zoneout. In eval mode those two are off, so the
trained weights run as a plain fused cell: what validation measures is what
export ships.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from faultwatch.train.options import TrainOptions
from torch import nn

#: Per layer: (h, c) for an LSTM, (h,) for a GRU; each [D, B, H_i] (D = 2 when bidirectional).
State = list[tuple[torch.Tensor, ...]]

CELLS = ("lstm", "gru")


@dataclass
class ForecasterConfig:
    """Constructor arguments; saved in the checkpoint as plain data (``asdict``). Defaults are
    the recipe's, from TrainOptions (faultwatch.train.options)."""

    n_features: int
    target_index: tuple[int, ...]  # position of each forecast target among the features
    hidden: tuple[int, ...] = TrainOptions.hidden
    dense: int = TrainOptions.dense  # 0 = no hidden dense layer
    dropout: float = TrainOptions.dropout  # between layers and before the head, as in the recipe
    cell: str = TrainOptions.cell  # or "gru"
    peephole: bool = TrainOptions.peephole  # LSTM only
    bidirectional: bool = TrainOptions.bidirectional  # offline scoring only: cannot stream
    recurrent_dropout: float = TrainOptions.recurrent_dropout  # variational: one mask on h per sequence
    zoneout: float = TrainOptions.zoneout  # probability a unit keeps its previous h and c, training only

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise ValueError(f"unknown cell {self.cell!r} (choose from {', '.join(CELLS)})")
        if self.peephole and self.cell != "lstm":
            raise ValueError("--peephole is an LSTM variant; it does not apply to a GRU")
        for name in ("dropout", "recurrent_dropout", "zoneout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {getattr(self, name)}")

    @property
    def directions(self) -> int:
        return 2 if self.bidirectional else 1

    @property
    def has_cell_state(self) -> bool:
        return self.cell == "lstm"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["target_index"] = list(self.target_index)
        d["hidden"] = list(self.hidden)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> ForecasterConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model argument(s): {', '.join(unknown)}")
        d = dict(d)
        d["target_index"] = tuple(d["target_index"])
        d["hidden"] = tuple(d["hidden"])
        return cls(**d)


class Recurrent(nn.Module):
    """One recurrent layer (both directions when bidirectional), batch first."""

    def __init__(self, cell: str, input_size: int, hidden: int, *, peephole: bool = False,
                 bidirectional: bool = False, recurrent_dropout: float = 0.0, zoneout: float = 0.0):
        super().__init__()
        kind = nn.LSTM if cell == "lstm" else nn.GRU
        self.cell, self.hidden_size, self.input_size = cell, hidden, input_size
        self.directions = 2 if bidirectional else 1
        self.rnn = kind(input_size, hidden, batch_first=True, bidirectional=bidirectional)
        self.recurrent_dropout, self.zoneout = recurrent_dropout, zoneout
        if peephole:
            # [D, 3, H]: weights on the cell state for the (input, forget, output) gates.
            bound = 1.0 / math.sqrt(hidden)
            self.peephole: nn.Parameter | None = nn.Parameter(
                torch.empty(self.directions, 3, hidden).uniform_(-bound, bound))
        else:
            self.peephole = None
        #: Export sets this: run the fused kernel, the peephole term is patched into the ONNX graph.
        self.fused_for_export = False

    def zero_state(self, batch: int, device: torch.device | None = None) -> tuple[torch.Tensor, ...]:
        zeros = torch.zeros(self.directions, batch, self.hidden_size, device=device)
        return (zeros, zeros.clone()) if self.cell == "lstm" else (zeros,)

    def needs_unrolled(self) -> bool:
        if self.fused_for_export:
            return False
        stochastic = self.training and (self.recurrent_dropout > 0 or self.zoneout > 0)
        return self.peephole is not None or stochastic

    def forward(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        """x [B, T, I], state per :meth:`zero_state` → out [B, T, D·H], new state."""
        if self.needs_unrolled():
            return self._unrolled(x, state)
        out, new = self.rnn(x, state if self.cell == "lstm" else state[0])
        return out, (new if self.cell == "lstm" else (new,))

    def _unrolled(self, x: torch.Tensor, state: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, tuple]:
        outs, finals = [], []
        for d in range(self.directions):
            suffix = "_l0_reverse" if d else "_l0"
            w_ih, w_hh = getattr(self.rnn, "weight_ih" + suffix), getattr(self.rnn, "weight_hh" + suffix)
            b_ih, b_hh = getattr(self.rnn, "bias_ih" + suffix), getattr(self.rnn, "bias_hh" + suffix)
            xd = x.flip(1) if d else x
            layer_state = tuple(s[d] for s in state)  # each [B, H]
            if self.cell == "lstm":
                peep = None if self.peephole is None else self.peephole[d]
                out, final = self._lstm_steps(xd, layer_state, w_ih, w_hh, b_ih + b_hh, peep)
            else:
                out, final = self._gru_steps(xd, layer_state, w_ih, w_hh, b_ih, b_hh)
            outs.append(out.flip(1) if d else out)
            finals.append(final)
        out = torch.cat(outs, dim=2)
        return out, tuple(torch.stack([f[k] for f in finals]) for k in range(len(finals[0])))

    def _masks(self, h: torch.Tensor) -> torch.Tensor | None:
        """Variational recurrent dropout: one mask per sequence on h, scaled to keep the mean."""
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return None
        return torch.bernoulli(torch.full_like(h, 1 - p)) / (1 - p)

    def _zone(self, old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
        """Zoneout: each unit keeps its previous value with probability ``zoneout`` (training)."""
        if not (self.training and self.zoneout > 0):
            return new
        keep = torch.bernoulli(torch.full_like(new, self.zoneout)).bool()
        return torch.where(keep, old, new)

    def _lstm_steps(self, x, state, w_ih, w_hh, bias, peep):
        h, c = state  # [B, H]
        xp = x @ w_ih.T + bias  # [B, T, 4H], gates in torch order i, f, g, o
        mask = self._masks(h)
        outs = []
        for t in range(x.shape[1]):
            gates = xp[:, t] + (h if mask is None else h * mask) @ w_hh.T
            i, f, g, o = gates.chunk(4, dim=1)
            if peep is not None:
                i, f = i + peep[0] * c, f + peep[1] * c
            c_new = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            if peep is not None:
                o = o + peep[2] * c_new
            h_new = torch.sigmoid(o) * torch.tanh(c_new)
            h, c = self._zone(h, h_new), self._zone(c, c_new)
            outs.append(h)
        return torch.stack(outs, dim=1), (h, c)

    def _gru_steps(self, x, state, w_ih, w_hh, b_ih, b_hh):
        (h,) = state  # [B, H]
        xp = x @ w_ih.T + b_ih  # [B, T, 3H], gates in torch order r, z, n
        mask = self._masks(h)
        outs = []
        for t in range(x.shape[1]):
            hp = (h if mask is None else h * mask) @ w_hh.T + b_hh
            xr, xz, xn = xp[:, t].chunk(3, dim=1)
            hr, hz, hn = hp.chunk(3, dim=1)
            r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
            h_new = (1 - z) * torch.tanh(xn + r * hn) + z * h
            h = self._zone(h, h_new)
            outs.append(h)
        return torch.stack(outs, dim=1), (h,)


class Forecaster(nn.Module):
    target_index: torch.Tensor  # [K] long, a buffer: where each target sits among the features

    """Next-step forecaster.

    The head predicts the *change* from the current reading of each target
    (a skip connection from the input): the next reading is mostly the
    current one, so an untrained model is a persistence forecaster and the
    recurrent layers only have to learn the dynamics.
    """

    def __init__(self, config: ForecasterConfig):
        super().__init__()
        self.config = config
        d = config.directions
        sizes = (config.n_features, *[h * d for h in config.hidden])
        self.rnns = nn.ModuleList(
            Recurrent(config.cell, sizes[i], h, peephole=config.peephole,
                      bidirectional=config.bidirectional, recurrent_dropout=config.recurrent_dropout,
                      zoneout=config.zoneout)
            for i, h in enumerate(config.hidden)
        )
        self.dropout = nn.Dropout(config.dropout)
        n_targets = len(config.target_index)
        self.head: nn.Module
        if config.dense > 0:
            self.head = nn.Sequential(
                nn.Linear(sizes[-1], config.dense),
                nn.ReLU(),
                nn.Linear(config.dense, n_targets),
            )
        else:
            self.head = nn.Linear(sizes[-1], n_targets)
        self.register_buffer("target_index", torch.tensor(config.target_index, dtype=torch.long))

    def zero_state(self, batch: int, device: torch.device | None = None) -> State:
        return [rnn.zero_state(batch, device) for rnn in self.recurrent_layers()]

    def recurrent_layers(self) -> list[Recurrent]:
        """``self.rnns``, typed (a ModuleList's items read as plain Modules)."""
        return [rnn for rnn in self.rnns if isinstance(rnn, Recurrent)]

    def forward(self, x: torch.Tensor, state: State | None = None) -> tuple[torch.Tensor, State]:
        """x: [B, T, F] scaled readings → forecast [B, T, K] of the next reading, new state."""
        if state is None:
            state = self.zero_state(x.shape[0], x.device)
        out, new_state = x, []
        for rnn, layer_state in zip(self.rnns, state, strict=True):
            out, layer_state = rnn(out, layer_state)  # out: [B, T, D·H_i]
            new_state.append(layer_state)
            out = self.dropout(out)
        last = x.index_select(2, self.target_index)  # [B, T, K] current reading of each target
        return last + self.head(out), new_state

    def weight_matrices(self) -> list[torch.Tensor]:
        """The matrices a max-norm constraint applies to: recurrent and dense weights, not biases."""
        return [p for name, p in self.named_parameters() if "weight" in name]

    def parameter_table(self) -> list[tuple[str, int]]:
        """(layer name, parameter count) per top-level layer, for the training report."""
        rows = []
        for i, rnn in enumerate(self.recurrent_layers()):
            kind = ("peephole-" if rnn.peephole is not None else "") + rnn.cell
            arrow = f"{rnn.input_size}→{'2×' if rnn.directions == 2 else ''}{rnn.hidden_size}"
            rows.append((f"{'bi' if rnn.directions == 2 else ''}{kind}{i} ({arrow})",
                         sum(p.numel() for p in rnn.parameters())))
        rows.append(("head", sum(p.numel() for p in self.head.parameters())))
        return rows
