"""An image's bytes must be of the type its `mime_type` names, and of a type
the API accepts: anything else is a 400 `invalid_input` saying what the
bytes are, answered before a plugin is started, so the plugin's state does
not change. The check is the service layer's (every route, either mode)."""

from __future__ import annotations

import base64
import io
from collections.abc import Callable

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from host.errors import Rejected
from host.registry import PluginRegistry
from host.services import PluginManagementService
from host.services.payloads import ALLOWED_MIME_TYPES, check_image_type, sniff_image
from sandbox.supervisor import Sandbox
from tests.host.api.test_routes import assert_envelope

HTML = b"<html><body>not an image</body></html>"
PILLOW_FORMATS = {
    "image/png": "PNG",
    "image/jpeg": "JPEG",
    "image/gif": "GIF",
    "image/webp": "WEBP",
    "image/bmp": "BMP",
    "image/tiff": "TIFF",
}


def encoded(fmt: str) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (4, 3), (10, 200, 30)).save(out, format=fmt)
    return out.getvalue()


def test_every_accepted_type_is_recognised_from_its_bytes() -> None:
    assert set(PILLOW_FORMATS) == ALLOWED_MIME_TYPES
    for mime_type, fmt in PILLOW_FORMATS.items():
        data = encoded(fmt)
        found = sniff_image(data)
        assert found is not None and found[0] == mime_type, (fmt, data[:12])
        check_image_type(data, mime_type)  # no exception: the bytes are what they claim
    assert sniff_image(HTML) is None and sniff_image(b"") is None


def test_a_mismatch_names_both_types_and_unknown_bytes_show_their_first_bytes() -> None:
    with pytest.raises(Rejected) as mismatch:
        check_image_type(encoded("PNG"), "image/gif", "image_info")
    error = mismatch.value.envelope["error"]
    assert error["message"] == "the image's bytes are PNG, but mime_type says image/gif"
    assert error["details"] == {"reason": "invalid_input", "detected": "image/png"}
    assert error["plugin"] == "image_info"
    with pytest.raises(Rejected) as unknown:
        check_image_type(HTML, "image/png")
    message = unknown.value.envelope["error"]["message"]
    assert message.startswith(
        "the image's bytes are no known image format (first bytes 3c 68 74 6d 6c 3e 3c 62); "
        "accepted: image/bmp, image/gif, image/jpeg, image/png, image/tiff, image/webp"
    )


def state_of(client: TestClient, plugin: str) -> str:
    state: str = client.get(f"/v1/plugins/{plugin}").json()["state"]
    return state


@pytest.mark.parametrize(
    ("image", "mime_type", "message"),
    [
        (HTML, "image/png", "the image's bytes are no known image format (first bytes 3c 68"),
        (b"GIF89a" + bytes(20), "image/png", "the image's bytes are GIF, but mime_type says"),
        ("png", "image/gif", "the image's bytes are PNG, but mime_type says image/gif"),
    ],
)
def test_every_route_refuses_the_image_before_the_plugin_runs(
    client: TestClient, png: bytes, image: bytes | str, mime_type: str, message: str
) -> None:
    data = png if image == "png" else image
    assert isinstance(data, bytes)
    text = base64.b64encode(data).decode()
    before = state_of(client, "image_info")
    answers = [
        client.post(
            "/v1/analyze", json={"plugin": "image_info", "image": text, "mime_type": mime_type}
        ),
        client.post(
            "/v1/jobs", json={"plugin": "image_info", "image": text, "mime_type": mime_type}
        ),
        client.post(
            "/v1/analyze/upload",
            files={"file": ("f", data, mime_type)},
            data={"plugin": "image_info"},
        ),
        client.post(
            "/v1/analyze/upload",
            files={"file": ("f", data, "application/octet-stream")},
            data={"plugin": "image_info", "mime_type": mime_type},
        ),
    ]
    for answer in answers:
        detail = assert_envelope(answer, 400, "invalid_input")
        assert detail["message"].startswith(message), detail
    assert state_of(client, "image_info") == before == "IDLE"
    assert client.get("/v1/jobs").json()["total"] == 0  # refused, not queued


def test_the_plugin_state_would_have_changed_without_the_check(
    registry: PluginRegistry, sandbox: Sandbox
) -> None:
    # The same bytes run straight through the sandbox (no service check):
    # the plugin fails on them, which the check above spares it.
    plugins = PluginManagementService(registry, sandbox)
    _, error = plugins.execute_plugin("image_info", {"image": HTML, "mime_type": "image/png"})
    assert error["error"]["details"]["reason"] == "plugin_raised"
    assert plugins.describe("image_info")["state"] == "ERROR"


def test_the_service_check_refuses_a_mismatch_for_every_mode(
    registry: PluginRegistry, sandbox: Sandbox, png: bytes
) -> None:
    # PluginManagementService.check is what the single node's and the
    # multi-node dispatcher's `enqueue` call before a job is accepted.
    plugins = PluginManagementService(registry, sandbox)
    with pytest.raises(Rejected, match="the image's bytes are PNG, but mime_type says image/jpeg"):
        plugins.check("image_info", {"image": png, "mime_type": "image/jpeg"})
    with pytest.raises(Rejected, match="no known image format"):
        plugins.check(
            "image_info", {"image": base64.b64encode(HTML).decode(), "mime_type": "image/png"}
        )
    plugins.check("image_info", {"image": png, "mime_type": "image/png"})
    assert plugins.describe("image_info")["state"] == "IDLE"


def test_bytes_of_the_declared_type_still_reach_the_plugin(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client()
    for mime_type, fmt in PILLOW_FORMATS.items():
        text = base64.b64encode(encoded(fmt)).decode()
        answer = client.post(
            "/v1/analyze", json={"plugin": "image_info", "image": text, "mime_type": mime_type}
        )
        assert answer.status_code == 200, answer.text
        assert answer.json()["result"]["format"] == fmt
