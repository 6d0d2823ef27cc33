"""The console in a real browser against a real `plughost serve`: Debian's
chromium driven by Playwright. Calls made through the API show up on the
page (state, counts, quarantine); an admin lifts a quarantine from the page;
a client sees neither another client's jobs nor the admin actions; the
read-only pages work without JavaScript, in a narrow window, and load
nothing from anywhere but the host."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from scripts.console_screenshot import DemoHost, launch_chromium

pytestmark = [pytest.mark.no_leak_check, pytest.mark.timeout(60)]  # the host is its own process
CLIENT_1, CLIENT_2, ADMIN = "client-one-token", "client-two-token", "the-admin-token"
NAME_1 = "first-client"  # CLIENT_1's configured name
WAIT_MS = 10_000


@pytest.fixture(scope="module")
def host() -> Iterator[DemoHost]:
    tokens = {
        "PLUGHOST_CLIENT_TOKENS": f"{NAME_1}={CLIENT_1},{CLIENT_2}",
        "PLUGHOST_ADMIN_TOKEN": ADMIN,
        "PLUGHOST_QUARANTINE_COOLDOWN_S": "600",
    }
    with DemoHost(env=tokens) as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = launch_chromium(playwright)
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser: Browser, host: DemoHost) -> Iterator[Any]:
    """Opens pages in fresh contexts; afterwards, no page asked for anything
    but the host itself."""
    contexts, requested = [], []

    def open_(**options: Any) -> Page:
        context = browser.new_context(**options)
        context.set_default_timeout(WAIT_MS)
        context.on("request", lambda request: requested.append(request.url))
        contexts.append(context)
        return context.new_page()

    yield open_
    for context in contexts:
        context.close()
    elsewhere = [url for url in requested if not url.startswith(host.url + "/")]
    assert elsewhere == [], "the console loaded something from elsewhere"


def sign_in(page: Page, host: DemoHost, token: str) -> None:
    page.goto(host.url + "/console/login")
    page.fill("#token", token)
    page.click("form.login button[type=submit]")
    page.wait_for_url(host.url + "/console")


def listed_jobs(page: Page, host: DemoHost) -> set[str]:
    """Ids of the echo_size jobs the jobs page shows `page`'s visitor."""
    page.goto(host.url + "/console/jobs?plugin=echo_size")
    expect(page.locator("h1")).to_have_text("Jobs")
    return {row.get_attribute("data-job") or "" for row in page.locator("[data-job]").all()}


def quarantine_crasher(host: DemoHost) -> None:
    host.call("POST", "/v1/admin/plugins/crasher/quarantine/reset", {}, ADMIN)
    for _ in range(2):  # the host quarantines after 2 unavailable outcomes in a row
        status, body = host.analyze("crasher", CLIENT_1)
        assert status in (400, 503), body
    assert host.call("GET", "/v1/plugins/crasher", token=ADMIN)[1]["quarantine"]["quarantined"]


def test_calls_through_the_api_change_state_counts_and_quarantine_on_the_page(
    open_page: Any, host: DemoHost
) -> None:
    host.call("POST", "/v1/admin/plugins/crasher/quarantine/reset", {}, ADMIN)
    page = open_page()
    sign_in(page, host, CLIENT_1)
    echo = page.locator("#plugin-echo_size")
    before = int(echo.locator("[data-testid=calls]").inner_text())
    assert host.analyze("echo_size", CLIENT_1)[0] == 200
    page.reload()
    expect(echo.locator("[data-testid=calls]")).to_have_text(str(before + 1))
    expect(echo.locator("[data-testid=state]")).to_have_text("SUCCESS")

    crasher = page.locator("#plugin-crasher")
    expect(crasher.locator("[data-testid=quarantine]")).to_have_count(0)
    errors = int(crasher.locator("[data-testid=errors]").inner_text().split()[0])
    quarantine_crasher(host)
    # No reload: the page's script refreshes the table by itself.
    expect(crasher.locator("[data-testid=quarantine]")).to_be_visible(timeout=12_000)
    expect(crasher.locator("[data-testid=state]")).to_have_text("UNAVAILABLE")
    expect(crasher.locator("[data-testid=errors]")).to_contain_text(str(errors + 2))
    countdown = crasher.locator(".countdown")
    first = float(countdown.get_attribute("data-seconds") or 0)
    assert 500 < first <= 600
    page.wait_for_function(
        f"() => parseFloat(document.querySelector('#plugin-crasher .countdown')"
        f".dataset.seconds) < {first}",
        timeout=WAIT_MS,
    )
    expect(page.locator("[data-testid=quarantined-count]")).to_have_text("1 quarantined")


def test_admin_resets_a_quarantine_from_the_page(open_page: Any, host: DemoHost) -> None:
    quarantine_crasher(host)
    page = open_page()
    sign_in(page, host, ADMIN)
    page.goto(host.url + "/console/plugins/crasher")
    expect(page.locator("[data-testid=quarantine]")).to_be_visible()
    page.click("[data-testid=reset]")
    expect(page.locator("h1")).to_have_text("Confirm")
    expect(page.locator("main")).to_contain_text("Lift the quarantine of plugin crasher")
    page.click("[data-testid=confirm]")
    page.wait_for_url(re.compile(r"/console/plugins/crasher\?done=reset$"))
    expect(page.locator("main")).to_contain_text("not quarantined")
    expect(page.get_by_role("status")).to_have_text("The quarantine was lifted.")
    # The state is still the last call's (SPEC: states are set by calls); the page says so.
    badge = page.locator("[data-testid=state]")
    expect(badge).to_have_text("UNAVAILABLE")
    expect(page.locator("[data-testid=lifted]")).to_have_text(
        "quarantine lifted: the next call will tell"
    )
    assert "stopped by the sandbox" in (badge.get_attribute("title") or "")
    expect(page.locator("[data-testid=legend]")).to_be_visible()
    status, described = host.call("GET", "/v1/plugins/crasher", token=ADMIN)
    assert status == 200 and described["quarantine"]["quarantined"] is False


def test_a_client_sees_neither_another_clients_jobs_nor_admin_actions(
    open_page: Any, host: DemoHost
) -> None:
    first = host.analyze("echo_size", CLIENT_1)[1]["job_id"]
    second = host.analyze("echo_size", CLIENT_2)[1]["job_id"]
    quarantine_crasher(host)
    client, admin = open_page(), open_page()
    sign_in(client, host, CLIENT_2)
    sign_in(admin, host, ADMIN)
    assert listed_jobs(client, host) >= {second} and first not in listed_jobs(client, host)
    assert listed_jobs(admin, host) >= {first, second}
    for page, actions in [(client, 0), (admin, 1)]:
        page.goto(host.url + "/console")
        expect(page.locator("#plugin-crasher [data-testid=quarantine]")).to_be_visible()
        expect(page.get_by_text("Reload plugins…")).to_have_count(actions)
        page.goto(host.url + "/console/plugins/crasher")
        expect(page.locator("[data-testid=quarantine]")).to_be_visible()
        expect(page.locator("[data-testid=reset]")).to_have_count(actions)
    response = client.goto(host.url + "/console/confirm/reset?name=crasher")
    assert response is not None and response.status == 403


def test_read_only_pages_work_without_javascript_in_a_narrow_window(
    open_page: Any, host: DemoHost
) -> None:
    page = open_page(java_script_enabled=False, viewport={"width": 360, "height": 740})
    sign_in(page, host, CLIENT_1)  # a plain form post
    for path, heading in [
        ("/console", "Plugins"),
        ("/console/plugins/echo_size", "echo_size"),
        ("/console/jobs?status=SUCCESS", "Jobs"),
        ("/console/isolation", "Isolation"),
    ]:
        response = page.goto(host.url + path)
        assert response is not None and response.status == 200, path
        expect(page.locator("h1")).to_contain_text(heading)
        for box in (page.locator("main").bounding_box(), page.locator("header").bounding_box()):
            assert box is not None and box["x"] + box["width"] <= 361, path
    page.goto(host.url + "/console/isolation")
    expect(page.locator("main")).to_contain_text("probes passed")
    expect(page.locator("table.cases tbody tr").first).to_be_visible()


def test_a_page_on_another_site_cannot_sign_the_browser_in(
    browser: Browser, host: DemoHost
) -> None:
    attacker = "http://attacker.test"
    form = (
        f'<form method="post" action="{host.url}/console/login">'
        f'<input name="token" value="{CLIENT_2}"><input name="csrf" value="{"0" * 64}"></form>'
        "<script>document.forms[0].submit()</script>"
    )
    context = browser.new_context()
    context.set_default_timeout(WAIT_MS)
    context.route(
        attacker + "/**", lambda route: route.fulfill(body=form, content_type="text/html")
    )
    try:
        page = context.new_page()
        page.goto(host.url + "/console/login")  # the victim has the console open
        with page.expect_response(host.url + "/console/login") as posted:
            page.goto(attacker + "/lure")
        assert posted.value.status == 403
        page.goto(host.url + "/console")
        assert page.url == host.url + "/console/login"  # signed in as nobody
    finally:
        context.close()


def test_the_browser_keeps_a_session_id_not_the_token(open_page: Any, host: DemoHost) -> None:
    page = open_page()
    sign_in(page, host, ADMIN)
    cookies = page.context.cookies()
    session = [c for c in cookies if c["name"] == "plughost_console"]
    assert session and session[0]["httpOnly"] and session[0]["sameSite"] == "Strict"
    assert not any(ADMIN in c["value"] for c in cookies)
    page.click("header .who button[type=submit]")  # sign out
    page.wait_for_url(host.url + "/console/login")
    replayed = open_page()
    replayed.context.add_cookies([{**session[0]}])
    replayed.goto(host.url + "/console")
    assert replayed.url == host.url + "/console/login"


def test_job_dates_stay_on_one_line_at_1366_px(open_page: Any, host: DemoHost) -> None:
    host.call("POST", "/v1/admin/plugins/crasher/quarantine/reset", {}, ADMIN)
    host.analyze("crasher", CLIENT_1, **{"raise": True})  # error envelopes in the table
    quarantine_crasher(host)
    host.analyze("crasher", CLIENT_1)  # refused: the longest message
    host.analyze("echo_size", CLIENT_2)
    page = open_page(viewport={"width": 1366, "height": 768})
    sign_in(page, host, ADMIN)  # the widest table: the owner column too
    page.goto(host.url + "/console/jobs")
    expect(page.locator("table.jobs td.when time").first).to_be_visible()
    line = page.evaluate(
        "() => parseFloat(getComputedStyle("
        "document.querySelector('table.jobs td.when')).lineHeight)"
    )
    cells = page.locator("table.jobs td.when time").all()
    assert cells and line > 0
    for cell in cells:
        box = cell.bounding_box()
        assert box is not None and box["height"] < 1.5 * line, (cell.inner_text(), box, line)
    table = page.locator("table.jobs").bounding_box()
    assert table is not None and table["x"] + table["width"] <= 1366


def test_a_job_opens_from_the_table_with_its_outcome(open_page: Any, host: DemoHost) -> None:
    job = host.analyze("echo_size", CLIENT_1)[1]["job_id"]
    page = open_page(viewport={"width": 1366, "height": 768})
    sign_in(page, host, CLIENT_1)
    page.goto(host.url + "/console/jobs?plugin=echo_size")
    page.click(f"[data-job='{job}'] [data-testid=job-link]")
    page.wait_for_url(host.url + f"/console/jobs/{job}")
    expect(page.locator("[data-testid=status]")).to_have_text("SUCCESS")
    expect(page.locator("[data-testid=result]")).to_contain_text('"mime_type": "image/png"')
    other = open_page()
    sign_in(other, host, CLIENT_2)
    response = other.goto(host.url + f"/console/jobs/{job}")
    assert response is not None and response.status == 404


def test_the_admin_sees_a_named_client_and_the_log_names_it(open_page: Any, host: DemoHost) -> None:
    job = host.analyze("echo_size", CLIENT_1)[1]["job_id"]
    page = open_page()
    sign_in(page, host, ADMIN)
    page.goto(host.url + f"/console/jobs/{job}")
    expect(page.locator("[data-testid=owner]")).to_contain_text(NAME_1)
    client = open_page()
    sign_in(client, host, CLIENT_1)
    expect(client.locator("header .who")).to_contain_text(f"signed in as {NAME_1}")
    lines = [json.loads(line) for line in host.log.read_text().splitlines() if line.startswith("{")]
    access = [e for e in lines if e["logger"] == "uvicorn.access" and "/v1/analyze" in e["message"]]
    assert any(e.get("client") == NAME_1 for e in access), access[-3:]
    pages = [
        e for e in lines if e["logger"] == "uvicorn.access" and "GET /console " in e["message"]
    ]
    assert any(e.get("client") == NAME_1 for e in pages), pages[-3:]
