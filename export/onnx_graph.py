"""torch → ONNX step graph, and onnxruntime quantization of it.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: it keeps
the LSTM weights as constant initializers of the ONNX ``LSTM`` op, which is
what ``quantize_dynamic`` needs to turn it into ``DynamicQuantizeLSTM``. With
the dynamo exporter (torch 2.13) the quantizer silently left a float LSTM.
"""

from __future__ import annotations

import io
import logging
import tempfile
import warnings
from pathlib import Path

import onnx
import torch
from faultwatch.runtime import contract as C
from faultwatch.train.model import Forecaster
from torch import nn

OPSET = 17


class ExportError(RuntimeError):
    """Export could not produce a model that meets the contract."""


class StepGraph(nn.Module):
    """Flattens the forecaster's state into separate graph inputs and outputs."""

    def __init__(self, model: Forecaster):
        super().__init__()
        self.model = model

    def forward(self, readings: torch.Tensor, *state: torch.Tensor):
        pairs = [(state[2 * i], state[2 * i + 1]) for i in range(len(state) // 2)]
        forecast, new_state = self.model(readings, pairs)
        return (forecast, *[t for pair in new_state for t in pair])


def to_onnx(model: Forecaster, contract: C.ModelContract) -> onnx.ModelProto:
    """Export the fp32 step graph with dynamic batch and time axes."""
    model.eval()
    example = (torch.zeros(1, 2, model.config.n_features), *[
        t for h, c in model.zero_state(1) for t in (h, c)
    ])
    inputs, outputs = contract.input_names(), contract.output_names()
    dynamic = {C.READINGS: {0: "batch", 1: "time"}, C.FORECAST: {0: "batch", 1: "time"}}
    dynamic |= {name: {1: "batch"} for name in inputs[1:] + outputs[1:]}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The exporter warns about LSTMs exported without initial states; ours has them as inputs.
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        torch.onnx.export(
            StepGraph(model).eval(), example, buffer, input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    onnx.checker.check_model(proto)
    return proto


def op_types(proto: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


def quantize_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantization; fails loudly if the LSTM was skipped."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        # quantize_dynamic logs a generic "consider pre-processing" hint through the root logger.
        root = logging.getLogger()
        level = root.level
        root.setLevel(logging.ERROR)
        try:
            quantize_dynamic(src, dst, weight_type=QuantType.QInt8)
        finally:
            root.setLevel(level)
        quantized = onnx.load(dst)
    ops = op_types(quantized)
    if "LSTM" in ops or "DynamicQuantizeLSTM" not in ops:
        raise ExportError(
            "onnxruntime's quantizer left the LSTM in float (ops: " + ", ".join(sorted(ops)) + ")"
        )
    return quantized


def with_contract(proto: onnx.ModelProto, contract: C.ModelContract) -> bytes:
    """The deployable file: graph plus the contract as metadata."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = C.METADATA_KEY, contract.to_json()
    model.producer_name = "faultwatch"
    return model.SerializeToString()
