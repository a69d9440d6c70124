"""Export and the runtime refuse what they cannot trust: damaged or foreign checkpoints, pickled
objects, newer versions, model files whose contract does not match their graph or is damaged.

Each refusal is one clear error (CheckpointError, ExportError, ModelError), never a traceback
from deep inside torch or onnxruntime.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from faultwatch.export.build import ExportOptions, export_model
from faultwatch.export.onnx_graph import ExportError
from faultwatch.runtime.engine.contract import CONTRACT_VERSION
from faultwatch.runtime.engine.model import ModelError, StepModel
from faultwatch.train.checkpoint import CheckpointError, load_checkpoint
from model_fixtures import HIDDEN, TrainedModels, with_edited_contract

pytestmark = [pytest.mark.torch, pytest.mark.usefixtures("torch_one_thread")]

# -- refusals ------------------------------------------------------------------------------


def test_export_refuses_an_unknown_quantization(trained: TrainedModels, tmp_path: Path):
    out = tmp_path / "model.onnx"
    with pytest.raises(ExportError, match="int4"):
        export_model(trained.run_dir, out, ExportOptions(quantize="int4"))
    assert not out.exists()


def _run_copy(trained: TrainedModels, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained.run_dir, run)
    return run


@pytest.mark.parametrize("damage", ["truncated", "garbage", "text", "empty"])
def test_corrupt_checkpoint_gives_checkpoint_error(trained: TrainedModels, tmp_path: Path, damage: str):
    run = _run_copy(trained, tmp_path)
    path = run / "checkpoint.pt"
    data = path.read_bytes()
    path.write_bytes({
        "truncated": data[: len(data) // 2],
        "garbage": bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)),
        "text": b"this is not a checkpoint\n",
        "empty": b"",
    }[damage])
    with pytest.raises(CheckpointError):
        load_checkpoint(run)
    out = tmp_path / "model.onnx"
    with pytest.raises(CheckpointError):  # the path `faultwatch export` takes
        export_model(run, out, ExportOptions(quantize="none"))
    assert not out.exists()


def test_foreign_and_missing_checkpoints_give_checkpoint_error(tmp_path: Path):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"state_dict": {"w": torch.zeros(3)}, "epoch": 3}, foreign / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a faultwatch checkpoint"):
        load_checkpoint(foreign)
    torch.save([1, 2, 3], foreign / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a faultwatch checkpoint"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nowhere")


def test_newer_checkpoint_version_is_refused(trained: TrainedModels, tmp_path: Path):
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    payload["version"] += 1
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="upgrade"):
        load_checkpoint(path)


class _TouchOnUnpickle:
    """Unpickling this calls ``Path.touch(marker)``: proof that code ran during a load."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_checkpoint_with_a_pickled_object_is_rejected_without_running_it(trained: TrainedModels,
                                                                          tmp_path: Path):
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)
    marker = tmp_path / "code-ran"
    payload["provenance"]["note"] = _TouchOnUnpickle(marker)
    path = tmp_path / "checkpoint.pt"
    torch.save(payload, path)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        load_checkpoint(path)
    assert not marker.exists(), "load_checkpoint executed pickled code"
    # Control: the file really carries executable pickle (a full unpickle runs it).
    torch.load(path, map_location="cpu", weights_only=False)
    assert marker.exists()


def test_saved_checkpoint_is_plain_data(trained: TrainedModels):
    """Loads with weights_only=True and holds no module object: only tensors, numbers, text, containers."""
    payload = torch.load(trained.checkpoint, map_location="cpu", weights_only=True)

    def walk(value) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                assert isinstance(k, str | int), type(k)
                walk(v)
        elif isinstance(value, list | tuple):
            for v in value:
                walk(v)
        else:
            assert isinstance(value, torch.Tensor | int | float | str | bool | type(None)), type(value)

    walk(payload)
    assert payload["format"] == "faultwatch-checkpoint"
    # Rebuilt from its args alone, the model has the trained sizes.
    model, _, _ = load_checkpoint(trained.run_dir)
    assert model.config.hidden == HIDDEN and not model.training


# -- the runtime refuses models it cannot read ---------------------------------------------


def test_newer_contract_version_is_refused_by_step_model(trained: TrainedModels, tmp_path: Path):
    def bump(raw):
        raw["version"] = CONTRACT_VERSION + 1

    path = with_edited_contract(trained.int8, tmp_path / "future.onnx", bump)
    with pytest.raises(ModelError) as info:
        StepModel(path)
    message = str(info.value)
    assert "\n" not in message
    assert f"contract version {CONTRACT_VERSION + 1}" in message and "upgrade" in message
    assert str(path) in message


@pytest.mark.parametrize(
    ("edit", "named"),
    [
        (lambda raw: raw.update(hidden=[*raw["hidden"], 4]), "h_in_2"),  # a layer the graph lacks
        (lambda raw: raw.update(features=raw["features"][:-1], targets=raw["targets"][:-1],
                                scaler=raw["scaler"] | {"offset": raw["scaler"]["offset"][:-1],
                                                        "scale": raw["scaler"]["scale"][:-1]},
                                calibration=raw["calibration"]
                                | {"residual_std": raw["calibration"]["residual_std"][:-1]},
                                detector_calibration=raw["detector_calibration"] | {
                                    "spike_residual_std":
                                        raw["detector_calibration"]["spike_residual_std"][:-1]}),
         "features"),
        (lambda raw: raw.pop("scaler"), "scaler"),
        (lambda raw: raw.update(cell="transformer"), "transformer"),
        # Crafted or damaged metadata that used to load (or crash with a traceback): each is
        # refused at load, which is start, --check-config and reload alike.
        (lambda raw: raw.update(hidden=[h * 2 for h in raw["hidden"]]), "wide"),
        (lambda raw: raw.update(hidden=["x"]), "malformed field"),
        (lambda raw: raw.update(sample_period_s="fast"), "malformed field"),
        (lambda raw: raw.update(sample_period_s=0), "sample_period_s must be finite and > 0"),
        (lambda raw: raw.update(sample_period_s="NaN"), "sample_period_s must be finite and > 0"),
        (lambda raw: raw["scaler"].update(scale=[0.0] * len(raw["scaler"]["scale"])),
         "scaler.scale must be finite and > 0"),
        (lambda raw: raw["scaler"].update(offset=[float("nan")] * len(raw["scaler"]["offset"])),
         "scaler.offset must be finite"),
        (lambda raw: raw["scaler"].update(offset=["1"] * len(raw["scaler"]["offset"])),
         "scaler.offset must hold numbers"),
        (lambda raw: raw["calibration"].update(residual_std=[float("inf")] * len(raw["targets"])),
         "calibration.residual_std must be finite and > 0"),
        (lambda raw: raw["calibration"].update(threshold=float("nan")), "calibration.threshold"),
        (lambda raw: raw["calibration"].update(threshold=-1.0), "calibration.threshold"),
        (lambda raw: raw["calibration"].update(score_span=0), "calibration.score_span"),
        (lambda raw: raw["calibration"].update(warmup=1.5), "calibration.warmup"),
        (lambda raw: raw["calibration"].update(extra=1), "malformed field"),
        (lambda raw: raw.update(features=[*raw["features"][:-1], raw["features"][0]]), "unique"),
        (lambda raw: raw.update(targets=[raw["targets"][0]] * 2), "repeated"),
    ],
    ids=["extra-layer", "fewer-features", "no-scaler", "unknown-cell", "hidden-doubled", "hidden-text",
         "period-text", "period-zero", "period-nan", "scale-zero", "offset-nan", "offset-text",
         "residual-inf", "threshold-nan", "threshold-negative", "span-zero", "warmup-fraction",
         "calibration-extra-key", "feature-twice", "target-twice"],
)
def test_contract_mismatch_is_a_model_error_naming_it(trained: TrainedModels, tmp_path: Path, edit,
                                                      named: str):
    path = with_edited_contract(trained.fp32, tmp_path / "edited.onnx", edit)
    with pytest.raises(ModelError, match=named) as info:
        StepModel(path)
    assert "\n" not in str(info.value)


def test_a_damaged_model_file_loads_intact_or_is_refused_in_one_line(trained: TrainedModels, tmp_path: Path,
                                                                     capfd):
    """Truncated at every 10 %, a byte flipped at every 10 %, empty, a folder: never a traceback."""
    good = trained.int8.read_bytes()
    variants = {f"truncated-{pct}%": good[:len(good) * pct // 100] for pct in range(0, 100, 10)}
    for pct in range(0, 100, 10):
        at = len(good) * pct // 100
        variants[f"flipped-{pct}%"] = good[:at] + bytes([good[at] ^ 0xFF]) + good[at + 1:]
    refused = 0
    for name, data in variants.items():
        path = tmp_path / f"{name}.onnx"
        path.write_bytes(data)
        try:
            StepModel(path)  # a flip inside a weight still makes a loadable model
        except ModelError as exc:
            assert "\n" not in str(exc) and str(path) in str(exc), (name, str(exc))
            refused += 1
    assert refused >= 10  # every truncation at least
    assert "EP Error" not in capfd.readouterr().out  # onnxruntime's retry, printed to stdout: off
    (tmp_path / "folder.onnx").mkdir()
    with pytest.raises(ModelError, match="cannot read model"):
        StepModel(tmp_path / "folder.onnx")


def test_replaced_contract_keeps_graph_parity(trained: TrainedModels, tmp_path: Path):
    """Editing nothing but re-serializing keeps the model loadable (the edit helper is sound)."""
    path = with_edited_contract(trained.fp32, tmp_path / "same.onnx", lambda raw: None)
    assert StepModel(path).contract == StepModel(trained.fp32).contract
