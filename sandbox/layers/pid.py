"""Layer pid_namespace: the call's processes see only each other.

Detected: a child can unshare CLONE_NEWPID. Host: nothing.
Child: the flag joins the minimal root's unshare (`sandbox.layers.mnt`);
then `split` forks the process into relay, init (pid 1) and worker. A root
launcher makes the namespace itself before the fork (`sandbox.layers.shared`):
the child is then init, and forks only the worker; or it forks the child into
its uid's slot, whose init is the slot's holder: the child is the worker.
"""

from __future__ import annotations

import os
import signal
from typing import NoReturn

from sandbox import trace
from sandbox.layers.kernel import PR_SET_PDEATHSIG, prctl
from sandbox.layers.mnt import enter_minimal_root, mount_own_proc
from sandbox.layers.privilege import give_up_privileges
from sandbox.protocol import RELAYED_STATUS as STATUS

CLONE_NEWPID = 0x20000000


def split(
    uid: int | None,
    gid: int | None,
    relay_fd: int,
    call_fds: tuple[int, ...],
    made_by_launcher: bool = False,
    copied_root: bool = False,
) -> None:
    """Fork into the new PID namespace: relay (here) -> init (pid 1) -> worker.

    The relay stays in the host's namespace and hands the worker's exit
    status to the launcher. Init mounts the namespace's /proc and switches
    to the minimal root, then reaps every process of the namespace; when the
    worker ends, init reports and exits, and the kernel kills whatever is
    left in the namespace. When the launcher `made_by_launcher` the namespace
    (`sandbox.layers.shared`), this process already is its init and reports
    to the launcher itself: no relay. In a `copied_root` (the launcher's
    template) the root is in place already: init only mounts /proc.
    Returns only in the worker.
    """
    if made_by_launcher:
        status_w = relay_fd
    else:
        status_r, status_w = os.pipe()
        init = os.fork()
        if init:
            os.close(status_w)
            _relay(init, status_r, relay_fd, call_fds)
        os.close(status_r)
    trace.mark("init.forked")
    if copied_root:
        mount_own_proc()
    else:
        enter_minimal_root(own_pid_namespace=True)
    trace.mark("init.enter_minimal_root")
    worker = os.fork()
    if worker:
        for fd in {0, *call_fds, relay_fd} - {status_w}:
            os.close(fd)
        give_up_privileges(uid, gid, user_namespace=uid is None)
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        trace.mark("init.privilege")
        _init_loop(worker, status_w)
    if status_w != relay_fd:
        os.close(status_w)
    trace.mark("worker.forked")


def _init_loop(worker: int, status_w: int) -> NoReturn:
    while True:
        try:
            pid, status, usage = os.wait4(-1, 0)
        except ChildProcessError:
            os._exit(0)
        if pid == worker:
            os.write(status_w, STATUS.pack(status, usage.ru_maxrss))
            os._exit(0)


def _relay(init: int, status_r: int, relay_fd: int, call_fds: tuple[int, ...]) -> NoReturn:
    """Hand the worker's wait status and peak RSS to the launcher, then exit.

    The relay is root and in the host's PID namespace: it never re-raises
    the plugin's fatal signal on itself (a root core dump, a root crash),
    it writes the raw status on `relay_fd`, which the launcher reports as the
    call's own.
    """
    trace.mark("relay.fork_init")
    for fd in call_fds:
        os.close(fd)  # the call's pipes belong to the worker
    prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    data = b""
    while len(data) < STATUS.size:
        chunk = os.read(status_r, STATUS.size - len(data))
        if not chunk:
            break
        data += chunk
    _, init_status, usage = os.wait4(init, 0)
    if len(data) != STATUS.size:  # init died before it could report
        data = STATUS.pack(init_status, usage.ru_maxrss)
    os.write(relay_fd, data)  # 12 bytes: one write, never partial
    os._exit(0)
