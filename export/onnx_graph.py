"""torch → ONNX step graph, and the precisions it can be shipped in.

The legacy TorchScript exporter (``dynamo=False``) is used on purpose: it keeps
the recurrent weights as constant initializers of the ONNX ``LSTM``/``GRU`` op,
which is what ``quantize_dynamic`` needs to turn an LSTM into
``DynamicQuantizeLSTM``. With the dynamo exporter (torch 2.13) the quantizer
silently left a float LSTM.

Precisions (``--quantize``):

``none``         float32 as exported.
``int8``         onnxruntime dynamic quantization: LSTM → ``DynamicQuantizeLSTM`` (int8 weights,
                 int8 matmuls, peepholes kept as its ``P`` input), dense layers → ``MatMulInteger``.
                 onnxruntime has no quantized GRU kernel, so a GRU's weights are stored int8 per
                 output row and rebuilt in float at session load (:func:`int8_recurrent_weights`).
``int8-static``  QDQ static quantization: the dense layers get ``QuantizeLinear``/``DequantizeLinear``
                 pairs whose activation ranges are calibrated on training readings; the recurrent
                 weights are stored int8 as for a GRU above (ONNX has no QDQ form of an LSTM/GRU's
                 activations, so the recurrence itself computes in float).
``fp16``         float16 weights, cast back to float32 at load: onnxruntime's CPU provider has no
                 float16 LSTM/GRU kernel, so this halves the file, not the arithmetic.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from faultwatch.runtime.engine import contract as C
from faultwatch.train.model import Forecaster
from onnx import TensorProto, helper, numpy_helper
from torch import nn

OPSET = 17
RECURRENT_OPS = ("LSTM", "GRU")


class ExportError(RuntimeError):
    """Export could not produce a model that meets the contract."""


class StepGraph(nn.Module):
    """Flattens the forecaster's per-layer state into separate graph inputs and outputs."""

    def __init__(self, model: Forecaster):
        super().__init__()
        self.model = model
        self.per_layer = 2 if model.config.has_cell_state else 1

    def forward(self, readings: torch.Tensor, *state: torch.Tensor):
        k = self.per_layer
        layers = [tuple(state[k * i:k * (i + 1)]) for i in range(len(state) // k)]
        forecast, new_state = self.model(readings, layers)
        return (forecast, *[t for layer in new_state for t in layer])


@contextlib.contextmanager
def _fused(model: Forecaster) -> Iterator[None]:
    """Every layer on torch's fused kernel, so the exporter emits one ONNX LSTM/GRU op per layer."""
    for rnn in model.recurrent_layers():
        rnn.fused_for_export = True
    try:
        yield
    finally:
        for rnn in model.recurrent_layers():
            rnn.fused_for_export = False


def to_onnx(model: Forecaster, contract: C.ModelContract) -> onnx.ModelProto:
    """Export the fp32 step graph with dynamic batch and time axes."""
    if model.config.bidirectional:
        raise ExportError("a bidirectional model cannot stream: its backward pass needs the readings "
                          "after the one being forecast, which a live device has not sent yet")
    model.eval()
    example = (torch.zeros(1, 2, model.config.n_features),
               *[t for layer in model.zero_state(1) for t in layer])
    inputs, outputs = contract.input_names(), contract.output_names()
    dynamic = {C.READINGS: {0: "batch", 1: "time"}, C.FORECAST: {0: "batch", 1: "time"}}
    dynamic |= {name: {1: "batch"} for name in inputs[1:] + outputs[1:]}
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _fused(model):
        # The exporter warns about RNNs exported without initial states (ours has them as inputs),
        # about tracing torch's own shape checks, and that the legacy exporter is legacy (chosen
        # on purpose, see above).
        warnings.filterwarnings("ignore", message=".*batch_size other than 1.*")
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=".*(legacy TorchScript|"
                                "feature will be removed).*")
        torch.onnx.export(
            # A BytesIO works (the legacy exporter writes to any file object); torch's stubs say paths.
            StepGraph(model).eval(), example, buffer,  # type: ignore[arg-type]
            input_names=inputs, output_names=outputs,
            dynamic_axes=dynamic, opset_version=OPSET, dynamo=False,
        )
    proto = onnx.load_from_string(buffer.getvalue())
    _add_peepholes(proto, model)
    onnx.checker.check_model(proto)
    return proto


def recurrent_nodes(proto: onnx.ModelProto) -> list[onnx.NodeProto]:
    return [n for n in proto.graph.node if n.op_type in (*RECURRENT_OPS, "DynamicQuantizeLSTM")]


def _add_peepholes(proto: onnx.ModelProto, model: Forecaster) -> None:
    """Give each LSTM op its layer's peephole weights as input ``P`` [1, 3H] in ONNX order (i, o, f)."""
    if not model.config.peephole:
        return
    nodes = recurrent_nodes(proto)
    if len(nodes) != len(model.rnns):
        raise ExportError(f"expected {len(model.rnns)} LSTM ops in the exported graph, found {len(nodes)}")
    for i, (node, rnn) in enumerate(zip(nodes, model.recurrent_layers(), strict=True)):
        size = next(a.i for a in node.attribute if a.name == "hidden_size")
        if node.op_type != "LSTM" or size != rnn.hidden_size:
            raise ExportError(f"layer {i}: exported {node.op_type}(hidden {size}) does not match the model")
        if rnn.peephole is None:
            raise ExportError(f"layer {i}: the model says peephole but the layer has no peephole weights")
        p = rnn.peephole.detach().numpy()  # [1, 3, H] gates (i, f, o)
        onnx_order = np.concatenate([p[:, 0], p[:, 2], p[:, 1]], axis=1).astype(np.float32)  # [1, 3H]
        name = f"peephole_{i}"
        proto.graph.initializer.append(numpy_helper.from_array(onnx_order, name))
        while len(node.input) < 7:
            node.input.append("")
        node.input.append(name)


def op_types(proto: onnx.ModelProto) -> set[str]:
    return {node.op_type for node in proto.graph.node}


@contextlib.contextmanager
def _quiet_root_logger() -> Iterator[None]:
    # onnxruntime's quantizers log a generic "consider pre-processing" hint through the root logger.
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


def _initializers(proto: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    return {t.name: t for t in proto.graph.initializer}


def int8_recurrent_weights(proto: onnx.ModelProto, ops: tuple[str, ...] = RECURRENT_OPS) -> list[str]:
    """Store the W and R weights of float recurrent ops as int8, one symmetric scale per output row;
    returns the names of the weights converted.

    The graph rebuilds each float weight as ``Cast(int8) × scale`` rather than ``DequantizeLinear``:
    onnxruntime constant-folds that at session load (it deliberately leaves ``DequantizeLinear``
    in place for QDQ fusion, which has no LSTM/GRU kernel to fuse into), so the file is int8 and
    the step costs what the float32 step costs.
    """
    inits = _initializers(proto)
    done = []
    for node in list(proto.graph.node):  # a snapshot: nodes are inserted below
        if node.op_type not in ops:
            continue
        for slot in (1, 2):  # W [1, G·H, I], R [1, G·H, H]
            name = node.input[slot]
            if name not in inits:
                raise ExportError(f"{node.op_type} weight {name!r} is not a constant initializer")
            w = numpy_helper.to_array(inits[name])
            if w.shape[0] != 1:
                raise ExportError(f"{node.op_type} weight {name!r} has {w.shape[0]} directions, expected 1")
            scale = np.maximum(np.abs(w).max(axis=2, keepdims=True), 1e-12) / 127.0  # [1, G·H, 1]
            q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
            proto.graph.initializer.remove(inits[name])
            proto.graph.initializer.extend([
                numpy_helper.from_array(q, f"{name}_int8"),
                numpy_helper.from_array(scale.astype(np.float32), f"{name}_scale"),
            ])
            at = list(proto.graph.node).index(node)
            proto.graph.node.insert(at, helper.make_node(
                "Mul", [f"{name}_int8_float", f"{name}_scale"], [f"{name}_dequantized"],
                name=f"{name}_Dequantize"))
            proto.graph.node.insert(at, helper.make_node(
                "Cast", [f"{name}_int8"], [f"{name}_int8_float"], name=f"{name}_Cast", to=TensorProto.FLOAT))
            node.input[slot] = f"{name}_dequantized"
            done.append(name)
    return done


def quantize_int8(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Dynamic int8 quantization; fails loudly if a recurrent op kept float weights."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "int8.onnx"
        onnx.save(proto, src)
        # reduce_range: 7-bit weights. On x86 CPUs without VNNI (AVX2 only, as on many edge
        # boxes and this project's CI) onnxruntime's u8×s8 kernel adds pairs of products in
        # int16 (VPMADDUBSW), which saturates with full-range weights: int8 forecasts then
        # drift from fp32 by several times export's parity tolerance, and batched calls stop
        # matching single ones. The model must be right on every CPU it may be copied to.
        # per_channel: one scale per output row of each weight matrix ([4·hidden] gates of an LSTM,
        # [out] of a dense layer) instead of one per tensor, so a row of small weights is not
        # rounded to a few levels because another row is large. Measured on SKAB valve1 with
        # eval's LSTM(32) (valve1/0–14 with 2 training seeds, valve1/15 with 5): per tensor, 10 of
        # 35 exports failed parity (0.022–0.026 > 0.02; valve1/15 on every seed); per channel
        # none did, max diff 0.006–0.018. It costs 4 bytes per row of scales.
        quantize_dynamic(src, dst, weight_type=QuantType.QInt8, reduce_range=True, per_channel=True)
        quantized = onnx.load(dst)
    if "LSTM" in op_types(proto) and ("LSTM" in op_types(quantized)
                                      or "DynamicQuantizeLSTM" not in op_types(quantized)):
        raise ExportError("onnxruntime's quantizer left the LSTM in float (ops: "
                          + ", ".join(sorted(op_types(quantized))) + ")")
    int8_recurrent_weights(quantized, ops=("GRU",))  # no quantized GRU kernel exists: int8 storage
    _check_no_float_weights(quantized)
    return quantized


def quantize_int8_static(proto: onnx.ModelProto, calibration: list[dict[str, np.ndarray]]) -> onnx.ModelProto:
    """QDQ static quantization of the dense layers, activation ranges calibrated on ``calibration``
    feeds (full graph inputs); int8 storage for the recurrent weights."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        """Feeds training readings, one device's training part per call from a zero state."""

        def __init__(self) -> None:
            self._feeds = iter(calibration)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._feeds, None)

    with tempfile.TemporaryDirectory() as tmp, _quiet_root_logger():
        src, dst = Path(tmp) / "fp32.onnx", Path(tmp) / "qdq.onnx"
        onnx.save(proto, src)
        # Only MatMul: the skip connection's Gather feeds readings straight into the forecast, and
        # 8-bit readings there would cost 1/255 of the range on every forecast.
        quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, op_types_to_quantize=["MatMul"],
                        per_channel=True, activation_type=QuantType.QInt8, weight_type=QuantType.QInt8,
                        reduce_range=True,  # 7-bit weights: no int16 saturation on non-VNNI CPUs
                        extra_options={"CalibTensorRangeSymmetric": False})
        quantized = onnx.load(dst)
    if "QuantizeLinear" not in op_types(quantized):
        raise ExportError("onnxruntime's static quantizer inserted no QuantizeLinear nodes")
    int8_recurrent_weights(quantized)
    _check_no_float_weights(quantized)
    return quantized


def _check_no_float_weights(proto: onnx.ModelProto) -> None:
    """After int8 quantization no matrix may still feed a MatMul or recurrent op in float32."""
    inits = _initializers(proto)
    for node in proto.graph.node:
        if node.op_type in ("MatMul", *RECURRENT_OPS):
            weights = [node.input[1]] + ([node.input[2]] if node.op_type in RECURRENT_OPS else [])
            for name in weights:
                if name in inits and inits[name].data_type == TensorProto.FLOAT:
                    raise ExportError(f"{node.op_type} weight {name!r} was left in float32 by quantization")


def to_fp16(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Store every float32 weight as float16 behind a ``Cast`` back to float32."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    casts = []
    for init in list(out.graph.initializer):
        if init.data_type != TensorProto.FLOAT:
            continue
        value = numpy_helper.to_array(init)
        if np.abs(value).max(initial=0.0) > np.finfo(np.float16).max:
            raise ExportError(f"weight {init.name!r} does not fit float16")
        out.graph.initializer.remove(init)
        out.graph.initializer.append(numpy_helper.from_array(value.astype(np.float16), f"{init.name}_fp16"))
        casts.append(helper.make_node("Cast", [f"{init.name}_fp16"], [init.name], name=f"{init.name}_Cast",
                                      to=TensorProto.FLOAT))
    for i, node in enumerate(casts):
        out.graph.node.insert(i, node)
    return out


def with_contract(proto: onnx.ModelProto, contract: C.ModelContract) -> bytes:
    """The deployable file: graph plus the contract as metadata."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key, entry.value = C.METADATA_KEY, contract.to_json()
    model.producer_name = "faultwatch"
    return model.SerializeToString()
