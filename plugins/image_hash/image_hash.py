"""Exact and perceptual hashes of an image.

sha256 identifies the exact bytes. The average hash (aHash) and difference
hash (dHash) are 64-bit perceptual hashes: re-encoded, resized or slightly
edited copies of a picture differ from it in only a few bits, so a Hamming
distance below about 10 marks a near duplicate. Pass
`options.compare_to` (a hex hash from an earlier call) to get the distance.
"""

import hashlib
import io

from PIL import Image


def _bits_to_hex(bits):
    value = 0
    for bit in bits:
        value = (value << 1) | int(bit)
    return f"{value:016x}"


def average_hash(image):
    small = image.convert("L").resize((8, 8), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    mean = sum(pixels) / len(pixels)
    return _bits_to_hex(p > mean for p in pixels)


def difference_hash(image):
    small = image.convert("L").resize((9, 8), Image.Resampling.LANCZOS)
    pixels = list(small.getdata())
    bits = []
    for row in range(8):
        for col in range(8):
            bits.append(pixels[row * 9 + col] > pixels[row * 9 + col + 1])
    return _bits_to_hex(bits)


def hamming(a, b):
    return bin(int(a, 16) ^ int(b, 16)).count("1")


class ImageHash:
    def run(self, payload):
        data = payload["image"]
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            result = {
                "sha256": hashlib.sha256(data).hexdigest(),
                "ahash": average_hash(image),
                "dhash": difference_hash(image),
                "width": image.width,
                "height": image.height,
            }
        other = payload["options"].get("compare_to")
        if other is not None:
            other = str(other)
            if len(other) != 16 or any(c not in "0123456789abcdef" for c in other.lower()):
                raise ValueError("options.compare_to must be a 16-digit hex hash")
            result["distance"] = {
                "ahash": hamming(result["ahash"], other),
                "dhash": hamming(result["dhash"], other),
            }
        return result
