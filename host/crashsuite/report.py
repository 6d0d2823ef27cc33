"""What a crash-suite run found: one `CaseReport` per case, a `SuiteReport`
for the run, and the three ways to print it (table, JSON, JUnit XML)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

PASS, FAIL, NOT_DEFENDED = "pass", "FAIL", "not defended"


@dataclass
class CaseReport:
    name: str
    category: str
    expected: list[str]
    observed: str
    verdict: str
    seconds: float
    leftover_processes: int | None
    leftover_fds: int | None
    rss_change_mb: float | None
    problems: list[str] = field(default_factory=list)
    message: str = ""


@dataclass
class SuiteReport:
    protections: dict[str, bool]
    cases: list[CaseReport]
    benign_calls: int
    benign_failures: list[str]
    # Every case's timeout and the suite's own waits were multiplied by this
    # (a slow or emulated machine); what each case expects is unchanged.
    time_scale: float = 1.0

    @property
    def failed(self) -> list[CaseReport]:
        return [c for c in self.cases if c.verdict == FAIL]

    @property
    def ok(self) -> bool:
        """True when no case broke containment and every benign call succeeded."""
        return not self.failed and not self.benign_failures

    def summary(self) -> dict[str, int]:
        return {
            "cases": len(self.cases),
            "passed": sum(c.verdict == PASS for c in self.cases),
            "failed": len(self.failed),
            "not_defended": sum(c.verdict == NOT_DEFENDED for c in self.cases),
            "benign_calls": self.benign_calls,
            "benign_failures": len(self.benign_failures),
        }

    @property
    def missing_layers(self) -> list[str]:
        """Isolation layers missing or switched off in the sandbox the cases ran in."""
        return [name for name, on in self.protections.items() if not on]


def _row(c: CaseReport) -> tuple[str, ...]:
    return (
        c.name,
        c.category,
        " | ".join(c.expected),
        c.observed,
        c.verdict,
        f"{c.seconds:.2f}s",
        str(c.leftover_processes),
        "-" if c.leftover_fds is None else str(c.leftover_fds),
        "-" if c.rss_change_mb is None else f"{c.rss_change_mb:+.1f}",
    )


def format_table(report: SuiteReport) -> str:
    header = ("CASE", "CATEGORY", "EXPECTED", "OBSERVED", "VERDICT", "TIME", "PROCS", "FDS")
    rows = [(*header, "RSS Δ MB"), *map(_row, report.cases)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header) + 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    for c in report.cases:
        if c.problems and c.verdict != PASS:
            lines.append(f"  {c.verdict}: {c.name}: {'; '.join(c.problems)}")
    active = [name for name, on in report.protections.items() if on]
    lines.append(f"isolation layers active: {', '.join(active) or 'none'}")
    lines.append(f"missing or off: {', '.join(report.missing_layers) or 'none'}")
    if report.time_scale != 1:
        lines.append(
            f"time scale: x{report.time_scale:g} (every case's timeout and the suite's waits; "
            "the verdicts expected are unchanged)"
        )
    s = report.summary()
    lines.append(
        f"{s['passed']} passed, {s['failed']} failed, {s['not_defended']} not defended here; "
        f"benign calls {s['benign_calls'] - s['benign_failures']}/{s['benign_calls']} succeeded"
    )
    for failure in report.benign_failures:
        lines.append(f"  benign call failed {failure}")
    return "\n".join(lines)


def to_json(report: SuiteReport) -> dict[str, Any]:
    return {
        "summary": report.summary(),
        "ok": report.ok,
        "protections": report.protections,
        "time_scale": report.time_scale,
        "benign_failures": report.benign_failures,
        "cases": [asdict(c) for c in report.cases],
    }


def _junit_case(suite: ET.Element, c: CaseReport) -> None:
    case = ET.SubElement(
        suite,
        "testcase",
        classname=f"crash_suite.{c.category}",
        name=c.name,
        time=f"{c.seconds:.3f}",
    )
    if c.verdict == FAIL:
        failure = ET.SubElement(
            case, "failure", message="; ".join(c.problems)[:500], type="containment"
        )
        failure.text = json.dumps(asdict(c), indent=2)
    elif c.verdict == NOT_DEFENDED:
        ET.SubElement(case, "skipped", message="; ".join(c.problems)[:500])


def to_junit(report: SuiteReport) -> str:
    s = report.summary()
    root = ET.Element("testsuites", name="plughost")
    suite = ET.SubElement(
        root,
        "testsuite",
        name="plughost-crash-suite",
        tests=str(s["cases"] + 1),
        failures=str(s["failed"] + (1 if report.benign_failures else 0)),
        skipped=str(s["not_defended"]),
        errors="0",
        time=f"{sum(c.seconds for c in report.cases):.3f}",
    )
    for c in report.cases:
        _junit_case(suite, c)
    benign = ET.SubElement(
        suite, "testcase", classname="crash_suite.benign", name="benign_calls_keep_succeeding"
    )
    if report.benign_failures:
        ET.SubElement(
            benign, "failure", message="; ".join(report.benign_failures)[:500], type="availability"
        )
    return ET.tostring(root, encoding="unicode", xml_declaration=True)


def write_reports(report: SuiteReport, json_path: str | None, junit_path: str | None) -> None:
    if json_path:
        Path(json_path).write_text(json.dumps(to_json(report), indent=2))
    if junit_path:
        Path(junit_path).write_text(to_junit(report))
