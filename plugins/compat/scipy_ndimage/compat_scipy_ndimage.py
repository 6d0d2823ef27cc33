"""Compatibility: scipy's image labelling and signal processing."""

import numpy as np
from scipy import ndimage, signal


class Plugin:
    def run(self, payload):
        image = np.zeros((64, 64), dtype=np.uint8)
        image[4:12, 4:12] = image[30:40, 8:20] = image[50:60, 40:60] = 1
        _, blobs = ndimage.label(image)
        convolved = signal.fftconvolve([1.0, 2.0, 3.0], [0.0, 1.0, 0.5])
        return {"blobs": int(blobs), "convolved": [round(float(v), 6) for v in convolved]}
