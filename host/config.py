"""Host configuration: one pydantic model, read from a TOML file, environment
variables (`PLUGHOST_<FIELD>`, lists comma-separated) and command-line flags,
later sources winning.

Defaults bind the server to 127.0.0.1 and leave the API open; set
`client_tokens` / `admin_token` to require bearer tokens. Each client token
is a principal that sees only its own jobs (with no client tokens everyone is
"anonymous"); the admin token sees every job, and the admin routes are closed
until it is set. A client token written `name=token` carries a name the
console and the logs show; the principal stays the token's digest, so
naming a token later keeps its jobs.

What the job store keeps is bounded: `job_retention_s` (age of finished
jobs), `max_db_bytes` (size of the database: over it the oldest finished jobs
are pruned), `max_jobs_per_client` and `max_stored_bytes_per_client` (jobs and
stored input+result bytes per principal; a new job makes room by dropping
the principal's oldest finished jobs, a 64th of the job quota at once, and
gets 429 `quota_exceeded` only when its unfinished jobs alone fill the
quota), and `max_list_bytes`
(serialized jobs per `GET /v1/jobs` page, and items per `GET /v1/batches/{id}`
page; the page says where the next one starts). `max_batch_items` is the most
images one `POST /v1/batches` may hold (each item is a job, and counts
against the quota). `self_check` runs
a few crash-suite probes at start-up (reported at /readyz);
`require_containment` makes the server refuse to start if one fails.
`isolation` is "standard" (apply every layer the machine offers, warn about
the others) or "strict" (refuse to run plugins while a layer is missing);
`disable_layers` switches layers off by name (see `sandbox.supervisor.OPTIONAL_LAYERS`).
`prewarm` keeps that many children set up and waiting per plugin recently
called, so a call pays a hand-over instead of a start (0 turns it off).

Completion callbacks (docs/callbacks.md) are off until `callback_allow`
names the hosts a job's `callback_url` may point at: `hooks.example.com`,
`*.example.com` (any subdomain), either with `:port` to allow that port
only, or `*` for any host. Even then a destination that resolves to a
loopback, link-local (cloud metadata), private, unspecified, multicast or
reserved address is refused, unless it lies in one of the CIDRs of
`callback_allow_networks`; the host's own listening port on its own
addresses is refused always. `callback_max_attempts` attempts are made,
`callback_backoff_s` * 2^n apart, each within `callback_timeout_s`.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

ENV_PREFIX = "PLUGHOST_"
MiB = 1024 * 1024
# The name of a client token written `name=token`: shown, never a secret.
CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
# Names the host gives principals itself (host/api/auth.py): a client named
# so would pass for the admin, an anonymous caller or another client in logs.
RESERVED_NAMES = frozenset({"admin", "anonymous"})


def _named(entry: str, position: int) -> tuple[str | None, str]:
    """(name, token) of one `client_tokens` entry: `name=token`, or a plain
    token (which may end in `=` padding). Raises ValueError naming the
    entry's position, never its text: a token is a secret."""
    name, equals, token = entry.partition("=")
    if not equals or not token or token.startswith("="):
        return None, entry
    if not CLIENT_NAME.fullmatch(name):
        raise ValueError(
            f"client_tokens entry {position} reads as name=token, and its name is not 1 to"
            " 64 letters, digits, '.', '_' or '-' (a plain token may hold '=' only as"
            " trailing padding)"
        )
    if name in RESERVED_NAMES or re.fullmatch(r"client-[0-9a-f]{16}", name):
        raise ValueError(
            f"client_tokens entry {position}: the name {name!r} is how the host names the"
            " admin, anonymous callers or an unnamed client: choose another"
        )
    return name, token


def default_state_dir() -> str:
    """Where a host keeps its job database: /var/lib/plughost for a system
    service (root), $XDG_STATE_HOME/plughost (~/.local/state/plughost) for a
    user; never the current directory by accident."""
    if os.geteuid() == 0:
        return "/var/lib/plughost"
    base = os.environ.get("XDG_STATE_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "state"
    )
    return os.path.join(base, "plughost")


class ConfigError(Exception):
    """Configuration that cannot be used; the message names the source and field."""


class Settings(BaseModel):
    """Every tunable of the server, with its default."""

    model_config = ConfigDict(extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    plugins_dirs: list[str] = Field(default_factory=list)
    state_dir: str = Field(default_factory=default_state_dir)
    db_path: str | None = None  # default: <state_dir>/jobs.sqlite3
    default_plugin: str = "image_info"
    workers: int = Field(default_factory=lambda: os.cpu_count() or 2, ge=1, le=256)
    queue_size: int = Field(default=32, ge=0, le=100_000)
    quarantine_threshold: int = Field(default=3, ge=1)
    quarantine_cooldown_s: float = Field(default=60.0, gt=0)
    job_retention_s: float = Field(default=7 * 24 * 3600, gt=0)
    max_db_bytes: int = Field(default=1024 * MiB, ge=MiB)
    max_jobs_per_client: int = Field(default=1000, ge=1)
    max_stored_bytes_per_client: int = Field(default=256 * MiB, ge=MiB)
    max_list_bytes: int = Field(default=4 * MiB, ge=64 * 1024)
    max_batch_items: int = Field(default=100, ge=1, le=10_000)
    max_request_bytes: int = Field(default=32 * 1024 * 1024, ge=1024)
    client_tokens: list[str] = Field(default_factory=list)
    admin_token: str | None = None
    log_level: str = "info"
    self_check: bool = True
    require_containment: bool = False
    isolation: Literal["standard", "strict"] = "standard"
    prewarm: int = Field(default=1, ge=0, le=8)
    # The plugins' own environments (host/environments.py); default <state_dir>/envs.
    env_dir: str | None = None
    # Plugins whose packages may be built from source (running the packages'
    # build code as the host's user); "*" for every plugin. Wheels only otherwise.
    allow_source_builds: list[str] = Field(default_factory=list)
    # A root server becomes this user once the sandbox is set up (host/privileges.py).
    user: str | None = None
    disable_layers: list[str] = Field(default_factory=list)
    # SQLite's synchronous setting for the job database: NORMAL survives the
    # server being killed at any point, FULL a power cut too (an fsync per commit).
    db_sync: Literal["NORMAL", "FULL"] = "NORMAL"

    # Multi-node deployment (docs/scale-out.md). With a postgresql:// URL the
    # jobs, quarantine and plugin statistics live in PostgreSQL and jobs run
    # on `plughost worker` nodes (each running `workers` sandboxes at once);
    # without it the server is the embedded single node with SQLite.
    database_url: str | None = Field(default=None, pattern=r"^postgres(ql)?://")
    max_attempts: int = Field(default=3, ge=1, le=100)  # runs of a job whose node died
    heartbeat_s: float = Field(default=2.0, gt=0, le=60)  # a node's heartbeat period
    stalled_after_s: float = Field(default=10.0, gt=0)  # silent this long: the node is dead

    # Request bounds and connection limits (see README, Configuration).
    options_max_depth: int = Field(default=16, ge=1, le=64)
    options_max_items: int = Field(default=10_000, ge=1)
    options_max_string_bytes: int = Field(default=64 * 1024, ge=1)
    header_timeout_s: float = Field(default=10.0, gt=0)
    body_timeout_s: float = Field(default=30.0, gt=0)
    max_connections: int = Field(default=256, ge=1)
    log_repeat_limit: int = Field(default=10, ge=1)
    log_repeat_interval_s: float = Field(default=10.0, gt=0)

    # The console (host/console/session.py). A session lasts this long after
    # sign-in; its cookie is Secure when served over HTTPS, or as set here
    # (True behind a TLS proxy that does not send X-Forwarded-Proto). Sign-in
    # forms must come from `console_origin` (default: the origin the request
    # names in its Host header). Wrong tokens: `console_login_failures` per
    # `console_login_window_s` per client address, then 429 until the window ends.
    console_session_s: float = Field(default=8 * 3600, gt=0)
    console_secure_cookie: bool | None = None
    console_origin: str | None = Field(default=None, pattern=r"^https?://[^/?#]+$")
    console_login_failures: int = Field(default=5, ge=1)
    console_login_window_s: float = Field(default=60.0, gt=0)

    # Completion callbacks (see the module docstring and docs/callbacks.md).
    callback_allow: list[str] = Field(default_factory=list)
    callback_allow_networks: list[str] = Field(default_factory=list)
    callback_max_attempts: int = Field(default=8, ge=1, le=30)
    callback_backoff_s: float = Field(default=1.0, gt=0, le=3600)
    callback_timeout_s: float = Field(default=5.0, gt=0, le=60)

    @property
    def job_db(self) -> str:
        """The SQLite job database: `db_path`, or jobs.sqlite3 in `state_dir`."""
        return self.db_path or os.path.join(self.state_dir, "jobs.sqlite3")

    @property
    def plugin_envs(self) -> str:
        """Where the plugins' environments live: `env_dir`, or envs/ in `state_dir`."""
        return self.env_dir or os.path.join(self.state_dir, "envs")

    @field_validator("db_sync", mode="before")
    @classmethod
    def _upper(cls, value: Any) -> Any:
        return value.upper() if isinstance(value, str) else value

    @field_validator(
        "client_tokens",
        "plugins_dirs",
        "disable_layers",
        "allow_source_builds",
        "callback_allow",
        "callback_allow_networks",
        mode="before",
    )
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("callback_allow_networks")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for network in value:
            try:
                ipaddress.ip_network(network, strict=False)
            except ValueError as exc:
                raise ValueError(f"{network!r} is not a network in CIDR form ({exc})") from exc
        return value

    # Plugin names are unique (host/discovery.py): the first plugin found
    # keeps a name. This maps a name to the directory of the plugin that
    # wins instead, e.g. {"image_info" = "/srv/plugins/image_info"};
    # PLUGHOST_PLUGIN_OVERRIDES=image_info=/srv/plugins/image_info,other=/dir.
    plugin_overrides: dict[str, str] = Field(default_factory=dict)

    # Client tokens' names (`name=token` entries), by token: display only.
    _client_names: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _client_names_of_entries(self) -> Settings:
        """Split `name=token` entries: `client_tokens` keeps the tokens,
        `client_names` their names. Raises ValueError on a bad or repeated name."""
        tokens: list[str] = []
        names: dict[str, str] = {}
        for position, entry in enumerate(self.client_tokens, 1):
            name, token = _named(entry, position)
            if name is not None:
                if name in names.values():
                    raise ValueError(f"client_tokens: the name {name!r} is given to two tokens")
                if names.get(token, name) != name:
                    raise ValueError(f"client_tokens entry {position}: a token named twice")
                names[token] = name
            tokens.append(token)
        self.client_tokens, self._client_names = tokens, names
        return self

    @property
    def client_names(self) -> dict[str, str]:
        """The configured name of each named client token, by token."""
        return dict(self._client_names)

    @field_validator("plugin_overrides", mode="before")
    @classmethod
    def _pairs(cls, value: Any) -> Any:
        if isinstance(value, str):
            pairs = [part.partition("=") for part in value.split(",") if part.strip()]
            return {name.strip(): directory.strip() for name, _, directory in pairs}
        return value


def _describe(source: str, error: ValidationError) -> str:
    parts = [
        f"{'.'.join(str(p) for p in item['loc']) or '(top level)'}: {item['msg']}"
        for item in error.errors()
    ]
    return f"{source}: " + "; ".join(parts)


def load_settings(
    config_file: str | Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Settings:
    """Merge file, environment and overrides (None values ignored). Raises ConfigError."""
    data: dict[str, Any] = {}
    if config_file is not None:
        path = Path(config_file)
        try:
            with path.open("rb") as stream:
                data.update(tomllib.load(stream))
        except OSError as exc:
            raise ConfigError(f"{path}: cannot be read: {exc.strerror}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path}: is not valid TOML: {exc}") from exc
        try:
            Settings.model_validate(data)
        except ValidationError as exc:
            raise ConfigError(_describe(str(path), exc)) from exc
    env = os.environ if environ is None else environ
    for name in Settings.model_fields:
        key = ENV_PREFIX + name.upper()
        if key in env:
            data[name] = env[key]
    for name, value in (overrides or {}).items():
        if value is not None and value != []:
            data[name] = value
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe("configuration", exc)) from exc
