"""Compatibility: Pillow opens the image it is given and makes a thumbnail."""

import io

from PIL import Image


class Plugin:
    def run(self, payload):
        with Image.open(io.BytesIO(payload["image"])) as image:
            size = list(image.size)
            image.thumbnail((16, 16))
            return {"size": size, "thumbnail": list(image.size)}
