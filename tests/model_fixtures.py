"""Session fixtures: tiny models really trained, exported and quantized once per test session.

Nothing here is mocked: the simulator writes a CSV, ``faultwatch.train`` trains a
small stacked LSTM on it with torch, and ``faultwatch.export`` exports it twice,
as fp32 (``--quantize none``) and as int8 (onnxruntime dynamic quantization), each
calibrated and parity-checked by export itself.

``trained``         :class:`TrainedModels`: every path and report below in one object
``train_data``      the simulated :class:`~faultwatch.runtime.devtools.simulator.SimData` (clean, no faults)
``train_csv``       its CSV
``run_dir``         the training run (``checkpoint.pt``, ``report.json``)
``fp32_model``      ``model-fp32.onnx`` (quantization ``none``)
``int8_model``      ``model-int8.onnx``
``export_reports``  ``{"none": report, "int8": report}`` as returned by ``export_model``

``tiny_model``      a :class:`~faultwatch.runtime.engine.model.StepModel` of the committed
                    tests/data/tiny-int8.onnx (hidden (8, 4), made by tests/data/make_tiny_models.py):
                    a really trained model that needs no torch, for ``make unit``
``tiny_fp32_model`` the same model exported as fp32 (tests/data/tiny-fp32.onnx)

The model is small on purpose (hidden (16, 8), dense 8) and trained for a few
epochs with a larger learning rate and shorter chunks than the defaults, so
that it gets past the untrained head's bias in about a second on two shared
cores. Training runs once per session; tests must not modify these files
(copy them into ``tmp_path`` first).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest
from faultwatch.runtime.devtools.simulator import SimData, simulate, write_csv

TRAIN_DEVICES = 2
TRAIN_STEPS = 1500
TRAIN_SEED = 0
HIDDEN = (16, 8)
DENSE = 8
EPOCHS = 20
VAL_FRACTION = 0.2  # the last 20 % of each device validates (and calibrates at export)


@dataclass(frozen=True)
class TrainedModels:
    data: SimData
    csv: Path
    run_dir: Path
    train_report: dict
    fp32: Path
    int8: Path
    fp32_report: dict
    int8_report: dict

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / "checkpoint.pt"

    def model(self, quantize: str) -> Path:
        return {"none": self.fp32, "int8": self.int8}[quantize]

    def report(self, quantize: str) -> dict:
        return {"none": self.fp32_report, "int8": self.int8_report}[quantize]


TINY_MODELS = Path(__file__).parent / "data"


@pytest.fixture(scope="session")
def tiny_model():
    """The committed tiny int8 model, loaded with onnxruntime only (no torch, no training)."""
    from faultwatch.runtime.engine.model import StepModel

    return StepModel(TINY_MODELS / "tiny-int8.onnx")


@pytest.fixture(scope="session")
def tiny_fp32_model():
    from faultwatch.runtime.engine.model import StepModel

    return StepModel(TINY_MODELS / "tiny-fp32.onnx")


@pytest.fixture
def torch_one_thread():
    """Torch on one thread for the test: a model this small gains nothing from more, and on
    two shared, busy cores torch's spinning worker threads made training 5x slower."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> TrainedModels:
    # torch is imported here, not at module level: the runtime's tests must not need it
    # before a test asks for a trained model.
    import torch
    from faultwatch.export.build import ExportOptions, export_model
    from faultwatch.train.command import train_run
    from faultwatch.train.fit import TrainConfig

    root = tmp_path_factory.mktemp("trained-model")
    data = simulate(devices=TRAIN_DEVICES, steps=TRAIN_STEPS, seed=TRAIN_SEED)
    csv_path = root / "train.csv"
    write_csv(data, csv_path)
    run_dir = root / "run"
    fp32, int8 = root / "model-fp32.onnx", root / "model-int8.onnx"
    # One thread: a model this small gains nothing from more, and on two shared, busy cores
    # torch's spinning worker threads made training 5x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            # The TorchScript exporter warns about tracing nn.LSTM and its own deprecation:
            # known and harmless here, and repeated in every test that first asks for a model.
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            train_report = train_run(
                csv_path, run_dir, hidden=HIDDEN, dense=DENSE, val_fraction=VAL_FRACTION,
                train_config=TrainConfig(epochs=EPOCHS, lr=1e-2, look_back=30, batch_size=16, seed=0),
                quiet=True,
            )
            fp32_report = export_model(run_dir, fp32, ExportOptions(quantize="none"))
            int8_report = export_model(run_dir, int8, ExportOptions(quantize="int8"))
    finally:
        torch.set_num_threads(threads)
    return TrainedModels(data, csv_path, run_dir, train_report, fp32, int8, fp32_report, int8_report)


@pytest.fixture(scope="session")
def train_data(trained: TrainedModels) -> SimData:
    return trained.data


@pytest.fixture(scope="session")
def train_csv(trained: TrainedModels) -> Path:
    return trained.csv


@pytest.fixture(scope="session")
def run_dir(trained: TrainedModels) -> Path:
    return trained.run_dir


@pytest.fixture(scope="session")
def fp32_model(trained: TrainedModels) -> Path:
    return trained.fp32


@pytest.fixture(scope="session")
def int8_model(trained: TrainedModels) -> Path:
    return trained.int8


@pytest.fixture(scope="session")
def export_reports(trained: TrainedModels) -> dict[str, dict]:
    return {"none": trained.fp32_report, "int8": trained.int8_report}
