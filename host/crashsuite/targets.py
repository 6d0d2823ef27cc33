"""Where the cases run: `LocalTarget` through a ToolRunner in this process
(on the sandbox it is given), `HttpTarget` through a running server's
`/v1/analyze`. Each can tell which processes a finished call left behind."""

from __future__ import annotations

import base64
import contextlib
import json
import urllib.error
import urllib.request
from typing import Any, Protocol

import psutil

from sandbox.supervisor import uid_range
from sandbox.tool_runner import ToolRunner


class Target(Protocol):
    local: bool

    def protections(self) -> dict[str, bool]: ...
    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]: ...
    def alive(self) -> bool: ...
    def idle_uids(self) -> set[int]: ...
    def leftover_processes(self) -> int: ...
    def end_leftovers(self) -> None: ...
    def settle(self) -> None: ...
    def host_fds(self) -> int: ...


def sandbox_processes(idle_uids: set[int] | None = None, only: set[int] | None = None) -> int:
    """Processes running under a sandbox uid (zombies and idle warm children
    aside), or under one of `only`."""
    count = 0
    idle = idle_uids or set()
    for proc in psutil.process_iter(["uids", "status"]):
        uids = proc.info["uids"]
        if not uids or (only is not None and uids.real not in only):
            continue
        if uids.real in uid_range() and uids.real not in idle:
            count += proc.info["status"] != psutil.STATUS_ZOMBIE
    return count


def descendants(pid: int | None, exclude: set[int]) -> list[psutil.Process]:
    """Live descendants of `pid`, minus the trees rooted at `exclude` (as
    psutil handles, which refuse to signal a pid that was reused since)."""
    if pid is None:
        return []
    try:
        children = psutil.Process(pid).children()
    except psutil.Error:
        return []
    found = []
    for child in children:
        if child.pid in exclude:
            continue
        try:
            if child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
        found += descendants(child.pid, exclude)
    return found


class LocalTarget:
    """Cases run through a ToolRunner in this very process, on its sandbox."""

    local = True

    def __init__(self, runner: ToolRunner) -> None:
        self.runner = runner

    def protections(self) -> dict[str, bool]:
        return self.runner.sandbox.protections()

    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        return self.runner.run(case, {"image": image, "mime_type": "image/png", "options": options})

    def alive(self) -> bool:
        return True

    def idle_uids(self) -> set[int]:
        return self.runner.sandbox.warm_uids()

    def leftover_processes(self) -> int:
        """Processes of finished calls still alive: by uid on a root host; on
        one without per-call uids, every descendant of this host's launcher
        that is not a warm child waiting for its call."""
        sandbox = self.runner.sandbox
        if sandbox.active_layers()["privilege_drop"]:
            # Only uids this host used and nobody holds: another host's calls
            # on the same machine (a running server) are not counted.
            return sandbox_processes(only=sandbox.uids_at_rest())
        return len(descendants(sandbox.launcher.pid, exclude=sandbox.warm_pids()))

    def end_leftovers(self) -> None:
        """Kill what a case the host could not defend left behind."""
        sandbox = self.runner.sandbox
        if sandbox.active_layers()["privilege_drop"]:
            return  # the next call with the same uid sweeps it
        for proc in descendants(sandbox.launcher.pid, exclude=sandbox.warm_pids()):
            with contextlib.suppress(psutil.Error):
                proc.kill()

    def host_fds(self) -> int:
        """This process's open descriptors, less those of the warm children
        waiting in the pool (which one stands there changes from call to call)."""
        sandbox = self.runner.sandbox
        sandbox.settle()  # a warm child put away at its idle limit meanwhile is closed
        process = psutil.Process()
        # The pool's keeper opens and closes descriptors of its own (its
        # wake-up pipe): a count is taken only where the pool's share did not
        # change around it.
        for _ in range(100):
            held = sandbox.warm_fds()
            count = process.num_fds()
            if sandbox.warm_fds() == held:
                break
        return count - held

    def settle(self) -> None:
        # Warm children started in the background hold descriptors; let them
        # land before counting the host's descriptors.
        self.runner.sandbox.settle()


class HttpTarget:
    """Cases sent to a running server's `/v1/analyze` (the server must load the cases)."""

    local = False
    TIMEOUT_S = 120.0  # for one request

    def __init__(self, url: str, token: str | None = None, timeout_s: float = TIMEOUT_S) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s

    def _request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        headers = {"content-type": "application/json"}
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                return response.status, json.loads(response.read() or b"null")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def protections(self) -> dict[str, bool]:
        _, body = self._request("GET", "/readyz")
        return dict(body.get("isolation", {})) if isinstance(body, dict) else {}

    def call(
        self, case: str, image: bytes, options: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        body = {
            "plugin": case,
            "image": base64.b64encode(image).decode(),
            "mime_type": "image/png",
            "options": options,
        }
        status, answer = self._request("POST", "/v1/analyze", body)
        if status == 200:
            return answer["result"], {}
        return {}, {"error": answer.get("detail", {}) if isinstance(answer, dict) else {}}

    def alive(self) -> bool:
        try:
            return self._request("GET", "/healthz")[0] == 200
        except OSError:
            return False

    def settle(self) -> None:
        """Nothing to wait for: the server's descriptors are not counted."""

    def host_fds(self) -> int:
        return 0  # the server's are not ours to count

    def idle_uids(self) -> set[int]:
        _, body = self._request("GET", "/readyz")
        return set(body.get("warm_uids", [])) if isinstance(body, dict) else set()

    def leftover_processes(self) -> int:
        # Only a root server's calls can be seen from here (by their uids).
        return sandbox_processes(self.idle_uids())

    def end_leftovers(self) -> None:
        pass  # a root server's next call with the same uid sweeps them
