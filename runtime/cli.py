"""The ``faultwatch`` command: its parser and entry point. What each subcommand does is in
:mod:`faultwatch.runtime.commands`; the ones that need torch import it lazily.

User errors print one line to stderr and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import fields
from typing import Any

from faultwatch.runtime.commands import (
    TUNE_EPOCHS,
    UserError,
    cmd_bench,
    cmd_demo,
    cmd_eval,
    cmd_export,
    cmd_inspect,
    cmd_replay,
    cmd_run,
    cmd_simulate,
    cmd_train,
    cmd_tune,
)
from faultwatch.runtime.engine.detector import POLICIES
from faultwatch.runtime.version import VERSION

# Torch-free: the training options' flags, help and defaults are built from its fields.
from faultwatch.train.options import TrainOptions

TRAIN_HINT = "this command needs torch: pip install 'faultwatch[train]'"


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


# -- parser ------------------------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _train_option_flags(p: argparse.ArgumentParser, tune: bool = False) -> None:
    """One flag per field of faultwatch.train.options.TrainOptions (torch-free), its help and
    default read from the field. Defaults are SUPPRESSed on the parser (only flags given reach
    the handler, so they can override --config); the help shows the dataclass default."""
    p.add_argument("--config", default=None, help="JSON/TOML file of these options (e.g. tune's best.json)")
    p.add_argument("--quiet", action="store_true", default=False, help="print nothing")
    shown = {"epochs": TUNE_EPOCHS} if tune else {}
    kinds: dict[str, Callable[[str], Any]] = {"int": int, "float": float, "tuple[int, ...]": _ints,
                                              "tuple[str, ...]": _names, "tuple[str, ...] | None": _names}
    for f in fields(TrainOptions):
        text = f"{f.metadata['help']} ({TrainOptions.default_text(f.name, shown.get(f.name))})"
        if tune and f.name == "epochs":
            text = f"{f.metadata['help']}, per trial ({TUNE_EPOCHS}; train's default {f.default})"
        if tune and f.name == "hidden":
            text += "; the base trial, as are --lr --dropout --batch-size --look-back"
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true", help=text)
        elif "choices" in f.metadata:
            p.add_argument(flag, choices=f.metadata["choices"], help=text)
        else:
            p.add_argument(flag, type=kinds.get(str(f.type), str), help=text)
    p.add_argument("--stateful", dest="mode", action="store_const", const="stateful",
                   help="same as --mode stateful")
    p.add_argument("--windowed", dest="mode", action="store_const", const="windowed",
                   help="same as --mode windowed")


def _device_flags(p: argparse.ArgumentParser) -> None:
    """--device and --precision for commands that train without the rest of TrainOptions' flags."""
    for name in ("device", "precision"):
        f = TrainOptions.__dataclass_fields__[name]
        p.add_argument(f"--{name}", choices=f.metadata.get("choices"),
                       help=f"{f.metadata['help']} ({TrainOptions.default_text(name)})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faultwatch", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"faultwatch {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("simulate", help="simulated pump readings with injected faults → CSV or MQTT")
    p.add_argument("--devices", type=int, default=1)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--period", type=float, default=1.0, help="sample period in seconds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fault", action="append", default=[], metavar="KIND@DEVICE:START+DURATION",
                   help="e.g. valve_closure@pump-000:600+120 (repeatable)")
    p.add_argument("--out", help="CSV file to write")
    p.add_argument("--mqtt", type=_host_port, metavar="HOST:PORT", help="publish to this broker")
    p.add_argument("--rate", type=float, default=10.0, help="steps per second when publishing")
    p.add_argument("--topic", default="sensors/{device}")
    p.add_argument("--qos", type=int, choices=(0, 1), default=1)
    p.set_defaults(func=cmd_simulate)

    p = sub.add_parser("train", help="train the forecaster on a CSV (needs faultwatch[train])",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("data", help="CSV of readings")
    p.add_argument("--out", required=True, help="run directory")
    _train_option_flags(p)
    p.set_defaults(func=cmd_train, needs_torch=True)

    p = sub.add_parser("tune", help="search hyperparameters with Optuna (needs faultwatch[train])",
                       argument_default=argparse.SUPPRESS)
    p.add_argument("data", help="CSV of readings")
    p.add_argument("--out", required=True, help="folder for best.json, trials.csv, tune.json")
    p.add_argument("--trials", type=int, default=20)
    p.add_argument("--timeout", type=float, default=None, help="stop starting trials after this many s")
    p.add_argument("--hidden-range", type=_pair, default=(64, 512), help="first layer's units (64,512)")
    p.add_argument("--lr-range", type=_pair, default=(1e-4, 1e-2), help="log scale (1e-4,1e-2)")
    p.add_argument("--dropout-range", type=_pair, default=(0.2, 0.5), help="(0.2,0.5)")
    p.add_argument("--batch-range", type=_pair, default=(32, 256), help="powers of two within (32,256)")
    p.add_argument("--look-back-range", type=_pair, default=(20, 120), help="(20,120)")
    _train_option_flags(p, tune=True)
    p.set_defaults(func=cmd_tune, needs_torch=True)

    p = sub.add_parser("export", help="checkpoint → one ONNX file (needs faultwatch[train])")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--quantize", default="int8", metavar="MODE",
                   help="none, int8 (dynamic), int8-static (QDQ, calibrated on training readings) or fp16")
    # Detector settings written into the model; each defaults to DetectorSettings' own default.
    p.add_argument("--quantile", type=float, help="threshold quantile of normal scores")
    p.add_argument("--factor", type=float, help="static threshold = factor × quantile")
    p.add_argument("--span", type=int, help="EWMA span of the score")
    p.add_argument("--warmup", type=int, help="readings after a reset with no faults")
    p.add_argument("--threshold", choices=POLICIES, help="threshold policy (likelihood)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other detector setting, e.g. clear_m=20 or likelihood.tail=1e-10 (repeatable)")
    p.set_defaults(func=cmd_export, needs_torch=True)

    p = sub.add_parser("inspect", help="print a model's contract")
    p.add_argument("model")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("replay", help="run a CSV through the runtime engine, as the daemon would")
    p.add_argument("model")
    p.add_argument("data")
    p.add_argument("--out", required=True, help="scores CSV")
    p.set_defaults(func=cmd_replay)

    p = sub.add_parser("run", help="the edge daemon: MQTT readings in, forecasts and faults out")
    p.add_argument("--model")
    p.add_argument("--broker", type=_host_port, metavar="HOST:PORT")
    p.add_argument("--state-dir")
    p.add_argument("--config", help="TOML config file")
    p.add_argument("--check-config", nargs="?", const=True, default=False, metavar="FILE",
                   help="validate the config (FILE, or --config) and the model it names, then exit")
    p.add_argument("--example-config", action="store_true", help="print a documented config")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate, train, export, and detect a fault live over MQTT")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo, needs_torch=True)

    p = sub.add_parser("eval", help="benchmark the runtime on labelled data (SKAB, NAB, telemanom, "
                       "any CSV), with baselines (needs faultwatch[train])")
    bench = p.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    for name, help_text in (("skab", "SKAB: each labelled CSV under DIR, its first rows train"),
                            ("nab", "NAB series: each trains on its probationary period"),
                            ("telemanom", "telemanom layout (train/ test/ labeled_anomalies.csv): "
                             "one model per channel"),
                            ("csv", "any CSVs with an 'anomaly' column: the first rows train")):
        q = bench.add_parser(name, help=help_text)
        if name in ("skab", "telemanom"):
            q.add_argument("dir", help="folder of SKAB CSVs (searched recursively)" if name == "skab"
                           else "folder with train/CHAN.npy, test/CHAN.npy, labeled_anomalies.csv")
        if name == "skab":
            q.add_argument("--pretrain", action="store_true",
                           help="also: pretrain on anomaly-free.csv, fine-tune per file (both reported)")
        if name in ("skab", "csv"):
            q.add_argument("--train-rows", type=int, help="rows of each file that train (skab: 400)")
        if name == "csv":
            q.add_argument("csv", nargs="+", help="CSV files (timestamp column optional)")
            q.add_argument("--train-fraction", type=float, help="or this fraction of each file's rows")
        if name == "nab":
            q.add_argument("csv", nargs="+", help="NAB series (timestamp,value)")
            q.add_argument("--windows", required=True, help="NAB's windows JSON (combined_windows.json)")
        q.add_argument("--out", required=True, help="folder for metrics.json, reports, models, rows")
        q.add_argument("--quantize", choices=("none", "int8", "int8-static", "fp16"),
                       help="exported model precision (int8)")
        q.add_argument("--jobs", type=int, default=0, help="worker processes (0 = one per core)")
        q.add_argument("--epochs", type=int, help="training epochs per file, at most (80)")
        _device_flags(q)
        # Detector settings written into every model; each defaults to DetectorSettings' default.
        q.add_argument("--span", type=int, help="EWMA span of the score")
        q.add_argument("--quantile", type=float, help="threshold quantile of training scores")
        q.add_argument("--factor", type=float, help="static threshold = factor × quantile")
        q.add_argument("--threshold", choices=POLICIES, help="threshold policy (likelihood)")
        q.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="any other detector setting for every model, e.g. clear_m=20 or "
                            "likelihood.tail=1e-10 (repeatable)")
        q.add_argument("--models", metavar="DIR",
                       help="score the models an earlier eval wrote to DIR/models instead of "
                            "training: same forecasts, this run's detector")
        q.add_argument("--no-baselines", action="store_true", help="skip the z-score and HST baselines")
        q.add_argument("--no-reports", action="store_true", help="skip the HTML pages")
    p.set_defaults(func=cmd_eval, needs_torch=True)

    p = sub.add_parser("bench", help="side-by-side performance numbers and targets (needs faultwatch[train])")
    p.add_argument("--quick", action="store_true", help="smaller counts, under a minute (CI smoke)")
    p.add_argument("--json", metavar="FILE", help="also write every number to this JSON file")
    p.add_argument("--run-dir", help="bench this training run instead of training one")
    p.add_argument("--hidden", type=_ints, default=TrainOptions.hidden,
                   help=f"LSTM sizes of the trained model ({TrainOptions.default_text('hidden')})")
    p.add_argument("--dense", type=int, default=TrainOptions.dense, help=f"({TrainOptions.dense})")
    p.add_argument("--workdir", help="keep models, logs and broker files here (default: temporary)")
    p.add_argument("--no-daemon", action="store_true", help="skip the end-to-end daemon part")
    p.add_argument("--profile", action="store_true", help="py-spy the daemon during a throughput drain")
    p.set_defaults(func=cmd_bench, needs_torch=True)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', not 'faultwatch is broken'."""
    from faultwatch.runtime.engine.contract import ContractError
    from faultwatch.runtime.engine.model import ModelError
    from faultwatch.runtime.offline.csvdata import CsvError

    errors: list[type[BaseException]] = [UserError, OSError, ContractError, CsvError, ModelError]
    for module, name in (("faultwatch.runtime.daemon.config", "ConfigError"),
                         ("faultwatch.train.checkpoint", "CheckpointError"),
                         ("faultwatch.train.device", "DeviceError"),
                         ("faultwatch.export.onnx_graph", "ExportError"),
                         ("faultwatch.bench.evaluate", "EvalError")):
        mod = sys.modules.get(module)  # only what the handler already imported: never pull in torch
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "needs_torch", False):
        # Only the train/export side gets here, and it imports torch next anyway: importing it
        # now turns a missing (or broken) install into the one-line hint. The runtime's own
        # commands never reach this line.
        try:
            importlib.import_module("torch")
        except ImportError:
            print(f"faultwatch {args.command}: {TRAIN_HINT}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, user_errors()):
            for line in str(exc).splitlines() or [type(exc).__name__]:  # a config: a line per problem
                print(f"faultwatch {args.command}: {line}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
