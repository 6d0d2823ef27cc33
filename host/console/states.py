"""What each state badge of the console says, means, and asks of the reader.

A plugin is shown in one condition. The registry keeps the state its last
call left (SPEC section 4: IDLE, SUCCESS, ERROR, FAILED, UNAVAILABLE), and
lifting a quarantine does not change it: the state stays UNAVAILABLE until
the next call. A plugin whose environment keeps every call from running
(its declared packages being installed, never installed, or failed to
install) is shown by that instead: its calls are refused before they start
and leave the state as it was, so it would read IDLE while it cannot run.

    environment preparing / missing / failed   -> PREPARING / NOT PREPARED / CANNOT RUN
    else the registry's state, with a note      -> quarantined, or quarantine over
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Badge:
    """A condition's badge: its text, its colour class and its explanation."""

    label: str
    tone: str  # the CSS class: state-<tone>
    meaning: str
    action: str

    @property
    def explanation(self) -> str:
        return f"{self.meaning} {self.action}"


BADGES: dict[str, Badge] = {
    "IDLE": Badge(
        "IDLE",
        "idle",
        "Registered and ready, not called since the host started.",
        "Nothing to do.",
    ),
    "SUCCESS": Badge("SUCCESS", "success", "Its last call returned a result.", "Nothing to do."),
    "ERROR": Badge(
        "ERROR",
        "error",
        "Its last call failed in the plugin's own code: it raised, or returned"
        " something that is not a JSON object, or a result over the output limit.",
        "Read the recent outcomes; the plugin's author fixes the code or the input.",
    ),
    "FAILED": Badge(
        "FAILED",
        "failed",
        "The plugin could not be loaded: an import error or a bad entrypoint.",
        "The admin reads the error in the recent outcomes, fixes the plugin and reloads.",
    ),
    "UNAVAILABLE": Badge(
        "UNAVAILABLE",
        "unavailable",
        "Its last call was stopped by the sandbox (timeout, memory limit, crash, garbage"
        " on the pipe) or refused while the plugin was quarantined; repeated in a row,"
        " these quarantine the plugin for a cool-down.",
        "Read the recent outcomes; raise the plugin's limits or fix the plugin.",
    ),
    "PREPARING": Badge(
        "PREPARING",
        "preparing",
        "Its declared packages are being installed; calls are refused until they are.",
        "Wait: the badge turns IDLE when the environment is ready.",
    ),
    "NOT PREPARED": Badge(
        "NOT PREPARED",
        "unavailable",
        "Its declared packages are not installed; every call is refused.",
        "The operator runs `plughost plugins prepare`.",
    ),
    "CANNOT RUN": Badge(
        "CANNOT RUN",
        "unavailable",
        "Its declared packages could not be installed; every call is refused.",
        "The admin reads the installer's output on the plugin's page, fixes the"
        " requirements or the package index, and prepares it again.",
    ),
}
QUARANTINED = (
    "Quarantined: refused at once until the countdown ends or the admin lifts it, after"
    " several unavailable outcomes in a row."
)
QUARANTINE_OVER = (
    "The quarantine was lifted or ran out. The state is still the one its last call"
    " left (UNAVAILABLE): the next call will tell."
)
# The environment statuses that keep every call from running, by badge.
BLOCKING = {"preparing": "PREPARING", "missing": "NOT PREPARED", "failed": "CANNOT RUN"}


def condition(described: dict[str, Any]) -> dict[str, Any]:
    """How a plugin described by `PluginManagementService.describe` is shown:
    `badge` (label, tone, explanation), `runnable` (False while its
    environment refuses every call), `quarantined` and `quarantine_over`
    (its quarantine ended while its state still says UNAVAILABLE)."""
    environment = described.get("environment") or {}
    blocking = BLOCKING.get(str(environment.get("status")))
    quarantine = described["quarantine"]
    state = str(described["state"])
    over = (
        state == "UNAVAILABLE"
        and not quarantine["quarantined"]
        and quarantine["times_quarantined"] > 0
        and quarantine["unavailable_streak"] == 0
    )
    badge = BADGES[blocking] if blocking else BADGES.get(state, BADGES["UNAVAILABLE"])
    return {
        "label": badge.label,
        "tone": badge.tone,
        "explanation": badge.explanation,
        "runnable": blocking is None,
        "quarantined": bool(quarantine["quarantined"]),
        "quarantine_over": over,
    }


def legend() -> list[dict[str, str]]:
    """Every badge with what it means and what to do, for the page's legend."""
    return [
        {"label": b.label, "tone": b.tone, "meaning": b.meaning, "action": b.action}
        for b in BADGES.values()
    ]
