"""``faultwatch tune DATA.csv --trials N --out DIR``: Bayesian search over the recipe's main knobs.

Optuna's TPE sampler proposes hidden units, learning rate, dropout, batch size
and look-back; each trial is a real training run (the same loop as ``faultwatch
train``) on data prepared once, and reports its validation loss after every
epoch so Optuna's median pruner can stop hopeless trials early. The first trial
is always the base configuration (the recipe, or ``--config``), so the best
found is never worse than it under the same budget.

Writes ``DIR/best.json`` (usable as ``faultwatch train --config DIR/best.json``),
``DIR/trials.csv`` (one row per trial) and ``DIR/tune.json`` (the summary).
"""

from __future__ import annotations

import csv
import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TextIO

import optuna
from faultwatch.train.command import load_data, loop_config, model_config
from faultwatch.train.device import resolve_device
from faultwatch.train.fit import fit
from faultwatch.train.options import OptionsError, TrainOptions

#: Options a trial changes; the rest come from the base configuration.
TUNED = ("hidden", "lr", "dropout", "batch_size", "look_back")


@dataclass(frozen=True)
class SearchSpace:
    hidden: tuple[int, int] = (64, 512)  # first layer; deeper layers keep the base's ratios (128→64)
    lr: tuple[float, float] = (1e-4, 1e-2)  # log scale
    dropout: tuple[float, float] = (0.2, 0.5)
    batch_size: tuple[int, int] = (32, 256)  # powers of two in between
    look_back: tuple[int, int] = (20, 120)

    def __post_init__(self) -> None:
        for name in ("hidden", "lr", "dropout", "batch_size", "look_back"):
            low, high = getattr(self, name)
            if not 0 < low <= high:
                raise OptionsError(f"{name.replace('_', '-')}-range: need 0 < low ≤ high, got {low},{high}")
        if self.dropout[1] >= 1:
            raise OptionsError("dropout-range: must stay below 1")
        if not self.batch_sizes():
            raise OptionsError(f"batch-range {self.batch_size}: holds no power of two")

    def batch_sizes(self) -> list[int]:
        return [2**k for k in range(0, 16) if self.batch_size[0] <= 2**k <= self.batch_size[1]]

    def contains(self, options: TrainOptions) -> bool:
        return (self.hidden[0] <= options.hidden[0] <= self.hidden[1]
                and self.lr[0] <= options.lr <= self.lr[1]
                and self.dropout[0] <= options.dropout <= self.dropout[1]
                and options.batch_size in self.batch_sizes()
                and self.look_back[0] <= options.look_back <= self.look_back[1])


def _layers(base: tuple[int, ...], first: int) -> tuple[int, ...]:
    return tuple(max(1, round(first * h / base[0])) for h in base)


def _suggest(trial: optuna.trial.BaseTrial, base: TrainOptions, space: SearchSpace) -> TrainOptions:
    first = trial.suggest_int("hidden", *space.hidden, log=True)
    return replace(
        base,
        hidden=_layers(base.hidden, first),
        lr=trial.suggest_float("lr", *space.lr, log=True),
        dropout=trial.suggest_float("dropout", *space.dropout),
        batch_size=trial.suggest_categorical("batch_size", space.batch_sizes()),
        look_back=trial.suggest_int("look_back", *space.look_back),
    )


def tune(
    csv_path: Path,
    out_dir: Path,
    *,
    trials: int,
    base: TrainOptions | None = None,
    space: SearchSpace | None = None,
    timeout: float | None = None,
    pruner: optuna.pruners.BasePruner | None = None,
    quiet: bool = False,
    stream: TextIO | None = None,
) -> dict:
    """Run the study; write best.json, trials.csv and tune.json into ``out_dir``; return the summary."""
    base = base or TrainOptions()
    space = space or SearchSpace()
    if trials < 1:
        raise OptionsError(f"trials: need at least 1, got {trials}")
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=stream, flush=True))
    # Refused here, once: inside a trial a DeviceError (a ValueError) would only fail that trial.
    device = resolve_device(base.device, base.precision)
    table, prepared = load_data(csv_path, base)
    say(f"data: {len(table.timestamps)} rows, {len(prepared.series)} device(s), "
        f"{len(prepared.features)} features; {trials} trial(s) of up to {base.epochs} epochs on {device}")

    def objective(trial: optuna.Trial) -> float:
        options = _suggest(trial, base, space)
        started = time.monotonic()

        def report(row: dict) -> None:
            trial.report(row["val_loss"], row["epoch"])
            trial.set_user_attr("epochs_run", row["epoch"])
            if trial.should_prune():
                trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
                raise optuna.TrialPruned()

        result = fit(prepared, model_config(options, prepared), loop_config(options), progress=report)
        trial.set_user_attr("seconds", round(time.monotonic() - started, 2))
        trial.set_user_attr("val_loss_windowed", result.val_loss_windowed)
        return result.best_val_loss

    def log_trial(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        p = trial.params
        what = (f"val {trial.value:.3e}" if trial.state == optuna.trial.TrialState.COMPLETE
                else f"{trial.state.name.lower()} at epoch {trial.user_attrs.get('epochs_run', 0)}")
        layers = ",".join(map(str, _layers(base.hidden, p["hidden"])))
        say(f"trial {trial.number + 1:3d}/{trials}  hidden {layers}  lr {p['lr']:.1e}  "
            f"dropout {p['dropout']:.2f}  batch {p['batch_size']}  look-back {p['look_back']}  → {what} "
            f"({trial.user_attrs.get('epochs_run', 0)} epochs, {trial.user_attrs.get('seconds', 0):.1f} s)")

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sampler = optuna.samplers.TPESampler(seed=base.seed, n_startup_trials=max(2, min(10, trials // 3)))
    pruner = pruner or optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=3)
    study = optuna.create_study(direction="minimize", sampler=sampler, pruner=pruner)
    baseline_enqueued = space.contains(base)
    if baseline_enqueued:
        study.enqueue_trial({"hidden": base.hidden[0], "lr": base.lr, "dropout": base.dropout,
                             "batch_size": base.batch_size, "look_back": base.look_back})
    study.optimize(objective, n_trials=trials, timeout=timeout, callbacks=[log_trial],
                   catch=(ValueError,))
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not complete:
        raise OptionsError("no trial completed: widen the search space or raise --epochs")
    best = study.best_trial
    best_options = _suggest(optuna.trial.FixedTrial(best.params), base, space)

    out_dir.mkdir(parents=True, exist_ok=True)
    recipe = TrainOptions().to_dict()
    config = {k: v for k, v in best_options.to_dict().items()
              if (k in TUNED or v != recipe.get(k)) and k != "epochs"}
    (out_dir / "best.json").write_text(json.dumps(config, indent=2) + "\n")
    _write_trials(out_dir / "trials.csv", study, base)
    first = study.trials[0]
    summary = {
        "data": str(csv_path),
        "data_sha256": table.sha256,
        "trials": len(study.trials),
        "complete": len(complete),
        "pruned": sum(t.state == optuna.trial.TrialState.PRUNED for t in study.trials),
        "epochs_per_trial": base.epochs,
        "best_trial": best.number,
        "best_val_loss": best.value,
        "best_config": config,
        "baseline_val_loss": first.value if baseline_enqueued else None,
        "space": {k: list(v) for k, v in space.__dict__.items()},
        "config_path": str(out_dir / "best.json"),
    }
    (out_dir / "tune.json").write_text(json.dumps(summary, indent=2) + "\n")
    baseline = first.value if baseline_enqueued else None
    versus = "" if baseline is None or not math.isfinite(baseline) else \
        f" (base configuration, trial 1: {baseline:.3e})"
    say(f"best: trial {best.number + 1}, val {best.value:.3e}{versus} → {out_dir / 'best.json'}; "
        f"{summary['pruned']} pruned; all trials in {out_dir / 'trials.csv'}")
    return summary


def _write_trials(path: Path, study: optuna.Study, base: TrainOptions) -> None:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["trial", "state", "val_loss", "hidden", "lr", "dropout", "batch_size", "look_back",
                    "epochs_run", "seconds"])
        for t in study.trials:
            p = t.params
            w.writerow([t.number + 1, t.state.name.lower(), "" if t.value is None else f"{t.value:.6e}",
                        ",".join(map(str, _layers(base.hidden, p["hidden"]))) if "hidden" in p else "",
                        f"{p['lr']:.3e}" if "lr" in p else "",
                        f"{p['dropout']:.3f}" if "dropout" in p else "",
                        p.get("batch_size", ""), p.get("look_back", ""),
                        t.user_attrs.get("epochs_run", ""), t.user_attrs.get("seconds", "")])
