"""The dominant colours of an image, by median-cut quantisation.

Options: `count` (1 to 16, default 5) colours to return.
"""

import io

from PIL import Image


class DominantColors:
    def run(self, payload):
        count = payload["options"].get("count", 5)
        if not isinstance(count, int) or isinstance(count, bool) or not 1 <= count <= 16:
            raise ValueError("options.count must be an integer from 1 to 16")
        with Image.open(io.BytesIO(payload["image"])) as image:
            image.load()
            rgb = image.convert("RGB")
        rgb.thumbnail((256, 256))
        quantised = rgb.quantize(colors=count, method=Image.Quantize.MEDIANCUT)
        palette = quantised.getpalette() or []
        histogram = sorted(quantised.getcolors() or [], reverse=True)
        total = rgb.width * rgb.height
        colors = []
        for pixels, index in histogram[:count]:
            r, g, b = palette[index * 3 : index * 3 + 3]
            colors.append(
                {
                    "hex": f"#{r:02x}{g:02x}{b:02x}",
                    "rgb": [r, g, b],
                    "share": round(pixels / total, 4),
                }
            )
        return {"colors": colors, "pixels_sampled": total}
