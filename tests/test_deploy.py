"""The shipped systemd unit is one systemd accepts as it is."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from host.deployfiles import DeployError, systemd_unit

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "docs" / "systemd" / "plughost.service"


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="no systemd-analyze here")
def test_systemd_unit_verifies_without_a_warning(tmp_path: Path) -> None:
    # As `plughost deploy systemd` writes it: ExecStart= this install's plughost.
    unit = tmp_path / "plughost.service"
    unit.write_text(systemd_unit())
    assert f"ExecStart={Path(sys.executable).with_name('plughost')} serve" in unit.read_text()
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert "ignoring" not in result.stderr and "Unknown" not in result.stderr, result.stderr


def test_systemd_unit_keeps_what_the_sandbox_needs() -> None:
    settings = dict(
        line.split("=", 1)
        for line in UNIT.read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    assert settings["Delegate"] == "yes" and settings["StateDirectory"] == "plughost"
    assert settings["User"] != "root" and settings["NoNewPrivileges"] == "yes"
    # Each of these would take a layer away from every call.
    for breaking in ("RestrictNamespaces", "PrivateUsers", "ProtectControlGroups"):
        assert breaking not in settings, breaking


def test_the_unit_runs_as_the_account_asked_for_and_refuses_a_bad_name() -> None:
    unit = systemd_unit("svc-plug")
    assert "\nUser=svc-plug\n" in unit and "\nGroup=svc-plug\n" in unit
    assert "User=plughost" not in unit
    with pytest.raises(DeployError, match="not a user name"):
        systemd_unit("root\nExecStartPre=/bin/sh")


def test_an_install_path_with_a_space_or_percent_stays_one_word(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    venv = tmp_path / "my venv%i" / "bin"
    venv.mkdir(parents=True)
    (venv / "plughost").write_text("")
    monkeypatch.setattr(sys, "executable", str(venv / "python"))
    assert f'ExecStart="{venv}/plughost" serve'.replace("%", "%%") in systemd_unit()
    newline = tmp_path / "a\nExecStartPre=" / "bin"
    newline.mkdir(parents=True)
    (newline / "plughost").write_text("")
    monkeypatch.setattr(sys, "executable", str(newline / "python"))
    with pytest.raises(DeployError, match="cannot be written into a unit"):
        systemd_unit()
