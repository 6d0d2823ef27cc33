#!/usr/bin/env python3
"""Mechanical check of plughost's execution-path invariants.

Reads the source tree as ASTs (never as regex over text) and prints one
`file:line: [check] message` per violation; exits 1 if there is any.

    python scripts/scan_governance.py [ROOT]

Checks (docs/GOVERNANCE.md explains each and what to do when one fires):

  plugin-call    plugin code is invoked only in sandbox/child.py: no `.run(...)`
                 on anything but a ToolRunner (or a known library), no
                 `getattr(x, "run")`, no importing modules by name
  runner-shape   sandbox/tool_runner.py defines `ToolRunner.run(self, plugin_name, payload)`
  metrics        `update_execution_metrics(...)` is called in a `finally` of ToolRunner.run
                 (or of the ToolRunner method `run` hands the call to)
  layering       API modules never import `sandbox`; the job service never
                 imports ToolRunner or `sandbox`; the analysis service imports
                 neither the plugin service, ToolRunner nor `sandbox`; `sandbox` never
                 imports `host.api` or `host.services`
  boundary       `sandbox` never imports anything of `host`
  reasons        one definition of the reasons: no table of two or more reasons
                 (dict keys, set, frozenset, Literal) outside sandbox/outcome.py
  cycles         no import cycles among the modules of `host` and `sandbox`
                 (imports inside functions count)
  function-length no function in `host` or `sandbox` over 60 lines
  layer-names    isolation layer names are listed only in sandbox/layers/ (the
                 registry): no list, tuple, set or dict elsewhere in `host` or
                 `sandbox` spells two or more of them
  no-unpickle    host-side code imports no pickle, dill, marshal or shelve
  except         no bare `except:` and no handler whose whole body is `pass`
  docs           the docs (README.md, SECURITY.md, docs/*.md) name only subcommands
                 `host/cli.py` defines, in code (`plughost NAME`), and only functions
                 that exist (`name()` in code: defined in the tree, a builtin, the
                 standard library's, or the doc's own example code); the `SUBCOMMANDS:`
                 line of docs/architecture.md lists every subcommand; its table
                 of layers is the one `LAYERS` gives (`--write-layer-table` writes it)
"""

from __future__ import annotations

import ast
import builtins
import importlib
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CHILD_MODULE = "sandbox/child.py"
RUNNER_MODULE = "sandbox/tool_runner.py"
REASONS_MODULE = "sandbox/outcome.py"
# `.run(...)` receivers that are not plugins: library entry points.
LIBRARY_RUNNERS = {"subprocess", "asyncio", "uvicorn"}
UNPICKLERS = {"pickle", "_pickle", "cPickle", "dill", "marshal", "shelve", "cloudpickle"}
SCANNED = ("host", "sandbox")
CLI_MODULE = "host/cli.py"
LAYERS_MODULE = "sandbox/layers/__init__.py"
LAYER_TABLE_START = "<!-- the layers: written by scripts/scan_governance.py --write-layer-table -->"
LAYER_TABLE_END = "<!-- end of the layers -->"
LAYER_FIELDS = ("name", "needs", "detected", "host", "child")
ARCHITECTURE_DOC = "docs/architecture.md"
# Where a function a doc names may be defined (the bundled plugins' included).
DEFINING = ("host", "sandbox", "plughost", "scripts", "plugins", "examples")
# Standard-library modules whose functions docs name bare (`write()`, `ThreadPoolExecutor()`).
STDLIB_BARE = ("os", "concurrent.futures", "multiprocessing", "threading", "socket", "pathlib")
FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"`([^`\n]+)`")
COMMAND = re.compile(r"(?:^|[\s/(=$])plughost[ \t]+([a-z][a-z-]*)", re.M)
CALLED = re.compile(r"(?<![\w.])([A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*)\(")


@dataclass(frozen=True)
class Violation:
    path: str
    line: int
    check: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: [{self.check}] {self.message}"


def _imports(tree: ast.AST) -> Iterator[tuple[int, str]]:
    """Every imported module name, with its line (`from a.b import c` gives a.b and a.b.c)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Call):
        return f"{_dotted(node.func)}()"
    return "?"


def _makes_toolrunner(node: ast.AST | None) -> bool:
    """True if `node` builds a ToolRunner (`ToolRunner(...)`, `x or ToolRunner()`)."""
    if node is None:
        return False
    return any(
        isinstance(inner, ast.Call) and _dotted(inner.func).split(".")[-1] == "ToolRunner"
        for inner in ast.walk(node)
    )


def _toolrunner_names(tree: ast.AST) -> tuple[set[str], set[str]]:
    """Names that hold a ToolRunner anywhere in the module, and the attributes
    declared as one (a dataclass field or a parameter annotated `ToolRunner`,
    kept in `self.<same name>`)."""
    names = {"self._runner"}
    attributes: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and _makes_toolrunner(node.value):
            names.update(_dotted(t) for t in node.targets)
        elif isinstance(node, ast.AnnAssign) and (
            _makes_toolrunner(node.value) or _dotted(node.annotation) == "ToolRunner"
        ):
            names.add(_dotted(node.target))
            if isinstance(node.target, ast.Name):
                attributes.add(node.target.id)
        elif isinstance(node, ast.arg) and node.annotation is not None:
            if _dotted(node.annotation) == "ToolRunner":
                names.add(node.arg)
                attributes.add(node.arg)
    return names, attributes


def _library(receiver: str) -> bool:
    """`subprocess.run`, `uvicorn.Server.run`: a library's own `run`."""
    return receiver.split(".", 1)[0] in LIBRARY_RUNNERS


def check_plugin_calls(rel: str, tree: ast.AST) -> Iterator[Violation]:
    if rel == CHILD_MODULE:
        return
    runners, attributes = _toolrunner_names(tree)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "run":
            receiver = _dotted(func.value)
            if receiver in runners or receiver == "ToolRunner()" or _library(receiver):
                continue
            if "." in receiver and receiver.rsplit(".", 1)[1] in attributes:
                continue  # `x.runner`, where `runner` is declared a ToolRunner
            if receiver.endswith("ToolRunner()"):
                continue
            yield Violation(
                rel,
                node.lineno,
                "plugin-call",
                f"'{receiver}.run(...)' outside {CHILD_MODULE}: only a ToolRunner may be run here",
            )
        name = _dotted(func)
        if name == "getattr" and len(node.args) >= 2:
            attr = node.args[1]
            if isinstance(attr, ast.Constant) and attr.value == "run":
                yield Violation(
                    rel,
                    node.lineno,
                    "plugin-call",
                    f"getattr(..., 'run') outside {CHILD_MODULE}: plugin code runs in the child",
                )
        if name in {"importlib.import_module", "import_module", "__import__"}:
            yield Violation(
                rel,
                node.lineno,
                "plugin-call",
                f"{name}() outside {CHILD_MODULE}: the host never imports plugin code",
            )
        if isinstance(func, ast.Call) and _dotted(func.func) == "getattr":
            yield Violation(
                rel,
                node.lineno,
                "plugin-call",
                "calling the result of getattr(...): entrypoints are called in the child only",
            )


def check_runner(root: Path) -> Iterator[Violation]:
    path = root / RUNNER_MODULE
    if not path.is_file():
        yield Violation(RUNNER_MODULE, 1, "runner-shape", "sandbox/tool_runner.py is missing")
        return
    tree = ast.parse(path.read_text(), str(path))
    run = None
    methods: dict[str, ast.FunctionDef] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name == "ToolRunner":
            methods = {i.name: i for i in node.body if isinstance(i, ast.FunctionDef)}
            run = methods.get("run")
            if run is None:
                yield Violation(
                    RUNNER_MODULE, node.lineno, "runner-shape", "ToolRunner has no run()"
                )
                return
    if run is None:
        yield Violation(RUNNER_MODULE, 1, "runner-shape", "class ToolRunner is missing")
        return
    params = [a.arg for a in run.args.posonlyargs + run.args.args]
    if params != ["self", "plugin_name", "payload"] or run.decorator_list:
        yield Violation(
            RUNNER_MODULE,
            run.lineno,
            "runner-shape",
            f"ToolRunner.run must be a plain method (self, plugin_name, payload), has {params}",
        )
    # run itself, or the method of ToolRunner it hands the call to (self.<name>(...)).
    bodies = [run] + [
        methods[call.func.attr]
        for call in ast.walk(run)
        if isinstance(call, ast.Call)
        and isinstance(call.func, ast.Attribute)
        and _dotted(call.func.value) == "self"
        and call.func.attr in methods
    ]
    in_finally = False
    for node in (inner for body in bodies for inner in ast.walk(body)):
        if isinstance(node, ast.Try) and node.finalbody:
            for stmt in node.finalbody:
                for inner in ast.walk(stmt):
                    if isinstance(inner, ast.Call) and _dotted(inner.func).endswith(
                        "update_execution_metrics"
                    ):
                        in_finally = True
    if not in_finally:
        yield Violation(
            RUNNER_MODULE,
            run.lineno,
            "metrics",
            "ToolRunner.run (or the method it hands the call to) must call "
            "update_execution_metrics(...) in a finally block",
        )


def _module_of(rel: str) -> str:
    return rel.removesuffix(".py").removesuffix("/__init__").replace("/", ".")


def check_layering(rel: str, tree: ast.AST) -> Iterator[Violation]:
    module = _module_of(rel)
    for line, name in _imports(tree):
        top2 = ".".join(name.split(".")[:2])
        if module.startswith("host.api") and name.split(".")[0] == "sandbox":
            yield Violation(rel, line, "layering", f"API module imports '{name}': use the services")
        if module == "host.services.jobs" and (
            name.split(".")[0] == "sandbox" or name.endswith("ToolRunner")
        ):
            yield Violation(
                rel,
                line,
                "layering",
                f"JobManagementService imports '{name}': it calls PluginManagementService only",
            )
        if module == "host.services.analysis" and (
            name.split(".")[0] == "sandbox"
            or name.startswith("host.services.plugins")
            or name.endswith(("ToolRunner", "PluginManagementService"))
        ):
            yield Violation(
                rel,
                line,
                "layering",
                f"AnalysisService imports '{name}': it uses JobManagementService only",
            )
        if module.startswith("sandbox") and top2 in {"host.api", "host.services"}:
            yield Violation(
                rel, line, "layering", f"sandbox imports '{name}': it knows no HTTP or services"
            )


def check_sandbox_boundary(rel: str, tree: ast.AST) -> Iterator[Violation]:
    """The sandbox never imports anything of `host`: it reads plugins through
    the PluginCatalog protocol it defines (sandbox/tool_runner.py)."""
    if not _module_of(rel).startswith("sandbox"):
        return
    for line, name in _imports(tree):
        if name.split(".")[0] == "host" and not name.startswith(("host.api", "host.services")):
            yield Violation(
                rel,
                line,
                "boundary",
                f"sandbox imports '{name}': the host passes what the sandbox needs in",
            )


def check_unpickle(rel: str, tree: ast.AST) -> Iterator[Violation]:
    for line, name in _imports(tree):
        if name.split(".")[0] in UNPICKLERS:
            yield Violation(
                rel,
                line,
                "no-unpickle",
                f"imports '{name}': host code never deserialises with pickle-like formats",
            )


MAX_FUNCTION_LINES = 60


def check_function_length(rel: str, tree: ast.AST) -> Iterator[Violation]:
    """No function longer than a screen: a reader follows one idea at a time."""
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = (node.end_lineno or node.lineno) - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                yield Violation(
                    rel,
                    node.lineno,
                    "function-length",
                    f"{node.name}() is {length} lines, over {MAX_FUNCTION_LINES}: split it",
                )


def check_excepts(rel: str, tree: ast.AST) -> Iterator[Violation]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            if node.type is None:
                yield Violation(rel, node.lineno, "except", "bare 'except:'")
            if all(isinstance(stmt, ast.Pass) for stmt in node.body):
                yield Violation(rel, node.lineno, "except", "handler whose whole body is 'pass'")


def _reason_names(root: Path) -> set[str]:
    """The keys of the reason table, `REASONS` in sandbox/outcome.py."""
    path = root / REASONS_MODULE
    if not path.is_file():
        return set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.AnnAssign):
            targets, value = [node.target], node.value
        elif isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        else:
            continue
        if any(_dotted(t) == "REASONS" for t in targets) and isinstance(value, ast.Dict):
            return {k.value for k in value.keys if isinstance(k, ast.Constant)}
    return set()


def _listed_strings(node: ast.AST) -> list[str]:
    """String constants a table literal lists: dict keys, set members,
    `frozenset({...})` members, `Literal[...]` arguments."""
    if isinstance(node, ast.Dict):
        items: list[ast.AST | None] = list(node.keys)
    elif isinstance(node, ast.Set):
        items = list(node.elts)
    elif isinstance(node, ast.Subscript) and _dotted(node.value).split(".")[-1] == "Literal":
        items = list(node.slice.elts) if isinstance(node.slice, ast.Tuple) else [node.slice]
    else:
        return []
    return [i.value for i in items if isinstance(i, ast.Constant) and isinstance(i.value, str)]


def check_reason_tables(rel: str, tree: ast.AST, reasons: set[str]) -> Iterator[Violation]:
    """One definition of the reasons: no table keyed by (or listing) two or
    more reasons outside sandbox/outcome.py; other modules read REASONS."""
    if rel == REASONS_MODULE:
        return
    for node in ast.walk(tree):
        named = sorted(set(_listed_strings(node)) & reasons)
        if len(named) >= 2:
            yield Violation(
                rel,
                node.lineno,
                "reasons",
                f"a second table of reasons ({', '.join(named[:4])}): "
                f"read REASONS in {REASONS_MODULE} instead",
            )


LAYER_PACKAGE = "sandbox/layers/"


def registered_layers(root: Path) -> set[str]:
    """The layer names of the registry: the first argument of every
    `Layer("name", ...)` in sandbox/layers/__init__.py."""
    path = root / LAYER_PACKAGE / "__init__.py"
    if not path.is_file():
        return set()
    return {
        node.args[0].value
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call)
        and _dotted(node.func) == "Layer"
        and node.args
        and isinstance(node.args[0], ast.Constant)
        and isinstance(node.args[0].value, str)
    }


def check_layer_names(rel: str, tree: ast.AST, layers: set[str]) -> Iterator[Violation]:
    if rel.startswith(LAYER_PACKAGE):
        return
    for node in ast.walk(tree):
        if isinstance(node, ast.List | ast.Tuple | ast.Set):
            items: list[ast.expr | None] = list(node.elts)
        elif isinstance(node, ast.Dict):
            items = list(node.keys)
        else:
            continue
        named = [i.value for i in items if isinstance(i, ast.Constant) and i.value in layers]
        if len(named) >= 2:
            yield Violation(
                rel,
                node.lineno,
                "layer-names",
                f"layer names listed outside the registry ({', '.join(map(str, named[:3]))}):"
                " derive the list from sandbox.layers",
            )


def _module_paths(root: Path) -> dict[str, str]:
    """Every module below the scanned tops, by dotted name, with its path."""
    modules = {}
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            modules[_module_of(rel)] = rel
    return modules


def _import_edges(module: str, tree: ast.AST, modules: dict[str, str]) -> dict[str, int]:
    """Modules of the tree that `module` imports (function-level imports
    too: a cycle broken by a lazy import is still a cycle), with a line each.
    `from a import b` is an import of the module a.b when there is one."""
    edges: dict[str, int] = {}
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [
                f"{node.module}.{alias.name}"
                if f"{node.module}.{alias.name}" in modules
                else node.module
                for alias in node.names
            ]
        for name in names:
            if name in modules and name != module:
                edges.setdefault(name, node.lineno)
    return edges


def _cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for succ in graph.get(node, {}):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def check_cycles(root: Path, trees: dict[str, ast.AST]) -> Iterator[Violation]:
    """No import cycles among the modules of `host` and `sandbox`."""
    modules = _module_paths(root)
    graph = {
        module: _import_edges(module, trees[rel], modules)
        for module, rel in modules.items()
        if rel in trees
    }
    for component in _cycles(graph):
        first = component[0]
        inside = {m: line for m, line in graph[first].items() if m in component}
        target, line = min(inside.items(), key=lambda item: item[1])
        yield Violation(
            modules[first],
            line,
            "cycles",
            f"import cycle: {' -> '.join(component)} (here: imports {target})",
        )


def subcommand_names(root: Path) -> set[str]:
    """The subcommands of `SUBCOMMANDS` in host/cli.py: the first argument of
    each `Subcommand(...)` in it."""
    tree = ast.parse((root / CLI_MODULE).read_text(), CLI_MODULE)
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "SUBCOMMANDS" for t in node.targets
        ):
            for call in ast.walk(node.value):
                if (
                    isinstance(call, ast.Call)
                    and _dotted(call.func) == "Subcommand"
                    and call.args
                    and isinstance(call.args[0], ast.Constant)
                ):
                    names.add(str(call.args[0].value))
    return names


def defined_names(root: Path) -> set[str]:
    """Every function and class name defined below DEFINING, every builtin,
    and the public names of STDLIB_BARE."""
    names = set(dir(builtins))
    for module in STDLIB_BARE:
        names.update(n for n in dir(importlib.import_module(module)) if not n.startswith("_"))
    for top in DEFINING:
        for path in (root / top).rglob("*.py"):
            try:
                tree = ast.parse(path.read_text())
            except SyntaxError:
                continue  # the scan reports it for its own tops; a plugin's is the plugin's
            names.update(
                node.name
                for node in ast.walk(tree)
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            )
    return names


def _doc_code(text: str) -> list[tuple[int, str]]:
    """The code of a Markdown text, with the line each piece starts on:
    fenced blocks, then the inline spans of the rest."""
    pieces = [(text.count("\n", 0, m.start(1)) + 1, m.group(1)) for m in FENCED.finditer(text)]
    rest = FENCED.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    pieces += [(rest.count("\n", 0, m.start()) + 1, m.group(1)) for m in SPAN.finditer(rest)]
    return pieces


def _own_names(code: str) -> set[str]:
    """What a doc's example code defines or imports itself."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return set()
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            names.add(node.name)
        elif isinstance(node, ast.Import | ast.ImportFrom):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def check_docs(root: Path) -> Iterator[Violation]:
    """Docs name the subcommands and functions that exist."""
    commands = subcommand_names(root)
    known = defined_names(root)
    docs = sorted([root / "README.md", root / "SECURITY.md", *(root / "docs").glob("*.md")])
    for doc in (d for d in docs if d.is_file()):
        rel = doc.relative_to(root).as_posix()
        pieces = _doc_code(doc.read_text())
        own = set().union(*(_own_names(code) for _, code in pieces))
        for line, code in pieces:
            for match in COMMAND.finditer(code):
                if match.group(1) not in commands:
                    at = line + code.count("\n", 0, match.start())
                    yield Violation(
                        rel, at, "docs", f"`plughost {match.group(1)}`: no such subcommand"
                    )
            for match in CALLED.finditer(code):
                parts = match.group(1).split(".")
                if parts[0] in sys.stdlib_module_names or parts[-1] in known | own:
                    continue
                at = line + code.count("\n", 0, match.start())
                yield Violation(rel, at, "docs", f"`{match.group(1)}()`: no such function")
    text = (root / ARCHITECTURE_DOC).read_text()
    listed = re.search(r"SUBCOMMANDS:([^;\n]*)", text)
    if listed is None or set(re.findall(r"[a-z][a-z-]*", listed.group(1))) != commands:
        yield Violation(
            ARCHITECTURE_DOC,
            text.count("\n", 0, listed.start()) + 1 if listed else 1,
            "docs",
            f"its `SUBCOMMANDS:` line must list exactly: {', '.join(sorted(commands))}",
        )


def layer_table(root: Path) -> str:
    """The Markdown table of the layers, from the strings of each `Layer(...)`
    of `LAYERS` (read from the AST: the sandbox is not imported)."""
    tree = ast.parse((root / LAYERS_MODULE).read_text(), LAYERS_MODULE)
    rows = [
        "| layer | module | needs | detected by | host prepares | child applies (step) |",
        "|---|---|---|---|---|---|",
    ]
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and _dotted(node.func) == "Layer"):
            continue
        fields = dict(zip(LAYER_FIELDS, node.args, strict=False))
        fields.update((k.arg, k.value) for k in node.keywords if k.arg)
        text = {k: v.value for k, v in fields.items() if isinstance(v, ast.Constant)}
        module = text.get("module", "-")
        where = f"`{module}.py`" if module != "-" else "(always on)"
        cells = [text.get(f, "?").replace("|", "\\|") for f in LAYER_FIELDS]
        rows.append(f"| {cells[0]} | {where} | " + " | ".join(cells[1:]) + " |")
    return "\n".join(rows)


def _with_layer_table(text: str, table: str) -> str | None:
    """`text` with its generated block replaced by `table` (None: no block)."""
    start, end = text.find(LAYER_TABLE_START), text.find(LAYER_TABLE_END)
    if start < 0 or end < start:
        return None
    return f"{text[: start + len(LAYER_TABLE_START)]}\n{table}\n{text[end:]}"


def check_layer_table(root: Path) -> Iterator[Violation]:
    text = (root / ARCHITECTURE_DOC).read_text()
    if _with_layer_table(text, layer_table(root)) != text:
        line = text.count("\n", 0, max(text.find(LAYER_TABLE_START), 0)) + 1
        yield Violation(
            ARCHITECTURE_DOC,
            line,
            "docs",
            "its table of layers is not what LAYERS says: run "
            "`python scripts/scan_governance.py --write-layer-table`",
        )


def scan(root: Path) -> list[Violation]:
    """All violations below `root` (a checkout of plughost)."""
    violations = list(check_runner(root))
    reasons = _reason_names(root)
    layers = registered_layers(root)
    trees: dict[str, ast.AST] = {}
    for top in SCANNED:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root).as_posix()
            try:
                tree = ast.parse(path.read_text(), rel)
            except SyntaxError as exc:
                violations.append(Violation(rel, exc.lineno or 1, "syntax", str(exc.msg)))
                continue
            trees[rel] = tree
            for check in (
                check_plugin_calls,
                check_layering,
                check_sandbox_boundary,
                check_unpickle,
                check_excepts,
                check_function_length,
            ):
                violations.extend(check(rel, tree))
            violations.extend(check_reason_tables(rel, tree, reasons))
            violations.extend(check_layer_names(rel, tree, layers))
    violations.extend(check_cycles(root, trees))
    if (root / CLI_MODULE).is_file() and (root / ARCHITECTURE_DOC).is_file():
        violations.extend(check_docs(root))
    if (root / LAYERS_MODULE).is_file() and (root / ARCHITECTURE_DOC).is_file():
        violations.extend(check_layer_table(root))
    return violations


def main(argv: list[str]) -> int:
    write = "--write-layer-table" in argv
    argv = [a for a in argv if a != "--write-layer-table"]
    root = Path(argv[1]) if len(argv) > 1 else Path(__file__).resolve().parent.parent
    if write:
        doc = root / ARCHITECTURE_DOC
        text = _with_layer_table(doc.read_text(), layer_table(root))
        if text is None:
            print(f"{ARCHITECTURE_DOC} has no {LAYER_TABLE_START!r} block", file=sys.stderr)
            return 1
        doc.write_text(text)
    violations = scan(root)
    for violation in violations:
        print(violation)
    if violations:
        print(
            f"governance: {len(violations)} violation(s); see docs/GOVERNANCE.md", file=sys.stderr
        )
        return 1
    print("governance: all invariants hold")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
