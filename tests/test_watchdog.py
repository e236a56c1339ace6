"""The step watchdog: a callback that overruns its ``step_timeout`` is interrupted and
handled as a crash of its server, so the node keeps serving everyone else.

These tests run in real time (the watchdog measures real CPU time, not trio's clock),
with budgets of a few hundredths of a second so that each costs well under a second.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import trio

import otpy

BUDGET = 0.05


class Spinner(otpy.GenServer[int]):
    """Counts its calls; ``"spin"`` never returns by itself, in various ways."""

    vsn = "1"
    step_timeout = BUDGET

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "spin":
            while True:
                pass
        if request == "spin_swallowing":
            while True:
                try:
                    sum(range(100))
                except Exception:
                    pass
        if request == "spin_casting":
            while True:  # mostly in otpy's code and in sink's: never cut there
                self.call("sink", "get")
                self.send_after(60, "sink", 1).cancel()
        if request == "sleep":
            time.sleep(30)
        if request == ("call", "spin"):
            try:
                return otpy.Reply(self.call("other", "spin"), state)
            except otpy.ServerCrashed as exc:
                return otpy.Reply(("other crashed", type(exc.__cause__).__name__), state)
        return otpy.Reply(state + 1, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state


class Sink(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_info(self, message: Any, state: int) -> int:
        return state + 1

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state)


def tree(*extra: otpy.Child) -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child("spin", Spinner), otpy.Child("sink", Sink), *extra],
                           max_restarts=100)


def restarts(node: otpy.Node, child: str) -> int:
    return next(c.restarts for c in node.which_children() if c.id == child)


@pytest.mark.parametrize("request_", ["spin", "spin_swallowing", "spin_casting", "sleep"])
async def test_runaway_step_is_interrupted_and_restarted(request_: str, logs: list[Any]) -> None:
    """A step that never returns (a pure-Python loop, one that swallows exceptions, one
    that spends its time in otpy's own code, a blocking sleep) is interrupted; its
    caller gets ServerCrashed caused by StepTimeout, the server restarts from init, and
    a second server that a client was calling meanwhile answers."""
    async with otpy.open_node(tree()) as node:
        assert 1 == await node.call("spin", "count")
        answered: list[Any] = []

        async def bystander() -> None:
            answered.append(await node.call("sink", "get"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(bystander)
            with pytest.raises(otpy.ServerCrashed) as info:
                await node.call("spin", request_)
        cause = info.value.__cause__
        assert isinstance(cause, otpy.StepTimeout)
        assert "spin" == cause.name
        assert f"step_timeout of {BUDGET:g} s" in str(cause)
        assert 1 == len(answered)
        assert 1 == restarts(node, "spin")
        assert 1 == await node.call("spin", "count")  # a new incarnation, from init
    [crash] = [e for e in logs if e["event"] == "server_crashed"]
    assert "spin" == crash["server"]
    assert isinstance(crash["exc_info"], otpy.StepTimeout)


async def test_interruption_names_where_the_callback_was() -> None:
    """The StepTimeout says which callback overran and the line it was running."""
    async with otpy.open_node(tree()) as node:
        with pytest.raises(otpy.ServerCrashed) as info:
            await node.call("spin", "spin")
    message = str(info.value.__cause__)
    assert "Spinner.handle_call" in message
    assert "test_watchdog.py:" in message
    assert "self.start_task" in message  # says how to fix it


async def test_overrun_in_a_server_called_inline_crashes_that_server() -> None:
    """A calls B inline and B spins: B crashes with StepTimeout; A gets ServerCrashed
    from self.call, handles it, and answers."""
    root = tree(otpy.Child("other", Spinner))
    async with otpy.open_node(root) as node:
        assert ("other crashed", "StepTimeout") == await node.call("spin", ("call", "spin"))
        assert 1 == restarts(node, "other")
        assert 0 == restarts(node, "spin")


async def test_watchdog_does_not_fire_outside_a_step() -> None:
    """An idle node, and tasks busy outside any step, are never interrupted."""
    async with otpy.open_node(tree()) as node:
        await trio.sleep(5 * BUDGET)
        deadline = time.monotonic() + 4 * BUDGET
        while time.monotonic() < deadline:  # a client task hogging the loop
            pass
        await trio.sleep(0)
        assert 1 == await node.call("spin", "count")
        assert 0 == restarts(node, "spin")


async def test_child_step_timeout_overrides_the_class() -> None:
    """``Child(..., step_timeout=...)`` sets this child's budget; a callback well within
    it is not interrupted."""

    class Slow(Spinner):
        step_timeout = 0.01

        def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
            time.sleep(0.1)
            return otpy.Reply("done", state)

    root = otpy.Supervisor([otpy.Child("slow", Slow, step_timeout=1.0)])
    async with otpy.open_node(root) as node:
        assert "done" == await node.call("slow", "x")
        assert 1.0 == node.statistics("slow")["step_timeout"]


class SlowStop(Spinner):
    def handle_cast(self, message: Any, state: int) -> Any:
        return otpy.Stop("done", state)

    def terminate(self, reason: Any, state: int) -> None:
        while True:
            pass


async def test_overrunning_terminate_is_abandoned(logs: list[Any]) -> None:
    """A terminate that overruns is cut short; the server stops and restarts all the
    same."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("t", SlowStop)])) as node:
        node.cast("t", "stop")
        assert 1 == restarts(node, "t")
        assert 1 == await node.call("t", "count")
    [event, _shutdown] = [e for e in logs if e["event"] == "terminate_crashed"]
    assert isinstance(event["exc_info"], otpy.StepTimeout)


async def test_overrunning_init_fails_the_start() -> None:
    """An init that overruns fails the start with StartFailed caused by StepTimeout."""

    class SlowInit(Spinner):
        def init(self, arg: Any) -> int:
            while True:
                pass

    with pytest.raises(otpy.StartFailed) as info:
        async with otpy.open_node(otpy.Supervisor([otpy.Child("i", SlowInit)])):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, otpy.StepTimeout)


class SpinV2(Spinner):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if self.name == "spin":
            while True:
                pass
        return state


async def test_overrunning_code_change_rolls_the_upgrade_back() -> None:
    """A code_change that overruns is abandoned and the whole upgrade changes
    nothing."""
    root = tree(otpy.Child("other", Spinner))
    async with otpy.open_node(root) as node:
        await node.call("other", "incr")
        with pytest.raises(otpy.UpgradeFailed) as info:
            await node.upgrade(otpy.Release("2", [otpy.Update(Spinner, SpinV2)]))
        assert ["spin"] == list(info.value.failures)
        assert "StepTimeout" in info.value.failures["spin"]
        assert "1" == node.vsn_of("other") == node.vsn_of("spin")
        assert 1 == node.get_state("other")


@pytest.mark.parametrize("value", [0, -1.0, "1", None, True])
def test_bad_step_timeout_is_refused(value: Any) -> None:
    """step_timeout must be seconds > 0, on the class and on the Child spec."""
    with pytest.raises(TypeError, match="step_timeout must be seconds > 0"):
        type("Bad", (Spinner,), {"step_timeout": value})
    if value is not None:
        with pytest.raises(otpy.SupervisorError, match="step_timeout must be seconds > 0"):
            otpy.Child("c", Spinner, step_timeout=value)


def test_a_node_off_the_main_thread_runs_without_the_watchdog(logs: list[Any]) -> None:
    """Python runs signal handlers only on the main thread: a node elsewhere works, and
    says once that step_timeout is not enforced there."""
    import threading

    results: list[Any] = []

    async def main() -> None:
        async with otpy.open_node(tree()) as node:
            results.append(await node.call("spin", "count"))

    worker = threading.Thread(target=trio.run, args=(main,))
    worker.start()
    worker.join(timeout=30)
    assert [1] == results
    [event] = [e for e in logs if e["event"] == "watchdog_unavailable"]
    assert "main thread" in event["reason"]


class SlowCleanup(Spinner):
    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        try:
            while True:
                sum(range(10))
        finally:
            time.sleep(BUDGET / 2)  # cleanup well within a budget of its own
            CLEANED.append(request)


CLEANED: list[Any] = []


async def test_an_interrupted_callback_finishes_its_cleanup() -> None:
    """The finally block of an interrupted callback runs, with a budget of its own."""
    CLEANED.clear()
    async with otpy.open_node(otpy.Supervisor([otpy.Child("c", SlowCleanup)])) as node:
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "go")
    assert ["go"] == CLEANED


class SlowToDie(Spinner):
    def handle_cast(self, message: Any, state: int) -> Any:
        return otpy.Stop(SlowReason(), state)

    def terminate(self, reason: Any, state: int) -> None:
        raise ValueError("terminate fails, so otpy logs the reason's repr")


class SlowReason(Exception):
    def __repr__(self) -> str:  # called by otpy to log the stop, outside any callback
        time.sleep(4 * BUDGET)
        return "SlowReason()"


async def test_code_otpy_runs_around_a_callback_is_never_interrupted() -> None:
    """A slow __repr__ of a stop reason, called by otpy itself to log a failed
    terminate, is not taken for an overrunning callback: the server stops and restarts
    cleanly."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("d", SlowToDie)])) as node:
        node.cast("d", "stop")
        assert 1 == restarts(node, "d")
        assert 1 == await node.call("d", "count")


async def test_an_applications_handler_of_the_signal_is_left_alone(
        logs: list[Any]) -> None:
    """If the application already handles the watchdog's signal, otpy does not take
    it: the watchdog stays off and says so, and the handler is still there after."""
    import signal

    from otpy._watchdog import SIGNAL

    assert SIGNAL is not None

    def mine(signum: int, frame: Any) -> None:
        pass  # pragma: no cover - never sent

    previous = signal.signal(SIGNAL, mine)
    try:
        async with otpy.open_node(tree()) as node:
            assert 1 == await node.call("spin", "count")
        assert mine is signal.getsignal(SIGNAL)
    finally:
        signal.signal(SIGNAL, previous)
    [event] = [e for e in logs if e["event"] == "watchdog_unavailable"]
    assert "will not replace" in event["reason"]


class Swallower(otpy.GenServer[int]):
    """Loops that catch everything, the interruption included: the kinds a careless
    retry loop takes."""

    vsn = "1"
    step_timeout = BUDGET

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "bare":
            while True:
                try:
                    sum(range(100))
                except:  # noqa: E722 - the point of the test
                    pass
        if request == "base":
            while True:
                try:
                    time.sleep(0.01)
                except BaseException:
                    continue
        if request == "nested":
            while True:
                try:
                    try:
                        sum(range(100))
                    finally:
                        sum(range(10))
                except BaseException:
                    pass
        return otpy.Reply(state, state)


@pytest.mark.parametrize("request_", ["bare", "base", "nested"])
async def test_a_callback_that_swallows_the_interruption_is_ended(request_: str) -> None:
    """A callback that catches the interruption and goes on (a bare ``except:`` retry
    loop) is ended all the same within about two budgets: it crashes with StepTimeout
    and restarts, instead of stalling the node for ever."""
    root = otpy.Supervisor([otpy.Child("s", Swallower)], max_restarts=10)
    async with otpy.open_node(root) as node:
        # Not for ever: ended within about two budgets (a generous bound for a busy
        # machine; the watchdog is real time).
        with trio.fail_after(200 * BUDGET), pytest.raises(otpy.ServerCrashed) as info:
            await node.call("s", request_)
        assert isinstance(info.value.__cause__, otpy.StepTimeout)
        assert 0 == await node.call("s", "count")  # restarted, and serving


class SlowAdapter(otpy.GenServer[int]):
    """Its versioned-client hooks block: any client reaches them through vsn=."""

    vsn = "2"
    step_timeout = BUDGET

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(request, state)

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        if request == "slow request":
            time.sleep(30)
        return request

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        if reply == "slow reply":
            time.sleep(30)
        return reply


@pytest.mark.parametrize("request_", ["slow request", "slow reply"])
async def test_versioned_client_hooks_are_watched(request_: str) -> None:
    """upgrade_request and downgrade_reply run under the server's step_timeout too."""
    root = otpy.Supervisor([otpy.Child("a", SlowAdapter)], max_restarts=10)
    async with otpy.open_node(root) as node:
        with trio.fail_after(200 * BUDGET), pytest.raises(otpy.StepTimeout):
            await node.call("a", request_, vsn="1")  # not after the 30 s sleep
        assert "fine" == await node.call("a", "fine", vsn="1")
