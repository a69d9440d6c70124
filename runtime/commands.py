"""What each ``faultwatch`` subcommand does, given its parsed arguments (the parser is
:mod:`faultwatch.runtime.cli`). Handlers that need torch import it lazily, inside the handler:
this module is imported by every command, the edge daemon's included.

A problem the user can fix raises :class:`UserError`: one line on stderr, exit 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

# Torch-free: the training options' flags, help and defaults are built from its fields.
from faultwatch.train.options import TrainOptions

if TYPE_CHECKING:
    from faultwatch.runtime.engine.detector import DetectorSettings

#: ``faultwatch tune`` trains each trial for at most this many epochs unless told otherwise.
TUNE_EPOCHS = 30


class UserError(Exception):
    """Raised by handlers for a problem the user can fix; printed as one line, exit 2."""


def int_pair(pair: tuple[float, float]) -> tuple[int, int]:
    return int(pair[0]), int(pair[1])


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


def train_options(args, defaults: dict | None = None):
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

    train_with_options(Path(args.data), Path(args.out), train_options(args), quiet=args.quiet)
    return 0


def cmd_tune(args) -> int:
    from faultwatch.train.options import OptionsError
    from faultwatch.train.tune import SearchSpace, tune

    try:
        space = SearchSpace(
            hidden=int_pair(args.hidden_range), lr=args.lr_range, dropout=args.dropout_range,
            batch_size=int_pair(args.batch_range), look_back=int_pair(args.look_back_range))
        tune(Path(args.data), Path(args.out), trials=args.trials, timeout=args.timeout, space=space,
             base=train_options(args, defaults={"epochs": TUNE_EPOCHS}), quiet=args.quiet)
    except OptionsError as exc:
        raise UserError(str(exc)) from None
    return 0


def assignments(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` options → a nested dict (``likelihood.tail=1e-10`` → ``{"likelihood":
    {"tail": 1e-10}}``); a value is read as TOML (``20``, ``1e-10``, ``true``) or else kept as text.

    >>> assignments(["clear_m=20", "likelihood.tail=1e-10", "policy=static", "spike=false"])
    {'clear_m': 20, 'likelihood': {'tail': 1e-10}, 'policy': 'static', 'spike': False}
    """
    import tomllib

    out: dict = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        path = key.strip().split(".")
        if not sep or not all(path) or len(path) > 2:
            raise UserError(f"--set {pair!r}: expected KEY=VALUE or TABLE.KEY=VALUE")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            value = text.strip()
        table = out.setdefault(path[0], {}) if len(path) == 2 else out
        if not isinstance(table, dict):
            raise UserError(f"--set {pair!r}: {path[0]} is not a table")
        table[path[-1]] = value
    return out


def detector_settings(given: dict, pairs: list[str]) -> DetectorSettings:
    """The detector of an ``export`` or ``eval``: its flags (``None``: not given) over the
    defaults, then its ``--set`` assignments; a bad one is a :class:`UserError`."""
    from faultwatch.runtime.engine.detector import DetectorSettings, DetectorSettingsError

    try:
        detector = DetectorSettings(**{k: v for k, v in given.items() if v is not None})
        return detector.with_overrides(assignments(pairs))
    except DetectorSettingsError as exc:
        raise UserError(str(exc)) from None


def cmd_export(args) -> int:
    from faultwatch.export.build import ExportOptions, export_model

    detector = detector_settings({"quantile": args.quantile, "factor": args.factor, "score_span": args.span,
                                  "warmup": args.warmup, "policy": args.threshold}, args.set)
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

    spec = {k: v for k, v in (("quantize", args.quantize), ("epochs", args.epochs),
                              ("device", args.device), ("precision", args.precision)) if v is not None}
    if args.device is not None or args.precision is not None:
        from faultwatch.train.device import resolve_device

        # Refused here, in one line, rather than once per file in the worker processes.
        resolve_device(args.device or TrainOptions.device, args.precision or TrainOptions.precision)
    detector = detector_settings({"score_span": args.span, "quantile": args.quantile,
                                  "factor": args.factor, "policy": args.threshold}, args.set)
    if args.models is not None:
        if not (Path(args.models) / "models").is_dir():
            raise UserError(f"--models {args.models}: no models/ folder there (the --out of an earlier eval)")
        if spec:
            raise UserError(f"--models reuses trained models: --{next(iter(spec))} does not apply")
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
                          reports=not args.no_reports, models=args.models, **split)
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


def cmd_bench(args) -> int:
    from faultwatch.bench import speed as bench

    options = bench.BenchOptions(quick=args.quick, run_dir=Path(args.run_dir) if args.run_dir else None,
                                 hidden=args.hidden, dense=args.dense, daemon=not args.no_daemon,
                                 workdir=Path(args.workdir) if args.workdir else None, profile=args.profile)
    return bench.main(options, Path(args.json) if args.json else None)
