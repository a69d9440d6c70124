"""``faultwatch inspect``: a model file's contract, as a person or a script wants to read it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from faultwatch.runtime.engine.detector import DetectorSettings
from faultwatch.runtime.engine.model import StepModel


def _shape(arg) -> list:
    return [d if isinstance(d, int) else str(d) for d in arg.shape]


def describe(path: Path) -> dict:
    model = StepModel(path)
    c = model.contract
    p = c.provenance
    return {
        "file": str(path),
        "sha256": model.sha256,
        "size_bytes": model.size_bytes,
        "contract_version": c.version,
        "cell": c.cell,
        "peephole": bool(c.architecture.get("peephole", False)),
        "layers": len(c.hidden),
        "hidden": list(c.hidden),
        "dense": c.architecture.get("dense"),
        "parameters": c.architecture.get("parameters"),
        "quantization": c.quantization,
        "opset": p.get("opset"),
        "inputs": {i.name: {"shape": _shape(i), "type": i.type} for i in model.session.get_inputs()},
        "outputs": {o.name: {"shape": _shape(o), "type": o.type} for o in model.session.get_outputs()},
        "features": list(c.features),
        "targets": list(c.targets),
        "scaler": asdict(c.scaler),
        "sample_period_s": c.sample_period_s,
        "calibration": asdict(c.calibration),
        # What run, replay and eval decide with; "stored": false for a file that predates it.
        "detector": c.decisions.to_dict() | {"stored": c.detector is not None},
        "training": {
            "data_path": p.get("data_path"),
            "data_sha256": p.get("data_sha256"),
            "mode": p.get("mode"),
            "epochs": p.get("epochs"),
            "best_epoch": p.get("best_epoch"),
            "val_loss": p.get("val_loss"),
            "val_loss_streamed": p.get("val_loss_streamed"),
            "val_loss_windowed": p.get("val_loss_windowed"),
            "seed": p.get("seed"),
            "faultwatch_version": p.get("faultwatch_version"),
            "trained_at": p.get("trained_at"),
        },
        "exported": {"faultwatch_version": p.get("exported_with"), "at": p.get("exported_at")},
        "provenance": p,
    }


def _detector(raw: dict) -> DetectorSettings:
    return DetectorSettings.from_dict({k: v for k, v in raw.items() if k != "stored"})


def _num(value, fmt: str = ".3e") -> str:
    return "?" if value is None else format(value, fmt)


def render(info: dict) -> str:
    cal, t = info["calibration"], info["training"]
    cell = ("peephole " if info["peephole"] else "") + info["cell"]
    params = info["parameters"] or []
    lines = [
        f"{info['file']}  ({info['size_bytes']:,} bytes)",
        f"sha256 {info['sha256']}",
        f"contract v{info['contract_version']}: {cell}, {info['layers']} layer(s) {info['hidden']}"
        + (f", dense {info['dense']}" if info["dense"] is not None else "")
        + f"; quantization {info['quantization']}, opset {info['opset']}",
        *[f"  {name:<28} {count:>9,d} parameters" for name, count in params],
        "inputs:",
        *[f"  {n:<10} {v['type']:<16} {v['shape']}" for n, v in info["inputs"].items()],
        "outputs:",
        *[f"  {n:<10} {v['type']:<16} {v['shape']}" for n, v in info["outputs"].items()],
        f"features ({len(info['features'])}): {', '.join(info['features'])}",
        f"targets  ({len(info['targets'])}): {', '.join(info['targets'])}",
        f"scaler: {info['scaler']['kind']}; sample period {info['sample_period_s']:g} s",
        f"calibrated threshold: {cal['threshold']:.4g} (q{cal['quantile']} × {cal['factor']} of "
        f"{cal['n_scores']} held-out scores)",
        "detector" + ("" if info["detector"]["stored"] else " (not stored in this file: the legacy "
                      "settings)") + ":",
        *[f"  {line}" for line in _detector(info["detector"]).describe()],
        f"trained on {t['data_path']} (sha256 {t['data_sha256']})",
        f"  {t['mode'] or '?'} training, {t['epochs']} epochs (best {t['best_epoch']}), val loss "
        f"{_num(t['val_loss'])} (streamed {_num(t['val_loss_streamed'])}, windowed "
        f"{_num(t['val_loss_windowed'])}), seed {t['seed']}",
        f"  faultwatch {t['faultwatch_version']} at {t['trained_at']}; exported with faultwatch "
        f"{info['exported']['faultwatch_version'] or '?'} at {info['exported']['at']}",
    ]
    return "\n".join(lines)
