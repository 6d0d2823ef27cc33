"""Format, size, mode, per-band colour statistics and EXIF presence of an image."""

import io

from PIL import Image, ImageStat


class ImageInfo:
    def run(self, payload):
        with Image.open(io.BytesIO(payload["image"])) as image:
            image.load()
            exif = image.getexif()
            rgb = image.convert("RGB") if image.mode not in ("RGB", "L") else image
            stat = ImageStat.Stat(rgb)
            bands = rgb.getbands()
            return {
                "format": image.format,
                "mime_type": Image.MIME.get(image.format or "", payload["mime_type"]),
                "width": image.width,
                "height": image.height,
                "mode": image.mode,
                "frames": getattr(image, "n_frames", 1),
                "has_alpha": "A" in image.getbands() or "transparency" in image.info,
                "has_exif": len(exif) > 0,
                "exif_tags": len(exif),
                "bands": {
                    band: {
                        "mean": round(stat.mean[i], 3),
                        "stddev": round(stat.stddev[i], 3),
                        "min": stat.extrema[i][0],
                        "max": stat.extrema[i][1],
                    }
                    for i, band in enumerate(bands)
                },
                "brightness": round(sum(stat.mean) / len(stat.mean) / 255, 4),
            }
