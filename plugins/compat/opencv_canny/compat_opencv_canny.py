"""Compatibility: OpenCV decodes the image it is given and finds edges."""

import cv2
import numpy as np


class Plugin:
    def run(self, payload):
        decoded = cv2.imdecode(np.frombuffer(payload["image"], np.uint8), cv2.IMREAD_COLOR)
        square = np.zeros((64, 64), dtype=np.uint8)
        square[20:44, 20:44] = 255
        edges = cv2.Canny(square, 100, 200)
        rows, cols = np.nonzero(edges)
        near_border = (np.minimum(abs(rows - 20), abs(rows - 43)) <= 1) | (
            np.minimum(abs(cols - 20), abs(cols - 43)) <= 1
        )
        return {
            "decoded": list(decoded.shape),
            "has_edges": bool(len(rows) > 0),
            "edges_off_the_border": int((~near_border).sum()),
        }
