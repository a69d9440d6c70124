"""The streaming engine: one model step per reading from each device's carried state.

Needs numpy and onnxruntime only: the model contract, the onnxruntime step, the
per-device state, scoring, thresholds and fault events.
"""
