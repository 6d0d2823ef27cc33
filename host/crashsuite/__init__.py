"""The crash suite: hostile plugins run against the host to prove containment.

Each case is an ordinary plugin directory (bundled ones in `plugins/hostile/`)
whose manifest carries an `[expect]` table::

    [expect]
    category = "memory"
    outcome = ["PluginError:memory_limit"]       # "Type:reason", or "success"
    requires = ["network_namespace"]             # layers its defence needs ("a|b": either)
    claims = ["host_alive", "no_process_left"]   # optional; default: all of CLAIMS
                                                 # (plus "no_host_path" where listed)

    cases.py     the corpus: Case, load_cases; scaled and write_corpus (more time
                 for a slow machine)
    targets.py   where cases run: LocalTarget (a ToolRunner on a given sandbox),
                 HttpTarget (a running server's /v1/analyze)
    claims.py    one case run and its claims checked: run_case
    evidence.py  what an escape case compares with to prove it reached the
                 host's: identities of host files and of the host process,
                 a planted marker with a nonce
    report.py    CaseReport, SuiteReport; table, JSON and JUnit output
    runner.py    run_suite (benign calls around the cases), run_warm, self_check
    compat.py    the compatibility corpus (`plugins/compat/`): ordinary plugins
                 on the libraries image plugins use, each with the result its
                 `[expect] result` table names; `crash-suite --compat`

Benign calls run before, between and after the hostile ones and must keep
succeeding.
"""

from host.crashsuite.cases import (
    CLAIMS,
    HOSTILE_DIR,
    Case,
    load_cases,
    scaled,
    scaled_plugin,
    write_corpus,
)
from host.crashsuite.claims import run_case
from host.crashsuite.compat import COMPAT_DIR, format_compat, load_compat, run_compat
from host.crashsuite.report import (
    CaseReport,
    SuiteReport,
    format_table,
    to_json,
    to_junit,
    write_reports,
)
from host.crashsuite.runner import PROBES, run_suite, run_warm, sample_png, self_check
from host.crashsuite.targets import HttpTarget, LocalTarget, Target

__all__ = [
    "CLAIMS",
    "COMPAT_DIR",
    "HOSTILE_DIR",
    "PROBES",
    "Case",
    "CaseReport",
    "HttpTarget",
    "LocalTarget",
    "SuiteReport",
    "Target",
    "format_compat",
    "format_table",
    "load_cases",
    "load_compat",
    "run_case",
    "run_compat",
    "run_suite",
    "run_warm",
    "sample_png",
    "scaled",
    "scaled_plugin",
    "self_check",
    "to_json",
    "to_junit",
    "write_corpus",
    "write_reports",
]
