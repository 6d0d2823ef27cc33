"""Compatibility: onnxruntime runs a small model (y = relu(x W + b))."""

import os

import numpy as np
import onnxruntime

MODEL = os.path.join(os.path.dirname(__file__), "model.onnx")


class Plugin:
    def run(self, payload):
        session = onnxruntime.InferenceSession(MODEL, providers=["CPUExecutionProvider"])
        (y,) = session.run(None, {"x": np.array([[1.0, 2.0, 3.0]], dtype=np.float32)})
        return {"y": [round(float(v), 6) for v in y[0]]}
