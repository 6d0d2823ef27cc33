"""One quota across API nodes: two API nodes (processes, each in a network
namespace of its own) on one database, a client firing at both at once,
gets exactly its quota of jobs accepted, the rest 429 quota_exceeded."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import secrets
import signal
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psycopg
import pytest
from PIL import Image

from tests.cluster.conftest import CLUSTER, FAST, ROOT, Workers
from tests.cluster.pg import PgCluster, wait_for
from tests.cluster.test_netns import IP, Link
from tests.conftest import make_png, write_plugin

pytestmark = [
    *CLUSTER,
    pytest.mark.skipif(not Path(IP).exists(), reason="needs iproute2 (make test installs it)"),
]
PORT = 8471
PROBE = "probe=" + secrets.token_hex(16)
# Clients racing at once, each its own quota: a race between the nodes
# lets a client past its quota only at the one moment its count reaches it.
RACERS = [f"racer{n}=" + secrets.token_hex(16) for n in range(8)]
HEAVY = [f"heavy{n}=" + secrets.token_hex(16) for n in range(4)]
BATCHERS = [f"batcher{n}=" + secrets.token_hex(16) for n in range(4)]
MAX_JOBS = 5
# 300 x 300 pixels of noise: a PNG of about 270 kB, three of which fit in 1 MiB.
NOISE = 300


def _noise_png() -> bytes:
    image = Image.frombytes("RGB", (NOISE, NOISE), os.urandom(NOISE * NOISE * 3))
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def _post(
    host: str, token: str, plugin: str, image: bytes, items: int = 0
) -> tuple[int, dict[str, object]]:
    """POST /v1/jobs, or with `items` a POST /v1/batches of that many copies of `image`."""
    item = {"image": base64.b64encode(image).decode(), "mime_type": "image/png"}
    body: dict[str, object] = {"plugin": plugin, "options": {}, **item}
    if items:
        body = {"plugin": plugin, "items": [item] * items}
    conn = http.client.HTTPConnection(host, PORT, timeout=30)
    try:
        conn.request(
            "POST",
            "/v1/batches" if items else "/v1/jobs",
            json.dumps(body),
            {"content-type": "application/json", "authorization": f"Bearer {token}"},
        )
        answer = conn.getresponse()
        return answer.status, json.loads(answer.read())
    finally:
        conn.close()


def _accepts(host: str) -> bool:
    """The API node on `host` is up, sees the worker, and accepts a job."""
    try:
        return _post(host, _token(PROBE), "echo", make_png(8, 8))[0] == 202
    except (OSError, http.client.HTTPException):
        return False


def _token(entry: str) -> str:
    return entry.split("=", 1)[1]


class ApiNodes:
    """`host.cli serve` processes, each in the network namespace of a link."""

    def __init__(self, links: list[Link], db: str, plugins: Path, logs: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.hosts = [link.node_ip for link in links]
        for n, link in enumerate(links):
            with (logs / f"api-{n}.log").open("wb") as stream:
                self.procs.append(self._start(link, db, plugins, stream))

    @staticmethod
    def _start(
        link: Link, db: str, plugins: Path, stream: io.BufferedWriter
    ) -> subprocess.Popen[bytes]:
        argv = [
            IP, "netns", "exec", link.ns, sys.executable, "-m", "host.cli", "serve",
            "--database-url", db.replace("@" + db.split("@")[1].split(":")[0], "@" + link.host_ip),
            "--plugins-dir", str(plugins), "--host", link.node_ip, "--port", str(PORT),
            "--prewarm", "0",
        ]  # fmt: skip
        env = {
            **os.environ,
            **FAST,
            "PYTHONPATH": str(ROOT),
            "PLUGHOST_SELF_CHECK": "false",
            "PLUGHOST_CLIENT_TOKENS": ",".join([PROBE, *RACERS, *HEAVY, *BATCHERS]),
            "PLUGHOST_MAX_JOBS_PER_CLIENT": str(MAX_JOBS),
            "PLUGHOST_MAX_STORED_BYTES_PER_CLIENT": str(1024 * 1024),
        }
        return subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, cwd=ROOT, env=env)

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


@pytest.fixture
def cluster(plugins_dir: Path, tmp_path: Path) -> Iterator[tuple[str, ApiNodes]]:
    """PostgreSQL on two veth links, a worker (one slot) in this namespace,
    and an API node in each link's namespace, each accepting jobs."""
    write_plugin(plugins_dir, "hold", "time.sleep(600)\nreturn {}", timeout_s=600)
    base = secrets.randbelow(120) * 2
    links: list[Link] = []
    pg: PgCluster | None = None
    worker: Workers | None = None
    nodes: ApiNodes | None = None
    try:
        for i in range(2):
            links.append(Link(base + i, secrets.token_hex(2) + str(i)))
        pg = PgCluster(listen=",".join(link.host_ip for link in links), trust="10.231.0.0/16")
        db = pg.database("quota")
        worker = Workers(db, plugins_dir, tmp_path)
        worker.start("--workers", "1")
        nodes = ApiNodes(links, db, plugins_dir, tmp_path)
        for host in nodes.hosts:  # each node up and seeing the worker
            wait_for(
                lambda host=host: _accepts(host),
                90,
                f"the API node on {host} to accept a job",
                every_s=0.5,
            )
        yield db, nodes
    finally:
        if nodes is not None:
            nodes.stop()
        if worker is not None:  # its slot holds a 600 s job, which a stop would wait for
            for proc in worker.procs:
                worker.kill(proc)
        if pg is not None:
            pg.close()
        for link in links:
            link.close()


def _stored(db: str, answers: list[tuple[int, dict[str, object]]]) -> int:
    """How many jobs the database holds of the client whose answers these are."""
    job_id = next(
        body["job"]["id"] if "job" in body else body["items"][0]["job_id"]  # type: ignore[index]
        for status, body in answers
        if status == 202
    )
    with psycopg.connect(db) as conn:
        found = conn.execute(
            "SELECT COUNT(*) FROM plughost_jobs WHERE owner = "
            "(SELECT owner FROM plughost_jobs WHERE id = %s)",
            (job_id,),
        ).fetchone()
    assert found is not None
    return int(found[0])


Answers = list[tuple[int, dict[str, object]]]


def _fire(
    nodes: ApiNodes, clients: list[str], image: bytes, each: int, items: int = 0
) -> list[Answers]:
    """`each` POST /v1/jobs (with `items`: batches of that many) of every
    client at once, alternating between the nodes; the answers of each client."""
    with ThreadPoolExecutor(len(clients) * each) as pool:
        sent = [
            [
                pool.submit(_post, nodes.hosts[i % 2], _token(client), "hold", image, items)
                for i in range(each)
            ]
            for client in clients
        ]
        return [[a.result(timeout=120) for a in answers] for answers in sent]


def _accepted(answers: Answers) -> int:
    return sum(1 for status, _ in answers if status == 202)


def _check(answers: list[tuple[int, dict[str, object]]], accepted: int, quota: str) -> None:
    statuses = sorted(status for status, _ in answers)
    assert statuses.count(202) == accepted, statuses
    assert statuses.count(429) == len(answers) - accepted, statuses
    refused = {
        body["detail"]["details"]["quota"]  # type: ignore[index]
        for status, body in answers
        if status == 429
    }
    assert refused == {quota}


@pytest.mark.timeout(300)
def test_two_api_nodes_enforce_one_job_quota_and_one_byte_quota(cluster):
    db, nodes = cluster
    # The jobs never finish (one holds the worker's slot, the rest wait), so
    # a client's quota of unfinished jobs is all it gets.
    fired = _fire(nodes, RACERS, make_png(8, 8), 16)
    assert [_accepted(answers) for answers in fired] == [MAX_JOBS] * len(RACERS)
    for answers in fired:
        _check(answers, MAX_JOBS, "max_jobs_per_client")
        assert _stored(db, answers) == MAX_JOBS
    # A quota of 1 MiB holds three images of about 270 kB (and fewer jobs than MAX_JOBS).
    image = _noise_png()
    assert 3 * len(image) < 1024 * 1024 < 4 * len(image)
    fired = _fire(nodes, HEAVY, image, 10)
    assert [_accepted(answers) for answers in fired] == [3] * len(HEAVY)
    for answers in fired:
        _check(answers, 3, "max_stored_bytes_per_client")
        assert _stored(db, answers) == 3
    # Batches of two items: two fit a quota of five jobs, a third does not.
    fired = _fire(nodes, BATCHERS, make_png(8, 8), 8, items=2)
    assert [_accepted(answers) for answers in fired] == [MAX_JOBS // 2] * len(BATCHERS)
    for answers in fired:
        _check(answers, MAX_JOBS // 2, "max_jobs_per_client")
        assert _stored(db, answers) == 2 * (MAX_JOBS // 2)
