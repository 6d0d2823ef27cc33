"""The `plughost` command line.

    plughost serve [--host H] [--port P] [--plugins-dir DIR]... [--db PATH] [--config FILE] ...
    plughost run PLUGIN --image FILE [--mime-type T] [--option K=V]... [--plugins-dir DIR]...
    plughost plugins [list|prepare] [--plugins-dir DIR]... [--json] [--verbose]
    plughost new NAME [--dir D]
    plughost check DIR [--image FILE]...
    plughost crash-suite [--plugins-dir DIR]... [--case NAME]... [--http URL] [--json FILE] ...
    plughost worker --database-url URL [--plugins-dir DIR]... [--workers N] [--metrics-port P]
    plughost nodes --database-url URL [--json]

`worker` and `nodes` belong to a multi-node deployment (docs/scale-out.md).

Each subcommand is a `Subcommand` in `SUBCOMMANDS`: its options (shared ones
come from the parent parsers below, so `--plugins-dir` is defined once) and
the function that runs it. Each command builds its own registry and sandbox
and closes the sandbox before it returns.

`run` prints one JSON document: `{"result": ..., "plugin": ...}` and exits 0,
or `{"error": {...}}` and exits 1. Usage errors (a missing image file, an
option that is not K=V) exit 2 with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
import tomllib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from host import __version__, scaffold
from host.discovery import discover
from host.environments import EnvironmentStore, EnvStatus
from host.preparation import environment_store, prepare_all
from host.registry import PluginRegistry
from host.statedir import make_private_dir
from host.tracebacks import plugin_output, plugin_traceback
from sandbox.envelope import Envelope
from sandbox.limits import HostLimits
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner

MAGIC = {
    b"\x89PNG\r\n\x1a\n": "image/png",
    b"\xff\xd8\xff": "image/jpeg",
    b"GIF87a": "image/gif",
    b"GIF89a": "image/gif",
    b"BM": "image/bmp",
    b"II*\x00": "image/tiff",
    b"MM\x00*": "image/tiff",
}


def sniff_mime_type(path: Path, data: bytes) -> str | None:
    """Guess an image's MIME type from its first bytes, then from its name."""
    for magic, mime in MAGIC.items():
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return mimetypes.guess_type(path.name)[0]


def _parse_option(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"option {text!r} is not KEY=VALUE")
    try:
        value = json.loads(raw)
    except ValueError:
        value = raw  # not JSON: keep it as a string
    return key, value


# -- shared options (parent parsers) -----------------------------------------


def plugins_dir_options(help_text: str = "more plugin directories") -> argparse.ArgumentParser:
    """`--plugins-dir DIR`, repeatable."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--plugins-dir", action="append", default=[], metavar="DIR", help=help_text)
    return parent


def isolation_options(dest: str, help_text: str, prewarm_help: str) -> argparse.ArgumentParser:
    """`--disable-layer LAYER` (repeatable) and `--prewarm N`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--disable-layer", action="append", default=[], metavar="LAYER", dest=dest, help=help_text
    )
    parent.add_argument("--prewarm", type=int, metavar="N", help=prewarm_help)
    return parent


STATE_DIR_HELP = (
    "where the job database and the plugins' environments live (default "
    "/var/lib/plughost as root, $XDG_STATE_HOME/plughost otherwise)"
)


def state_dir_options() -> argparse.ArgumentParser:
    """`--state-dir DIR`."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    return parent


def _environments(args: argparse.Namespace) -> EnvironmentStore:
    """The plugin environments of the configuration (PLUGHOST_* variables, --state-dir)."""
    from host.config import ConfigError, load_settings

    try:
        settings = load_settings(None, overrides={"state_dir": args.state_dir})
    except ConfigError as exc:
        raise SystemExit(f"plughost: {exc}") from exc
    make_private_dir(settings.state_dir)
    return environment_store(settings.plugin_envs, settings.allow_source_builds)


def _stderr(line: str) -> None:
    print(f"plughost: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Subcommand:
    name: str
    help: str
    parents: Callable[[], list[argparse.ArgumentParser]]
    add_arguments: Callable[[argparse.ArgumentParser], None]
    handler: Callable[[argparse.Namespace, argparse.ArgumentParser], int]


@dataclass(frozen=True)
class LocalHost:
    """The plugins and the runner of one command."""

    registry: PluginRegistry
    runner: ToolRunner


@contextmanager
def _local_host(
    sandbox: Sandbox,
    plugins_dirs: Sequence[str] = (),
    environments: EnvironmentStore | None = None,
    limits: HostLimits | None = None,
) -> Iterator[LocalHost]:
    """A ToolRunner on `sandbox` with the discovered plugins (their load
    errors printed as warnings) and their environments; the sandbox is
    closed (launcher and warm children reaped) when the command ends."""
    registry = PluginRegistry()
    registry.environments = environments
    try:
        discover(registry, plugins_dirs)
        _warn(registry.load_errors)
        yield LocalHost(registry, ToolRunner(registry, sandbox, limits=limits))
    finally:
        sandbox.close()


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _warn(problems: Sequence[str]) -> None:
    for problem in problems:
        print(f"plughost: warning: {problem}", file=sys.stderr)


# -- run ---------------------------------------------------------------------


def _run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("plugin")
    run.add_argument("--image", required=True, type=Path, help="image file to analyse")
    run.add_argument("--mime-type", help="default: sniffed from the file")
    run.add_argument(
        "--option",
        action="append",
        default=[],
        type=_parse_option,
        metavar="K=V",
        help="plugin option; VALUE is JSON if it parses, else a string",
    )
    run.add_argument(
        "--debug",
        action="store_true",
        help="print on stderr what the plugin printed, the call's time and peak memory, "
        "and on a failure the plugin's traceback",
    )


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        image = args.image.read_bytes()
    except OSError as exc:
        parser.error(f"--image {args.image}: {exc.strerror}")
    mime_type = args.mime_type or sniff_mime_type(args.image, image)
    if mime_type is None:
        parser.error(f"--image {args.image}: cannot tell its type; pass --mime-type")
    payload = {"image": image, "mime_type": mime_type, "options": dict(args.option)}
    with _local_host(Sandbox(), args.plugins_dir, _environments(args)) as host:
        if args.plugin in host.registry.list_plugins():  # prepared before the call, never in it
            prepare_all(host.registry, _stderr, names=[args.plugin])
        unchecked = host.registry.unchecked_options(args.plugin, payload["options"])
        if unchecked:
            _stderr(f"warning: {args.plugin} declares no options schema; {unchecked} unchecked")
        result, error = host.runner.run(args.plugin, payload)
        measured = host.runner.last_measured()
        if error and Envelope.of(error).reason == "unknown_plugin":
            _stderr(_where_plugins_are(args.plugin, args.plugins_dir))
    if args.debug:
        _debug_report(error, measured)
    if error:
        from host.authoring import missing_module_hint

        hint = missing_module_hint(error)
        if hint:
            _stderr(hint)
        _print_json({"error": Envelope.of(error).public()})
        return 1
    _print_json({"result": result, "plugin": args.plugin})
    return 0


def _debug_report(error: dict[str, Any], measured: dict[str, Any]) -> None:
    """`run --debug`, on stderr: what the call printed, its figures, and on a
    failure the plugin's own traceback."""
    printed = plugin_output(measured)
    if printed:
        print(f"what the plugin printed:\n{printed}", file=sys.stderr)
    if measured:
        peak = measured.get("peak_rss_mb")
        cgroup = measured.get("cgroup_peak_mb")
        figures = [f"{measured.get('elapsed_ms', 0.0):.1f} ms"]
        figures.append("peak RSS not measured" if peak is None else f"peak RSS {peak} MB")
        if cgroup is not None:
            figures.append(f"cgroup peak {cgroup} MB")
        print(f"call: {', '.join(figures)}", file=sys.stderr)
    trace = plugin_traceback(error) if error else ""
    if trace:
        print(trace, file=sys.stderr)


def _manifest_name(path: Path) -> str | None:
    try:
        with path.open("rb") as stream:
            name = tomllib.load(stream).get("name")
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return name if isinstance(name, str) else None


def _where_plugins_are(name: str, plugins_dirs: Sequence[str]) -> str:
    """The hint for a plugin name `run` did not find."""
    searched = "the bundled plugins" + "".join(f", {d}" for d in plugins_dirs)
    here = Path(name)
    if here.is_dir():
        parent = here.resolve().parent
        where = "." if parent == Path.cwd().resolve() else str(parent)
        called = _manifest_name(here / "plugin.toml")
        rename = (
            f" and the name its plugin.toml gives, {called!r}" if called not in (None, name) else ""
        )
        hint = f"{name} is a directory: use --plugins-dir {where}{rename}"
        return f"no plugin {name!r} in {searched}; {hint}"
    return (
        f"no plugin {name!r} in {searched}; for a plugin of your own, add "
        "--plugins-dir DIR, the directory that holds its directory"
    )


# -- plugins -----------------------------------------------------------------


def _plugins_arguments(plugins: argparse.ArgumentParser) -> None:
    plugins.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument(
        "--verbose", action="store_true", help="also dependencies, environments and options"
    )


def _plugin_rows(registry: PluginRegistry) -> list[dict[str, Any]]:
    host = HostLimits()
    rows: list[dict[str, Any]] = []
    for name in registry.list_plugins():
        plugin = registry.get_plugin(name)
        limits = host.clamp(plugin.limits)
        rows.append(
            {
                "name": name,
                "version": plugin.manifest.version,
                "description": plugin.manifest.description,
                "directory": str(plugin.directory),
                "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
                # The operator's view: the environment's detail (the installer's words) too.
                "status": {
                    **registry.get_status(name),
                    "environment": registry.environment(name).public(admin=True),
                },
                "dependencies": list(plugin.requirements.dependencies),
                "options_schema": plugin.manifest.options,
            }
        )
    return rows


def _cmd_plugins(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    if args.action == "prepare":
        return _cmd_prepare(args)
    registry = PluginRegistry()
    registry.environments = _environments(args)
    discover(registry, args.plugins_dir)
    rows = _plugin_rows(registry)
    sandbox = Sandbox()
    try:
        isolation = sandbox.protections()
    finally:
        sandbox.close()
    if args.json:
        _print_json({"plugins": rows, "load_errors": registry.load_errors, "isolation": isolation})
        return 1 if registry.load_errors else 0
    print(f"{'NAME':<20} {'VERSION':<9} {'STATE':<12} {'TIMEOUT':>8} {'MEMORY':>7}  DESCRIPTION")
    for row in rows:
        print(
            f"{row['name']:<20} {row['version']:<9} {row['status']['state']:<12} "
            f"{row['limits']['timeout_s']:>7g}s {row['limits']['memory_mb']:>5}MB  "
            f"{row['description']}"
        )
        if args.verbose:
            _print_details(row)
    active = ", ".join(name for name, on in isolation.items() if on)
    missing = ", ".join(name for name, on in isolation.items() if not on) or "none"
    print(f"\nisolation layers active: {active}\nmissing or off: {missing}")
    for problem in registry.load_errors:
        print(f"plughost: error: {problem}", file=sys.stderr)
    return 1 if registry.load_errors else 0


def _print_details(row: dict[str, Any]) -> None:
    environment = row["status"]["environment"]
    print(f"    directory: {row['directory']}")
    if row["dependencies"]:
        print(f"    dependencies: {', '.join(row['dependencies'])}")
        packages = ", ".join(environment.get("packages", [])) or "-"
        print(f"    environment: {environment['status']} ({packages})")
        if environment.get("detail") or environment.get("message"):
            print(f"      {environment.get('detail') or environment['message']}")
    schema = row["options_schema"]
    if schema is None:
        print("    options: no schema (passed unchecked)")
        return
    for option, spec in (schema.get("properties") or {}).items():
        spec = spec if isinstance(spec, dict) else {}
        extra = f" = {spec['default']!r}" if "default" in spec else ""
        print(f"    option {option}: {spec.get('type', 'any')}{extra}")


def _cmd_prepare(args: argparse.Namespace) -> int:
    registry = PluginRegistry()
    registry.environments = _environments(args)
    discover(registry, args.plugins_dir)
    _warn(registry.load_errors)
    states = prepare_all(registry, _stderr)
    failed = {name: s for name, s in states.items() if s.status is not EnvStatus.READY}
    for name, state in failed.items():
        print(f"plughost: {name}: {state.message}", file=sys.stderr)
    _stderr(f"{len(states) - len(failed)} of {len(states)} plugin environments ready")
    return 1 if failed or registry.load_errors else 0


# -- new, check ----------------------------------------------------------------


def _new_arguments(new: argparse.ArgumentParser) -> None:
    new.add_argument("name")
    new.add_argument("--dir", type=Path, default=Path("."), help="where to create it")


def _cmd_new(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        directory = scaffold.create(args.name, args.dir)
    except (scaffold.ScaffoldError, OSError) as exc:
        print(f"plughost: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {directory}; next: plughost check {directory}")
    return 0


def _check_arguments(check: argparse.ArgumentParser) -> None:
    check.add_argument("directory", type=Path)
    check.add_argument(
        "--image", action="append", default=[], type=Path, help="also run on this image"
    )


def _cmd_check(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host.authoring import check_plugin, sample_images

    if not args.directory.is_dir():
        parser.error(f"no such directory: {args.directory}")
    for image in args.image:
        if not image.is_file():
            parser.error(f"--image {image}: no such file")
    environments = _environments(args)
    sandbox = Sandbox()
    try:
        return check_plugin(
            args.directory,
            sample_images(args.image),
            environments,
            lambda registry: ToolRunner(registry, sandbox),
        )
    finally:
        sandbox.close()


# -- serve -------------------------------------------------------------------

# Flags of `serve` that are settings of the same name (host/config.py).
SERVE_SETTINGS = (
    "host",
    "port",
    "state_dir",
    "db_path",
    "workers",
    "queue_size",
    "default_plugin",
    "log_level",
    "require_containment",
    "isolation",
    "disable_layers",
    "prewarm",
    "user",
    "database_url",
)


def _serve_arguments(serve: argparse.ArgumentParser) -> None:
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int)
    serve.add_argument(
        "--db", dest="db_path", metavar="PATH", help="SQLite job database (default in --state-dir)"
    )
    serve.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql://...: jobs in PostgreSQL, run by `plughost worker` nodes",
    )
    serve.add_argument("--workers", type=int, help="sandboxes running at once")
    serve.add_argument("--queue-size", type=int, help="jobs waiting before 503 overloaded")
    serve.add_argument("--default-plugin")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--isolation", choices=["standard", "strict"])
    serve.add_argument(
        "--user", help="started as root: serve as this user once the sandbox is set up"
    )
    serve.add_argument(
        "--require-containment",
        action="store_true",
        default=None,
        help="refuse to serve if the start-up containment self-check fails",
    )


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host.api import create_app
    from host.api.server import AddressUnavailable, backlog, listen, serve, serving_cap
    from host.config import ConfigError, load_settings
    from host.logs import configure_logging

    overrides = {name: getattr(args, name) for name in SERVE_SETTINGS}
    overrides["plugins_dirs"] = args.plugins_dir
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if settings.database_url:
        _need_cluster(parser)
    # The address first: a busy port is one line now, not an error after the start-up.
    # Its backlog is the one of the cap the server runs with (lowered to the
    # descriptor limit), not of the cap asked for.
    cap = serving_cap(settings.max_connections)
    try:
        sock = listen(settings.host, settings.port, backlog(cap))
    except AddressUnavailable as exc:
        _stderr(str(exc))
        return 1
    # The port the system gave for --port 0: the one callbacks may never call.
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    configure_logging(settings.log_level, settings.log_repeat_limit, settings.log_repeat_interval_s)
    # Tokens come from the config file or PLUGHOST_CLIENT_TOKENS / PLUGHOST_ADMIN_TOKEN,
    # never from flags: command lines are visible to every user of the machine.
    serve(create_app(settings), settings, sock, cap)
    return 0


# -- worker and nodes (a multi-node deployment) -------------------------------


def _need_cluster(parser: argparse.ArgumentParser) -> None:
    """Exit 2 with the fix when the multi-node dependencies are not installed."""
    import importlib.util

    missing = [m for m in ("procrastinate", "psycopg") if importlib.util.find_spec(m) is None]
    if missing:
        parser.error(
            f"a multi-node deployment needs {', '.join(missing)}: pip install 'plughost[cluster]'"
        )


def _cluster_settings(
    args: argparse.Namespace, parser: argparse.ArgumentParser, names: tuple[str, ...]
) -> Any:
    from host.config import ConfigError, load_settings

    overrides = {name: getattr(args, name, None) for name in names}
    overrides["plugins_dirs"] = getattr(args, "plugins_dir", [])
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if not settings.database_url:
        parser.error("--database-url (or database_url in the configuration) is required")
    _need_cluster(parser)
    return settings


def _worker_arguments(worker: argparse.ArgumentParser) -> None:
    worker.add_argument("--config", metavar="FILE", help="TOML file with settings")
    worker.add_argument("--database-url", metavar="URL", help="postgresql://... (shared)")
    worker.add_argument("--workers", type=int, help="sandboxes running at once (default: CPUs)")
    worker.add_argument("--max-attempts", type=int, help="runs of a job whose node died")
    worker.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    worker.add_argument("--isolation", choices=["standard", "strict"])
    worker.add_argument(
        "--metrics-port", type=int, metavar="P", help="serve GET /metrics on --host:P"
    )
    worker.add_argument("--host", help="address of --metrics-port (default 127.0.0.1)")
    worker.add_argument(
        "--user", help="started as root: run as this user once the sandbox is set up"
    )


def _cmd_worker(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host.logs import configure_logging
    from host.privileges import PrivilegeError
    from host.services.node import node_plugins

    names = ("database_url", "workers", "max_attempts", "log_level", "isolation", "prewarm")
    settings = _cluster_settings(
        args, parser, (*names, "host", "user", "disable_layers", "state_dir")
    )
    # Once `_cluster_settings` has checked that the multi-node extra is installed.
    from host.cluster.worker import WorkerNode, WorkerOptions, run_worker
    from host.services.callbacks import callback_settings

    configure_logging(settings.log_level, settings.log_repeat_limit, settings.log_repeat_interval_s)
    try:
        registry, sandbox = node_plugins(settings)
    except ValueError as exc:
        parser.error(str(exc))
    _warn(registry.load_errors)
    options = WorkerOptions(
        database_url=settings.database_url,
        concurrency=settings.workers,
        max_attempts=settings.max_attempts,
        heartbeat_s=settings.heartbeat_s,
        stalled_after_s=settings.stalled_after_s,
        metrics_address=None if args.metrics_port is None else (settings.host, args.metrics_port),
        user=settings.user,
        callbacks=callback_settings(
            settings, () if args.metrics_port is None else (args.metrics_port,)
        ),
    )
    quarantine = (settings.quarantine_threshold, settings.quarantine_cooldown_s)
    try:
        run_worker(WorkerNode(options, registry, sandbox, quarantine))
    except PrivilegeError as exc:
        _stderr(str(exc))
        return 1
    return 0


def _nodes_arguments(nodes: argparse.ArgumentParser) -> None:
    nodes.add_argument("--config", metavar="FILE", help="TOML file with settings")
    nodes.add_argument("--database-url", metavar="URL", help="postgresql://... (shared)")
    nodes.add_argument("--json", action="store_true", help="print JSON")


def _cmd_nodes(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    settings = _cluster_settings(args, parser, ("database_url",))
    # Once `_cluster_settings` has checked that the multi-node extra is installed.
    from host.cluster.nodes import NodeBook
    from host.cluster.pgstore import DatabaseUnavailable, PgJobStore, open_pool

    pool = open_pool(settings.database_url, max_size=1)
    try:
        nodes = NodeBook(PgJobStore(pool), "cli", settings.stalled_after_s).nodes()
    except DatabaseUnavailable as exc:
        _stderr(str(exc))
        return 1
    finally:
        pool.close()
    if args.json:
        _print_json({"nodes": nodes})
        return 0
    print(f"{'NAME':<40} {'ROLE':<7} {'HEALTH':<8} {'BEAT':>7} {'RUN':>4}/{'SLOTS':<5} PLUGINS")
    for node in nodes:
        plugins = ", ".join(f"{n}@{p['version']}" for n, p in sorted(node["plugins"].items()))
        print(
            f"{node['name']:<40} {node['role']:<7} {node['state']:<8} "
            f"{node['heartbeat_age_s']:>6.1f}s {node['running']:>4}/{node['concurrency']:<5} "
            f"{plugins}"
        )
    return 0


# -- crash-suite ---------------------------------------------------------------


def _suite_arguments(suite: argparse.ArgumentParser) -> None:
    suite.add_argument(
        "--case", action="append", default=[], metavar="NAME", help="only these cases"
    )
    suite.add_argument("--category", action="append", default=[], help="only these categories")
    suite.add_argument(
        "--http", metavar="URL", help="attack a running server instead of this process"
    )
    suite.add_argument("--json", metavar="FILE", help="write a JSON report")
    suite.add_argument("--junit", metavar="FILE", help="write a JUnit XML report")
    suite.add_argument(
        "--time-scale",
        type=_time_scale,
        default=1.0,
        metavar="F",
        help="multiply every case's timeout and the suite's waits by F (>= 1), for a slow, "
        "loaded or emulated machine; shown in the report. Against a server (--http) only "
        "the suite's waits: the server loads the cases (see --write-corpus)",
    )
    suite.add_argument(
        "--compat",
        action="store_true",
        help="run the compatibility corpus instead: ordinary plugins on multiprocessing, "
        "shared memory, thread pools, numpy, scipy, scikit-image, OpenCV, Pillow and "
        "onnxruntime, each of which must succeed with its expected result (their packages "
        "are installed into the state directory's environments first; --case narrows it)",
    )
    suite.add_argument(
        "--write-corpus",
        metavar="DIR",
        help="write the selected cases, timeouts scaled by --time-scale, to DIR (a new "
        "directory) for a server to load with --plugins-dir, and exit",
    )


def _time_scale(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 1 <= value <= 100:
        raise argparse.ArgumentTypeError(f"must be between 1 and 100, not {value:g}")
    return value


def _admit_cases(cases: list[Any], registry: PluginRegistry) -> None:
    """Register the cases in `registry`, dropping (with a warning) every case
    that claims a bundled plugin's name: names are unique, and the benign
    calls need the real plugin."""
    for case in list(cases):
        if case.name in registry.list_plugins():
            print(
                f"plughost: case {case.name} in {case.plugin.directory} claims the name of "
                f"the bundled plugin in {registry.get_plugin(case.name).directory}; skipped",
                file=sys.stderr,
            )
            cases.remove(case)
            continue
        registry.register(case.name, case.plugin)


def _progress(index: int, total: int, report: Any) -> None:
    print(
        f"[{index:>3}/{total}] {report.verdict:<13} {report.name} ({report.observed}, "
        f"{report.seconds:.2f}s)",
        file=sys.stderr,
        flush=True,
    )


def _suite_over_http(args: argparse.Namespace, cases: list[Any]) -> int:
    import os

    from host import crashsuite

    target = crashsuite.HttpTarget(
        args.http,
        token=os.environ.get("PLUGHOST_TOKEN"),
        timeout_s=crashsuite.HttpTarget.TIMEOUT_S * args.time_scale,
    )
    print(
        "note: against a server, leftover processes are counted by the sandbox uid range "
        "(a root server only); another host's calls on that machine would count too",
        file=sys.stderr,
    )
    report = crashsuite.run_suite(cases, target, _progress, time_scale=args.time_scale)
    return _finish_suite(args, report)


def _suite_here(args: argparse.Namespace, cases: list[Any]) -> int:
    from host import crashsuite

    try:
        sandbox = Sandbox(disabled=args.disable_layer, prewarm=args.prewarm or 0)
    except ValueError as exc:
        print(f"plughost: {exc}", file=sys.stderr)
        return 2
    scale = args.time_scale
    cases = [crashsuite.scaled(case, scale) for case in cases]
    limits = HostLimits()
    limits = replace(limits, max_timeout_s=limits.max_timeout_s * scale)
    with _local_host(sandbox, limits=limits) as host:
        _admit_cases(cases, host.registry)
        if not cases:
            print("plughost: no crash-suite case left to run", file=sys.stderr)
            return 2
        target = crashsuite.LocalTarget(host.runner)
        run = crashsuite.run_warm if args.prewarm else crashsuite.run_suite
        report = run(cases, target, _progress, time_scale=scale)
    return _finish_suite(args, report)


def _finish_suite(args: argparse.Namespace, report: Any) -> int:
    from host import crashsuite

    print(crashsuite.format_table(report))
    crashsuite.write_reports(report, args.json, args.junit)
    return 0 if report.ok else 1


def _compat_here(args: argparse.Namespace) -> int:
    from host import crashsuite

    cases, errors = crashsuite.load_compat(args.case)
    _warn(errors)
    if not cases:
        print("plughost: no compatibility case matches", file=sys.stderr)
        return 2
    try:
        sandbox = Sandbox(disabled=args.disable_layer, prewarm=0)
    except ValueError as exc:
        print(f"plughost: {exc}", file=sys.stderr)
        return 2
    registry = PluginRegistry()
    registry.environments = _environments(args)
    for case in cases:
        registry.register(case.name, case.plugin)
    try:
        states = prepare_all(registry, _stderr)
        unready = {name: s for name, s in states.items() if s.status is not EnvStatus.READY}
        for name, state in unready.items():
            print(f"plughost: {name}: environment {state.status.value}: {state.message}")
        limits = HostLimits()
        limits = replace(limits, max_timeout_s=limits.max_timeout_s * args.time_scale)
        runner = ToolRunner(registry, sandbox, limits=limits)
        for case in cases:
            registry.register(case.name, crashsuite.scaled_plugin(case.plugin, args.time_scale))
        reports = crashsuite.run_compat(
            [c for c in cases if c.name not in unready],
            runner,
            crashsuite.sample_png(),
            lambda i, n, r: print(
                f"[{i:>2}/{n}] {'pass' if r.ok else 'FAIL':<5} {r.name} ({r.seconds:.2f}s)",
                file=sys.stderr,
                flush=True,
            ),
        )
    finally:
        sandbox.close()
    print(crashsuite.format_compat(reports))
    return 0 if all(r.ok for r in reports) and not unready else 1


def _cmd_crash_suite(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host import crashsuite

    if args.compat:
        return _compat_here(args)
    cases, errors = crashsuite.load_cases(args.plugins_dir, args.case, args.category)
    _warn(errors)
    if not cases:
        print("plughost: no crash-suite case matches", file=sys.stderr)
        return 2
    if args.write_corpus:
        try:
            written = crashsuite.write_corpus(cases, Path(args.write_corpus), args.time_scale)
        except (FileExistsError, FileNotFoundError) as exc:
            print(f"plughost: --write-corpus wants a new directory: {exc}", file=sys.stderr)
            return 2
        print(
            f"{len(written)} cases written to {args.write_corpus} (time scale x{args.time_scale:g})"
        )
        return 0
    return _suite_over_http(args, cases) if args.http else _suite_here(args, cases)


# -- deploy -------------------------------------------------------------------


def _deploy_arguments(deploy: argparse.ArgumentParser) -> None:
    from host.deployfiles import FILES

    deploy.add_argument(
        "what", nargs="?", choices=sorted(FILES), help="the file to print (default: list them)"
    )
    deploy.add_argument(
        "--user",
        default="plughost",
        help="the account the systemd unit runs the host as (default plughost)",
    )


def _cmd_deploy(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host.deployfiles import DeployError, listing, path_of, systemd_unit

    try:
        if args.what is None:
            for name, path in listing():
                print(f"{name:<9} {path}")
            print("\nplughost deploy systemd > /etc/systemd/system/plughost.service")
            print("writes the unit for this install (docs/deploy.md, 'As a systemd service').")
            return 0
        if args.what == "systemd":
            sys.stdout.write(systemd_unit(args.user))
        else:
            sys.stdout.write(path_of(args.what).read_text())
    except DeployError as exc:
        _stderr(str(exc))
        return 1
    return 0


# -- the command line ----------------------------------------------------------

SUBCOMMANDS = (
    Subcommand(
        "run",
        "run one plugin on one image, print JSON",
        lambda: [plugins_dir_options(), state_dir_options()],
        _run_arguments,
        _cmd_run,
    ),
    Subcommand(
        "serve",
        "serve the HTTP API",
        lambda: [
            plugins_dir_options(),
            state_dir_options(),
            isolation_options(
                "disable_layers", "switch an isolation layer off", "warm children per plugin"
            ),
        ],
        _serve_arguments,
        _cmd_serve,
    ),
    Subcommand(
        "crash-suite",
        "run the hostile plugins, report containment",
        lambda: [
            plugins_dir_options("more case directories, besides plugins/hostile"),
            state_dir_options(),
            isolation_options(
                "disable_layer",
                "switch an isolation layer off, to see which cases depend on it (local runs)",
                "run the cases on prewarmed children (N per plugin), the fast path",
            ),
        ],
        _suite_arguments,
        _cmd_crash_suite,
    ),
    Subcommand(
        "plugins",
        "list installed plugins, or prepare their environments",
        lambda: [plugins_dir_options(), state_dir_options()],
        _plugins_arguments,
        _cmd_plugins,
    ),
    Subcommand(
        "worker",
        "run jobs of a multi-node deployment (a sandbox node)",
        lambda: [
            plugins_dir_options(),
            state_dir_options(),
            isolation_options(
                "disable_layers", "switch an isolation layer off", "warm children per plugin"
            ),
        ],
        _worker_arguments,
        _cmd_worker,
    ),
    Subcommand(
        "nodes",
        "list the nodes of a multi-node deployment",
        lambda: [],
        _nodes_arguments,
        _cmd_nodes,
    ),
    Subcommand(
        "new",
        "write a new plugin that passes `check`",
        lambda: [],
        _new_arguments,
        _cmd_new,
    ),
    Subcommand(
        "deploy",
        "print the systemd unit for this install, the dashboard or the deploy docs",
        lambda: [],
        _deploy_arguments,
        _cmd_deploy,
    ),
    Subcommand(
        "check",
        "validate a plugin and run it on sample images",
        lambda: [state_dir_options()],
        _check_arguments,
        _cmd_check,
    ),
)


def build_parser(subcommands: Sequence[Subcommand] = SUBCOMMANDS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plughost", description="Sandboxed plugin host")
    parser.add_argument("--version", action="version", version=f"plughost {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in subcommands:
        sub = commands.add_parser(command.name, help=command.help, parents=command.parents())
        command.add_arguments(sub)
        sub.set_defaults(handler=command.handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Callable[[argparse.Namespace, argparse.ArgumentParser], int] = args.handler
    return handler(args, parser)


if __name__ == "__main__":
    sys.exit(main())
