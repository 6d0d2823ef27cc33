"""`plughost new NAME`: a plugin directory that works as written.

The plugin it writes uses only the standard library, declares an options
schema, and comes with a test that runs it through the real sandbox with
the `plughost.testing` fixture, so `plughost check NAME` passes on it
before the author has changed a line.
"""

from __future__ import annotations

import re
from pathlib import Path

from host.manifest import NAME_PATTERN


class ScaffoldError(Exception):
    """A plugin that cannot be written there; the message says why."""


MANIFEST = """\
name = "{name}"
version = "0.1.0"
entrypoint = "{module}:{cls}"
description = "Byte size, digest and detected format of an image"

# Packages the plugin imports, as PEP 508 strings, installed into an
# environment of its own by `plughost plugins prepare` (never the host's).
# For example: dependencies = ["Pillow>=10.2"]
dependencies = []

[limits]
timeout_s = 5      # wall clock for the whole call, import included
memory_mb = 128    # the whole process tree

# A JSON Schema for payload["options"]; the host checks every call against it.
[options]
type = "object"
additionalProperties = false

[options.properties.algorithm]
type = "string"
enum = ["sha256", "blake2b"]
default = "sha256"
"""

MODULE = '''\
"""{name}: byte size, digest and detected format of an image.

The host creates `{cls}()` in a fresh sandboxed process and calls `run` once.
`payload` is {{"image": bytes, "mime_type": str, "options": dict}}; the result
must be a dict of JSON values (no NaN or Infinity). Raise an exception to
fail the call: the client gets its type and message, the operator the traceback.
"""

import hashlib

SIGNATURES = {{
    b"\\x89PNG\\r\\n\\x1a\\n": "png",
    b"\\xff\\xd8\\xff": "jpeg",
    b"GIF87a": "gif",
    b"GIF89a": "gif",
}}


class {cls}:
    def run(self, payload):
        image = payload["image"]
        algorithm = payload["options"].get("algorithm", "sha256")
        detected = next(
            (kind for magic, kind in SIGNATURES.items() if image.startswith(magic)), "unknown"
        )
        return {{
            "bytes": len(image),
            "format": detected,
            "digest": {{"algorithm": algorithm, "hex": hashlib.new(algorithm, image).hexdigest()}},
        }}
'''

TEST = '''\
"""Runs {name} through the real sandbox, as the host will.

    pytest {dirname}
"""

from pathlib import Path

HERE = Path(__file__).resolve().parent
PNG = bytes.fromhex(  # a 1x1 red PNG
    "89504e470d0a1a0a0000000d4948445200000001000000010802000000907753de0000000c4944"
    "4154789c63f8cfc0000003010100c9fe92ef0000000049454e44ae426082"
)


def test_reports_format_and_digest(plughost_run):
    result, error = plughost_run(HERE, PNG, options={{"algorithm": "sha256"}})
    assert error == {{}}
    assert result["format"] == "png"
    assert result["bytes"] == len(PNG)
    assert len(result["digest"]["hex"]) == 64


def test_an_unknown_option_is_refused(plughost_run):
    result, error = plughost_run(HERE, PNG, options={{"colour": "red"}})
    assert result == {{}}
    assert error["error"]["details"]["reason"] == "invalid_input"
'''

README = """\
# {name}

A plughost plugin: byte size, digest and detected format of an image.

    plughost check {dirname}                          # validate, prepare, run on the samples
    plughost run {name} --plugins-dir . --image picture.png
    pytest {dirname}                                  # its tests, through the real sandbox

Options (`payload["options"]`, checked against the `[options]` schema in
`plugin.toml`): `algorithm`, one of `sha256` (default) or `blake2b`.

See plughost's `docs/plugins.md` for the plugin API, limits and dependencies.
"""


def class_name(name: str) -> str:
    """`edge-count` -> `EdgeCount`."""
    return "".join(part.capitalize() for part in re.split(r"[-_]", name) if part) or "Plugin"


def create(name: str, parent: Path) -> Path:
    """Write the plugin `name` into `parent/name`; return its directory."""
    if not re.fullmatch(NAME_PATTERN, name):
        raise ScaffoldError(f"plugin name {name!r} is not valid: use 1-64 of a-z, 0-9, '_' and '-'")
    module = name.replace("-", "_")
    if not module.isidentifier():
        raise ScaffoldError(f"plugin name {name!r} must start with a letter or '_'")
    directory = parent / name
    if directory.exists():
        raise ScaffoldError(f"{directory} already exists; choose another name or --dir")
    directory.mkdir(parents=True)
    fields = {"name": name, "module": module, "cls": class_name(name), "dirname": directory}
    (directory / "plugin.toml").write_text(MANIFEST.format(**fields))
    (directory / f"{module}.py").write_text(MODULE.format(**fields))
    (directory / f"test_{module}.py").write_text(TEST.format(**fields))
    (directory / "README.md").write_text(README.format(**fields))
    return directory
