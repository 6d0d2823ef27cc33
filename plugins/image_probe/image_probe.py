"""image_probe: what an image is, read from its header with the standard library alone.

Formats: PNG, GIF, JPEG, BMP, WebP (VP8, VP8L, VP8X). The dimensions of
anything else are null; the byte size and digest are always given.
"""

import hashlib
import struct

JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg(data):
    at = 2
    while at + 9 < len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        if marker in JPEG_SOF:
            height, width = struct.unpack(">HH", data[at + 5 : at + 9])
            return width, height
        at += 2 + length
    return None


def _webp(data):
    kind = data[12:16]
    if kind == b"VP8 " and len(data) >= 30:
        width, height = struct.unpack("<HH", data[26:30])
        return width & 0x3FFF, height & 0x3FFF
    if kind == b"VP8L" and len(data) >= 25:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8X" and len(data) >= 30:
        return int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    return None


def probe(data):
    """(format, (width, height) or None)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) >= 24:
        return "png", struct.unpack(">II", data[16:24])
    if data[:6] in (b"GIF87a", b"GIF89a") and len(data) >= 10:
        return "gif", struct.unpack("<HH", data[6:10])
    if data.startswith(b"\xff\xd8"):
        return "jpeg", _jpeg(data)
    if data.startswith(b"BM") and len(data) >= 26:
        width, height = struct.unpack("<ii", data[18:26])
        return "bmp", (width, abs(height))
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp", _webp(data)
    return "unknown", None


class ImageProbe:
    def run(self, payload):
        data = payload["image"]
        kind, size = probe(data)
        result = {
            "format": kind,
            "width": size[0] if size else None,
            "height": size[1] if size else None,
            "bytes": len(data),
            "declared_mime_type": payload["mime_type"],
        }
        if payload["options"].get("digest", True):
            result["sha256"] = hashlib.sha256(data).hexdigest()
        return result
