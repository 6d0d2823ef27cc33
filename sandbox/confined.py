"""Running a trusted tool confined, outside any call: the package installer.

uv and pip are trusted programs, but what they fetch and read is not, and a
source build the operator allowed runs a package's own build code. So the
host starts the installer through this program (`python -I -m
sandbox.confined FD`, FD a pipe the host writes a JSON `Confinement` to:
not the command line, which every local user can read), which applies these steps
in order and then executes the tool:

    host --spawn--> confined (host's uid)
      root host only:
        1. unshare a mount, a PID and a network namespace; mounts made
           private; loopback up, and a listener on 127.0.0.1:PROXY_PORT,
           the installer's HTTP(S)_PROXY: each connection is handed, as a
           descriptor, to the host over `proxy_fd`, whose proxy reaches the
           package index and nothing else (`host.indexproxy`)
        2. empty tmpfs over /tmp, /var/tmp and /dev/shm (nothing of the
           host's shared scratch places), and over the topmost directory
           others may not enter on the way to each `reach` path (the
           interpreter and uv may live below /root: /root is then an empty
           tmpfs holding just them); each `reach` path bound back where it
           was; the work directory and the download cache bound at their
           `binds` paths under /tmp
        3. fork: the tool's process is the init of the new PID namespace, so
           every process it starts dies with it, and mounts a /proc of that
           namespace (no host process is listed); this program hands the
           proxy's connections over, waits and passes its exit status on
        4. setgroups([]), setgid and setuid to the installer's own uid
        5. parent-death SIGKILL (if this program is killed, so is the tool)
      every host:
        6. no_new_privs
        7. Landlock: reads only below INSTALLER_READABLE (the system: /usr,
           /lib*, /bin, /etc with its certificates and resolver files, /proc,
           /sys, a few devices), the `reach` paths (the interpreter, uv, the
           operator's local index paths) and the resolver's file where
           /etc/resolv.conf leads; writes only below `writable` (and
           /dev/null); no TCP bind; signals and abstract unix sockets scoped
           (ABI 6+). Nothing else of the host is readable: not its home, its
           state directory and job store, other plugins' files. A kernel
           without Landlock skips this step (the host reports it); any other
           failure stops here
        8. execve the tool with exactly the environment the host gave

A step that fails exits with CONFINEMENT_FAILED before the tool runs, with
the reason on stderr (fail closed).
"""

from __future__ import annotations

import array
import json
import os
import select
import signal
import socket
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from sandbox.layers import landlock, net
from sandbox.layers.kernel import (
    PR_SET_NO_NEW_PRIVS,
    PR_SET_PDEATHSIG,
    IsolationError,
    mount,
    prctl,
    unshare,
)

CONFINEMENT_FAILED = 125
CLONE_NEWNS, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x20000000, 0x40000000
PROXY_PORT = 3128  # in the installer's own network namespace, where every port is free
MS_BIND, MS_REC, MS_PRIVATE, MS_NOSUID, MS_NODEV, MS_NOEXEC = 4096, 16384, 1 << 18, 2, 4, 8
HIDDEN_SCRATCH = ("/tmp", "/var/tmp", "/dev/shm")
WRITABLE_FILES = ("/dev/null",)
# What any installer reads of the system: programs and libraries, /etc (the
# certificates, the resolver's and the index settings' files; what in it is
# secret its permissions keep from the installer's uid), its own /proc, the
# CPU and cgroup figures it sizes its work by, and the harmless devices.
INSTALLER_READABLE = (
    "/usr",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/etc",
    "/proc",
    "/sys",
    "/dev/null",
    "/dev/zero",
    "/dev/random",
    "/dev/urandom",
)


@dataclass(frozen=True)
class Confinement:
    """What the tool may do. `binds` maps a path under /tmp (as the tool
    sees it) to the host directory bound there; `uid` None: the host's own
    (an unprivileged host), and then there are no namespaces and no binds."""

    argv: list[str]
    env: dict[str, str]
    writable: list[str]
    binds: dict[str, str] = field(default_factory=dict)
    reach: list[str] = field(default_factory=list)  # directories it must be able to enter
    readable: list[str] = field(default_factory=list)  # more it reads (as the tool sees them)
    uid: int | None = None
    gid: int | None = None
    proxy_fd: int | None = None  # a unix socket to the host's index proxy (root host)

    def to_json(self) -> str:
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> Confinement:
        data: dict[str, Any] = json.loads(text)
        return cls(**data)


def _covered(path: str, hidden: Iterable[str]) -> str | None:
    """The topmost directory on the way to `path` that gets an empty tmpfs:
    a hidden scratch place, or one others may not enter. None: no cover."""
    parts = path.strip("/").split("/")
    for depth in range(1, len(parts)):
        ancestor = "/" + "/".join(parts[:depth])
        if ancestor in hidden or not os.stat(ancestor).st_mode & 0o001:
            return ancestor
    return None


def _bind(fd: int, target: str) -> None:
    os.makedirs(target, mode=0o755, exist_ok=True)
    mount(f"/proc/self/fd/{fd}", target, None, MS_BIND | MS_REC, None)
    os.close(fd)


def _namespaces(spec: Confinement) -> None:
    """Steps 1 and 2: a mount namespace of its own, with private scratch
    places, the `reach` paths reachable, and the directories the tool works
    in bound below /tmp."""
    unshare(CLONE_NEWNS | CLONE_NEWPID | (CLONE_NEWNET if spec.proxy_fd is not None else 0))
    try:
        mount("none", "/", None, MS_REC | MS_PRIVATE, None)
    except IsolationError as exc:  # EINVAL: a chroot into a plain directory
        raise IsolationError("mount", f"/ is not a mount point here (a chroot?): {exc}") from None
    # Opened in the new namespace (a bind's source must be one of its
    # mounts), before a tmpfs hides them.
    flags = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
    sources = {target: os.open(source, flags) for target, source in spec.binds.items()}
    hidden = [place for place in HIDDEN_SCRATCH if os.path.isdir(place)]
    reach = {os.path.realpath(path) for path in spec.reach}
    covers = {path: _covered(path, hidden) for path in reach}
    kept = {path: os.open(path, flags) for path, cover in covers.items() if cover is not None}
    for place in sorted({*hidden, *(c for c in covers.values() if c is not None)}):
        mount("tmpfs", place, "tmpfs", MS_NOSUID | MS_NODEV, "mode=0755,size=16m")
    for path, fd in sorted(kept.items()):
        _bind(fd, path)
    for target, fd in sources.items():
        if not target.startswith("/tmp/"):
            raise IsolationError("bind", f"{target} is not below /tmp")
        _bind(fd, target)


def _drop(spec: Confinement, parent_alive: int) -> None:
    """Steps 4 and 5: the installer's uid, and death with this program."""
    assert spec.uid is not None and spec.gid is not None
    os.setgroups([])
    os.setgid(spec.gid)
    os.setuid(spec.uid)
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)  # after setuid, which clears it
    readable, _, _ = select.select([parent_alive], [], [], 0)
    if readable:  # end of file: this program died before the signal was set
        os._exit(CONFINEMENT_FAILED)
    os.close(parent_alive)


def _restrict(spec: Confinement) -> None:
    """Steps 6 and 7."""
    prctl(PR_SET_NO_NEW_PRIVS, 1)
    if landlock.landlock_abi() >= 1:
        landlock.restrict_tool(_readable(spec), spec.writable, WRITABLE_FILES)
    else:
        print("confined: this kernel has no Landlock; reads and writes are bounded by the uid only")


def _readable(spec: Confinement) -> list[str]:
    """INSTALLER_READABLE, the `reach` and `readable` paths, and the
    directory of the file /etc/resolv.conf leads to (systemd-resolved's is
    below /run)."""
    resolver = os.path.dirname(os.path.realpath("/etc/resolv.conf"))
    return [*INSTALLER_READABLE, *spec.reach, *spec.readable, resolver]


def _exec(spec: Confinement) -> None:
    """Step 8; returns only if the tool cannot be executed."""
    try:
        os.execve(spec.argv[0], spec.argv, spec.env)
    except OSError as exc:
        print(f"confined: cannot execute {spec.argv[0]}: {exc.strerror}", file=sys.stderr)
        os._exit(CONFINEMENT_FAILED)


def _proxy_listener() -> socket.socket:
    """Step 1's network: loopback up, and the listener the installer's
    proxy settings name."""
    net.loopback_up()
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", PROXY_PORT))
    listener.listen(64)
    return listener


def _wait(
    pid: int, listener: socket.socket | None = None, channel: socket.socket | None = None
) -> int:
    """Step 3's other half: hand each connection to the proxy's listener
    over to the host, until the tool exits; its exit status, as a shell
    reports it."""
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        if listener is not None and channel is not None:
            ready, _, _ = select.select([listener], [], [], 0.2)
            if ready:
                _hand_over(listener, channel)
        try:
            done, status = os.waitpid(pid, os.WNOHANG if listener is not None else 0)
        except ChildProcessError:
            return CONFINEMENT_FAILED
        if done:
            break
    code = os.waitstatus_to_exitcode(status)
    return code if code >= 0 else 128 - code


def _hand_over(listener: socket.socket, channel: socket.socket) -> None:
    """Send one accepted connection's descriptor to the host's proxy."""
    try:
        conn, _ = listener.accept()
    except OSError:
        return
    with conn:
        fds = array.array("i", [conn.fileno()])
        channel.sendmsg([b"c"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds)])


def main(argv: list[str]) -> int:
    """Confine and run the tool described on the descriptor `argv[1]`.
    Returns (as the exit status) the tool's, or CONFINEMENT_FAILED."""
    try:
        with os.fdopen(int(argv[1]), encoding="utf-8") as stream:
            spec = Confinement.from_json(stream.read())
        if spec.uid is None:
            _restrict(spec)
            _exec(spec)
            return CONFINEMENT_FAILED
        if spec.proxy_fd is not None:
            os.set_inheritable(spec.proxy_fd, False)  # the tool never holds it
        _namespaces(spec)
        listener = _proxy_listener() if spec.proxy_fd is not None else None
        alive_r, alive_w = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(alive_w)
                if listener is not None:
                    listener.close()
                mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, None)
                _drop(spec, alive_r)
                _restrict(spec)
            except (IsolationError, OSError) as exc:
                print(f"confined: {exc}", file=sys.stderr)
                os._exit(CONFINEMENT_FAILED)
            _exec(spec)
        os.close(alive_r)
        if listener is not None and spec.proxy_fd is not None:
            return _wait(pid, listener, socket.socket(fileno=spec.proxy_fd))
        return _wait(pid)
    except (IsolationError, OSError, ValueError, TypeError, IndexError) as exc:
        print(f"confined: {exc}", file=sys.stderr)
        return CONFINEMENT_FAILED


if __name__ == "__main__":
    sys.exit(main(sys.argv))
