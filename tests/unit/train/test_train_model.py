"""The forecaster's cells and the training loop: real torch, tiny models, small simulated data.

- every cell's parameter count is the textbook formula, layer by layer;
- the step-by-step cell (peepholes, recurrent dropout, zoneout) is the fused kernel's math;
- each regulariser changes training, and only training;
- the same seed gives the same weights; the report carries both validation errors.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from faultwatch.runtime.devtools.simulator import simulate, write_csv
from faultwatch.runtime.offline.csvdata import read_csv
from faultwatch.train.data import prepare
from faultwatch.train.fit import TrainConfig, fit
from faultwatch.train.model import Forecaster, ForecasterConfig

F = 8
TINY = {"hidden": (16, 8), "dense": 8}
FAST = {"epochs": 2, "lr": 1e-2, "look_back": 20, "batch_size": 16}


pytestmark = pytest.mark.usefixtures("torch_one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    path = tmp_path_factory.mktemp("train-model") / "sim.csv"
    write_csv(simulate(devices=2, steps=500, seed=5), path)
    return prepare(read_csv(path))


def config(**kw) -> ForecasterConfig:
    return ForecasterConfig(n_features=F, target_index=tuple(range(F)), **(TINY | kw))


def state_dict_of(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


def max_weight_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# -- parameter counts ------------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "peephole", "bidirectional"), [
    ("lstm", False, False), ("gru", False, False), ("lstm", True, False), ("lstm", False, True),
    ("gru", False, True),
])
def test_parameter_count_per_layer_is_the_formula(cell, peephole, bidirectional):
    hidden = (128, 64)
    model = Forecaster(config(hidden=hidden, dense=32, cell=cell, peephole=peephole,
                              bidirectional=bidirectional))
    gates = 4 if cell == "lstm" else 3
    directions = 2 if bidirectional else 1
    inputs = (F, directions * hidden[0])
    table = model.parameter_table()
    for i, h in enumerate(hidden):
        # G·(input + hidden)·hidden weights + two bias vectors of G·hidden (torch keeps b_ih and b_hh),
        # + 3·hidden peephole weights (input, forget, output gates), per direction.
        expected = directions * (gates * (inputs[i] + h) * h + 2 * gates * h + (3 * h if peephole else 0))
        name, count = table[i]
        assert count == expected, (name, count, expected)
        assert f"{inputs[i]}→" in name and str(h) in name
    n_out = F
    assert table[-1] == ("head", directions * hidden[-1] * 32 + 32 + 32 * n_out + n_out)
    assert sum(c for _, c in table) == sum(p.numel() for p in model.parameters())


def test_reference_recipe_counts():
    """LSTM(128) → LSTM(64) on 8 channels: the numbers the README prints."""
    table = dict(Forecaster(config(hidden=(128, 64), dense=32)).parameter_table())
    assert table == {"lstm0 (8→128)": 70_656, "lstm1 (128→64)": 49_664, "head": 2_344}


# -- the step-by-step cell -------------------------------------------------------------------


@pytest.mark.parametrize(("cell", "bidirectional"), [("lstm", False), ("gru", False), ("lstm", True),
                                                     ("gru", True)])
def test_unrolled_cell_is_the_fused_kernel(cell, bidirectional):
    torch.manual_seed(0)
    model = Forecaster(config(cell=cell, bidirectional=bidirectional)).eval()
    x = torch.rand(3, 25, F)
    rnn = model.rnns[0]
    state = tuple(torch.rand_like(s) for s in rnn.zero_state(3))
    with torch.no_grad():
        fused_out, fused_state = rnn(x, state)
        assert not rnn.needs_unrolled()
        loop_out, loop_state = rnn._unrolled(x, state)
    torch.testing.assert_close(loop_out, fused_out, atol=1e-5, rtol=0)
    for a, b in zip(loop_state, fused_state, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_peepholes_change_the_cell_and_still_stream():
    torch.manual_seed(0)
    model = Forecaster(config(peephole=True)).eval()
    x = torch.rand(2, 40, F)
    with torch.no_grad():
        whole, _ = model(x)
        state, steps = model.zero_state(2), []
        for t in range(x.shape[1]):
            f, state = model(x[:, t:t + 1], state)
            steps.append(f)
        torch.testing.assert_close(torch.cat(steps, 1), whole, atol=1e-5, rtol=0)
        for rnn in model.rnns:
            rnn.peephole.mul_(4)
        stronger, _ = model(x)
        for rnn in model.rnns:
            rnn.peephole.zero_()
        plain, _ = model(x)
        for rnn in model.rnns:  # zero peepholes: exactly torch's LSTM
            rnn.fused_for_export = True
        fused, _ = model(x)
    assert (stronger - whole).abs().max() > 1e-3
    torch.testing.assert_close(plain, fused, atol=1e-5, rtol=0)


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("kind", ["recurrent_dropout", "zoneout"])
def test_recurrent_regularisers_are_random_in_training_and_off_in_eval(cell, kind):
    torch.manual_seed(0)
    model = Forecaster(config(cell=cell, dropout=0.0, **{kind: 0.3}))
    x = torch.rand(2, 30, F)
    model.train()
    a, b = model(x)[0], model(x)[0]
    assert (a - b).abs().max() > 1e-4, "two training passes should draw different masks"
    model.eval()
    with torch.no_grad():
        evaluated = model(x)[0]
        for rnn in model.rnns:
            assert not rnn.needs_unrolled()  # eval runs the fused kernel, as export does
        plain = Forecaster(config(cell=cell, dropout=0.0))
        plain.load_state_dict(model.state_dict())
        torch.testing.assert_close(evaluated, plain.eval()(x)[0])


# -- regularisers change training ----------------------------------------------------------


def test_each_regulariser_changes_the_trained_weights(prepared):
    base = fit(prepared, config(), TrainConfig(**FAST))
    weights = state_dict_of(base)
    for name, model_kw, loop_kw in [("recurrent dropout", {"recurrent_dropout": 0.3}, {}),
                                    ("zoneout", {"zoneout": 0.2}, {}),
                                    ("max-norm", {}, {"max_norm": 0.5})]:
        other = fit(prepared, config(**model_kw), TrainConfig(**FAST | loop_kw))
        assert max_weight_diff(weights, state_dict_of(other)) > 1e-3, name
        assert other.history[0]["train_loss"] != base.history[0]["train_loss"], name


def test_max_norm_caps_every_weight_row(prepared):
    cap = 0.5
    free = fit(prepared, config(), TrainConfig(**FAST))
    capped = fit(prepared, config(), TrainConfig(**FAST, max_norm=cap))
    norms = lambda m: torch.cat([w.detach().norm(dim=1) for w in m.weight_matrices()])  # noqa: E731
    assert norms(free.model).max() > cap  # without the constraint some rows are longer
    assert norms(capped.model).max() <= cap + 1e-5
    # Biases and peepholes are not weights in the Keras sense: untouched by the constraint.
    assert all("weight" in n for n, p in capped.model.named_parameters()
               if any(p is w for w in capped.model.weight_matrices()))


# -- reproducibility and the report ---------------------------------------------------------


def test_same_seed_same_weights_other_seed_other_weights(prepared):
    kw = {"recurrent_dropout": 0.2}  # random masks too, not only init and shuffling
    a = state_dict_of(fit(prepared, config(**kw), TrainConfig(**FAST, seed=7)))
    b = state_dict_of(fit(prepared, config(**kw), TrainConfig(**FAST, seed=7)))
    c = state_dict_of(fit(prepared, config(**kw), TrainConfig(**FAST, seed=8)))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert max_weight_diff(a, c) > 1e-3


@pytest.mark.parametrize("mode", ["stateful", "windowed"])
def test_both_validation_errors_are_reported_for_both_modes(prepared, mode):
    result = fit(prepared, config(), TrainConfig(**FAST, mode=mode))
    assert result.val_loss_streamed == result.best_val_loss  # early stopping watches the daemon's view
    assert np.isfinite(result.val_loss_windowed) and result.val_loss_windowed > 0
    assert len(result.history) == FAST["epochs"]


def test_bidirectional_trains_windowed_and_cannot_claim_a_streamed_error(prepared):
    with pytest.raises(ValueError, match="windowed"):
        fit(prepared, config(bidirectional=True), TrainConfig(**FAST, mode="stateful"))
    result = fit(prepared, config(bidirectional=True), TrainConfig(**FAST, mode="windowed"))
    assert result.val_loss_streamed is None
    assert result.best_val_loss == result.val_loss_windowed
    assert result.model.rnns[1].input_size == 2 * TINY["hidden"][0]


def test_peephole_is_an_lstm_option():
    with pytest.raises(ValueError, match="LSTM"):
        config(cell="gru", peephole=True)
