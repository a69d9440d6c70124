"""The ``faultwatch`` command. Subcommands that need torch import it lazily.

User errors print one line to stderr and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from faultwatch.runtime.engine.detector import POLICIES
from faultwatch.runtime.version import VERSION

# Torch-free: the training options' flags, help and defaults are built from its fields.
from faultwatch.train.options import TrainOptions

TRAIN_HINT = "this command needs torch: pip install 'faultwatch[train]'"
#: ``faultwatch tune`` trains each trial for at most this many epochs unless told otherwise.
TUNE_EPOCHS = 30


class UserError(Exception):
    """Raised by handlers for a problem the user can fix; printed as one line, exit 2."""


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


# -- handlers ----------------------------------------------------------------------------


def cmd_simulate(args) -> int:
    from faultwatch.runtime.devtools.simulator import parse_fault, simulate, write_csv

    try:
        faults = [parse_fault(spec) for spec in args.fault]
        data = simulate(devices=args.devices, steps=args.steps, period_s=args.period, seed=args.seed,
                        faults=faults)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    if args.mqtt:
        from faultwatch.runtime.devtools.sim_publish import publish

        host, port = args.mqtt
        sent = publish(data, host, port, rate=args.rate, topic=args.topic, qos=args.qos)
        print(f"published {sent} readings to {host}:{port}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_csv(data, args.out)
        print(f"wrote {args.out}: {args.steps} steps × {args.devices} device(s), "
              f"{int(data.anomaly.sum())} anomalous readings")
    return 0


def _train_options(args, defaults: dict | None = None):
    """TrainOptions from the recipe, then ``defaults``, then --config, then the flags given."""
    from faultwatch.train.options import OptionsError, load_config

    given = {k: v for k, v in vars(args).items() if k in TrainOptions.__dataclass_fields__}
    try:
        values = dict(defaults or {})
        if args.config:
            from_file = load_config(args.config)
            TrainOptions.from_mapping(from_file, source=args.config)  # errors name the file
            values |= from_file
        return TrainOptions.from_mapping(values | given)
    except OptionsError as exc:
        raise UserError(str(exc)) from None


def cmd_train(args) -> int:
    from faultwatch.train.command import train_with_options

    train_with_options(Path(args.data), Path(args.out), _train_options(args), quiet=args.quiet)
    return 0


def cmd_tune(args) -> int:
    from faultwatch.train.options import OptionsError
    from faultwatch.train.tune import SearchSpace, tune

    try:
        space = SearchSpace(
            hidden=_int_pair(args.hidden_range), lr=args.lr_range, dropout=args.dropout_range,
            batch_size=_int_pair(args.batch_range), look_back=_int_pair(args.look_back_range))
        tune(Path(args.data), Path(args.out), trials=args.trials, timeout=args.timeout, space=space,
             base=_train_options(args, defaults={"epochs": TUNE_EPOCHS}), quiet=args.quiet)
    except OptionsError as exc:
        raise UserError(str(exc)) from None
    return 0


def cmd_export(args) -> int:
    from faultwatch.export.build import ExportOptions, export_model
    from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError

    try:
        given = {"quantile": args.quantile, "factor": args.factor, "score_span": args.span,
                 "warmup": args.warmup, "policy": args.threshold}
        detector = DetectorSettings(**{k: v for k, v in given.items() if v is not None})
    except DetectorSettingsError as exc:
        raise UserError(str(exc)) from None
    options = ExportOptions(quantize=args.quantize, detector=detector)
    report = export_model(Path(args.run_dir), Path(args.out), options)
    p, lat = report["parity"], report["latency_us_per_step_batch1"]
    print(f"exported {report['model']} ({report['quantize']}, {report['size_bytes']:,} bytes = "
          f"{100 * report['size_ratio']:.0f}% of fp32's {report['fp32_size_bytes']:,}; "
          f"opset {report['opset']}, ONNX checker passed)")
    print(f"parity over {p['held_out_steps']} held-out steps: max |onnx streamed - torch| = "
          f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']:g}), forecast RMSE "
          f"{p['rmse_onnx']:.4g} vs torch {p['rmse_torch']:.4g} ({100 * p['rmse_rel_change']:+.2f}%)")
    print(f"per step at batch 1: {lat['model']:.1f} µs (fp32 {lat['fp32']:.1f} µs); runs with default "
          f"session options, full and no graph optimisation (forecasts within "
          f"{max(report['sessions'].values()):.1e} of each other)")
    print(f"threshold {report['calibration']['threshold']:.4g} "
          f"(q{report['calibration']['quantile']} × {report['calibration']['factor']}, "
          f"{detector.policy}); report → {Path(args.out).with_suffix('.report.json')}")
    return 0


def cmd_inspect(args) -> int:
    from faultwatch.runtime.offline.describe import describe, render

    info = describe(Path(args.model))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def cmd_replay(args) -> int:
    from faultwatch.runtime.offline.replay import replay_csv

    summary = replay_csv(Path(args.model), Path(args.data), Path(args.out))
    print(f"replayed {summary['readings']} readings of {summary['devices']} device(s) → {args.out}: "
          f"{summary['anomalous']} anomalous, {summary['faults_raised']} fault(s) raised")
    if "labels" in summary:
        m = summary["labels"]
        print(f"against the file's anomaly labels (fault active vs label, per reading): "
              f"F1 {m['f1']:.3f}, false alarms {100 * m['far']:.2f}%, missed {100 * m['mar']:.2f}% "
              f"(tp {m['tp']}, fp {m['fp']}, fn {m['fn']}, tn {m['tn']})")
    return 0


def cmd_run(args) -> int:
    # onnxruntime otherwise keeps a telemetry event queue under ~/.cache, which is the state dir
    # under the systemd unit and the image. Set before anything imports onnxruntime.
    os.environ["ORT_DISABLE_TELEMETRY"] = "1"
    from faultwatch.runtime.daemon.config import example_config, load_config

    if args.example_config:
        print(example_config(), end="")
        return 0
    if isinstance(args.check_config, str):  # --check-config FILE
        if args.config and args.config != args.check_config:
            raise UserError("give the config file once: --check-config FILE, or --config FILE --check-config")
        args.config = args.check_config
    config = load_config(args.config, args)
    if args.check_config:
        from faultwatch.runtime.engine.model import StepModel

        model = StepModel(config.model, threads=config.engine.threads)  # loads and warms up, or says why not
        print(f"{args.config or 'defaults'}: ok; model {config.model} ({len(model.contract.features)} "
              f"features, sha256 {model.sha256[:12]}…), reading {', '.join(config.topics)} from "
              f"{config.broker.host}:{config.broker.port}")
        return 0
    from faultwatch.runtime.daemon.daemon import run_daemon

    return run_daemon(config)


def cmd_demo(args) -> int:
    from faultwatch.bench.demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, seed=args.seed)


def cmd_eval(args) -> int:
    from faultwatch.bench.eval_file import EvalOptions
    from faultwatch.bench.evaluate import run_csv, run_nab, run_skab, run_telemanom
    from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError

    spec = {k: v for k, v in (("quantize", args.quantize), ("epochs", args.epochs),
                              ("device", args.device), ("precision", args.precision)) if v is not None}
    if args.device is not None or args.precision is not None:
        from faultwatch.train.device import resolve_device

        # Refused here, in one line, rather than once per file in the worker processes.
        resolve_device(args.device or TrainOptions.device, args.precision or TrainOptions.precision)
    given = {"score_span": args.span, "quantile": args.quantile, "factor": args.factor,
             "policy": args.threshold}
    try:
        detector = DetectorSettings(**{k: v for k, v in given.items() if v is not None})
    except DetectorSettingsError as exc:
        raise UserError(str(exc)) from None
    split = {}
    if args.benchmark in ("skab", "csv") and args.train_rows is not None:
        split["train_rows"] = args.train_rows
    if args.benchmark == "csv":
        if (args.train_rows is None) == (args.train_fraction is None):
            raise UserError("give one of --train-rows N or --train-fraction F")
        if args.train_fraction is not None:
            if not 0 < args.train_fraction < 1:
                raise UserError(f"--train-fraction must be in (0, 1), got {args.train_fraction}")
            split["train_fraction"] = args.train_fraction
    options = EvalOptions(spec=spec, detector=detector, baselines=not args.no_baselines,
                          reports=not args.no_reports, **split)
    out = Path(args.out)
    if args.benchmark == "skab":
        run_skab(Path(args.dir), out, options, pretrain=args.pretrain, jobs=args.jobs)
    elif args.benchmark == "nab":
        run_nab([Path(c) for c in args.csv], Path(args.windows), out, options, jobs=args.jobs)
    elif args.benchmark == "telemanom":
        run_telemanom(Path(args.dir), out, options, jobs=args.jobs)
    else:
        run_csv([Path(c) for c in args.csv], out, options, jobs=args.jobs)
    return 0


# -- parser ------------------------------------------------------------------------------


def _pair(text: str) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected LOW,HIGH, got {text!r}") from None
    return low, high


def _int_pair(pair: tuple[float, float]) -> tuple[int, int]:
    return int(pair[0]), int(pair[1])


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


def cmd_bench(args) -> int:
    from faultwatch.bench import speed as bench

    options = bench.BenchOptions(quick=args.quick, run_dir=Path(args.run_dir) if args.run_dir else None,
                                 hidden=args.hidden, dense=args.dense, daemon=not args.no_daemon,
                                 workdir=Path(args.workdir) if args.workdir else None, profile=args.profile)
    return bench.main(options, Path(args.json) if args.json else None)


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
