"""``faultwatch inspect``: a model file's contract, as a person or a script wants to read it."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from .model import StepModel


def _shape(arg) -> list:
    return [d if isinstance(d, int) else str(d) for d in arg.shape]


def describe(path: Path) -> dict:
    model = StepModel(path)
    c = model.contract
    return {
        "file": str(path),
        "sha256": model.sha256,
        "size_bytes": model.size_bytes,
        "contract_version": c.version,
        "cell": c.cell,
        "layers": len(c.hidden),
        "hidden": list(c.hidden),
        "quantization": c.quantization,
        "opset": c.provenance.get("opset"),
        "inputs": {i.name: {"shape": _shape(i), "type": i.type} for i in model.session.get_inputs()},
        "outputs": {o.name: {"shape": _shape(o), "type": o.type} for o in model.session.get_outputs()},
        "features": list(c.features),
        "targets": list(c.targets),
        "scaler": asdict(c.scaler),
        "sample_period_s": c.sample_period_s,
        "calibration": asdict(c.calibration),
        "provenance": c.provenance,
    }


def render(info: dict) -> str:
    cal = info["calibration"]
    lines = [
        f"{info['file']}  ({info['size_bytes']:,} bytes, sha256 {info['sha256'][:16]}…)",
        f"contract v{info['contract_version']}: {info['cell']} {info['hidden']}, "
        f"quantization {info['quantization']}, opset {info['opset']}",
        "inputs:",
        *[f"  {n:<10} {v['type']:<16} {v['shape']}" for n, v in info["inputs"].items()],
        "outputs:",
        *[f"  {n:<10} {v['type']:<16} {v['shape']}" for n, v in info["outputs"].items()],
        f"features ({len(info['features'])}): {', '.join(info['features'])}",
        f"targets  ({len(info['targets'])}): {', '.join(info['targets'])}",
        f"scaler: {info['scaler']['kind']}; sample period {info['sample_period_s']:g} s",
        f"threshold: {cal['threshold']:.4g} on the EWMA(span {cal['score_span']}) score "
        f"(q{cal['quantile']} × {cal['factor']} of {cal['n_scores']} held-out scores); "
        f"warm-up {cal['warmup']} readings",
        "provenance: " + ", ".join(f"{k}={v}" for k, v in info["provenance"].items()),
    ]
    return "\n".join(lines)
