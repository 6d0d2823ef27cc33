"""What a client can make the host store and send back is bounded: listing
pages by bytes, stored jobs and bytes per client."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from host.errors import QuotaExceeded, envelope
from host.services import PluginManagementService, SQLiteJobStore
from host.services.jobs import JobManagementService
from tests.conftest import wait_until
from tests.host.api.test_bounds import peak_bytes
from tests.host.api.test_routes import assert_envelope
from tests.host.api.test_tenants import ALICE, BOB, TOKENS

MiB = 1024 * 1024


def big_result(size: int) -> dict[str, Any]:
    """A result of about `size` bytes of JSON made of many small objects,
    the shape that costs a parser the most memory per byte."""
    return {"rows": [{"v": 1} for _ in range(size // 10)]}


@pytest.fixture
def results_of(monkeypatch: pytest.MonkeyPatch) -> Callable[[int], None]:
    """Make every plugin call return a fresh result of the given size."""

    def set_size(size: int) -> None:
        def fake(
            self: PluginManagementService,
            plugin_name: str,
            payload: Any,
            cancel: Any = None,
            owner: Any = None,
        ) -> tuple[dict[str, Any], dict[str, Any]]:
            return big_result(size), {}

        monkeypatch.setattr(PluginManagementService, "execute_plugin", fake)

    return set_size


@pytest.mark.timeout(180)
def test_listing_large_results_is_bounded_in_bytes_and_memory(
    make_client: Callable[..., TestClient],
    results_of: Callable[[int], None],
    body: dict,
    tmp_path: Path,
) -> None:
    client = make_client(store=SQLiteJobStore(tmp_path / "jobs.sqlite3"))
    results_of(1_000_000 - 1000)  # just under the sandbox's 1 MB output limit
    ids = [client.post("/v1/analyze", json=body).json()["job_id"] for _ in range(20)]
    response, peak = peak_bytes(lambda: client.get("/v1/jobs", params={"limit": 20}))
    print(f"GET /v1/jobs?limit=20: {len(response.content)} bytes, peak {peak / MiB:.1f} MiB")

    assert response.status_code == 200
    page = response.json()
    assert len(response.content) <= 4 * MiB + 4096  # the default max_list_bytes
    assert 1 <= len(page["jobs"]) < 20 and page["truncated"] is True
    assert page["total"] == 20 and page["next_offset"] == len(page["jobs"])
    assert peak < 48 * MiB  # the red team saw 623 MB for this listing
    seen = [j["id"] for j in page["jobs"]]
    while page["next_offset"] is not None:
        page = client.get("/v1/jobs", params={"limit": 20, "offset": page["next_offset"]}).json()
        seen += [j["id"] for j in page["jobs"]]
    assert sorted(seen) == sorted(ids)


def test_reading_one_large_result_costs_about_its_size(
    make_client: Callable[..., TestClient],
    results_of: Callable[[int], None],
    body: dict,
    tmp_path: Path,
) -> None:
    client = make_client(store=SQLiteJobStore(tmp_path / "jobs.sqlite3"))
    results_of(1_000_000 - 1000)
    job_id = client.post("/v1/analyze", json=body).json()["job_id"]
    response, peak = peak_bytes(lambda: client.get(f"/v1/jobs/{job_id}"))
    print(f"GET /v1/jobs/{{id}}: {len(response.content)} bytes, peak {peak / MiB:.1f} MiB")
    assert response.status_code == 200
    assert len(response.json()["result"]["rows"]) == 99_900
    assert peak < 8 * MiB  # not parsed and re-serialized


def test_a_single_job_larger_than_the_page_cap_is_still_listed(
    make_client: Callable[..., TestClient], results_of: Callable[[int], None], body: dict
) -> None:
    client = make_client(max_list_bytes=64 * 1024)
    results_of(200_000)
    first = client.post("/v1/analyze", json=body).json()["job_id"]
    second = client.post("/v1/analyze", json=body).json()["job_id"]
    page = client.get("/v1/jobs").json()
    assert [j["id"] for j in page["jobs"]] == [second]
    assert page["truncated"] is True and page["next_offset"] == 1
    page = client.get("/v1/jobs", params={"offset": 1}).json()
    assert [j["id"] for j in page["jobs"]] == [first]
    assert page["truncated"] is False and page["next_offset"] is None
    assert len(page["jobs"][0]["result"]["rows"]) == 20_000


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Plugin calls wait until the event is set (jobs stay unfinished)."""
    release = threading.Event()

    def fake(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        release.wait(20)
        return {"ok": True}, {}

    monkeypatch.setattr(PluginManagementService, "execute_plugin", fake)
    yield release
    release.set()


def _analyses(client: TestClient, body: dict, count: int) -> list[str]:
    """`count` analyses by ALICE, one after another; their job ids."""
    ids = []
    for _ in range(count):
        response = client.post("/v1/analyze", json=body, headers=ALICE)
        assert response.status_code == 200
        ids.append(response.json()["job_id"])
    return ids


def test_a_client_over_its_job_quota_keeps_its_newest_jobs(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(max_jobs_per_client=3, **TOKENS)
    ids = _analyses(client, body, 5)
    bob = client.post("/v1/analyze", json=body, headers=BOB)
    assert bob.status_code == 200
    listed = client.get("/v1/jobs", headers=ALICE).json()
    assert listed["total"] == 3 and {j["id"] for j in listed["jobs"]} == set(ids[-3:])
    assert client.get(f"/v1/jobs/{ids[0]}", headers=ALICE).status_code == 404
    assert client.get(f"/v1/jobs/{bob.json()['job_id']}", headers=BOB).status_code == 200


def test_a_client_at_its_job_quota_makes_room_a_64th_of_it_at_once(
    make_client: Callable[..., TestClient], body: dict, results_of: Callable[[int], None]
) -> None:
    results_of(10)  # no sandbox call: the quota is what is measured
    client = make_client(max_jobs_per_client=128, **TOKENS)
    ids = _analyses(client, body, 129)
    listed = client.get("/v1/jobs?limit=200", headers=ALICE).json()
    # The 129th job made room by dropping the 3 oldest (128 // 64 + 1): the
    # next two jobs need no pruning.
    assert listed["total"] == 126
    assert {j["id"] for j in listed["jobs"]} == set(ids[-126:])


def test_a_client_whose_unfinished_jobs_fill_its_quota_gets_429_and_others_go_on(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    client = make_client(max_jobs_per_client=2, workers=1, queue_size=4, **TOKENS)
    first = [client.post("/v1/jobs", json=body, headers=ALICE) for _ in range(2)]
    assert [r.status_code for r in first] == [202, 202]
    refused = client.post("/v1/jobs", json=body, headers=ALICE)
    detail = assert_envelope(refused, 429, "quota_exceeded")
    assert detail["type"] == "ValidationError"
    assert detail["details"]["quota"] == "max_jobs_per_client" and detail["details"]["limit"] == 2
    assert "max_jobs_per_client" in detail["message"]
    assert int(refused.headers["retry-after"]) >= 1
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202
    _finish(client, held, ALICE, BOB)
    # Finished now: the oldest of them makes room for the next job.
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 2


def test_stored_results_count_against_the_byte_quota(
    make_client: Callable[..., TestClient], results_of: Callable[[int], None], body: dict
) -> None:
    client = make_client(max_stored_bytes_per_client=MiB, **TOKENS)
    results_of(350_000)  # about 280 kB of compact JSON: 3 fit in 1 MiB, not 4
    ids = []
    for _ in range(6):
        response = client.post("/v1/analyze", json=body, headers=ALICE)
        assert response.status_code == 200
        ids.append(response.json()["job_id"])
    listed = client.get("/v1/jobs", headers=ALICE).json()
    # Room is made before a job is stored; its result, known only at the end,
    # may take the client one result past its quota until its next job.
    assert 3 <= listed["total"] <= 4
    assert {j["id"] for j in listed["jobs"]} == set(ids[-listed["total"] :])
    assert client.post("/v1/analyze", json=body, headers=BOB).status_code == 200


def test_a_quota_refusal_stores_nothing_and_frees_its_queue_slot(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    client = make_client(max_jobs_per_client=1, workers=1, queue_size=1, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202
    for _ in range(3):
        assert_envelope(client.post("/v1/jobs", json=body, headers=ALICE), 429, "quota_exceeded")
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 1
    _finish(client, held, ALICE, BOB)


def _finish(client: TestClient, held: threading.Event, *callers: dict[str, str]) -> None:
    """Let the held jobs run and wait until every caller's jobs are done."""
    held.set()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pending = [
            job
            for headers in callers
            for job in client.get("/v1/jobs", headers=headers).json()["jobs"]
            if job["status"] in ("PENDING", "RUNNING")
        ]
        if not pending:
            return
        time.sleep(0.05)
    raise AssertionError(f"jobs still unfinished: {pending}")


def test_an_analysis_whose_owner_has_no_room_is_refused_and_never_runs(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    # Its quota is checked on the store by the thread that starts it, not on
    # the event loop: the refusal is the same 429, and nothing is stored.
    client = make_client(max_jobs_per_client=1, workers=2, queue_size=0, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202
    refused = client.post("/v1/analyze", json=body, headers=ALICE)
    detail = assert_envelope(refused, 429, "quota_exceeded")
    assert detail["details"]["quota"] == "max_jobs_per_client"
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 1
    # Its slot is free again: the pool's two places hold ALICE's held job and BOB's.
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202
    _finish(client, held, ALICE, BOB)


def test_an_analysis_that_outlasts_its_wait_is_recorded_within_its_owners_quota(
    make_client: Callable[..., TestClient],
    body: dict,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import host.api.routes.analyze as analyze

    # Queued behind a held job, the analysis has not started (its quota not
    # checked yet) when its caller stops waiting: recording it checks the
    # quota, and a refused one never runs.
    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.3)
    client = make_client(max_jobs_per_client=1, workers=1, queue_size=4, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202  # runs, held
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202  # waits
    refused = client.post("/v1/analyze", json=body, headers=ALICE)
    assert_envelope(refused, 429, "quota_exceeded")
    _finish(client, held, ALICE, BOB)
    jobs = client.get("/v1/jobs", headers=ALICE).json()
    assert jobs["total"] == 1 and jobs["jobs"][0]["status"] == "SUCCESS"
    # The refused analysis leaves the pool's queue without running.
    stats = client.app.state.services.jobs.stats
    deadline = time.monotonic() + 20
    while stats()["queued"] + stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert stats()["queued"] + stats()["running"] == 0


def test_an_analysis_checks_its_quota_on_the_thread_that_runs_it(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    client = make_client(**TOKENS)
    store = client.app.state.services.jobs.store
    check, threads = store.check, []

    def spy(admit: Any) -> None:
        threads.append(threading.current_thread().name)
        check(admit)

    store.check = spy
    assert client.post("/v1/analyze", json=body, headers=ALICE).status_code == 200
    # One hand-over (the loop to the pool's thread), not two (a store thread first).
    assert len(threads) == 1 and threads[0].startswith("plughost-job"), threads


def test_an_analysis_still_queued_when_its_wait_ends_runs_all_the_same(
    make_client: Callable[..., TestClient],
    body: dict,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import host.api.routes.analyze as analyze

    # The wait's end gave up on the job's future, and that cancelled the job
    # in the pool's queue: stored PENDING for good, its place never given back.
    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.3)
    client = make_client(workers=1, queue_size=1, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202  # runs, held
    answer = client.post("/v1/analyze", json=body, headers=ALICE)
    assert answer.status_code == 202 and answer.json()["job"]["status"] == "PENDING"
    _finish(client, held, ALICE, BOB)
    assert client.get(answer.json()["links"]["self"], headers=ALICE).json()["status"] == "SUCCESS"
    # Both places of the pool are free again.
    again = [client.post("/v1/jobs", json=body, headers=BOB) for _ in range(2)]
    assert [r.status_code for r in again] == [202, 202]
    _finish(client, held, BOB)


# -- waited analyses: the event loop, refusals racing the wait's end, leaks ---
# (found by attacking the in-memory submission of /v1/analyze)


def _idle(client: TestClient, timeout: float = 20.0) -> None:
    """Wait until the pool runs and queues nothing; then check that it
    leaked nothing (slots, tokens, futures, waited jobs, hand-overs)."""
    jobs = client.app.state.services.jobs
    pool = jobs.runner
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        s = pool.stats()
        if s["queued"] + s["running"] == 0:
            break
        time.sleep(0.02)
    assert pool.stats()["queued"] + pool.stats()["running"] == 0, pool.stats()
    assert pool._slots._value == pool.workers + pool.queue_size
    assert not pool._tokens and not pool._futures
    assert not jobs._waited and not jobs._handing
    assert not jobs._flying


def _in_thread(call: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(call()))
    t.start()
    return t, out


def _slow_refusal(monkeypatch: pytest.MonkeyPatch, where: str, refused: threading.Event) -> None:
    """Make a waited job's QuotaExceeded take 0.8 s to leave `where` (a
    descheduled pool thread, stretched to be seen)."""
    original = getattr(JobManagementService, where)

    def slow(self: JobManagementService, *args: Any) -> Any:
        try:
            return original(self, *args)
        except QuotaExceeded:
            refused.set()
            time.sleep(0.8)
            raise

    monkeypatch.setattr(JobManagementService, where, slow)


def test_the_event_loop_never_waits_for_the_services_lock(
    make_client: Callable[..., TestClient], body: dict
) -> None:
    # A pool/store thread holds JobManagementService._lock across store I/O
    # (_start's quota check and prune, record_waited's insert of the input,
    # _write_finished's insert of the result, _cancel_pending). The loop
    # now takes the same lock in _queue (and _handed) for every /v1/analyze.
    client = make_client(**TOKENS)
    jobs = client.app.state.services.jobs
    assert client.post("/v1/analyze", json=body, headers=ALICE).status_code == 200
    # A store thread's write under the lock that lasts 1 s.
    locked = threading.Event()

    def store_write() -> None:
        with jobs._lock:
            locked.set()
            time.sleep(1.0)

    writer = threading.Thread(target=store_write)
    writer.start()
    assert locked.wait(5)
    t, out = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE))
    time.sleep(0.2)  # the analysis is in _queue, on the loop, waiting for the lock
    started = time.monotonic()
    health = client.get("/healthz")
    health_s = time.monotonic() - started
    writer.join(5)
    t.join(20)
    assert health.status_code == 200 and out[0].status_code == 200
    assert health_s < 0.3, f"GET /healthz took {health_s:.2f} s: the loop waited for the lock"


def test_a_job_refused_as_it_starts_is_never_stored_pending_for_good(
    make_client: Callable[..., TestClient],
    body: dict,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # _start raises QuotaExceeded with the job still in _waited (quota not
    # cleared) and the service's lock released; _run_submitted pops it only
    # later. record_waited in between re-checks the quota, which may pass by
    # now (the owner's other job ended): the job is stored PENDING, the
    # client told 202, and nothing will ever run it.
    import host.api.routes.analyze as analyze

    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.4)
    # Past the check made before a queue place is taken (room taken by what
    # this process does not run, such as a batch's items not fed to the
    # pool yet, reaches the check as the job starts).
    monkeypatch.setattr(JobManagementService, "_refuse_past_quota_in_flight", lambda *_: None)
    refused = threading.Event()
    _slow_refusal(monkeypatch, "_start", refused)
    client = make_client(max_jobs_per_client=1, workers=2, queue_size=4, **TOKENS)
    first = client.post("/v1/jobs", json=body, headers=ALICE)
    assert first.status_code == 202  # runs, held: ALICE's quota is full
    t, out = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE))
    assert refused.wait(10)
    held.set()  # ALICE's first job ends: a finished job makes room
    t.join(20)
    answer = out[0]
    if answer.status_code == 429:
        return  # the refusal won: fine
    assert answer.status_code == 202, answer.text
    _idle(client)
    job = client.get(answer.json()["links"]["self"], headers=ALICE).json()
    time.sleep(1.0)
    job = client.get(answer.json()["links"]["self"], headers=ALICE).json()
    assert job["status"] != "PENDING", f"answered 202, stored PENDING, never runs: {job}"


def test_a_job_refused_as_it_starts_answers_429_not_404(
    make_client: Callable[..., TestClient],
    body: dict,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The refusal is popped from _waited before the job's future reaches
    # the loop; a wait that ends in between asks record_waited (None), then
    # the store (no such job): POST /v1/analyze answers 404 unknown_job.
    import host.api.routes.analyze as analyze

    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.4)
    refused = threading.Event()
    _slow_refusal(monkeypatch, "_run_submitted", refused)
    client = make_client(max_jobs_per_client=1, workers=2, queue_size=4, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202  # held
    answer = client.post("/v1/analyze", json=body, headers=ALICE)
    _finish(client, held, ALICE)
    _idle(client)
    assert_envelope(answer, 429, "quota_exceeded")


def test_many_timed_out_and_refused_analyses_leak_nothing(
    make_client: Callable[..., TestClient],
    body: dict,
    held: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import host.api.routes.analyze as analyze

    monkeypatch.setattr(analyze, "ANALYZE_WAIT_S", 0.2)
    client = make_client(max_jobs_per_client=2, workers=1, queue_size=6, **TOKENS)
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202  # held
    threads = [
        _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE)) for _ in range(6)
    ]
    for t, _ in threads:
        t.join(20)
    statuses = sorted(out[0].status_code for _, out in threads)
    # Two are recorded (202), the rest refused as they are recorded (429).
    assert statuses == [202, 202, 429, 429, 429, 429], statuses
    _finish(client, held, ALICE, BOB)
    _idle(client)
    listed = client.get("/v1/jobs", headers=ALICE).json()
    assert listed["total"] == 2 and all(j["status"] == "SUCCESS" for j in listed["jobs"])


def test_analyses_running_in_memory_count_against_the_job_quota(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    # Each is stored as it ends: three running at once with a quota of one
    # would leave three stored. The first to start takes the room; the others
    # are refused as they start.
    client = make_client(max_jobs_per_client=1, workers=3, queue_size=4, **TOKENS)
    threads = [
        _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE)) for _ in range(3)
    ]
    deadline = time.monotonic() + 10
    while sum(bool(out) for _, out in threads) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    running = client.app.state.services.jobs.stats()["running"]
    _finish(client, held, ALICE)
    for t, _ in threads:
        t.join(20)
    statuses = sorted(out[0].status_code for _, out in threads)
    assert running == 1 and statuses == [200, 429, 429], (running, statuses)
    refused = next(out[0] for _, out in threads if out[0].status_code == 429)
    detail = assert_envelope(refused, 429, "quota_exceeded")
    assert detail["details"]["used"] == 1  # the analysis running, not yet stored
    assert client.get("/v1/jobs", headers=ALICE).json()["total"] == 1
    _idle(client)


def test_a_client_at_its_quota_holds_no_queue_place_with_its_analyses(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    # ALICE's two queued jobs fill her quota: each analysis she sends is
    # refused at once, before it takes a queue place (it took one until a
    # worker reached it and refused it there, so BOB's jobs were refused
    # 503 overloaded meanwhile).
    client = make_client(max_jobs_per_client=2, workers=1, queue_size=4, **TOKENS)
    jobs = client.app.state.services.jobs
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202  # runs, held
    wait_until(lambda: jobs.runner.stats()["running"] == 1)
    for _ in range(2):
        assert client.post("/v1/jobs", json=body, headers=ALICE).status_code == 202  # queued
    floods = [
        _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE)) for _ in range(4)
    ]
    for thread, _ in floods:
        thread.join(10)
        assert not thread.is_alive(), "an analysis over its client's quota was queued"
    for _, out in floods:
        detail = assert_envelope(out[0], 429, "quota_exceeded")
        assert detail["details"]["used"] == 2
    assert client.post("/v1/jobs", json=body, headers=BOB).status_code == 202  # room queued
    _finish(client, held, ALICE, BOB)
    _idle(client)


def test_an_analysis_still_queued_at_shutdown_is_answered_503_and_the_running_one_finishes(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event
) -> None:
    # The queued analysis never ran and was never stored: its client is told
    # so in an envelope it can retry on (it was a bare 500 before), and the
    # analysis that was running when the host began to shut down still
    # answers its result.
    client = make_client(workers=1, queue_size=2, **TOKENS)
    running, running_out = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=BOB))
    jobs = client.app.state.services.jobs
    wait_until(lambda: jobs.runner.stats()["running"] == 1)
    queued, queued_out = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=ALICE))
    wait_until(lambda: jobs.runner.stats()["queued"] == 1)
    stopping, _ = _in_thread(lambda: jobs.shutdown(timeout_s=10))
    queued.join(10)
    assert not queued.is_alive(), "the queued analysis was not answered while the host shut down"
    detail = assert_envelope(queued_out[0], 503, "shutting_down")
    assert queued_out[0].headers["Retry-After"]
    assert "did not run" in detail["message"]
    held.set()
    for thread in (running, stopping):
        thread.join(10)
        assert not thread.is_alive()
    assert running_out[0].status_code == 200 and running_out[0].json()["result"] == {"ok": True}
    for route in ("/v1/analyze", "/v1/jobs"):  # and nothing new is taken
        assert_envelope(client.post(route, json=body, headers=ALICE), 503, "shutting_down")


def test_a_job_still_queued_at_shutdown_is_kept_as_interrupted_not_cancelled(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event, tmp_path: Path
) -> None:
    # Its client never cancelled it: the record says the host shut down
    # before it ran (it was CANCELLED, "job was cancelled before it ran").
    path = tmp_path / "jobs.sqlite3"
    client = make_client(workers=1, queue_size=2, store=SQLiteJobStore(path), **TOKENS)
    jobs = client.app.state.services.jobs
    first = client.post("/v1/jobs", json=body, headers=BOB).json()["job"]["id"]
    wait_until(lambda: jobs.runner.stats()["running"] == 1)
    queued = client.post("/v1/jobs", json=body, headers=ALICE).json()["job"]["id"]
    stopping, _ = _in_thread(lambda: jobs.shutdown(timeout_s=10))
    wait_until(lambda: jobs.runner.stats()["queued"] == 0)
    held.set()
    stopping.join(10)
    assert not stopping.is_alive()
    store = SQLiteJobStore(path)
    try:
        ran, never_ran = store.get(first), store.get(queued)
    finally:
        store.close()
    assert ran is not None and ran.status.value == "SUCCESS"
    assert never_ran is not None and never_ran.status.value == "INTERRUPTED", never_ran
    assert never_ran.error is not None and never_ran.error["details"]["reason"] == "interrupted"


@pytest.mark.timeout(30)
def test_a_job_the_shutdown_kills_is_kept_as_interrupted_not_cancelled(
    make_client: Callable[..., TestClient],
    body: dict,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # README and docs/deploy.md: SIGTERM lets running jobs finish (up to
    # 10 s) and marks the others INTERRUPTED. One still running then had its
    # sandbox killed through its cancel token, and was stored CANCELLED,
    # "job cancelled by the client" (a real server did so too).
    def until_cancelled(
        self: PluginManagementService,
        plugin_name: str,
        payload: Any,
        cancel: Any = None,
        owner: Any = None,
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        wait_until(lambda: cancel.cancelled, timeout_s=20)  # as the sandbox stops its call
        return {}, envelope("cancelled", "call was cancelled", plugin_name)

    monkeypatch.setattr(PluginManagementService, "execute_plugin", until_cancelled)
    path = tmp_path / "jobs.sqlite3"
    client = make_client(workers=1, queue_size=2, store=SQLiteJobStore(path), **TOKENS)
    jobs = client.app.state.services.jobs
    job_id = client.post("/v1/jobs", json=body, headers=ALICE).json()["job"]["id"]
    wait_until(lambda: jobs.runner.stats()["running"] == 1)
    jobs.stop_starting()
    jobs.shutdown(timeout_s=0.2)
    store = SQLiteJobStore(path)
    try:
        killed = store.get(job_id)
    finally:
        store.close()
    assert killed is not None and killed.status.value == "INTERRUPTED", killed
    assert killed.error is not None and killed.error["details"]["reason"] == "interrupted"


@pytest.mark.timeout(30)
def test_a_keyed_analysis_dropped_at_shutdown_answers_its_retry_as_it_answered_first(
    make_client: Callable[..., TestClient], body: dict, held: threading.Event, tmp_path: Path
) -> None:
    # README: the same Idempotency-Key answers with that job as the first
    # request does. A keyed analysis is stored before it runs, so the one
    # dropped at shutdown keeps its key: a retry with it during the shutdown
    # was answered 202 with the job PENDING (which the shutdown then marks
    # INTERRUPTED). It is answered 503 as the first was, whose message says
    # the key now names a job that ends INTERRUPTED.
    client = make_client(workers=1, queue_size=2, store=SQLiteJobStore(tmp_path / "j"), **TOKENS)
    jobs = client.app.state.services.jobs
    running, _ = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=BOB))
    wait_until(lambda: jobs.runner.stats()["running"] == 1)
    keyed = {**ALICE, "Idempotency-Key": "sunset-1"}
    first, first_out = _in_thread(lambda: client.post("/v1/analyze", json=body, headers=keyed))
    wait_until(lambda: jobs.runner.stats()["queued"] == 1)
    jobs.stop_starting()
    first.join(10)
    assert_envelope(first_out[0], 503, "shutting_down")
    retry = client.post("/v1/analyze", json=body, headers=keyed)
    held.set()
    running.join(10)
    assert retry.status_code == first_out[0].status_code, retry.text
    assert "new key" in retry.json()["detail"]["message"]
