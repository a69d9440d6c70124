"""One source for training hyperparameters: every TrainOptions field is a ``faultwatch train`` and
``faultwatch tune`` flag whose help shows the dataclass default, and the loop's and the benchmark's
settings take their defaults from the same fields. No torch needed."""

from __future__ import annotations

import argparse
import ast
from dataclasses import fields
from pathlib import Path

import pytest
from faultwatch.runtime import cli, commands
from faultwatch.train.options import OptionsError, TrainOptions

ROOT = Path(__file__).resolve().parents[3]


def _subcommand(name: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


def _help_by_flag(name: str) -> dict[str, str]:
    actions = _subcommand(name)._actions
    return {flag: action.help or "" for action in actions for flag in action.option_strings}


def _shown(value) -> str:
    """What the help must show for a default, written out here independently of the CLI."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("command", ["train", "tune"])
def test_every_option_has_a_flag_whose_help_shows_the_dataclass_default(command):
    helps = _help_by_flag(command)
    for f in fields(TrainOptions):
        flag = "--" + f.name.replace("_", "-")
        assert flag in helps, f"{command}: no {flag} for TrainOptions.{f.name}"
        assert f.metadata["help"] in helps[flag], flag
        if command == "tune" and f.name == "epochs":
            assert f"({cli.TUNE_EPOCHS};" in helps[flag] and str(f.default) in helps[flag]
        elif f.default is None or f.default == ():
            assert f"({f.metadata['default_text']})" in helps[flag], flag
        else:
            assert f"({_shown(f.default)})" in helps[flag], (flag, helps[flag])


def test_a_new_default_reaches_the_help(monkeypatch):
    # The help is read from the field, not written beside it: change the field, the help follows.
    monkeypatch.setattr(TrainOptions.__dataclass_fields__["look_back"], "default", 77)
    assert "(77)" in _help_by_flag("train")["--look-back"]


def test_no_flags_give_the_dataclass_defaults():
    args = cli.build_parser().parse_args(["train", "data.csv", "--out", "run"])
    assert commands.train_options(args) == TrainOptions()


def test_choices_come_from_the_fields():
    train = {a.dest: a.choices for a in _subcommand("train")._actions if a.choices}
    for f in fields(TrainOptions):
        if "choices" in f.metadata:
            assert tuple(train[f.name]) == tuple(f.metadata["choices"])
    with pytest.raises(OptionsError, match="precision"):
        TrainOptions(precision="fp8")


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1"])
def test_device_spellings_accepted(device):
    assert TrainOptions(device=device).device == device


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:x", "CPU", "mps"])
def test_other_device_spellings_refused_naming_the_option(device):
    with pytest.raises(OptionsError, match="device"):
        TrainOptions.from_mapping({"device": device})


def _class_defaults(path: Path, class_name: str) -> dict[str, ast.expr]:
    tree = ast.parse(path.read_text())
    cls = next(n for n in ast.walk(tree) if isinstance(n, ast.ClassDef) and n.name == class_name)
    return {n.target.id: n.value for n in cls.body
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.value is not None}


def test_train_config_restates_no_number():
    # Every TrainConfig default is TrainOptions.<same name>, not a literal copy of it.
    defaults = _class_defaults(ROOT / "train" / "fit.py", "TrainConfig")
    assert defaults, "TrainConfig not found"
    for name, value in defaults.items():
        assert ast.unparse(value) == f"TrainOptions.{name}", (name, ast.unparse(value))


def test_forecaster_config_defaults_are_the_options():
    defaults = _class_defaults(ROOT / "train" / "model.py", "ForecasterConfig")
    assert len(defaults) == 8
    for name, value in defaults.items():
        assert ast.unparse(value) == f"TrainOptions.{name}", (name, ast.unparse(value))


def test_bench_spec_shares_the_recipe_where_it_keeps_it():
    defaults = _class_defaults(ROOT / "bench" / "eval_model.py", "BenchSpec")
    for name in ("seed", "val_fraction", "device", "precision"):
        assert ast.unparse(defaults[name]) == f"TrainOptions.{name}", name
