"""Fixtures of the host tests: plugins that probe what they can import."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

UNDECLARED = ("PIL", "psutil", "pydantic", "fastapi", "host", "sandbox", "numpy", "six")
PROBE = """
import importlib, sys


def importable(name):
    try:
        importlib.import_module(name)
        return True
    except ImportError:
        return False


class Plugin:
    def run(self, payload):
        {body}
        return {{
            "versions": versions,
            "importable": [n for n in {undeclared!r} if n not in versions and importable(n)],
        }}
"""


def probe_plugin(root: Path, name: str, dependencies: list[str], body: str) -> Path:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "plugin.toml").write_text(
        f'name = "{name}"\nversion = "1.0"\nentrypoint = "{name}:Plugin"\n'
        f"dependencies = {json.dumps(dependencies)}\n[limits]\ntimeout_s = 20\nmemory_mb = 512\n"
    )
    (directory / f"{name}.py").write_text(PROBE.format(body=body, undeclared=UNDECLARED))
    return directory


@pytest.fixture
def conflicting(tmp_path: Path) -> Path:
    """Two plugins: numpy with six 1.16, and six 1.17 alone."""
    probe_plugin(
        tmp_path,
        "np_stats",
        ["numpy>=1.26,<3", "six==1.16.0"],
        "import numpy, six\n        versions = {'numpy': numpy.__version__, "
        "'six': six.__version__, 'mean': float(numpy.frombuffer(payload['image'], "
        "numpy.uint8).mean())}",
    )
    probe_plugin(
        tmp_path,
        "six_new",
        ["six==1.17.0"],
        "import six\n        versions = {'six': six.__version__}",
    )
    return tmp_path


def check_versions(result: dict[str, object], name: str) -> None:
    versions = result["versions"]
    assert isinstance(versions, dict)
    if name == "np_stats":
        assert versions["six"] == "1.16.0" and versions["numpy"].startswith(("1.", "2."))
    else:
        assert versions["six"] == "1.17.0"
    assert result["importable"] == [], f"{name} imported what it did not declare"
