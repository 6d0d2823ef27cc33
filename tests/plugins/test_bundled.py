"""The bundled image plugins, run through the sandbox on images made here."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from sandbox.tool_runner import ToolRunner


def encode(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    out = io.BytesIO()
    image.save(out, format=fmt, **kwargs)
    return out.getvalue()


def scene(width: int = 200, height: int = 150) -> Image.Image:
    image = Image.new("RGB", (width, height), (240, 240, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse([width * 0.1, height * 0.1, width * 0.6, height * 0.8], fill=(200, 40, 40))
    draw.rectangle([width * 0.55, height * 0.3, width * 0.95, height * 0.95], fill=(30, 60, 200))
    return image


def call(runner: ToolRunner, plugin: str, data: bytes, mime: str, **options: object) -> dict:
    result, error = runner.run(plugin, {"image": data, "mime_type": mime, "options": options})
    assert error == {}, error
    return result


def test_image_info_describes_a_jpeg_with_exif(runner: ToolRunner) -> None:
    exif = Image.Exif()
    exif[0x010F] = "plughost camera"  # Make
    exif[0x0110] = "model 1"  # Model
    data = encode(scene(), "JPEG", exif=exif.tobytes(), quality=90)
    result = call(runner, "image_info", data, "image/jpeg")
    assert result["format"] == "JPEG" and result["mime_type"] == "image/jpeg"
    assert (result["width"], result["height"]) == (200, 150)
    assert result["has_exif"] is True and result["exif_tags"] == 2
    assert set(result["bands"]) == {"R", "G", "B"}
    assert 0 < result["brightness"] < 1


def test_image_info_sees_alpha_and_frames(runner: ToolRunner) -> None:
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    result = call(runner, "image_info", encode(rgba, "PNG"), "image/png")
    assert result["has_alpha"] is True and result["has_exif"] is False
    frames = [Image.new("RGB", (8, 8), (80 * i, 0, 0)) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:])
    result = call(runner, "image_info", gif.getvalue(), "image/gif")
    assert result["frames"] == 3


def test_image_info_rejects_bytes_that_are_no_image(runner: ToolRunner) -> None:
    result, error = runner.run("image_info", {"image": b"not an image", "mime_type": "image/png"})
    assert result == {}
    assert error["error"]["details"]["reason"] == "plugin_raised"
    assert "cannot identify image file" in error["error"]["message"]


def test_image_hash_finds_near_duplicates(runner: ToolRunner) -> None:
    original = call(runner, "image_hash", encode(scene(), "PNG"), "image/png")
    # The same picture, resized and re-encoded as JPEG: other bytes, same look.
    copy = encode(scene().resize((160, 120)), "JPEG", quality=70)
    other = Image.new("RGB", (200, 150), (20, 200, 20))
    ImageDraw.Draw(other).rectangle([0, 0, 90, 150], fill=(250, 250, 0))
    near = call(runner, "image_hash", copy, "image/jpeg", compare_to=original["dhash"])
    far = call(
        runner, "image_hash", encode(other, "PNG"), "image/png", compare_to=original["dhash"]
    )
    assert near["sha256"] != original["sha256"]
    assert near["distance"]["dhash"] <= 10
    assert far["distance"]["dhash"] > near["distance"]["dhash"] + 10


def test_image_hash_rejects_a_malformed_comparison_hash(runner: ToolRunner) -> None:
    _, error = runner.run(
        "image_hash",
        {
            "image": encode(scene(), "PNG"),
            "mime_type": "image/png",
            "options": {"compare_to": "xyz"},
        },
    )
    assert "compare_to" in error["error"]["message"]


def test_dominant_colors_finds_the_main_colours_and_their_shares(runner: ToolRunner) -> None:
    image = Image.new("RGB", (100, 100), (255, 0, 0))
    ImageDraw.Draw(image).rectangle([0, 0, 99, 24], fill=(0, 0, 255))
    result = call(runner, "dominant_colors", encode(image, "PNG"), "image/png", count=2)
    colors = {c["hex"]: c["share"] for c in result["colors"]}
    assert colors == pytest.approx({"#ff0000": 0.75, "#0000ff": 0.25}, abs=0.01)


@pytest.mark.parametrize("count", [0, 17, "five", True])
def test_dominant_colors_validates_its_count_option(runner: ToolRunner, count: object) -> None:
    _, error = runner.run(
        "dominant_colors",
        {"image": encode(scene(), "PNG"), "mime_type": "image/png", "options": {"count": count}},
    )
    assert "options.count" in error["error"]["message"]
