"""Compatibility: numpy's linear algebra on its BLAS threads."""

import numpy as np


class Plugin:
    def run(self, payload):
        x = np.linalg.solve(np.array([[3.0, 1.0], [1.0, 2.0]]), np.array([9.0, 8.0]))
        ones = np.ones((512, 512))
        product = ones @ ones
        return {"x": [round(float(v), 9) for v in x], "product": float(product[100, 200])}
