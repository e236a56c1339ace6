"""The node: calls, casts and sends from trio code, ordering, timeouts, suspension,
timers, tasks owned by servers, start failures, and the trio rules (checkpoints, bare
errors).

Each test pins one behaviour of "The node" section of the API contract.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

import otpy


@asynccontextmanager
async def node_of(*children: otpy.Child, max_restarts: int = 100) -> AsyncIterator[otpy.Node]:
    """A node whose root supervises ``children`` one_for_one."""
    root = otpy.Supervisor(list(children), max_restarts=max_restarts)
    async with otpy.open_node(root) as node:
        yield node


class Log(otpy.GenServer[list[Any]]):
    """Its state is the list of what it handled, in order.

    Calls: "log" answers the list; "crash" raises; anything else is logged and echoed.
    Casts: "crash" raises; ``("relay", target, n)`` casts 0..n-1 to ``target``;
    anything else is logged. Infos are logged."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == "log":
            return otpy.Reply(state, state)
        if request == "crash":
            raise ZeroDivisionError("crash requested")
        return otpy.Reply(request, [*state, ("call", request)])

    def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
        match message:
            case "crash":
                raise ZeroDivisionError("crash requested")
            case ("relay", target, n):
                for i in range(n):
                    self.cast(target, i)
                return state
        return [*state, ("cast", message)]

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, ("info", message)]


class Deferrer(otpy.GenServer[list[otpy.Caller]]):
    """Defers every "wait" call; ``("release", value)`` answers them; "alive" reports
    whether each deferred caller still waits; "crash" raises, "stop" stops it."""

    vsn = "1"

    def init(self, arg: Any) -> list[otpy.Caller]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[otpy.Caller]) -> Any:
        if request == "wait":
            return otpy.NoReply([*state, caller])
        if request == "alive":
            return otpy.Reply([c.alive for c in state], state)
        if request == "crash":
            raise RuntimeError("asked to crash")
        if request == "stop":
            return otpy.Stop("normal", state, reply="stopping")
        return otpy.Reply(request, state)

    def handle_cast(self, message: Any, state: list[otpy.Caller]) -> list[otpy.Caller]:
        _, value = message
        for caller in state:
            caller.reply(value)
        return []


# -- ordering --------------------------------------------------------------------------


async def test_call_after_casts_sees_every_cast() -> None:
    """One sender's casts then call: the call observes all the casts, in order."""
    async with node_of(otpy.Child("log", Log)) as node:
        for i in range(5):
            node.cast("log", i)
        assert [("cast", i) for i in range(5)] == await node.call("log", "log")


async def test_call_after_casts_to_a_suspended_server_sees_every_cast() -> None:
    """Queued casts, then a queued call: after resume the call sees them all."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        for i in range(3):
            node.cast("log", i)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.call, "log", "probe")
            await trio.testing.wait_all_tasks_blocked()
            node.cast("log", "after")
            node.resume("log")
        expected = [("cast", 0), ("cast", 1), ("cast", 2), ("call", "probe"), ("cast", "after")]
        assert expected == await node.call("log", "log")


async def test_casts_sends_and_calls_are_handled_in_the_order_sent() -> None:
    """Interleaved cast/send/call from one sender reach their handlers in order."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        node.send("log", "i1")
        node.cast("log", "c1")
        node.send("log", "i2")
        node.resume("log")
        await node.call("log", "k1")
        node.cast("log", "c2")
        expected = [("info", "i1"), ("cast", "c1"), ("info", "i2"), ("call", "k1"),
                    ("cast", "c2")]
        assert expected == await node.call("log", "log")


async def test_call_never_jumps_messages_already_queued() -> None:
    """``await node.call`` to a server with queued casts is answered after them."""
    async with node_of(otpy.Child("relay", Log), otpy.Child("log", Log)) as node:
        node.cast("relay", ("relay", "log", 3))  # queues 0, 1, 2 for "log"
        assert [("cast", 0), ("cast", 1), ("cast", 2)] == await node.call("log", "log")


async def test_call_nowait_never_jumps_messages_already_queued() -> None:
    """``node.call_nowait`` serves the queued messages first, then answers."""
    async with node_of(otpy.Child("relay", Log), otpy.Child("log", Log)) as node:
        node.cast("relay", ("relay", "log", 3))
        assert [("cast", 0), ("cast", 1), ("cast", 2)] == node.call_nowait("log", "log")


class CastThenCall(otpy.GenServer[int]):
    """Casts ``n`` increments to a target, then calls it, all from one callback."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        target, n = request
        for i in range(n):
            self.cast(target, i)
        return otpy.Reply(self.call(target, "log"), state)


async def test_self_call_after_self_casts_sees_every_cast() -> None:
    """Inside a callback, casts then a call to one server: the call sees the casts."""
    async with node_of(otpy.Child("a", CastThenCall), otpy.Child("log", Log)) as node:
        assert [("cast", i) for i in range(4)] == await node.call("a", ("log", 4))


# -- call_nowait -----------------------------------------------------------------------


async def test_call_nowait_answers_an_idle_server_at_once() -> None:
    """``call_nowait`` to an idle server returns its reply synchronously."""
    async with node_of(otpy.Child("log", Log)) as node:
        assert "hello" == node.call_nowait("log", "hello")


async def test_call_nowait_to_a_suspended_server_raises_would_block() -> None:
    """``call_nowait`` cannot wait for a suspended server: WouldBlock says why, and the
    request is not queued."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        with pytest.raises(otpy.WouldBlock, match="suspended"):
            node.call_nowait("log", "x")
        node.resume("log")
        assert [] == await node.call("log", "log")


async def test_call_nowait_to_a_server_that_defers_raises_would_block() -> None:
    """A NoReply answer cannot be given now: WouldBlock says the server deferred, and
    the deferred caller is marked as gone."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        with pytest.raises(otpy.WouldBlock, match="NoReply"):
            node.call_nowait("d", "wait")
        assert [False] == await node.call("d", "alive")


async def test_call_nowait_behind_a_queued_crash_is_answered_by_the_restarted_server(
) -> None:
    """``call_nowait`` serves the queue first even across a crash in it: the restarted
    server serves the rest of the queue, then answers."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        node.cast("log", "a")
        node.cast("log", "crash")
        node.cast("log", "b")
        node.resume("log")
        assert [("cast", "b")] == node.call_nowait("log", "log")
        assert [("cast", "b")] == await node.call("log", "log")


async def test_call_nowait_crash_raises_server_crashed() -> None:
    """``call_nowait`` to a crashing server raises ServerCrashed with the cause."""
    async with node_of(otpy.Child("log", Log)) as node:
        with pytest.raises(otpy.ServerCrashed) as info:
            node.call_nowait("log", "crash")
    assert isinstance(info.value.__cause__, ZeroDivisionError)


# -- unknown names ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "operation",
    ["call_nowait", "cast", "send", "get_state", "vsn_of", "suspend", "resume"],
)
async def test_unknown_name_raises_no_such_server(operation: str) -> None:
    """Every operation on a name nobody holds raises NoSuchServer (a LookupError)."""
    async with node_of(otpy.Child("log", Log)) as node:
        args = (("nobody", "x") if operation in ("call_nowait", "cast", "send")
                else ("nobody",))
        with pytest.raises(otpy.NoSuchServer) as info:
            getattr(node, operation)(*args)
    assert isinstance(info.value, LookupError)
    assert "nobody" == info.value.name


async def test_call_to_unknown_name_raises_no_such_server() -> None:
    """``await node.call`` to an unknown name raises NoSuchServer, suggesting a close
    name."""
    async with node_of(otpy.Child("log", Log)) as node:
        with pytest.raises(otpy.NoSuchServer, match="did you mean 'log'"):
            await node.call("lgo", "x")


async def test_a_burst_of_unknown_names_pays_for_its_suggestions(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """3000 calls to unknown names at a node of 200 servers are each refused with
    NoSuchServer, but the did-you-mean suggestion, which compares the name with every
    server's, is made only a few times: refusing a bad name costs about what serving a
    call does. A lone typo still gets its suggestion, and so does its repeat."""
    import otpy._core.scheduler as scheduler

    compared = []
    close_matches = scheduler.difflib.get_close_matches

    def counting(word: str, possibilities: Any, n: int = 3) -> list[str]:
        compared.append(word)
        return close_matches(word, possibilities, n=n)

    monkeypatch.setattr(scheduler.difflib, "get_close_matches", counting)
    async with node_of(*[otpy.Child(f"s{i}", Log) for i in range(200)]) as node:
        with pytest.raises(otpy.NoSuchServer, match="did you mean 's17'"):
            node.call_nowait("s17x", "x")
        with pytest.raises(otpy.NoSuchServer, match="did you mean 's17'"):
            node.call_nowait("s17x", "x")
        for i in range(3000):
            with pytest.raises(otpy.NoSuchServer):
                node.call_nowait(f"bogus-{i}", "x")
    assert len(compared) <= 1 + 3000 // (4 * 200) + 1


async def test_call_to_a_supervisor_name_says_it_is_a_supervisor() -> None:
    """Calling a supervisor's name raises NoSuchServer saying it is a supervisor."""
    async with node_of(otpy.Child("log", Log)) as node:
        with pytest.raises(otpy.NoSuchServer, match="is a supervisor"):
            await node.call("root", "x")


# -- call timeouts ---------------------------------------------------------------------


async def test_call_timeout_raises_call_timeout_which_is_a_timeout_error(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """No reply within ``timeout``: CallTimeout, catchable as TimeoutError, after
    exactly ``timeout`` seconds."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        start = trio.current_time()
        with pytest.raises(TimeoutError) as info:
            await node.call("d", "wait", timeout=2.5)
        assert 2.5 == trio.current_time() - start
    assert isinstance(info.value, otpy.CallTimeout)
    assert "'d'" in str(info.value)


async def test_caller_alive_is_false_after_the_caller_gave_up(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A server holding a deferred caller sees ``caller.alive`` turn False on timeout."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        with pytest.raises(otpy.CallTimeout):
            await node.call("d", "wait", timeout=1.0)
        assert [False] == await node.call("d", "alive")


async def test_late_reply_after_timeout_is_dropped(
    autojump_clock: trio.testing.MockClock, logs: list[dict[str, Any]]
) -> None:
    """A reply to a caller that timed out is dropped: no error, and the caller's next
    call gets its own answer."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        with pytest.raises(otpy.CallTimeout):
            await node.call("d", "wait", timeout=1.0)
        node.cast("d", ("release", "late"))
        await trio.sleep(1)
        assert "mine" == await node.call("d", "mine")
        assert [] == await node.call("d", "alive")
    assert [] == [e for e in logs if e["log_level"] in ("error", "warning")]


async def test_timed_out_request_is_still_executed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A call that timed out while the server was suspended is served after resume:
    its effect happens, only its reply is dropped."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        with pytest.raises(otpy.CallTimeout):
            await node.call("log", "late request", timeout=1.0)
        node.resume("log")
        assert [("call", "late request")] == await node.call("log", "log")


async def test_call_without_timeout_waits_as_long_as_needed(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``timeout=None`` waits past the default 5 s for a deferred reply."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        async with trio.open_nursery() as nursery:
            result: list[Any] = []

            async def wait() -> None:
                result.append(await node.call("d", "wait", timeout=None))

            nursery.start_soon(wait)
            await trio.sleep(60)
            node.cast("d", ("release", "finally"))
        assert ["finally"] == result


# -- crashes with queued messages ------------------------------------------------------


async def test_messages_queued_behind_a_crash_are_served_by_the_restarted_server(
    logs: list[dict[str, Any]],
) -> None:
    """Suspend, queue casts, a crashing cast, more casts and a call, resume: the
    restarted server serves everything queued after the crash, in order."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        node.cast("log", "a")
        node.cast("log", "crash")
        node.cast("log", "b")
        node.send("log", "c")
        async with trio.open_nursery() as nursery:
            replies: list[Any] = []

            async def call() -> None:
                replies.append(await node.call("log", "log"))

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            node.resume("log")
        assert [[("cast", "b"), ("info", "c")]] == replies
        assert [1] == [c.restarts for c in node.which_children("root")]
    assert 1 == len([e for e in logs if e["event"] == "server_crashed"])


async def test_call_queued_behind_a_crash_is_answered_by_the_restarted_server() -> None:
    """A call queued behind a crashing call gets its answer from the new server; the
    crashing call's caller gets ServerCrashed."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        node.cast("log", "before")
        outcomes: dict[str, Any] = {}
        async with trio.open_nursery() as nursery:

            async def crash() -> None:
                try:
                    await node.call("log", "crash")
                except otpy.ServerCrashed as exc:
                    outcomes["crash"] = type(exc.__cause__)

            async def after() -> None:
                outcomes["after"] = await node.call("log", "log")

            nursery.start_soon(crash)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(after)
            await trio.testing.wait_all_tasks_blocked()
            node.resume("log")
        assert {"crash": ZeroDivisionError, "after": []} == outcomes


async def test_callers_queued_for_a_server_that_is_not_restarted_get_an_error() -> None:
    """A temporary server crashes with calls queued: the waiting callers get
    ServerStopped at once instead of hanging."""
    async with node_of(otpy.Child("log", Log, restart="temporary")) as node:
        node.suspend("log")
        node.cast("log", "crash")
        errors: list[BaseException] = []
        async with trio.open_nursery() as nursery:

            async def call() -> None:
                try:
                    await node.call("log", "log", timeout=None)
                except otpy.ServerStopped as exc:
                    errors.append(exc)

            nursery.start_soon(call)
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            node.resume("log")
        assert [otpy.ServerStopped, otpy.ServerStopped] == [type(e) for e in errors]
        assert [] == node.servers()


# -- suspend and resume ----------------------------------------------------------------


async def test_suspend_and_resume_lose_nothing() -> None:
    """Messages sent to a suspended server wait; after resume every one is served in
    order and every waiting call is answered."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.suspend("log")
        replies: dict[int, Any] = {}
        async with trio.open_nursery() as nursery:
            for i in range(3):
                node.cast("log", i)

                async def call(i: int = i) -> None:
                    replies[i] = await node.call("log", f"call {i}")

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
            assert [] == node.get_state("log")
            node.resume("log")
        assert {0: "call 0", 1: "call 1", 2: "call 2"} == replies
        expected = [x for i in range(3) for x in (("cast", i), ("call", f"call {i}"))]
        assert expected == node.get_state("log")


async def test_get_state_and_vsn_of_work_while_suspended() -> None:
    """``get_state`` and ``vsn_of`` answer for a suspended server."""
    async with node_of(otpy.Child("log", Log)) as node:
        node.cast("log", "x")
        node.suspend("log")
        assert [("cast", "x")] == node.get_state("log")
        assert "1" == node.vsn_of("log")


async def test_vsn_of_a_class_without_vsn_is_its_derived_vsn() -> None:
    """``vsn_of`` reports the derived version of a class that sets none."""

    class NoVsn(otpy.GenServer[int]):
        pass

    async with node_of(otpy.Child("n", NoVsn, 0)) as node:
        assert NoVsn.vsn == node.vsn_of("n")


# -- mailbox limit ---------------------------------------------------------------------


class Small(Log):
    max_mailbox = 2


@pytest.mark.parametrize("operation", ["cast", "send"])
async def test_full_mailbox_refuses_cast_and_send(operation: str) -> None:
    """At ``max_mailbox`` queued messages, cast/send raise MailboxFull and queue
    nothing."""
    async with node_of(otpy.Child("s", Small)) as node:
        node.suspend("s")
        getattr(node, operation)("s", 1)
        getattr(node, operation)("s", 2)
        with pytest.raises(otpy.MailboxFull, match="max_mailbox=2"):
            getattr(node, operation)("s", 3)
        node.resume("s")
        kind = "cast" if operation == "cast" else "info"
        assert [(kind, 1), (kind, 2)] == await node.call("s", "log")


# -- timers ----------------------------------------------------------------------------


class Timers(otpy.GenServer[list[Any]]):
    """Records ``(time, message)`` for each info; ``("after", s, msg)`` sets a timer
    and ``("cancel", msg)`` cancels the timer set for ``msg``."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        self.refs: dict[Any, otpy.TimerRef] = {}
        return []

    def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
        match message:
            case ("after", seconds, msg):
                self.refs[msg] = self.send_after(seconds, self.name, msg)
            case ("cancel", msg):
                self.refs[msg].cancel()
        return state

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, (trio.current_time(), message)]


async def test_timers_fire_in_deadline_order_at_their_time(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``send_after`` delivers each message to handle_info when its time comes."""
    async with node_of(otpy.Child("t", Timers)) as node:
        start = trio.current_time()
        node.cast("t", ("after", 3.0, "three"))
        node.cast("t", ("after", 1.0, "one"))
        node.cast("t", ("after", 2.0, "two"))
        await trio.sleep(10)
        fired = [(round(t - start, 6), m) for t, m in node.get_state("t")]
    assert [(1.0, "one"), (2.0, "two"), (3.0, "three")] == fired


async def test_cancelled_timer_does_not_fire(autojump_clock: trio.testing.MockClock) -> None:
    """A cancelled timer never delivers its message; the others still do."""
    async with node_of(otpy.Child("t", Timers)) as node:
        node.cast("t", ("after", 1.0, "kept"))
        node.cast("t", ("after", 2.0, "cancelled"))
        node.cast("t", ("cancel", "cancelled"))
        await trio.sleep(10)
        assert ["kept"] == [m for _, m in node.get_state("t")]


async def test_timer_cancel_says_whether_it_was_pending(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """``TimerRef.cancel()`` is True while pending, False once fired or cancelled."""

    class Keep(Timers):
        def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
            return otpy.Reply(self.send_after(request, self.name, "x"), state)

    async with node_of(otpy.Child("t", Keep)) as node:
        pending = await node.call("t", 5.0)
        fired = await node.call("t", 1.0)
        await trio.sleep(2)
        assert [True, False] == [pending.cancel(), pending.cancel()]
        assert False is fired.cancel()


async def test_timer_reaches_the_restarted_server(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A timer is addressed to the name: it reaches the server that holds it when it
    fires, here the restarted one."""

    class Crashable(Timers):
        def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
            raise ZeroDivisionError

    async with node_of(otpy.Child("t", Crashable)) as node:
        node.cast("t", ("after", 1.0, "ping"))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("t", "crash")
        await trio.sleep(2)
        assert ["ping"] == [m for _, m in node.get_state("t")]


# -- tasks owned by servers ------------------------------------------------------------


class Tasks(otpy.GenServer[list[Any]]):
    """Starts tasks on casts; records TaskDone/TaskFailed infos; "crash" raises."""

    vsn = "1"

    def init(self, arg: list[str]) -> list[Any]:
        self.trace = arg
        return []

    def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
        match message:
            case ("sleep_then", seconds, value):
                self.start_task(sleep_then, seconds, value, tag=value)
            case ("fail_after", seconds):
                self.start_task(fail_after, seconds, tag="failing")
            case "forever":
                self.start_task(forever, self.trace, tag="forever")
            case "crash":
                raise ZeroDivisionError("crash requested")
        return state

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, message]


async def sleep_then(seconds: float, value: Any) -> Any:
    await trio.sleep(seconds)
    return value


async def fail_after(seconds: float) -> None:
    await trio.sleep(seconds)
    raise OSError("connection refused")


async def forever(trace: list[str]) -> None:
    try:
        await trio.sleep_forever()
    except trio.Cancelled:
        trace.append(f"cancelled at {trio.current_time():g}")
        raise


async def test_task_result_arrives_as_task_done(autojump_clock: trio.testing.MockClock) -> None:
    """``start_task``: the result comes back to handle_info as TaskDone(tag, result)."""
    async with node_of(otpy.Child("t", Tasks, [])) as node:
        node.cast("t", ("sleep_then", 2.0, "slow"))
        node.cast("t", ("sleep_then", 1.0, "fast"))
        await trio.sleep(5)
        expected = [otpy.TaskDone("fast", "fast"), otpy.TaskDone("slow", "slow")]
        assert expected == node.get_state("t")


async def test_task_exception_arrives_as_task_failed(
    autojump_clock: trio.testing.MockClock, logs: list[dict[str, Any]]
) -> None:
    """A task that raises delivers TaskFailed(tag, error); the server does not crash."""
    async with node_of(otpy.Child("t", Tasks, [])) as node:
        node.cast("t", ("fail_after", 1.0))
        await trio.sleep(5)
        (failed,) = node.get_state("t")
    assert isinstance(failed, otpy.TaskFailed)
    assert "failing" == failed.tag
    assert isinstance(failed.error, OSError)
    assert [] == [e for e in logs if e["event"] == "server_crashed"]


async def test_task_is_cancelled_when_its_server_crashes(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A crash cancels the server's tasks at once; the restarted server gets nothing
    from them."""
    trace: list[str] = []
    async with node_of(otpy.Child("t", Tasks, trace)) as node:
        node.cast("t", "forever")
        await trio.sleep(1)
        node.cast("t", "crash")
        await trio.sleep(1)
        assert ["cancelled at 1"] == trace
        assert [] == node.get_state("t")


async def test_task_is_cancelled_when_the_node_stops_after_the_shutdown_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """An orderly stop gives the server's tasks the child's ``shutdown`` seconds, then
    cancels them; ``open_node`` returns only after they ended."""
    trace: list[str] = []
    async with node_of(otpy.Child("t", Tasks, trace, shutdown=3.0)) as node:
        node.cast("t", "forever")
        await trio.sleep(1)
    assert ["cancelled at 4"] == trace


# -- starting the tree -----------------------------------------------------------------


class Starter(otpy.GenServer[int]):
    """Records its start and terminate in ``arg[0]``; raises in init if ``arg[1]``."""

    vsn = "1"

    def init(self, arg: tuple[list[str], bool]) -> int:
        trace, fail = arg
        self.trace = trace
        if fail:
            raise ValueError(f"{self.name} cannot start")
        trace.append(f"start {self.name}")
        return 0

    def terminate(self, reason: Any, state: int) -> None:
        self.trace.append(f"stop {self.name} {reason}")


async def test_start_failure_raises_start_failed_with_the_cause() -> None:
    """An init that raises makes ``open_node`` raise StartFailed (bare), whose
    ``__cause__`` is the original exception and which names the child."""
    trace: list[str] = []
    with pytest.raises(otpy.StartFailed) as info:
        async with node_of(otpy.Child("a", Starter, (trace, False)),
                           otpy.Child("b", Starter, (trace, True))):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, ValueError)
    assert "b cannot start" == str(info.value.__cause__)
    assert "b" == info.value.child
    assert "'b'" in str(info.value)


async def test_start_failure_stops_started_children_in_reverse_order() -> None:
    """Children started before the failing one are stopped, last started first."""
    trace: list[str] = []
    with pytest.raises(otpy.StartFailed):
        async with node_of(*(otpy.Child(n, Starter, (trace, False)) for n in "abc"),
                           otpy.Child("d", Starter, (trace, True)),
                           otpy.Child("e", Starter, (trace, False))):
            pass  # pragma: no cover
    expected = ["start a", "start b", "start c",
                "stop c shutdown", "stop b shutdown", "stop a shutdown"]
    assert expected == trace


async def test_children_start_in_order_and_stop_in_reverse_order() -> None:
    """The tree starts in list order and stops in reverse order when the node exits."""
    trace: list[str] = []
    async with node_of(*(otpy.Child(n, Starter, (trace, False)) for n in "abc")):
        assert ["start a", "start b", "start c"] == trace
    assert ["stop c shutdown", "stop b shutdown", "stop a shutdown"] == trace[3:]


# -- errors reach the user bare --------------------------------------------------------


async def test_error_raised_in_the_body_reaches_the_user_bare() -> None:
    """An exception from the body of ``open_node`` is not wrapped in an ExceptionGroup."""
    with pytest.raises(KeyError) as info:
        async with node_of(otpy.Child("log", Log)):
            raise KeyError("from the body")
    assert KeyError is type(info.value)


async def test_otpy_error_in_the_body_reaches_the_user_bare(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A CallTimeout not caught in the body leaves ``open_node`` bare."""
    with pytest.raises(otpy.CallTimeout) as info:
        async with node_of(otpy.Child("d", Deferrer)) as node:
            await node.call("d", "wait", timeout=1.0)
    assert otpy.CallTimeout is type(info.value)


async def test_root_giving_up_raises_restart_intensity_exceeded_bare(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """Too many restarts: the body is cancelled and ``open_node`` raises
    RestartIntensityExceeded bare."""
    with pytest.raises(otpy.RestartIntensityExceeded) as info:
        async with node_of(otpy.Child("log", Log), max_restarts=1) as node:
            node.cast("log", "crash")
            node.cast("log", "crash")
            await trio.sleep(1)
            pytest.fail("the body was not cancelled")  # pragma: no cover
    assert otpy.RestartIntensityExceeded is type(info.value)
    assert "root" == info.value.supervisor


async def test_cancelling_the_body_from_outside_shuts_the_node_down_cleanly(
    autojump_clock: trio.testing.MockClock,
) -> None:
    """A timeout around ``open_node`` cancels the body; the tree is shut down and the
    enclosing cancel scope catches the cancellation."""
    trace: list[str] = []
    with trio.move_on_after(1.0) as scope:
        async with node_of(otpy.Child("a", Starter, (trace, False))):
            await trio.sleep_forever()
    assert scope.cancelled_caught
    assert ["start a", "stop a shutdown"] == trace


def test_run_drives_a_node_from_synchronous_code() -> None:
    """``otpy.run(root, main)`` starts the tree, awaits main, returns its result."""

    async def main(node: otpy.Node) -> Any:
        node.cast("log", "x")
        return await node.call("log", "log")

    root = otpy.Supervisor([otpy.Child("log", Log)])
    assert [("cast", "x")] == otpy.run(root, main)


def test_errors_derive_from_otpy_error_and_the_builtin() -> None:
    """Each error is an OtpyError and the built-in a user would catch."""
    assert issubclass(otpy.CallTimeout, TimeoutError)
    assert issubclass(otpy.NoSuchServer, LookupError)
    assert issubclass(otpy.BadReturn, TypeError)
    assert issubclass(otpy.ServerCrashed, otpy.ServerStopped)
    errors = [getattr(otpy, n) for n in otpy.__all__]
    errors = [e for e in errors if isinstance(e, type) and issubclass(e, Exception)]
    assert [] == [e for e in errors if not issubclass(e, otpy.OtpyError)]


# -- checkpoints -----------------------------------------------------------------------


async def test_call_answered_at_once_is_a_checkpoint() -> None:
    """``await node.call`` is a checkpoint even when the reply is ready at once."""
    async with node_of(otpy.Child("log", Log)) as node:
        with trio.testing.assert_checkpoints():
            assert "x" == await node.call("log", "x")


async def test_call_that_waits_is_a_checkpoint() -> None:
    """``await node.call`` that waits for a queued turn is a checkpoint."""
    async with node_of(otpy.Child("relay", Log), otpy.Child("log", Log)) as node:
        node.cast("relay", ("relay", "log", 1))
        with trio.testing.assert_checkpoints():
            await node.call("log", "x")


async def test_call_answered_at_once_can_be_cancelled() -> None:
    """A call in a cancelled scope raises Cancelled and the request is not made."""
    async with node_of(otpy.Child("log", Log)) as node:
        with trio.CancelScope() as scope:
            scope.cancel()
            await node.call("log", "x")
        assert scope.cancelled_caught
        assert [] == await node.call("log", "log")


async def test_supervisor_control_calls_are_checkpoints() -> None:
    """start_child, terminate_child, restart_child and delete_child are checkpoints."""
    async with node_of(otpy.Child("log", Log)) as node:
        with trio.testing.assert_checkpoints():
            await node.start_child("root", otpy.Child("extra", Log))
        with trio.testing.assert_checkpoints():
            await node.terminate_child("root", "extra")
        with trio.testing.assert_checkpoints():
            await node.restart_child("root", "extra")
        with trio.testing.assert_checkpoints():
            await node.terminate_child("root", "extra")
        with trio.testing.assert_checkpoints():
            await node.delete_child("root", "extra")
        assert ["log"] == [c.id for c in node.which_children("root")]


async def test_leaving_open_node_is_a_checkpoint() -> None:
    """Exiting the ``open_node`` block is a checkpoint."""
    manager = node_of(otpy.Child("log", Log))
    await manager.__aenter__()
    with trio.testing.assert_checkpoints():
        await manager.__aexit__(None, None, None)


@pytest.mark.parametrize(
    ("request_", "error"), [("crash", otpy.ServerCrashed), ("stop", otpy.ServerStopped)])
async def test_deferred_callers_fail_at_once_when_the_server_stops(
    request_: str, error: type[Exception]
) -> None:
    """A caller deferred with NoReply is never left hanging: when the server stops
    (crash or Stop) it gets an error at once, not after its timeout."""
    outcomes: list[object] = []
    root = otpy.Supervisor([otpy.Child("d", Deferrer, restart="temporary")])
    async with otpy.open_node(root) as node:

        async def wait() -> None:
            try:
                await node.call("d", "wait", timeout=None)
            except otpy.OtpyError as exc:
                outcomes.append(exc)

        # Bounded, so that a regression fails here instead of hanging the suite.
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                nursery.start_soon(wait)
                await trio.testing.wait_all_tasks_blocked()
                with contextlib.suppress(otpy.OtpyError):
                    await node.call("d", request_)
    assert [error, error] == [type(o) for o in outcomes]
