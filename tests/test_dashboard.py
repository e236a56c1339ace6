"""The dashboard in a real browser: Debian's headless Chromium, driven by selenium through
chromedriver (the ``chromium`` fixture), against a node's HTTP endpoint on loopback.

Selenium's calls block, so they run in a worker thread while the node serves on the
test's trio loop.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, TypeVar

import trio

import otpy
from otpy._serve.http import serve_http

COOKIE = b"browser-test-cookie"
T = TypeVar("T")


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state)


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


def page(driver: Any) -> dict[str, Any]:
    """What the browser shows: the rendered figures if any, the login error, the
    stylesheet's effect, and the cookies it keeps."""
    from selenium.webdriver.common.by import By

    def text(element_id: str) -> str | None:
        found = driver.find_elements(By.ID, element_id)
        return found[0].text if found else None

    return {
        "title": driver.title,
        "servers": text("servers"),
        "names": text("names"),
        "error": text("error"),
        "login_form": bool(driver.find_elements(By.ID, "cookie")),
        # otpy.css, served from the package's static assets, sets this colour
        "body_color": driver.execute_script(
            "return getComputedStyle(document.body).color"),
        "script_sees_cookie": driver.execute_script("return document.cookie"),
        "cookies": [(c["name"], c.get("httpOnly"), c.get("sameSite"))
                    for c in driver.get_cookies()],
    }


async def test_the_dashboard_opens_only_with_the_nodes_cookie(chromium: Any) -> None:
    """A wrong cookie sees the login form again and nothing of the node; the right one
    gets an HttpOnly, SameSite=Strict session and the page the node rendered (its
    servers), styled by the vendored stylesheet."""
    root = otpy.Supervisor([otpy.Child("c1", Counter), otpy.Child("c2", Counter)])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        host, port = await nursery.start(functools.partial(
            serve_http, node._rt, ("127.0.0.1", 0), cookie=COOKIE))
        base = f"http://{host}:{port}"

        await in_thread(log_in, chromium, base, "not-the-cookie")
        wrong = await in_thread(page, chromium)
        await in_thread(log_in, chromium, base, COOKIE.decode())
        right = await in_thread(page, chromium)
        nursery.cancel_scope.cancel()

    assert (True, None, "That is not the node's cookie.", []) == (
        wrong["login_form"], wrong["servers"], wrong["error"], wrong["cookies"])
    assert ("otpy node", "2", "c1, c2", False) == (
        right["title"], right["servers"], right["names"], right["login_form"])
    assert [("otpy_session", True, "Strict")] == right["cookies"]
    assert "" == right["script_sees_cookie"]  # HttpOnly: no script can read it
    assert "rgb(29, 36, 51)" == right["body_color"]
