"""The console's batch pages, under the API's tenant rules: a client sees
its own batches and their items (each a link to its job's page), another
client's batch is a 404 like an unknown one, the admin sees every batch
with its owner."""

from __future__ import annotations

import re
from collections.abc import Callable

from fastapi.testclient import TestClient

from tests.host.api.test_batches import BROKEN, batch_body, item, wait_batch
from tests.host.api.test_console import sign_in
from tests.host.api.test_tenants import ALICE, BOB, TOKENS

NAMED = {"client_tokens": ["alice=alice-secret-token", "bob-secret-token"]}


def _batch(client: TestClient, who: dict[str, str], count: int, broken: int | None = None) -> str:
    """The id of a finished batch of `count` images, item `broken` unreadable."""
    body = batch_body(count)
    if broken is not None:
        body["items"][broken] = item(BROKEN)  # type: ignore[index]
    answer = client.post("/v1/batches", json=body, headers=who)
    assert answer.status_code == 202, answer.text
    batch_id = str(answer.json()["id"])
    wait_batch(client, batch_id, who)
    return batch_id


def test_a_clients_batch_has_a_page_listing_its_items_each_linked_to_its_job(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(**TOKENS)
    batch_id = _batch(client, ALICE, 5, broken=2)
    view = client.get(f"/v1/batches/{batch_id}", headers=ALICE).json()
    sign_in(client, "alice-secret-token")
    listing = client.get("/console/batches").text
    assert f'href="/console/batches/{batch_id}"' in listing
    assert 'href="/console/batches" aria-current="page"' in listing
    assert re.search(r'data-testid="counts">5 <span class="sub">· 1 FAILED</span> '
                     r'<span class="sub">· 4 SUCCESS</span>', listing)  # fmt: skip
    page = client.get(f"/console/batches/{batch_id}")
    assert page.status_code == 200
    assert re.search(r'data-testid="status"[^>]*>FINISHED<', page.text)
    links = re.findall(r'href="/console/jobs/([0-9a-f]+)" data-testid="item-link"', page.text)
    assert links == [i["job_id"] for i in view["items"]]
    broken = view["items"][2]["error"]
    assert f'data-testid="item-error">{broken["details"]["reason"]}: ' in page.text
    assert page.text.count("result keys: ") == 4
    assert "Owner" not in page.text  # a client is shown its own batches only
    # Each item's own page is its job's.
    assert client.get(f"/console/jobs/{links[0]}").status_code == 200


def test_another_clients_batch_is_a_404_like_an_unknown_one_and_the_admin_sees_every_batch(
    make_client: Callable[..., TestClient],
) -> None:
    client = make_client(**NAMED, admin_token="admin-secret-token")
    alices, bobs = _batch(client, ALICE, 2), _batch(client, BOB, 1)
    sign_in(client, "bob-secret-token")
    assert f"/console/batches/{alices}" not in client.get("/console/batches").text
    other = client.get(f"/console/batches/{alices}")
    unknown = client.get("/console/batches/" + "0" * 32)
    assert other.status_code == unknown.status_code == 404
    assert other.text.replace(alices, "X") == unknown.text.replace("0" * 32, "X")
    assert client.get("/console/batches/" + "a" * 300).status_code == 404
    assert client.get("/console/batches?offset=99999999999999999999").status_code == 400
    sign_in(client, "admin-secret-token")
    listing = client.get("/console/batches").text
    assert f"/console/batches/{alices}" in listing and f"/console/batches/{bobs}" in listing
    owners = re.findall(r'data-testid="owner"[^>]*>([^<]+)<', listing)
    assert "alice" in owners  # a named client by its name
    page = client.get(f"/console/batches/{alices}").text
    assert re.search(r'data-testid="owner"><strong>alice</strong>', page)
    client.cookies.clear()
    anonymous = client.get(f"/console/batches/{alices}", follow_redirects=False)
    assert anonymous.status_code == 303 and anonymous.headers["location"] == "/console/login"
