"""Compatibility: scikit-image's Otsu threshold."""

import numpy as np
from skimage.filters import threshold_otsu


class Plugin:
    def run(self, payload):
        image = np.full((64, 64), 50, dtype=np.uint8)
        image[:, 32:] = 200
        threshold = threshold_otsu(image)
        return {"above": int((image > threshold).sum()), "pixels": int(image.size)}
