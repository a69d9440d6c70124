"""Where training runs: ``--device auto|cpu|cuda[:N]`` and ``--precision fp32|bf16``.

``auto`` picks the first CUDA device when torch sees one, else the CPU. Asking
for CUDA where there is none, a CUDA index past the last device, or bf16 off
CUDA is a :class:`DeviceError` (a user error: one line, exit 2).

bf16 is autocast (``torch.autocast("cuda", torch.bfloat16)``): weights and the
optimiser stay fp32, matrix products run in bf16. One caveat of torch's
autocast: it runs cuDNN's fused LSTM/GRU in fp16, whatever the autocast dtype
(aten/src/ATen/cudnn/AutocastRNN.cpp casts to ``kHalf``), so with
``--precision bf16`` the fused recurrent layers compute in fp16 and the dense
head in bf16. The Python-loop cells (peephole, zoneout, recurrent dropout) run
their matrix products in bf16.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from faultwatch.train.options import DEVICE_PATTERN, PRECISIONS


class DeviceError(ValueError):
    """The requested device or precision is not available here."""


def resolve_device(spec: str = "auto", precision: str = "fp32") -> torch.device:
    """``auto``/``cpu``/``cuda``/``cuda:N`` → the torch device to train on; refuses what this
    machine cannot do, with a message that says what to ask for instead."""
    if not DEVICE_PATTERN.fullmatch(spec):
        raise DeviceError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if precision not in PRECISIONS:
        raise DeviceError(f"--precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if spec == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: torch sees no CUDA device here "
                              f"(torch {torch.__version__}); use --device cpu or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise DeviceError(f"--device {spec}: this machine has {count} CUDA device(s), "
                              f"cuda:0 to cuda:{count - 1}")
    if precision == "bf16" and device.type != "cuda":
        raise DeviceError(f"--precision bf16 needs a CUDA device (training on {device.type}); "
                          "use --precision fp32")
    return device


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """The context forward passes and losses run in: bf16 autocast on CUDA, else nothing."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def model_device(model: torch.nn.Module) -> torch.device:
    """The device a model's parameters live on (all of them, as training keeps them)."""
    return next(model.parameters()).device


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
