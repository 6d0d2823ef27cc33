"""The `plughost` command line.

    plughost serve [--host H] [--port P] [--plugins-dir DIR]... [--db PATH] [--config FILE] ...
    plughost run PLUGIN --image FILE [--mime-type T] [--option K=V]... [--plugins-dir DIR]...
    plughost plugins [list|prepare] [--plugins-dir DIR]... [--json] [--verbose]
    plughost new NAME [--dir D]
    plughost check DIR [--image FILE]...

`run` prints one JSON document: `{"result": ..., "plugin": ...}` and exits 0,
or `{"error": {...}}` and exits 1. Usage errors (a missing image file, an
option that is not K=V) exit 2 with a message on stderr.
"""

from __future__ import annotations

import argparse
import json
import mimetypes
import sys
from pathlib import Path
from typing import Any

from host import __version__, scaffold
from host.discovery import discover
from host.environments import EnvironmentStore, EnvStatus
from host.preparation import environment_store, prepare_all
from host.registry import get_registry
from host.tracebacks import plugin_traceback
from sandbox.envelope import public_error
from sandbox.limits import HostLimits
from sandbox.supervisor import Sandbox
from sandbox.tool_runner import ToolRunner, shared_sandbox

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="plughost", description="Sandboxed plugin host")
    parser.add_argument("--version", action="version", version=f"plughost {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run one plugin on one image, print JSON")
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
    run.add_argument("--plugins-dir", action="append", default=[], metavar="DIR")
    run.add_argument(
        "--debug", action="store_true", help="on a failure, print the plugin's traceback"
    )
    run.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    serve = commands.add_parser("serve", help="serve the HTTP API")
    serve.add_argument("--config", metavar="FILE", help="TOML file with settings")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int)
    serve.add_argument("--plugins-dir", action="append", default=[], metavar="DIR")
    serve.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    serve.add_argument(
        "--db", dest="db_path", metavar="PATH", help="SQLite job database (default in --state-dir)"
    )
    serve.add_argument("--workers", type=int, help="sandboxes running at once")
    serve.add_argument("--queue-size", type=int, help="jobs waiting before 503 overloaded")
    serve.add_argument("--default-plugin")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--isolation", choices=["standard", "strict"])
    serve.add_argument("--prewarm", type=int, metavar="N", help="warm children per plugin")
    serve.add_argument(
        "--user", help="started as root: serve as this user once the sandbox is set up"
    )
    serve.add_argument(
        "--disable-layer",
        action="append",
        default=[],
        metavar="LAYER",
        dest="disable_layers",
        help="switch an isolation layer off",
    )
    serve.add_argument(
        "--require-containment",
        action="store_true",
        default=None,
        help="refuse to serve if the start-up containment self-check fails",
    )

    suite = commands.add_parser("crash-suite", help="run the hostile plugins, report containment")
    suite.add_argument(
        "--plugins-dir",
        action="append",
        default=[],
        metavar="DIR",
        help="more case directories, besides plugins/hostile",
    )
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
        "--prewarm",
        type=int,
        default=0,
        metavar="N",
        help="run the cases on prewarmed children (N per plugin), the fast path",
    )
    suite.add_argument(
        "--disable-layer",
        action="append",
        default=[],
        metavar="LAYER",
        help="switch an isolation layer off, to see which cases depend on it (local runs)",
    )

    plugins = commands.add_parser(
        "plugins", help="list installed plugins, or prepare their environments"
    )
    plugins.add_argument("action", nargs="?", choices=["list", "prepare"], default="list")
    plugins.add_argument("--plugins-dir", action="append", default=[], metavar="DIR")
    plugins.add_argument("--json", action="store_true", help="print JSON")
    plugins.add_argument(
        "--verbose", action="store_true", help="also dependencies, environments and options"
    )
    plugins.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)

    new = commands.add_parser("new", help="write a new plugin that passes `check`")
    new.add_argument("name")
    new.add_argument("--dir", type=Path, default=Path("."), help="where to create it")

    check = commands.add_parser("check", help="validate a plugin and run it on sample images")
    check.add_argument("directory", type=Path)
    check.add_argument(
        "--image", action="append", default=[], type=Path, help="also run on this image"
    )
    check.add_argument("--state-dir", metavar="DIR", help=STATE_DIR_HELP)
    return parser


STATE_DIR_HELP = (
    "where the job database and the plugins' environments live (default "
    "/var/lib/plughost as root, $XDG_STATE_HOME/plughost otherwise)"
)


def _environments(args: argparse.Namespace) -> EnvironmentStore:
    """The plugin environments of the configuration (PLUGHOST_* variables)."""
    from host.config import ConfigError, load_settings

    try:
        settings = load_settings(None, overrides={"state_dir": args.state_dir})
    except ConfigError as exc:
        raise SystemExit(f"plughost: {exc}") from exc
    return environment_store(settings.plugin_envs, settings.allow_source_builds)


def _stderr(line: str) -> None:
    print(f"plughost: {line}", file=sys.stderr, flush=True)


def _print_json(document: Any) -> None:
    print(json.dumps(document, indent=2, sort_keys=True))


def _cmd_run(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    try:
        image = args.image.read_bytes()
    except OSError as exc:
        parser.error(f"--image {args.image}: {exc.strerror}")
    mime_type = args.mime_type or sniff_mime_type(args.image, image)
    if mime_type is None:
        parser.error(f"--image {args.image}: cannot tell its type; pass --mime-type")
    registry = get_registry()
    registry.environments = _environments(args)
    discover(registry, args.plugins_dir)
    for problem in registry.load_errors:
        print(f"plughost: warning: {problem}", file=sys.stderr)
    if args.plugin in registry.list_plugins():  # prepared before the call, never in it
        prepare_all(registry, _stderr, names=[args.plugin])
    payload = {"image": image, "mime_type": mime_type, "options": dict(args.option)}
    unchecked = registry.unchecked_options(args.plugin, payload["options"])
    if unchecked:
        _stderr(f"warning: {args.plugin} declares no options schema; {unchecked} passed unchecked")
    result, error = ToolRunner().run(args.plugin, payload)
    if error:
        _print_json({"error": public_error(error)})
        trace = plugin_traceback(error) if args.debug else ""
        if trace:
            print(trace, file=sys.stderr)
        return 1
    _print_json({"result": result, "plugin": args.plugin})
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    registry = get_registry()
    registry.environments = _environments(args)
    discover(registry, args.plugins_dir)
    for problem in registry.load_errors:
        print(f"plughost: warning: {problem}", file=sys.stderr)
    states = prepare_all(registry, _stderr, refresh=False)
    failed = {name: s for name, s in states.items() if s.status is not EnvStatus.READY}
    for name, state in failed.items():
        print(f"plughost: {name}: {state.message}", file=sys.stderr)
    ready = len(states) - len(failed)
    print(f"{ready} of {len(states)} plugin environments ready", file=sys.stderr)
    return 1 if failed or registry.load_errors else 0


def _cmd_plugins(args: argparse.Namespace) -> int:
    if args.action == "prepare":
        return _cmd_prepare(args)
    registry = get_registry()
    registry.environments = _environments(args)
    discover(registry, args.plugins_dir)
    host = HostLimits()
    rows: list[dict[str, Any]] = []
    for name in registry.list_plugins():
        plugin = registry.get_plugin(name)
        limits = host.clamp(plugin.manifest.plugin_limits)
        rows.append(
            {
                "name": name,
                "version": plugin.manifest.version,
                "description": plugin.manifest.description,
                "directory": str(plugin.directory),
                "limits": {"timeout_s": limits.timeout_s, "memory_mb": limits.memory_mb},
                "status": registry.get_status(name),
                "dependencies": list(plugin.requirements.dependencies),
                "options_schema": plugin.manifest.options,
            }
        )
    isolation = shared_sandbox().protections()
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
        if environment.get("message"):
            print(f"      {environment['message']}")
    schema = row["options_schema"]
    if schema is None:
        print("    options: no schema (passed unchecked)")
    else:
        for option, spec in (schema.get("properties") or {}).items():
            kind = spec.get("type", "any") if isinstance(spec, dict) else "any"
            extra = (
                f" = {spec['default']!r}" if isinstance(spec, dict) and "default" in spec else ""
            )
            print(f"    option {option}: {kind}{extra}")


def _cmd_new(args: argparse.Namespace) -> int:
    try:
        directory = scaffold.create(args.name, args.dir)
    except (scaffold.ScaffoldError, OSError) as exc:
        print(f"plughost: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {directory}; next: plughost check {directory}")
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from host.authoring import check_plugin, sample_images

    for image in args.image:
        if not image.is_file():
            print(f"plughost: --image {image}: no such file", file=sys.stderr)
            return 2
    environments = _environments(args)
    sandbox = shared_sandbox()
    return check_plugin(
        args.directory,
        sample_images(args.image),
        environments,
        lambda registry: ToolRunner(sandbox=sandbox, registry=registry),
    )


def _cmd_serve(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from host.api import create_app
    from host.api.server import serve
    from host.config import ConfigError, load_settings
    from host.logs import configure_logging

    names = (
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
    )
    overrides = {name: getattr(args, name) for name in names}
    overrides["plugins_dirs"] = args.plugins_dir
    try:
        settings = load_settings(args.config, overrides=overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_repeat_limit, settings.log_repeat_interval_s)
    # Tokens come from the config file or PLUGHOST_CLIENT_TOKENS / PLUGHOST_ADMIN_TOKEN,
    # never from flags: command lines are visible to every user of the machine.
    serve(create_app(settings), settings)
    return 0


def _cmd_crash_suite(args: argparse.Namespace) -> int:
    import os

    from host import crashsuite

    cases, errors = crashsuite.load_cases(args.plugins_dir, args.case, args.category)
    for problem in errors:
        print(f"plughost: warning: {problem}", file=sys.stderr)
    if not cases:
        print("plughost: no crash-suite case matches", file=sys.stderr)
        return 2
    target: crashsuite.Target
    if args.http:
        target = crashsuite.HttpTarget(args.http, token=os.environ.get("PLUGHOST_TOKEN"))
        print(
            "note: against a server, leftover processes are counted by the sandbox uid range "
            "(a root server only); another host's calls on that machine would count too",
            file=sys.stderr,
        )
    else:
        registry = get_registry()
        discover(registry)
        bundled = set(registry.list_plugins())
        for case in list(cases):
            if case.name in bundled:  # names are unique: never replace a bundled plugin
                print(
                    f"plughost: case {case.name} in {case.plugin.directory} claims the name of "
                    f"the bundled plugin in {registry.get_plugin(case.name).directory}; skipped",
                    file=sys.stderr,
                )
                cases.remove(case)
                continue
            registry.register(case.name, case.plugin)
        if not cases:
            print("plughost: no crash-suite case left to run", file=sys.stderr)
            return 2
        try:
            sandbox = Sandbox(disabled=args.disable_layer, prewarm=args.prewarm)
        except ValueError as exc:
            print(f"plughost: {exc}", file=sys.stderr)
            return 2
        target = crashsuite.LocalTarget(registry, ToolRunner(sandbox=sandbox))

    def progress(index: int, total: int, report: crashsuite.CaseReport) -> None:
        print(
            f"[{index:>3}/{total}] {report.verdict:<13} {report.name} ({report.observed}, "
            f"{report.seconds:.2f}s)",
            file=sys.stderr,
            flush=True,
        )

    if args.prewarm and not args.http:
        # Each case runs twice: the first call starts cold and warms a child
        # for the plugin, the reported run uses that warm child.
        crashsuite.run_suite(cases, target)
    report = crashsuite.run_suite(cases, target, progress)
    if isinstance(target, crashsuite.LocalTarget):
        target.runner.sandbox.close()
    print(crashsuite.format_table(report))
    crashsuite.write_reports(report, args.json, args.junit)
    return 0 if report.ok else 1


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command == "run":
        return _cmd_run(args, parser)
    if args.command == "serve":
        return _cmd_serve(args, parser)
    if args.command == "crash-suite":
        return _cmd_crash_suite(args)
    if args.command == "new":
        return _cmd_new(args)
    if args.command == "check":
        return _cmd_check(args)
    return _cmd_plugins(args)


if __name__ == "__main__":
    sys.exit(main())
