"""Two worker nodes in network namespaces of their own, each reaching
PostgreSQL over a veth link and nothing else, each with its own copy of the
plugins (no shared directory): jobs accepted by an API node run on both."""

from __future__ import annotations

import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from host.config import Settings
from host.services.build import build_services
from host.services.store import JobStatus
from tests.cluster.conftest import CLUSTER, Workers, live_workers
from tests.cluster.pg import PgCluster, wait_for
from tests.conftest import make_png

IP = shutil.which("ip") or "/usr/sbin/ip"
PAYLOAD = {"image": make_png(8, 8), "mime_type": "image/png", "options": {"s": 0.2}}
pytestmark = [
    *CLUSTER,
    pytest.mark.skipif(not Path(IP).exists(), reason="needs iproute2 (make test installs it)"),
]


def ip(*args: str) -> None:
    subprocess.run([IP, *args], check=True, timeout=30, capture_output=True)


class Link:
    """A network namespace joined to this one by a veth pair on its own /30."""

    def __init__(self, subnet: int, tag: str) -> None:
        self.ns = f"plughost-{tag}"
        self.host_ip = f"10.231.{subnet}.1"
        self.node_ip = f"10.231.{subnet}.2"
        outer, inner = f"ph{tag}o", f"ph{tag}i"
        ip("netns", "add", self.ns)
        ip("link", "add", outer, "type", "veth", "peer", "name", inner)
        ip("link", "set", inner, "netns", self.ns)
        ip("addr", "add", f"{self.host_ip}/30", "dev", outer)
        ip("link", "set", outer, "up")
        ip("-n", self.ns, "addr", "add", f"{self.node_ip}/30", "dev", inner)
        ip("-n", self.ns, "link", "set", inner, "up")
        ip("-n", self.ns, "link", "set", "lo", "up")

    def close(self) -> None:
        ip("netns", "del", self.ns)  # takes the veth pair with it


@pytest.fixture
def links() -> Iterator[list[Link]]:
    base = secrets.randbelow(120) * 2
    made: list[Link] = []
    try:
        for i in range(2):
            made.append(Link(base + i, secrets.token_hex(2) + str(i)))
        yield made
    finally:
        for link in made:
            link.close()


def test_workers_in_their_own_network_namespaces_run_the_jobs(links, plugins_dir, tmp_path):
    listen = ",".join(link.host_ip for link in links)
    pg = PgCluster(listen=listen, trust="10.231.0.0/16")
    workers: list[Workers] = []
    try:
        db = pg.database("netns")
        for n, link in enumerate(links):
            own = tmp_path / f"node{n}"
            shutil.copytree(plugins_dir, own / "plugins")  # nothing shared between the nodes
            url = db.replace(links[0].host_ip, link.host_ip)
            node = Workers(url, own / "plugins", own)
            node.start("--workers", "1", prefix=[IP, "netns", "exec", link.ns])
            workers.append(node)
        settings = Settings(
            database_url=db,
            plugins_dirs=[str(plugins_dir)],
            heartbeat_s=0.5,
            stalled_after_s=3.0,
            prewarm=0,
        )
        services = build_services(settings)
        try:
            wait_for(lambda: live_workers(services) == 2, 60, "two workers over their veth links")
            futures = [services.analysis.submit("nap", PAYLOAD)[1] for _ in range(12)]
            done = [f.result(timeout=60) for f in futures]
            assert all(job.status is JobStatus.SUCCESS for job in done)
        finally:
            services.jobs.shutdown()
            services.plugins.close()
        with psycopg.connect(db) as conn:
            ran_on = conn.execute("SELECT DISTINCT node FROM plughost_jobs").fetchall()
        assert len(ran_on) == 2  # both namespaced nodes ran jobs
    finally:
        for node in workers:
            node.stop_all()
        pg.close()
