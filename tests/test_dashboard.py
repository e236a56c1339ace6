"""The dashboard in a real browser: Debian's headless Chromium, driven by selenium through
chromedriver (the ``chromium`` fixture), against a node's HTTP endpoint on loopback
(``open_node(root, http=...)``).

Selenium's calls block, so they run in a worker thread while the node serves on the
test's trio loop. What the page shows is read with one script call each time (the page
re-renders as snapshots arrive, so an element found earlier may be gone).
"""

from __future__ import annotations

import functools
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

import pytest
import trio

import otpy

COOKIE = "browser-test-cookie"
T = TypeVar("T")


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise ValueError("the test asked for a crash")
        return otpy.Reply(state, state + 1)


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([
        otpy.Child("ledger", Counter),
        otpy.Supervisor([otpy.Child("stock", Counter)], name="warehouse",
                        strategy="one_for_all"),
    ])


@pytest.fixture
def node_cookie(monkeypatch: pytest.MonkeyPatch) -> str:
    """The node reads its cookie from $OTPY_COOKIE, as a deployed node would."""
    monkeypatch.setenv("OTPY_COOKIE", COOKIE)
    return COOKIE


async def in_thread(fn: Callable[..., T], *args: Any) -> T:
    return await trio.to_thread.run_sync(functools.partial(fn, *args))


def log_in(driver: Any, base: str, cookie: str) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.expected_conditions import staleness_of
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(base + "/")
    field = driver.find_element(By.ID, "cookie")
    field.send_keys(cookie)
    driver.find_element(By.ID, "login").click()
    WebDriverWait(driver, 20).until(staleness_of(field))  # the answer's page is loaded


def shown(driver: Any) -> dict[str, Any]:
    """What the page shows, read in one script call."""
    return dict(driver.execute_script("""
        const text = (sel) => { const e = document.querySelector(sel);
                                return e ? e.textContent : null; };
        return {
          title: document.title,
          login_form: !!document.getElementById("cookie"),
          error: text("#error"),
          tree: !!document.getElementById("tree"),
          children: [...document.querySelectorAll("[data-child]")].map(e => e.dataset.child),
          ledger_restarts: text('[data-child="ledger"] .restarts'),
          ledger_crash: text('[data-child="ledger"] .last-crash'),
          stock_status: text('[data-child="stock"] .badge'),
          servers: text("#servers"),
          live: text("#live"),
          marker: window.otpyTestMarker || null,
          script_sees_cookie: document.cookie,
          body_color: getComputedStyle(document.body).color,
        };"""))


def wait_for(driver: Any, condition: Callable[[dict[str, Any]], bool],
             seconds: float = 20.0) -> dict[str, Any]:
    """Poll what the page shows until ``condition`` holds (bounded in time)."""
    deadline = time.monotonic() + seconds
    while True:
        seen = shown(driver)
        if condition(seen) or time.monotonic() > deadline:
            return seen
        time.sleep(0.1)


def post(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body)) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


async def test_a_wrong_cookie_sees_the_login_form_and_nothing_of_the_node(
        chromium: Any, node_cookie: str) -> None:
    """A wrong cookie is refused: the login form again, no session, no tree, no name."""
    async with otpy.open_node(tree(), http=("127.0.0.1", 0)) as node:
        host, port = node.http_address or ("", 0)
        await in_thread(log_in, chromium, f"http://{host}:{port}", "not-the-cookie")
        seen = await in_thread(shown, chromium)
        cookies = await in_thread(chromium.get_cookies)
        source = await in_thread(lambda: chromium.page_source)
    assert (True, "That is not the node's cookie.", False, [], []) == (
        seen["login_form"], seen["error"], seen["tree"], seen["children"], cookies)
    assert all(name not in source for name in ("ledger", "warehouse", "stock"))


async def test_the_page_shows_the_tree_and_a_crash_restarts_it_live(
        chromium: Any, node_cookie: str) -> None:
    """Logged in with the node's cookie: an HttpOnly, SameSite=Strict session, the tree
    with every child; a crash made through POST /call shows, without a reload, as the
    child's restart count and its last crash reason."""
    async with otpy.open_node(tree(), http=("127.0.0.1", 0)) as node:
        host, port = node.http_address or ("", 0)
        base = f"http://{host}:{port}"
        await in_thread(log_in, chromium, base, COOKIE)
        before = await in_thread(wait_for, chromium, lambda s: s["ledger_restarts"] == "0")
        await in_thread(chromium.execute_script, "window.otpyTestMarker = 'same page';")
        assert 500 == await in_thread(post, base + "/call/ledger", b'"crash"')
        after = await in_thread(wait_for, chromium, lambda s: s["ledger_restarts"] == "1")
        cookies = await in_thread(chromium.get_cookies)
    assert ("otpy node nonode", False, ["ledger", "warehouse", "stock"], "2", "live") == (
        before["title"], before["login_form"], before["children"], before["servers"],
        before["live"])
    assert [("otpy_session", True, "Strict")] == [
        (c["name"], c.get("httpOnly"), c.get("sameSite")) for c in cookies]
    assert "" == before["script_sees_cookie"]  # HttpOnly: no script can read it
    assert "rgb(29, 36, 51)" == before["body_color"]  # the vendored stylesheet
    assert ("1", "last crash: ValueError: the test asked for a crash", "same page") == (
        after["ledger_restarts"], after["ledger_crash"], after["marker"])


async def test_an_action_is_confirmed_in_the_page_then_done(
        chromium: Any, node_cookie: str) -> None:
    """Suspend asks first (a dialog in the page); cancelled, nothing happens; confirmed,
    the page's request (with its CSRF token) suspends the server, and the tree shows
    it."""
    from selenium.webdriver.common.by import By

    def click_suspend_then(answer: str) -> None:
        chromium.execute_script(
            "document.querySelector('[data-child=\"stock\"] [data-action=suspend]').click()")
        chromium.find_element(By.ID, f"confirm-{answer}").click()

    async with otpy.open_node(tree(), http=("127.0.0.1", 0)) as node:
        host, port = node.http_address or ("", 0)
        await in_thread(log_in, chromium, f"http://{host}:{port}", COOKIE)
        await in_thread(wait_for, chromium, lambda s: s["stock_status"] == "running")
        await in_thread(click_suspend_then, "no")
        await trio.sleep(0.5)
        cancelled = node.statistics("stock")["status"]
        await in_thread(click_suspend_then, "yes")
        seen = await in_thread(wait_for, chromium, lambda s: s["stock_status"] == "suspended")
        status = node.statistics("stock")["status"]
    assert ("idle", "suspended", "suspended") == (cancelled, status, seen["stock_status"])
