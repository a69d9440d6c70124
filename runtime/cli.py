"""The ``faultwatch`` command. Subcommands that need torch import it lazily.

User errors print one line to stderr and exit 2; they never show a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .version import VERSION

TRAIN_HINT = "this command needs torch: pip install 'faultwatch[train]'"


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
    from .simulator import parse_fault, simulate, write_csv

    try:
        faults = [parse_fault(spec) for spec in args.fault]
    except ValueError as exc:
        raise UserError(str(exc)) from None
    data = simulate(devices=args.devices, steps=args.steps, period_s=args.period, seed=args.seed,
                    faults=faults)
    if args.mqtt:
        from .sim_publish import publish

        host, port = args.mqtt
        sent = publish(data, host, port, rate=args.rate, topic=args.topic, qos=args.qos)
        print(f"published {sent} readings to {host}:{port}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        write_csv(data, args.out)
        print(f"wrote {args.out}: {args.steps} steps × {args.devices} device(s), "
              f"{int(data.anomaly.sum())} anomalous readings")
    return 0


def cmd_train(args) -> int:
    from faultwatch.train.command import train_run
    from faultwatch.train.fit import TrainConfig

    config = TrainConfig(mode=args.mode, look_back=args.look_back, batch_size=args.batch_size,
                         epochs=args.epochs, lr=args.lr, patience=args.patience, seed=args.seed)
    train_run(Path(args.data), Path(args.out), hidden=args.hidden, dense=args.dense,
              dropout=args.dropout, train_config=config, features=args.features,
              exclude=args.exclude or [], targets=args.target, val_fraction=args.val_fraction,
              scaler=args.scaler, quiet=args.quiet)
    return 0


def cmd_export(args) -> int:
    from faultwatch.export.build import ExportOptions, export_model

    options = ExportOptions(quantize=args.quantize, quantile=args.quantile, factor=args.factor,
                            score_span=args.span, warmup=args.warmup)
    report = export_model(Path(args.run_dir), Path(args.out), options)
    p = report["parity"]
    print(f"exported {report['model']} ({report['quantize']}, {report['size_bytes']:,} bytes; "
          f"fp32 graph {report['fp32_size_bytes']:,} bytes)")
    print(f"parity over {p['held_out_steps']} held-out steps: max |onnx streamed - torch| = "
          f"{p['max_abs_diff']:.2e} (tolerance {p['tolerance']:g}), forecast RMSE "
          f"{p['rmse_onnx']:.4g} vs torch {p['rmse_torch']:.4g} ({100 * p['rmse_rel_change']:+.2f}%)")
    print(f"threshold {report['calibration']['threshold']:.4g} "
          f"(q{report['calibration']['quantile']} × {report['calibration']['factor']})")
    return 0


def cmd_inspect(args) -> int:
    from .describe import describe, render

    info = describe(Path(args.model))
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def cmd_replay(args) -> int:
    from .replay import replay_csv

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
    from .config import example_config, load_config
    from .daemon import run_daemon

    if args.example_config:
        print(example_config(), end="")
        return 0
    config = load_config(args.config, args)
    if args.check_config:
        print(f"{args.config or 'defaults'}: ok")
        return 0
    return run_daemon(config)


def cmd_demo(args) -> int:
    from .demo import run_demo

    return run_demo(Path(args.workdir) if args.workdir else None, seed=args.seed)


# -- parser ------------------------------------------------------------------------------


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

    p = sub.add_parser("train", help="train the LSTM forecaster on a CSV (needs faultwatch[train])")
    p.add_argument("data", help="CSV of readings")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--hidden", type=_ints, default=(128, 64), help="LSTM sizes, e.g. 128,64")
    p.add_argument("--dense", type=int, default=32)
    p.add_argument("--dropout", type=float, default=0.3)
    p.add_argument("--mode", choices=("stateful", "windowed"), default="stateful")
    p.add_argument("--look-back", type=int, default=60)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--patience", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--features", type=_names, help="input columns (default: all numeric)")
    p.add_argument("--exclude", type=_names, help="columns never used as inputs")
    p.add_argument("--target", type=_names, help="forecast these channels (default: all features)")
    p.add_argument("--val-fraction", type=float, default=0.2)
    p.add_argument("--scaler", choices=("minmax", "standard"), default="minmax")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_train, needs_torch=True)

    p = sub.add_parser("export", help="checkpoint → one ONNX file (needs faultwatch[train])")
    p.add_argument("run_dir")
    p.add_argument("--out", required=True)
    p.add_argument("--quantize", default="int8", help="none or int8")
    p.add_argument("--quantile", type=float, default=0.995, help="threshold quantile of normal scores")
    p.add_argument("--factor", type=float, default=1.5, help="threshold = factor × quantile")
    p.add_argument("--span", type=int, default=5, help="EWMA span of the score")
    p.add_argument("--warmup", type=int, default=30, help="readings after a reset with no faults")
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
    p.add_argument("--check-config", action="store_true", help="validate the config and exit")
    p.add_argument("--example-config", action="store_true", help="print a documented config")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="simulate, train, export, and detect a fault live over MQTT")
    p.add_argument("--workdir", help="keep the demo's files here (default: a temporary folder)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo, needs_torch=True)
    return parser


def user_errors() -> tuple[type[BaseException], ...]:
    """Exception types that mean 'the input is wrong', not 'faultwatch is broken'."""
    from .contract import ContractError
    from .csvdata import CsvError
    from .model import ModelError

    errors: list[type[BaseException]] = [UserError, OSError, ContractError, CsvError, ModelError]
    for module, name in (("faultwatch.runtime.config", "ConfigError"),
                         ("faultwatch.train.checkpoint", "CheckpointError"),
                         ("faultwatch.export.onnx_graph", "ExportError")):
        mod = sys.modules.get(module)  # only what the handler already imported: never pull in torch
        if mod is not None:
            errors.append(getattr(mod, name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "needs_torch", False):
        try:
            import torch  # noqa: F401
        except ImportError:
            print(f"faultwatch {args.command}: {TRAIN_HINT}", file=sys.stderr)
            return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if isinstance(exc, user_errors()):
            print(f"faultwatch {args.command}: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
