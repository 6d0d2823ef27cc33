"""edge_count: the share of an image's pixels that lie on an edge."""

import io

from PIL import Image, ImageFilter


class EdgeCount:
    def run(self, payload):
        threshold = payload["options"].get("threshold", 64)
        with Image.open(io.BytesIO(payload["image"])) as image:
            edges = image.convert("L").filter(ImageFilter.FIND_EDGES)
        histogram = edges.histogram()
        total = sum(histogram)
        strong = sum(histogram[threshold:])
        return {
            "width": edges.width,
            "height": edges.height,
            "threshold": threshold,
            "edge_pixels": strong,
            "edge_share": round(strong / total, 6) if total else 0.0,
        }
