"""The governance scanner: each check fails on a violating sample, naming
file and line, and the real tree passes."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCANNER = ROOT / "scripts" / "scan_governance.py"


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    for top in ("host", "sandbox"):
        shutil.copytree(ROOT / top, tmp_path / top, ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def scan(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCANNER), str(root)], capture_output=True, text=True, timeout=60
    )


def test_real_tree_passes() -> None:
    result = scan(ROOT)
    assert result.returncode == 0, result.stdout
    assert "all invariants hold" in result.stdout


def test_scratch_copy_passes_before_it_is_broken(tree: Path) -> None:
    assert scan(tree).returncode == 0


def _append(tree: Path, rel: str, code: str) -> int:
    path = tree / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text() if path.exists() else ""
    path.write_text(text + "\n" + code + "\n")
    return len(text.splitlines()) + 2  # line of the first appended line


@pytest.mark.parametrize(
    ("rel", "code", "check"),
    [
        ("host/cli.py", "def f(thing):\n    return thing.run({})", "plugin-call"),
        ("host/cli.py", "def f(p):\n    return p.run({})", "plugin-call"),
        ("host/registry.py", "def f(x):\n    return getattr(x, 'run')", "plugin-call"),
        (
            "host/discovery.py",
            "import importlib\ndef f(n):\n    return importlib.import_module(n)",
            "plugin-call",
        ),
        ("host/discovery.py", "def f(m, a):\n    return getattr(m, a)()", "plugin-call"),
        ("host/manifest.py", "import pickle", "no-unpickle"),
        ("sandbox/supervisor.py", "from marshal import loads", "no-unpickle"),
        (
            "host/registry.py",
            "def f():\n    try:\n        return 1\n    except:\n        return 2",
            "except",
        ),
        (
            "host/registry.py",
            "def f():\n    try:\n        return 1\n    except ValueError:\n        pass",
            "except",
        ),
        ("host/api/app.py", "from sandbox.tool_runner import ToolRunner", "layering"),
        ("host/services/jobs.py", "from sandbox.tool_runner import ToolRunner", "layering"),
        ("host/services/jobs.py", "import sandbox", "layering"),
        (
            "host/services/analysis.py",
            "from host.services.plugins import PluginManagementService",
            "layering",
        ),
        ("sandbox/limits.py", "import host.services.jobs", "layering"),
        ("sandbox/limits.py", "from host.api import app", "layering"),
        ("sandbox/tool_runner.py", "from host.registry import PluginRegistry", "boundary"),
        ("sandbox/limits.py", "import host.manifest", "boundary"),
        ("host/api/errors.py", "CODES = {'timeout': 400, 'crashed': 400}", "reasons"),
        ("host/services/plugins.py", "NEUTRAL = frozenset({'internal', 'overloaded'})", "reasons"),
        (
            "sandbox/protocol.py",
            "from typing import Literal\nR = Literal['timeout', 'crashed']",
            "reasons",
        ),
        ("host/discovery.py", "from host.registry import PluginRegistry", "cycles"),
        ("host/discovery.py", "def f():\n    from host import registry", "cycles"),
    ],
)
def test_each_violation_is_reported_with_file_and_line(
    tree: Path, rel: str, code: str, check: str
) -> None:
    first = _append(tree, rel, code)
    result = scan(tree)
    assert result.returncode == 1
    lines = [line for line in result.stdout.splitlines() if f"[{check}]" in line]
    assert lines, result.stdout
    path, line = lines[0].split(":")[:2]
    assert path == rel
    assert first <= int(line) <= first + code.count("\n")


def test_runner_run_must_keep_its_signature(tree: Path) -> None:
    path = tree / "sandbox" / "tool_runner.py"
    text = path.read_text().replace(
        "def run(self, plugin_name: str, payload: Any)", "def run(self, name: str, payload: Any)"
    )
    path.write_text(text)
    result = scan(tree)
    assert result.returncode == 1 and "[runner-shape]" in result.stdout
    assert "sandbox/tool_runner.py:" in result.stdout


def test_metrics_must_be_updated_in_finally(tree: Path) -> None:
    path = tree / "sandbox" / "tool_runner.py"
    text = path.read_text()
    assert "        finally:\n            if record:" in text
    path.write_text(
        text.replace(
            "        finally:\n            if record:", "        else:\n            if record:"
        )
    )
    result = scan(tree)
    assert result.returncode == 1 and "[metrics]" in result.stdout


def test_missing_tool_runner_is_reported(tree: Path) -> None:
    (tree / "sandbox" / "tool_runner.py").unlink()
    result = scan(tree)
    assert result.returncode == 1 and "[runner-shape]" in result.stdout


@pytest.mark.parametrize(
    ("rel", "code"),
    [
        ("sandbox/supervisor.py", 'EXTRA = ("seccomp", "landlock")'),
        ("host/cli.py", 'CHOICES = ["pid_namespace", "network_namespace", "seccomp"]'),
        ("sandbox/child.py", 'FLAGS = {"ipc_namespace": 1, "uts_namespace": 2}'),
    ],
)
def test_layer_names_are_listed_only_in_the_registry(tree: Path, rel: str, code: str) -> None:
    first = _append(tree, rel, code)
    result = scan(tree)
    assert result.returncode == 1
    assert f"{rel}:{first}: [layer-names]" in result.stdout, result.stdout


def test_a_single_layer_name_and_the_registry_itself_are_allowed(tree: Path) -> None:
    _append(tree, "sandbox/supervisor.py", 'ONE = ["seccomp"]')
    _append(tree, "sandbox/layers/cgroup.py", 'BOTH = ("cgroup_memory", "cgroup_pids")')
    assert scan(tree).returncode == 0


def test_a_function_over_sixty_lines_is_reported(tree: Path) -> None:
    path = tree / "host" / "long_function.py"
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    path.write_text(f"def too_long() -> None:\n{body}")
    result = scan(tree)
    assert result.returncode == 1 and "[function-length]" in result.stdout
    assert "host/long_function.py:1:" in result.stdout and "too_long() is 62 lines" in result.stdout


@pytest.fixture
def documented(tree: Path) -> Path:
    """The scratch tree with the docs and every tree a doc's function may come from."""
    for top in ("docs", "plughost", "scripts", "plugins", "examples"):
        shutil.copytree(ROOT / top, tree / top, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("README.md", "SECURITY.md"):
        shutil.copy(ROOT / name, tree / name)
    return tree


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Run `plughost vacuum --all` weekly.", "`plughost vacuum`: no such subcommand"),
        ("```sh\n/opt/x/bin/plughost doctor\n```", "`plughost doctor`: no such subcommand"),
        ("The watch calls `handle.memory()`.", "`handle.memory()`: no such function"),
        ("```\nW->>H: every 20 ms: oom_state()\n```", "`oom_state()`: no such function"),
    ],
)
def test_a_doc_naming_what_the_code_lacks_is_reported(
    documented: Path, text: str, message: str
) -> None:
    line = _append(documented, "docs/deploy.md", text)
    line += next(
        i for i, piece in enumerate(text.splitlines()) if "(" in piece or "plughost" in piece
    )
    result = scan(documented)
    assert result.returncode == 1
    found = [v for v in result.stdout.splitlines() if "[docs]" in v]
    assert len(found) == 1 and message in found[0], result.stdout
    assert found[0].startswith(f"docs/deploy.md:{line}:"), found[0]


def test_what_a_doc_names_that_exists_passes(documented: Path) -> None:
    _append(
        documented,
        "docs/plugins.md",
        "`plughost check DIR`, `sample_memory()`, `os.cpu_count()`, `write()`, `len()`\n"
        "```python\nfrom pathlib import Path\ndef helper():\n    return Path('x')\n```\n"
        "then `helper()` in prose",
    )
    assert scan(documented).returncode == 0


def test_architecture_must_list_every_subcommand(documented: Path) -> None:
    doc = documented / "docs" / "architecture.md"
    text = doc.read_text()
    assert "SUBCOMMANDS: run, serve, worker," in text
    doc.write_text(text.replace("SUBCOMMANDS: run, serve, worker,", "SUBCOMMANDS: run, serve,"))
    result = scan(documented)
    assert result.returncode == 1
    assert "[docs] its `SUBCOMMANDS:` line must list exactly" in result.stdout


def test_the_layer_table_must_say_what_layers_says(documented: Path) -> None:
    """A layer's facts change in the code: the doc's table is out of date
    until `--write-layer-table` writes it again."""
    module = documented / "sandbox" / "layers" / "__init__.py"
    text = module.read_text()
    assert '"Landlock ABI 1+"' in text
    module.write_text(text.replace('"Landlock ABI 1+"', '"Landlock ABI 3+"'))
    result = scan(documented)
    assert result.returncode == 1
    assert "[docs] its table of layers is not what LAYERS says" in result.stdout
    written = subprocess.run(
        [sys.executable, str(SCANNER), str(documented), "--write-layer-table"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert written.returncode == 0, written.stdout
    assert (
        "| landlock | `landlock.py` | Landlock ABI 3+ |"
        in (documented / "docs" / "architecture.md").read_text()
    )
