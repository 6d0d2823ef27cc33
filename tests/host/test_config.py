"""Where a host keeps its state: a documented directory, never the current
directory by accident."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from host.config import ConfigError, Settings, default_state_dir, load_settings


def test_a_system_service_keeps_its_jobs_in_var_lib(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert Settings().job_db == "/var/lib/plughost/jobs.sqlite3"


def test_a_user_keeps_its_jobs_in_its_xdg_state_home(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path))
    assert default_state_dir() == str(tmp_path / "plughost")
    monkeypatch.delenv("XDG_STATE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert Settings().job_db == str(tmp_path / ".local/state/plughost/jobs.sqlite3")


def test_state_dir_and_db_path_come_from_flags_and_environment(tmp_path: Path) -> None:
    settings = load_settings(environ={"PLUGHOST_STATE_DIR": str(tmp_path)})
    assert settings.job_db == str(tmp_path / "jobs.sqlite3")
    settings = load_settings(environ={}, overrides={"db_path": str(tmp_path / "x.db")})
    assert settings.job_db == str(tmp_path / "x.db")
    assert not Settings().job_db.startswith(os.getcwd())


def test_db_sync_is_a_setting_that_the_environment_still_sets(tmp_path: Path) -> None:
    from host.config import ConfigError
    from host.services import SQLiteJobStore
    from host.services.build import build_services

    assert load_settings(environ={}).db_sync == "NORMAL"
    settings = load_settings(environ={"PLUGHOST_DB_SYNC": "full"})
    assert settings.db_sync == "FULL"
    with pytest.raises(ConfigError, match="db_sync"):
        load_settings(environ={"PLUGHOST_DB_SYNC": "sometimes"})
    with pytest.raises(ValueError, match="NORMAL or FULL"):
        SQLiteJobStore(tmp_path / "bad.sqlite3", synchronous="OFF")
    settings = load_settings(environ={"PLUGHOST_DB_SYNC": "FULL", "PLUGHOST_PREWARM": "0"})
    services = build_services(settings.model_copy(update={"db_path": str(tmp_path / "j.db")}))
    try:
        store = services.jobs.store
        assert isinstance(store, SQLiteJobStore)
        # PRAGMA synchronous: 1 is NORMAL, 2 is FULL.
        assert store._db.execute("PRAGMA synchronous").fetchone()[0] == 2
    finally:
        services.jobs.shutdown(timeout_s=5)
        services.plugins.close()


def test_a_client_token_may_carry_a_name_and_plain_tokens_still_work() -> None:
    settings = load_settings(
        environ={"PLUGHOST_CLIENT_TOKENS": "alice=s3cret-a, plain-token ,padded==,bob=s3cret-b"}
    )
    assert settings.client_tokens == ["s3cret-a", "plain-token", "padded==", "s3cret-b"]
    assert settings.client_names == {"s3cret-a": "alice", "s3cret-b": "bob"}
    from_file = Settings(client_tokens=["carol=tok=with=equals"])
    assert from_file.client_names == {"tok=with=equals": "carol"}


@pytest.mark.parametrize(
    ("entries", "wrong"),
    [
        ("bad name=s3cret-token", "entry 1 reads as name=token"),
        ("ok=s3cret-a,ok=s3cret-b", "the name 'ok' is given to two tokens"),
        ("x/y+z=s3cret-token", "entry 1 reads as name=token"),
        # Names the host gives principals itself: a client would pass for another in logs.
        ("admin=s3cret-token", "the name 'admin' is how the host names"),
        ("ok=s3cret-a,anonymous=s3cret-b", "entry 2: the name 'anonymous' is how"),
        ("client-0123456789abcdef=s3cret-token", "is how the host names"),
    ],
)
def test_a_bad_client_name_is_refused_without_quoting_the_token(entries: str, wrong: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(environ={"PLUGHOST_CLIENT_TOKENS": entries})
    assert wrong in str(refused.value) and "s3cret" not in str(refused.value)


def test_callback_networks_must_be_cidrs() -> None:
    from host.config import ConfigError, load_settings

    settings = load_settings(environ={"PLUGHOST_CALLBACK_ALLOW_NETWORKS": "10.0.0.0/8,fd00::/8"})
    assert settings.callback_allow_networks == ["10.0.0.0/8", "fd00::/8"]
    with pytest.raises(ConfigError, match="not a network in CIDR form"):
        load_settings(environ={"PLUGHOST_CALLBACK_ALLOW_NETWORKS": "10.0.0.0/33"})
