"""What every child inherits from the launcher, worked out there once.

Runs in the launcher: `prepare` is called before each fork (`sandbox.launcher`)
and fills this module's globals with work every child would otherwise
repeat. The forked child reads them (`sandbox.child`) by identity: an entry
made for the same object (the call's limits, a loaded module, an import
hook) is used as it is, anything else the child works out itself with the
same functions, which live here:

    READY_FRAME     the ready frame, encoded once
    INTERPRETER     the interpreter's own file, the venv's links resolved
    ARGV            where the launcher's argv memory is (the child wipes it)
    ENVIRONMENT     what turns the environment into SAFE_ENV in a minimal
                    root's scratch, with the thread pools' variables
    RLIMITS         the next call's limits and their rlimits
    VERDICTS        id -> whether a loaded module or import hook is the
                    standard library's
    PREPARED        the loaded modules' names, and which of them to forget
    FINDERS         the import path's directories -> their FileFinder

`prepare` also has the layers make their own (the seccomp programs, the
Landlock rules: `sandbox.layers.seccomp`, `sandbox.layers.landlock`).
Neither the host nor any plugin code imports this module.
"""

from __future__ import annotations

import importlib.machinery
import os
import sys

from sandbox.layers import landlock, mnt, seccomp
from sandbox.layers.kernel import argv_memory
from sandbox.limits import rlimits_for
from sandbox.protocol import READY, SAFE_ENV, ChildSpec, encode_frame

READY_FRAME = encode_frame(READY)  # encoded once, in the launcher

# The interpreter's own file, the venv's links resolved (in the launcher).
INTERPRETER = os.path.realpath(sys.executable)

ARGV: tuple[int, int] | None = None  # the launcher's argv memory, found by `prepare`

# The rlimits of the call the launcher forks next, for each count of extra
# processes and whether a cgroup counts its memory (`prepare`), beside the
# limits they were worked out from.
RLIMITS: tuple[object, dict[tuple[int, bool], dict[int, tuple[int, int]]]] = (None, {})

Environment = tuple[tuple[str, ...], tuple[tuple[str, str], ...]]

# ((scratch, threads), the cpus limit it was made for, what turns the
# launcher's environment into that of a call with this scratch and as many
# threads: nothing, for the launcher's own environment is that call's
# (`prepare`); the child of any other call works its own out.
ENVIRONMENT: tuple[tuple[str, int], int, Environment] = (("", 0), 0, ((), ()))

# What thread pools read to size themselves: OpenMP, the BLAS libraries,
# numexpr, Rust's rayon, and Python's own os.cpu_count() from 3.13. A call
# gets them set to its CPUs (`thread_count`).
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "PYTHON_CPU_COUNT",
)


def thread_count(cpus: int) -> int:
    """The CPUs a call of `cpus` runs on: at most as many as this process may use."""
    return min(cpus, len(os.sched_getaffinity(0)))


def environment_for(scratch: str, threads: int) -> Environment:
    """What turns this process's environment into SAFE_ENV with HOME and
    TMPDIR at `scratch` and THREAD_VARIABLES at `threads`: the variables to
    remove, and those to set."""
    wanted = {
        **SAFE_ENV,
        "HOME": scratch,
        "TMPDIR": scratch,
        **dict.fromkeys(THREAD_VARIABLES, str(threads)),
    }
    environ = os.environ
    removed = tuple(name for name in environ if name not in wanted)
    changed = tuple((name, value) for name, value in wanted.items() if environ.get(name) != value)
    return removed, changed


def writable(scratch: str) -> tuple[str, ...]:
    """The directories a call writes: its scratch, and in a minimal root its
    own /dev/shm."""
    return (scratch, mnt.SHM) if scratch == mnt.SCRATCH else (scratch,)


def landlock_expose(spec: ChildSpec) -> tuple[str, ...]:
    """The paths a call's Landlock rules let it read. An installed plugin's
    import root is listed to find its package; in the minimal root it holds
    that package alone."""
    return (*spec.expose, spec.import_root) if spec.import_root else spec.expose


# The standard library's entries of sys.path, as the launcher found them.
STDLIB_PATH = [p for p in sys.path if p.startswith(sys.base_prefix) and not p.endswith("-packages")]
_STDLIB_ROOTS = tuple(os.path.realpath(p) + os.sep for p in STDLIB_PATH)

# id -> (the object, whether it comes from the standard library). The object
# is held so that its id names nothing else while the entry exists.
VERDICTS: dict[int, tuple[object, bool]] = {}
# The loaded modules' names when `prepare` last ran, and which of them to forget.
PREPARED: tuple[frozenset[str], tuple[str, ...]] = (frozenset(), ())


def import_path(spec: ChildSpec) -> list[str]:
    """The call's sys.path: its plugin, its environment, the standard library."""
    return [spec.import_root or spec.plugin_dir, *spec.import_paths, *STDLIB_PATH]


def from_stdlib(thing: object) -> bool:
    """A module (or import hook) of the interpreter itself, not of a package.

    The verdict on everything the launcher had loaded was reached there once
    (`prepare`); a child works out only what its own set-up added.
    """
    known = VERDICTS.get(id(thing))
    if known is not None and known[0] is thing:
        return known[1]
    return _origin_in_stdlib(thing)


def _origin_in_stdlib(thing: object) -> bool:
    if isinstance(thing, type(sys)):
        origin = getattr(thing, "__file__", None)
    else:
        owner = getattr(thing, "__module__", None) or type(thing).__module__
        origin = getattr(sys.modules.get(owner), "__file__", None)
    return origin is None or os.path.realpath(origin).startswith(_STDLIB_ROOTS)


def forget(name: str, module: object) -> bool:
    """Whether a child forgets the loaded module `name` (not the standard library's)."""
    return name != "__main__" and not from_stdlib(module)


def prepare(spec: ChildSpec) -> None:
    """Work every child would otherwise repeat, done once in the launcher
    before it forks: which loaded modules and import hooks are the standard
    library's (the child's `_isolate_imports` resolves each one's file),
    where the argv memory to wipe is, the seccomp filter's program, and for
    `spec`: the environment for its scratch directory, its Landlock rules,
    the finders of its import path and its rlimits. Only what is new since
    the last call costs anything."""
    global PREPARED, ARGV, RLIMITS, ENVIRONMENT
    if ARGV is None:
        ARGV = argv_memory()
    if len(sys.modules) != len(PREPARED[0]):
        for thing in [*sys.modules.values(), *sys.meta_path, *sys.path_hooks]:
            if id(thing) not in VERDICTS:
                VERDICTS[id(thing)] = (thing, _origin_in_stdlib(thing))
        names = tuple(sorted(n for n, module in sys.modules.items() if forget(n, module)))
        PREPARED = (frozenset(sys.modules), names)
    seccomp.prepare_filters()
    landlock.prepare()
    # The environment of a call in a minimal root is the same for every such
    # call with as many CPUs: the launcher takes it as its own (it runs no
    # program and no thread pool that reads it), and such a child changes
    # no variable (each change, a putenv and a Python method, is pages
    # written in every child). A call without a minimal root has a host
    # scratch directory of its own; its child works its environment out.
    # Done again only when the cpus limit changed; the affinity is read again
    # in the child, which works its environment out itself if it differs.
    if ENVIRONMENT[1] != spec.limits.cpus:
        threads = thread_count(spec.limits.cpus)
        apply_environment(environment_for(mnt.SCRATCH, threads))
        prepared = environment_for(mnt.SCRATCH, threads)  # nothing left to change
        ENVIRONMENT = ((mnt.SCRATCH, threads), spec.limits.cpus, prepared)
    if spec.layers.get("landlock"):
        landlock.prepare_rules(landlock_expose(spec), writable(mnt.SCRATCH))
    _prepare_finders(import_path(spec))
    if RLIMITS[0] != spec.limits:
        RLIMITS = (
            spec.limits,
            {
                (extra, counted): rlimits_for(spec.limits, extra, counted)
                for extra in (0, 1)
                for counted in (False, True)
            },
        )
    else:  # the same values: the child recognises the limits by identity
        RLIMITS = (spec.limits, RLIMITS[1])


def apply_environment(environment: Environment) -> None:
    """Change this process's environment as `environment_for` worked out."""
    removed, changed = environment
    environ = os.environ
    for name in removed:
        del environ[name]
    for name, value in changed:
        environ[name] = value


# A directory of a call's import path -> the standard library's finder for
# it, made in the launcher (`prepare`); None for an entry that is no directory.
FINDERS: dict[str, importlib.machinery.FileFinder | None] = {}
MAX_FINDERS = 512
_LOADERS = (
    (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES),
    (importlib.machinery.SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES),
    (importlib.machinery.SourcelessFileLoader, importlib.machinery.BYTECODE_SUFFIXES),
)


def _prepare_finders(entries: list[str]) -> None:
    """The finders a child's imports would otherwise make first (running
    the zip importer's hook, which fails with an exception on a directory),
    made here; the standard library's directories also listed, which every
    call may read. A plugin's own directories are listed by its child: the
    launcher's memory is every call's, and one plugin must not find the
    names of another's files there. A finder lists its directory again if
    it changed since (its mtime), as any finder does."""
    for entry in entries:
        if entry in FINDERS:
            continue
        if len(FINDERS) >= MAX_FINDERS:
            FINDERS.clear()
        finder = None  # not a directory here (a zip file, or nothing): the child's hooks decide
        if os.path.isdir(entry):
            finder = importlib.machinery.FileFinder(entry, *_LOADERS)
            if entry in STDLIB_PATH:
                finder.find_spec("-")  # no module has that name: only the listing is read
        FINDERS[entry] = finder


__all__ = ["prepare"]
