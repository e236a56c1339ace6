"""A node with a small tree, seen on its dashboard: the screenshot in the README.

A node serves HTTP (``open_node(root, http=...)``); a few clients keep its servers busy,
one server is made to crash twice (through ``POST /call``, as any HTTP client would),
one is suspended with messages waiting, and a release is installed. Then Debian's
headless Chromium logs in to the dashboard with the node's cookie, waits for the live
view to show the step statistics, opens one server, and saves a screenshot::

    python examples/dashboard_shot.py                       # ./dashboard.png
    python examples/dashboard_shot.py docs/img/dashboard.png   # what `make screenshot` does

It needs ``chromium`` and ``chromium-driver`` (Debian's; ``make test`` installs them)
and selenium (in otpy's ``test`` extra).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from typing import Any

import structlog
import trio

import otpy

COOKIE = "dashboard-demo-cookie"


@dataclass(frozen=True)
class Cart:
    items: tuple[str, ...] = ()
    total_cents: int = 0
    owner: str = "ada@example.org"
    tags: frozenset[str] = field(default_factory=frozenset)


class CartV1(otpy.GenServer[Cart]):
    """A shopping cart: ("add", item, cents) adds an item; "crash" is a bug."""

    vsn = "1"

    def init(self, arg: Any) -> Cart:
        return Cart(tags=frozenset({"demo"}))

    def handle_call(self, request: Any, caller: otpy.Caller, state: Cart) -> Any:
        if request == "crash":
            raise KeyError("coupon 'WINTER24' not found")
        _, item, cents = request
        new = Cart((*state.items[-8:], item), state.total_cents + cents, state.owner,
                   state.tags)
        return otpy.Reply(new.total_cents, new)


class CartV2(CartV1):
    """Version 2: the same state, a new vsn (the release the screenshot shows)."""

    vsn = "2"

    def code_change(self, old_vsn: Any, state: Cart, extra: Any) -> Cart:
        return state


class Worker(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        total = 0
        for i in range(int(request)):  # some work, so that steps take time
            total += i
        return otpy.Reply(total, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + 1


def tree() -> otpy.Supervisor:
    return otpy.Supervisor([
        otpy.Supervisor([otpy.Child("cart", CartV1), otpy.Child("checkout", Worker)],
                        strategy="rest_for_one", name="shop", max_restarts=5,
                        max_seconds=60),
        otpy.Supervisor([otpy.Child(f"worker{i}", Worker) for i in range(8)],
                        name="pool", max_restarts=10, max_seconds=60),
        otpy.Supervisor([otpy.Child("mailer", Worker), otpy.Child("audit", Worker)],
                        strategy="one_for_all", name="jobs"),
    ], name="root")


def post(url: str, body: bytes) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=body)) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def open_browser(profile: str) -> Any:
    """Headless Chromium under selenium. Started before the load: selenium's start
    makes many short blocking calls, each waiting for the GIL that a busy loop holds."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-dev-shm-usage", "--window-size=1480,1250",
                 "--hide-scrollbars", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path="/usr/bin/chromedriver"),
                            options=options)


def close_browser(driver: Any) -> None:
    service = driver.service
    pid = service.process.pid if service.process else None
    driver.quit()
    if pid is not None:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def screenshot(driver: Any, base: str, path: str, settle: float) -> None:
    """Log in, wait for the live view, open a server, let the page show ``settle``
    seconds more, save."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.wait import WebDriverWait

    driver.get(base + "/")
    driver.find_element(By.ID, "cookie").send_keys(COOKIE)
    driver.find_element(By.ID, "login").click()
    wait = WebDriverWait(driver, 30, poll_frequency=0.2)
    # the live view, once the step statistics have come in
    wait.until(lambda d: d.execute_script(
        "const row = document.querySelector('#server-table tr[data-server=worker3]');"
        "return row && /\\d/.test(row.cells[6].textContent)"))
    # one more crash, seen live: the cart's restart count goes to 3
    post(base + "/call/cart", b'"crash"')
    wait.until(lambda d: "3" == d.execute_script(
        "const e = document.querySelector('[data-child=cart] .restarts');"
        "return e && e.textContent"))
    driver.find_element(By.CSS_SELECTOR, '#server-table th[data-key="busy"]').click()
    driver.execute_script("document.querySelector('[data-child=cart] .row').click()")
    wait.until(lambda d: "Cart(" in d.execute_script(
        "return document.getElementById('detail').textContent"))
    time.sleep(settle)
    driver.save_screenshot(path)


async def main(path: str, settle: float) -> None:
    os.environ["OTPY_COOKIE"] = COOKIE  # the node's cookie, for this demo only
    with tempfile.TemporaryDirectory(prefix="otpy-shot-") as profile:
        driver = await trio.to_thread.run_sync(open_browser, profile)
        try:
            await show(driver, path, settle)
        finally:
            await trio.to_thread.run_sync(close_browser, driver)


async def show(driver: Any, path: str, settle: float) -> None:
    async with otpy.open_node(tree(), http=("127.0.0.1", 0)) as node, \
            trio.open_nursery() as nursery:
        host, port = node.http_address or ("", 0)
        base = f"http://{host}:{port}"

        async def busy(name: str, work: int) -> None:
            while True:
                await node.call(name, work)
                await trio.sleep(0)

        for name, work in (("worker3", 2000), ("worker5", 400), ("checkout", 50)):
            nursery.start_soon(busy, name, work)
        for n in range(3):
            await node.call("cart", ("add", f"book-{n}", 1250 + n))
        for _ in range(2):  # a bug, reached over HTTP: the supervisor restarts the cart
            await trio.to_thread.run_sync(post, base + "/call/cart", b'"crash"')
            await trio.sleep(0.5)
        await node.call("cart", ("add", "lamp", 3900))
        await node.upgrade(otpy.Release("2", [otpy.Update(CartV1, CartV2)],
                                        description="carts remember their tags"))
        node.suspend("mailer")
        for _ in range(120):
            node.cast("mailer", "send")
        await trio.to_thread.run_sync(screenshot, driver, base, path, settle)
        print(f"saved the dashboard to {path}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    # Given a path (make screenshot), wait until the figures of the last 10 s (the
    # worst loop lag) no longer show the browser's own start on a 2-core machine.
    trio.run(main, *((sys.argv[1], 12.0) if len(sys.argv) > 1 else ("dashboard.png", 0.0)))
