"""Train and export the tiny models committed beside this script, for tests that must not need torch.

    .venv/bin/python tests/data/make_tiny_models.py      # needs the train extra (torch)

writes ``tests/data/tiny-int8.onnx`` and ``tests/data/tiny-fp32.onnx``: a stacked LSTM
(hidden (8, 4), dense 4) really trained by ``faultwatch.train`` on simulated pumps
(2 devices × 1,500 readings, seed 0, no faults) and exported by ``faultwatch.export``
(calibrated and parity-checked), once as int8 and once as fp32. Each file is a few KB.
The ``tiny_model`` fixture (tests/model_fixtures.py) loads them with onnxruntime only,
so ``make unit`` runs real engine tests on an edge-only install.

Rerun it when the contract or the export format changes (the engine tests then say so:
the committed files no longer load), and commit the two files.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
HIDDEN = (8, 4)
DENSE = 4
DEVICES, STEPS, SEED = 2, 1500, 0
EPOCHS = 20


def main() -> int:
    import torch
    from faultwatch.export.build import ExportOptions, export_model
    from faultwatch.runtime.devtools.simulator import simulate, write_csv
    from faultwatch.train.command import train_run
    from faultwatch.train.fit import TrainConfig

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="faultwatch-tiny-") as tmp:
        root = Path(tmp)
        csv = root / "train.csv"
        write_csv(simulate(devices=DEVICES, steps=STEPS, seed=SEED), csv)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
            warnings.simplefilter("ignore", category=DeprecationWarning)
            # Same loop settings as the session fixture in model_fixtures.py: past the untrained
            # head's bias within seconds.
            train_run(csv, root / "run", hidden=HIDDEN, dense=DENSE, val_fraction=0.2,
                      train_config=TrainConfig(epochs=EPOCHS, lr=1e-2, look_back=30, batch_size=16,
                                               seed=SEED),
                      quiet=True)
            for quantize, name in (("int8", "tiny-int8.onnx"), ("none", "tiny-fp32.onnx")):
                # Exported in the temporary folder (export writes a report beside the model).
                report = export_model(root / "run", root / name, ExportOptions(quantize=quantize))
                shutil.copyfile(root / name, HERE / name)
                size = (HERE / name).stat().st_size
                print(f"{name}: {size} bytes, threshold {report['calibration']['threshold']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
