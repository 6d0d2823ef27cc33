"""The layer registry: every list of layer names comes from it, and the
policy that turns what a machine offers into what calls get is a pure
function of its inputs."""

from __future__ import annotations

import tomllib

import pytest

from host.discovery import BUNDLED_DIR
from sandbox import supervisor
from sandbox.layers import (
    ALWAYS_ON,
    DEPENDS_ON_PRIVILEGE_DROP,
    LAYERS,
    OPTIONAL_LAYERS,
    UNSHARE_FLAGS,
    missing,
    protections,
    resolve,
    shortfall,
)

EVERYTHING = dict.fromkeys(OPTIONAL_LAYERS, True)


def test_every_layer_is_declared_once_with_what_it_needs_and_does() -> None:
    names = [layer.name for layer in LAYERS]
    assert len(names) == len(set(names))
    for layer in LAYERS:
        assert layer.needs and layer.detected and layer.host and layer.child, layer.name
        assert (layer.probe is not None) == layer.optional, layer.name
    assert supervisor.OPTIONAL_LAYERS == OPTIONAL_LAYERS
    assert set(UNSHARE_FLAGS) <= set(DEPENDS_ON_PRIVILEGE_DROP)


def test_a_root_host_gets_every_layer_it_has_and_no_user_namespace() -> None:
    found = EVERYTHING | {"user_namespace": False}
    active = resolve(found, disabled=(), cgroup_v2=False)
    assert active == found
    assert missing(active) == []


def test_an_unprivileged_host_without_user_namespaces_gets_no_namespace() -> None:
    found = EVERYTHING | {"privilege_drop": False, "user_namespace": False}
    active = resolve(found, disabled=(), cgroup_v2=False)
    assert not any(active[name] for name in DEPENDS_ON_PRIVILEGE_DROP)
    assert set(missing(active)) == {"privilege_drop", "user_namespace", *DEPENDS_ON_PRIVILEGE_DROP}


def test_disabled_layers_are_off_and_reported_missing() -> None:
    active = resolve(EVERYTHING, disabled=["seccomp", "landlock"], cgroup_v2=False)
    assert active["seccomp"] is False and active["landlock"] is False
    assert {"seccomp", "landlock"} <= set(missing(active))


def test_an_unprivileged_host_is_warned_once_per_cause_with_what_adds_the_layers() -> None:
    # A user-namespace host on cgroup v2 without a delegated cgroup.
    found = EVERYTHING | {"privilege_drop": False, "cgroup_memory": False, "cgroup_pids": False}
    active = resolve(found, disabled=(), cgroup_v2=False)
    notes, warnings = shortfall(active, disabled=())
    # privilege_drop is never there for this kind of host: a note, not a warning.
    assert len(notes) == 1 and "privilege_drop" in notes[0] and "user_namespace" in notes[0]
    assert len(warnings) == 1
    assert "cgroup_memory, cgroup_pids are not available" in warnings[0]
    assert "Delegate=yes" in warnings[0]
    assert not any("privilege_drop" in line for line in warnings)


def test_without_user_namespaces_the_missing_privilege_drop_is_a_warning() -> None:
    found = EVERYTHING | {"privilege_drop": False, "user_namespace": False}
    notes, warnings = shortfall(resolve(found, disabled=(), cgroup_v2=False), disabled=())
    assert notes == []
    assert len(warnings) == 1 and "privilege_drop" in warnings[0]
    assert all(name in warnings[0] for name in DEPENDS_ON_PRIVILEGE_DROP)


def test_switched_off_layers_are_one_warning_apart_from_missing_ones() -> None:
    found = EVERYTHING | {"landlock": False}
    active = resolve(found, disabled=["seccomp", "tmpfs_scratch"], cgroup_v2=False)
    notes, warnings = shortfall(active, disabled=["seccomp", "tmpfs_scratch"])
    assert notes == []
    assert warnings == [
        "isolation layers tmpfs_scratch, seccomp are switched off; calls run without them",
        "isolation layer landlock is not available here; calls run without it"
        " (docs/deploy.md says what each needs)",
    ]


@pytest.mark.parametrize("v2", [True, False])
def test_cgroups_come_from_v2_only_where_v1_has_none(v2: bool) -> None:
    found = EVERYTHING | {"cgroup_memory": False, "cgroup_pids": False}
    active = resolve(found, disabled=["cgroup_pids"], cgroup_v2=v2)
    assert active["cgroup_memory"] is v2 and active["cgroup_pids"] is False


def test_protections_list_the_always_on_layers_first_and_omit_an_unused_user_namespace() -> None:
    active = resolve(EVERYTHING | {"user_namespace": False}, disabled=(), cgroup_v2=False)
    reported = protections(active)
    assert list(reported)[: len(ALWAYS_ON)] == list(ALWAYS_ON)
    assert "user_namespace" not in reported and all(reported.values())


def test_every_layer_a_crash_case_requires_is_in_the_registry() -> None:
    known = {layer.name for layer in LAYERS}
    required = set()
    for manifest in (BUNDLED_DIR / "hostile").glob("*/plugin.toml"):
        expect = tomllib.loads(manifest.read_text()).get("expect", {})
        for requirement in expect.get("requires", []):
            required.update(requirement.split("|"))
    assert required, "no crash case names a layer"
    assert required <= known, sorted(required - known)
