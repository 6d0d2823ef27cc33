"""Plugin manifests (`plugin.toml`), validated by pydantic.

A manifest that fails validation raises `ManifestError`, whose message names
the file and the field that is wrong; discovery reports it and moves on.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Annotated, Any

import jsonschema
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator

from host.requirements import check_dependency
from sandbox.limits import PluginLimits

NAME_PATTERN = r"^[a-z0-9_-]{1,64}$"
ENTRYPOINT_PATTERN = r"^[A-Za-z_][A-Za-z0-9_.]*:[A-Za-z_][A-Za-z0-9_]*$"


class ManifestError(Exception):
    """A plugin manifest that cannot be used; the message names file and field."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


# PEP 508: a name, extras, a version specifier and markers; no URL or path
# (`pkg @ https://...`) and nothing an installer would take for an option.
Pep508 = Annotated[str, AfterValidator(check_dependency)]


class LimitsSection(BaseModel):
    model_config = ConfigDict(extra="forbid")

    timeout_s: float | None = Field(default=None, gt=0)
    memory_mb: int | None = Field(default=None, gt=0)


class Manifest(BaseModel):
    """The validated content of one `plugin.toml`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = Field(pattern=NAME_PATTERN)
    version: str = Field(min_length=1, max_length=64)
    entrypoint: str = Field(pattern=ENTRYPOINT_PATTERN)
    description: str = Field(default="", max_length=500)
    limits: LimitsSection = LimitsSection()
    # PEP 508 strings: the packages the plugin imports, installed into an
    # environment of its own (host.environments), never the host's.
    dependencies: tuple[Pep508, ...] = ()
    # A JSON Schema for payload["options"], checked before every call.
    options: dict[str, Any] | None = None
    # The crash suite's expectations; ignored by the host itself.
    expect: dict[str, Any] | None = None

    @field_validator("options")
    @classmethod
    def _json_schema(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is not None:
            try:
                jsonschema.Draft202012Validator.check_schema(value)
            except jsonschema.SchemaError as exc:
                where = "/".join(str(p) for p in exc.path) or "(top level)"
                raise ValueError(f"not a valid JSON Schema at {where}: {exc.message}") from None
        return value

    @property
    def plugin_limits(self) -> PluginLimits:
        return PluginLimits(timeout_s=self.limits.timeout_s, memory_mb=self.limits.memory_mb)


def describe_errors(error: ValidationError) -> list[str]:
    """One line per problem, each naming its field."""
    parts = []
    for item in error.errors():
        field = ".".join(str(p) for p in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "is not a manifest field (check its spelling, or remove it)"
        parts.append(f"field '{field}': {message}")
    return parts


def _describe(error: ValidationError) -> str:
    return "; ".join(describe_errors(error))


def parse_manifest(path: Path, data: dict[str, Any]) -> Manifest:
    """Validate manifest `data` read from `path`. Raises ManifestError."""
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        raise ManifestError(path, _describe(exc)) from exc


def load_manifest(path: Path, code_dir: Path | None = None, expect: str | None = None) -> Manifest:
    """Read and validate one `plugin.toml`. Raises ManifestError.

    `code_dir` is where the entrypoint module must be found (default: beside
    the manifest); `expect` is the entrypoint it must name, when something
    else (an entry point) names it too.
    """
    try:
        with path.open("rb") as stream:
            data = tomllib.load(stream)
    except OSError as exc:
        raise ManifestError(path, f"cannot be read: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(path, f"is not valid TOML: {exc}") from exc
    manifest = parse_manifest(path, data)
    if expect is not None and manifest.entrypoint != expect:
        raise ManifestError(
            path,
            f"field 'entrypoint': {manifest.entrypoint!r} differs from {expect!r}; both must "
            f'name the same class: set entrypoint = "{expect}" in this file',
        )
    where = path.parent if code_dir is None else code_dir
    module = manifest.entrypoint.split(":")[0].split(".")[0]
    if not (where / f"{module}.py").is_file() and not (where / module).is_dir():
        raise ManifestError(path, f"field 'entrypoint': module '{module}' not found in {where}")
    return manifest
