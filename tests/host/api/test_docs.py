"""The API documentation works on a host with no way out: every asset the
pages load is served by the host itself."""

from __future__ import annotations

import ast
import base64
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host import __version__

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_docs_pages_load_every_asset_from_the_host(
    make_client: Callable[..., TestClient], page: str
) -> None:
    client = make_client()
    html = client.get(page)
    assert html.status_code == 200
    assets = re.findall(r"""(?:src|href)=["']([^"']+)["']""", html.text)
    assets += re.findall(r"""url: ?["']([^"']+)["']""", html.text)
    assert assets
    assert not [a for a in assets if a.startswith(("http:", "https:", "//"))], assets
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 100, asset


def test_openapi_names_the_installed_version(make_client: Callable[..., TestClient]) -> None:
    assert make_client().get("/openapi.json").json()["info"]["version"] == __version__


PUBLIC = {"/healthz", "/readyz"}


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, methods in schema["paths"].items():
        for method, operation in methods.items():
            yield path, method, operation


def test_openapi_declares_the_bearer_token_of_every_guarded_route(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(client_tokens=["c-token"], admin_token="a-token")
    schema = client.get("/openapi.json").json()
    assert schema["components"]["securitySchemes"] == {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A client token; admin routes take the admin token.",
        }
    }
    seen = set()
    for path, method, operation in operations(schema):
        seen.add(path)
        concrete = path.replace("{job_id}", "no-such-job").replace("{name}", "image_info")
        answer = client.request(method.upper(), concrete)
        if path in PUBLIC:
            assert "security" not in operation, path
            assert answer.status_code != 401, (path, answer.text)
        else:
            # Required: no anonymous alternative, and a call without it is a 401.
            assert operation["security"] == [{"bearer": []}], (path, method)
            assert answer.status_code == 401, (path, method, answer.text)
    assert PUBLIC < seen and "/metrics" in seen


def test_without_client_tokens_the_client_routes_document_the_token_as_optional(
    make_client: Callable[..., TestClient],
) -> None:
    schema = make_client(admin_token="a-token").get("/openapi.json").json()
    for path, _, operation in operations(schema):
        if path.startswith("/v1/admin/"):
            assert operation["security"] == [{"bearer": []}], path
        elif path not in PUBLIC:
            assert operation["security"] == [{"bearer": []}, {}], path


def documented_json_bodies(schema: dict[str, Any]) -> Iterator[tuple[str, Any]]:
    """Every JSON request body the schema offers as an example: the named
    examples, and the one Swagger UI builds from the fields' examples."""
    for path, _, operation in operations(schema):
        content = operation.get("requestBody", {}).get("content", {})
        media = content.get("application/json")
        if media is None:
            continue
        for example in media.get("examples", {}).values():
            yield path, example["value"]
        if "example" in media:
            yield path, media["example"]
        fields = media["schema"]["properties"]
        yield path, {name: field["examples"][0] for name, field in fields.items()}


def test_every_documented_example_body_succeeds(make_client: Callable[..., TestClient]) -> None:
    client = make_client(client_tokens=["c-token"])
    token = {"Authorization": "Bearer c-token"}
    schema = client.get("/openapi.json").json()
    bodies = list(documented_json_bodies(schema))
    assert {path for path, _ in bodies} == {"/v1/analyze", "/v1/batches", "/v1/jobs"}
    for path, body in bodies:
        answer = client.post(path, json=body, headers=token)
        assert answer.status_code in (200, 202), (path, body, answer.text)
        if path == "/v1/analyze":
            assert answer.json()["result"]["width"] == 1
    # The upload form: each field's example, and the example image as the file.
    form = schema["paths"]["/v1/analyze/upload"]["post"]["requestBody"]["content"]
    ref = form["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = schema["components"]["schemas"][ref]["properties"]
    data = {name: f["examples"][0] for name, f in fields.items() if name != "file"}
    assert set(data) == {"plugin", "mime_type", "options"}
    image = base64.b64decode(bodies[0][1]["image"])
    answer = client.post(
        "/v1/analyze/upload", data=data, files={"file": ("x", image)}, headers=token
    )
    assert answer.status_code == 200, answer.text


def host_names() -> set[str]:
    """The names of the host's own code: modules, functions, classes and
    their attributes, of host/ and sandbox/."""
    names: set[str] = set()
    for package in ("host", "sandbox"):
        for path in (ROOT / package).rglob("*.py"):
            names.add(path.stem)
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
                    names.add(node.name)
                elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
                    names.add(node.target.id)
    return {n for n in names if "_" in n.strip("_") or re.search(r"[a-z][A-Z]", n)}


def texts(value: Any) -> Iterator[str]:
    """Every description and summary in a schema."""
    if isinstance(value, dict):
        for key, item in value.items():
            if key in ("description", "summary") and isinstance(item, str):
                yield item
            else:
                yield from texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item)


def client_names(schema: dict[str, Any]) -> set[str]:
    """Names a client meets in the API itself: fields and parameters."""
    names: set[str] = set()
    for model in schema["components"]["schemas"].values():
        names |= set(model.get("properties", {}))
    for _, _, operation in operations(schema):
        names |= {p["name"] for p in operation.get("parameters", [])}
        for media in operation.get("requestBody", {}).get("content", {}).values():
            names |= set(media["schema"].get("properties", {}))
    return names


def test_descriptions_speak_to_the_client_not_of_the_code(
    make_client: Callable[..., TestClient],
) -> None:
    schema = make_client().get("/openapi.json").json()
    internal = host_names() - client_names(schema)
    assert {"analyze_body", "parse_analyze", "max_list_bytes"} <= internal
    found = list(texts(schema))
    assert len(found) > 20
    for text in found:
        words = set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))
        assert not words & internal, (text, words & internal)
        lowered = text.lower()
        for phrase in ("this model", "parses it", "dependency", ".py", "_body", "pydantic"):
            assert phrase not in lowered, (phrase, text)
        for quoted in re.findall(r"`([^`]*)`", text):  # a field's name, not code
            assert re.fullmatch(r"[a-z_]+", quoted), (quoted, text)
    assert "422" not in json.dumps(schema["paths"])
