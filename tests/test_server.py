"""GenServer: class checks, callback results, crashes, and what callbacks can do.

Each test pins one behaviour of the "Servers" section of the API contract.
"""

from __future__ import annotations

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


class Counter(otpy.GenServer[int]):
    """An int counter: "incr", "count" and "crash" calls; casts add; "boom" casts crash."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0 if arg is None else arg

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        if request == "count":
            return otpy.Reply(state, state)
        if request == "crash":
            raise ZeroDivisionError("crash requested")
        raise ValueError(f"unknown request {request!r}")

    def handle_cast(self, message: Any, state: int) -> int:
        if message == "boom":
            raise ZeroDivisionError("boom requested")
        return state + message


class Terminations(otpy.GenServer[int]):
    """A counter that records every ``terminate(reason, state)`` in the list ``arg``."""

    vsn = "1"

    def init(self, arg: list[tuple[Any, int]]) -> int:
        self.record = arg
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise KeyError("crash requested")
        if request == "stop":
            return otpy.Stop("normal", state, reply="bye")
        if request == "stop_silently":
            return otpy.Stop("normal", state)
        return otpy.Reply(state, state)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message

    def terminate(self, reason: Any, state: int) -> None:
        self.record.append((reason, state))


# -- class definition ------------------------------------------------------------------


@pytest.mark.parametrize(
    "callback", ["init", "handle_call", "handle_cast", "handle_info", "terminate"]
)
def test_async_callback_is_refused_when_the_class_is_defined(callback: str) -> None:
    """An ``async def`` callback is a TypeError at class definition saying what to write."""

    async def coro(self: Any, *args: Any) -> None:
        pass

    with pytest.raises(TypeError) as info:
        type("Bad", (otpy.GenServer,), {callback: coro})
    message = str(info.value)
    assert f"def {callback}(" in message
    assert "async" in message
    assert "start_task" in message


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("handle_cal", "handle_call"),
        ("handle_calls", "handle_call"),
        ("handle_cats", "handle_cast"),
        ("handle_inf", "handle_info"),
        ("terminat", "terminate"),
        ("code_chnage", "code_change"),
    ],
)
def test_misspelled_callback_name_is_refused(typo: str, meant: str) -> None:
    """A method named like a callback but misspelled is a TypeError naming the callback."""

    def method(self: Any, *args: Any) -> None:
        pass

    with pytest.raises(TypeError) as info:
        type("Typo", (otpy.GenServer,), {typo: method})
    assert f"did you mean {meant!r}" in str(info.value)


def test_private_helper_named_like_a_callback_is_accepted() -> None:
    """The rename the typo error suggests ('_handle_cal') defines the class fine."""

    class Helper(otpy.GenServer[int]):
        vsn = "1"

        def _handle_cal(self) -> int:
            return 1

    assert "1" == Helper.vsn


def test_unrelated_method_names_are_accepted() -> None:
    """Helpers whose names are not near a callback name are not refused."""

    class Helpers(otpy.GenServer[int]):
        vsn = "1"

        def handle_request(self) -> None:
            pass

        def initialize(self) -> None:
            pass

    assert "1" == Helpers.vsn


def test_vsn_that_is_not_a_string_is_refused() -> None:
    """``vsn = 2`` is a TypeError telling to write a string."""
    with pytest.raises(TypeError, match='must be a string such as "2"'):
        type("BadVsn", (otpy.GenServer,), {"vsn": 2})


def _versioned(step: int) -> type[otpy.GenServer[int]]:
    """The same class (same qualified name) with code that depends on ``step``."""
    if step == 1:

        class Derived(otpy.GenServer[int]):
            def handle_cast(self, message: Any, state: int) -> int:
                return state + 1

    else:

        class Derived(otpy.GenServer[int]):
            def handle_cast(self, message: Any, state: int) -> int:
                return state + 2

    return Derived


def test_class_without_vsn_gets_one_derived_from_its_code() -> None:
    """No ``vsn``: the class gets a non-empty string version."""
    vsn = _versioned(1).vsn
    assert isinstance(vsn, str)
    assert vsn != ""


def test_derived_vsn_is_stable_for_the_same_code() -> None:
    """Defining the very same class twice gives the same derived vsn."""
    assert _versioned(1).vsn == _versioned(1).vsn


def test_derived_vsn_changes_when_the_code_changes() -> None:
    """A change in a callback's code changes the derived vsn."""
    assert _versioned(1).vsn != _versioned(2).vsn


def test_declared_vsn_is_kept() -> None:
    """A class that sets ``vsn`` keeps it; subclasses without one get their own."""

    class Sub(Counter):
        def handle_cast(self, message: Any, state: int) -> int:
            return state - message

    assert "1" == Counter.vsn
    assert "1" != Sub.vsn


# -- callback results ------------------------------------------------------------------


class BadReturns(otpy.GenServer[int]):
    """Each handler returns a value that is not one of its documented results."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "ok":
            return otpy.Reply(state, state)
        return 42  # a bare value, not Reply/NoReply/Stop

    def handle_cast(self, message: Any, state: int) -> Any:
        return otpy.Reply("no", state)  # Reply is for calls only

    def handle_info(self, message: Any, state: int) -> Any:
        return otpy.NoReply(state)


async def test_bad_return_from_handle_call_crashes_with_bad_return() -> None:
    """A bare value from handle_call crashes the server with BadReturn naming the server,
    the callback and the value; the caller gets ServerCrashed caused by it."""
    async with node_of(otpy.Child("bad", BadReturns)) as node:
        with pytest.raises(otpy.ServerCrashed) as info:
            await node.call("bad", "whatever")
    cause = info.value.__cause__
    assert isinstance(cause, otpy.BadReturn)
    message = str(cause)
    assert "'bad'" in message
    assert "handle_call" in message
    assert "42" in message
    assert "otpy.Reply" in message


@pytest.mark.parametrize(
    ("deliver", "callback", "value"),
    [("cast", "handle_cast", "Reply("), ("send", "handle_info", "NoReply(")],
)
async def test_bad_return_from_cast_and_info_handlers_crashes_with_bad_return(
    logs: list[dict[str, Any]], deliver: str, callback: str, value: str
) -> None:
    """A Reply from handle_cast (NoReply from handle_info) crashes with BadReturn naming
    the server, the callback and the value."""
    async with node_of(otpy.Child("bad", BadReturns)) as node:
        getattr(node, deliver)("bad", "x")
        assert 0 == await node.call("bad", "ok")
    (crash,) = [e for e in logs if e["event"] == "server_crashed"]
    exc = crash["exc_info"]
    assert isinstance(exc, otpy.BadReturn)
    assert "'bad'" in str(exc)
    assert callback in str(exc)
    assert value in str(exc)


class InitReturnsReply(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> Any:
        return otpy.Reply(1, 2)


async def test_bad_return_from_init_fails_the_start() -> None:
    """``init`` returning a Reply makes the start fail with BadReturn as the cause."""
    with pytest.raises(otpy.StartFailed) as info:
        async with node_of(otpy.Child("bad", InitReturnsReply)):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, otpy.BadReturn)
    assert "init" in str(info.value.__cause__)


class WrongStateType(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> Any:
        return "not an int"


async def test_init_state_of_the_wrong_type_fails_the_start() -> None:
    """The state init returns is checked against the declared state type."""
    with pytest.raises(otpy.StartFailed) as info:
        async with node_of(otpy.Child("typed", WrongStateType)):
            pass  # pragma: no cover
    assert isinstance(info.value.__cause__, otpy.StateTypeError)
    assert "int" in str(info.value.__cause__)


async def test_init_ignore_leaves_the_child_not_running() -> None:
    """``init`` returning Ignore starts the node; the child is listed, not running."""

    class Ignored(otpy.GenServer[int]):
        vsn = "1"

        def init(self, arg: Any) -> Any:
            return otpy.Ignore

    async with node_of(otpy.Child("ignored", Ignored)) as node:
        with pytest.raises(otpy.NoSuchServer):
            await node.call("ignored", "x")
        assert ["not running"] == [c.status for c in node.which_children("root")]


async def test_missing_handle_call_crashes_the_server() -> None:
    """A class without handle_call crashes on a call, with a message saying what to
    define (OTP: undef)."""

    class NoCalls(otpy.GenServer[int]):
        vsn = "1"

    async with node_of(otpy.Child("nocalls", NoCalls, 0)) as node:
        with pytest.raises(otpy.ServerCrashed) as info:
            await node.call("nocalls", "x")
    assert "define handle_call" in str(info.value.__cause__)


async def test_unexpected_info_is_logged_and_the_server_keeps_running(
    logs: list[dict[str, Any]],
) -> None:
    """The default handle_info logs ``unexpected_message`` and keeps the state."""
    async with node_of(otpy.Child("c", Counter, 5)) as node:
        node.send("c", "stray")
        assert 5 == await node.call("c", "count")
    assert ["c"] == [e["server"] for e in logs if e["event"] == "unexpected_message"]
    assert [] == [e for e in logs if e["event"] == "server_crashed"]


# -- crashes ---------------------------------------------------------------------------


async def test_crash_gives_the_caller_server_crashed_caused_by_the_exception() -> None:
    """The caller of a crashing call gets ServerCrashed whose __cause__ is the error."""
    async with node_of(otpy.Child("c", Counter)) as node:
        with pytest.raises(otpy.ServerCrashed) as info:
            await node.call("c", "crash")
    assert isinstance(info.value, otpy.ServerStopped)
    assert isinstance(info.value.__cause__, ZeroDivisionError)
    assert "crash requested" == str(info.value.__cause__)
    assert "c" == info.value.name


async def test_crash_logs_exactly_one_server_crashed_event(logs: list[dict[str, Any]]) -> None:
    """One ``server_crashed`` event carries server, vsn, message and the exception with
    its traceback."""
    async with node_of(otpy.Child("c", Counter)) as node:
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
    crashes = [e for e in logs if e["event"] == "server_crashed"]
    assert 1 == len(crashes)
    (crash,) = crashes
    assert "c" == crash["server"]
    assert "1" == crash["vsn"]
    assert "error" == crash["log_level"]
    assert "'crash'" in crash["message"]
    assert isinstance(crash["exc_info"], ZeroDivisionError)
    assert crash["exc_info"].__traceback__ is not None
    assert ["server_crashed"] == [e["event"] for e in logs if e["log_level"] == "error"]


async def test_crashed_server_is_restarted_from_init() -> None:
    """After a crash the supervisor restarts the server: it answers from a fresh state."""
    async with node_of(otpy.Child("c", Counter)) as node:
        await node.call("c", "incr")
        await node.call("c", "incr")
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        assert 0 == await node.call("c", "count")
        assert [1] == [c.restarts for c in node.which_children("root")]


async def test_cast_crash_restarts_before_the_cast_returns() -> None:
    """Supervision is synchronous: right after a crashing cast the name is served again."""
    async with node_of(otpy.Child("c", Counter, 3)) as node:
        node.cast("c", "boom")
        assert 3 == node.get_state("c")
        assert 3 == node.call_nowait("c", "count")


async def test_terminate_gets_the_last_good_state_after_a_crash() -> None:
    """``terminate(reason, state)`` after a crash gets the exception and the state from
    before the crashing message."""
    record: list[tuple[Any, int]] = []
    async with node_of(otpy.Child("t", Terminations, record)) as node:
        node.cast("t", 7)
        with pytest.raises(otpy.ServerCrashed):
            await node.call("t", "crash")
        (reason, state), *shutdowns = record
    assert isinstance(reason, KeyError)
    assert 7 == state
    assert [] == shutdowns


async def test_stop_with_reply_answers_the_caller_then_terminates() -> None:
    """``Stop(reason, state, reply=...)`` answers the caller, then ``terminate(reason,
    state)`` runs."""
    record: list[tuple[Any, int]] = []
    async with node_of(otpy.Child("t", Terminations, record)) as node:
        node.cast("t", 4)
        assert "bye" == await node.call("t", "stop")
        assert [("normal", 4)] == record


async def test_stop_without_reply_fails_the_caller_with_server_stopped() -> None:
    """``Stop`` without a reply leaves the caller with ServerStopped (not a crash)."""
    record: list[tuple[Any, int]] = []
    async with node_of(otpy.Child("t", Terminations, record)) as node:
        with pytest.raises(otpy.ServerStopped) as info:
            await node.call("t", "stop_silently")
    assert not isinstance(info.value, otpy.ServerCrashed)
    assert "normal" == info.value.reason


async def test_permanent_server_stopped_normally_is_restarted() -> None:
    """A permanent child is restarted even after a normal Stop."""
    record: list[tuple[Any, int]] = []
    async with node_of(otpy.Child("t", Terminations, record)) as node:
        node.cast("t", 4)
        await node.call("t", "stop")
        assert 0 == await node.call("t", "get")


async def test_terminate_is_called_with_shutdown_when_the_node_stops() -> None:
    """Leaving ``open_node`` stops every server with reason "shutdown"."""
    record: list[tuple[Any, int]] = []
    async with node_of(otpy.Child("t", Terminations, record)) as node:
        node.cast("t", 9)
    assert [("shutdown", 9)] == record


async def test_crash_in_terminate_is_logged_and_does_not_stop_the_restart(
    logs: list[dict[str, Any]],
) -> None:
    """A terminate that raises is logged as ``terminate_crashed``; the restart goes on."""

    class BadTerminate(Counter):
        def terminate(self, reason: Any, state: int) -> None:
            raise RuntimeError("terminate failed")

    async with node_of(otpy.Child("c", BadTerminate, 2)) as node:
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        assert 2 == await node.call("c", "count")
    assert ["c", "c"] == [e["server"] for e in logs if e["event"] == "terminate_crashed"]


# -- calls from inside callbacks -------------------------------------------------------


class Caller(otpy.GenServer[int]):
    """Calls other servers from its callbacks; reports what happened as its reply."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        match request:
            case ("call", target, inner):
                try:
                    return otpy.Reply(("ok", self.call(target, inner)), state)
                except otpy.OtpyError as exc:
                    return otpy.Reply((type(exc).__name__, str(exc)), state)
            case "name":
                return otpy.Reply(self.name, state)
        return otpy.Reply(request, state)


async def test_self_call_steps_the_target_inline() -> None:
    """``self.call`` from a callback returns the target's reply within the step."""
    async with node_of(otpy.Child("a", Caller), otpy.Child("c", Counter, 41)) as node:
        assert ("ok", 42) == await node.call("a", ("call", "c", "incr"))
        assert 42 == node.get_state("c")


async def test_calling_yourself_is_refused_with_would_block() -> None:
    """A server calling itself gets WouldBlock saying it would deadlock, not a hang."""
    async with node_of(otpy.Child("a", Caller)) as node:
        kind, message = await node.call("a", ("call", "a", "x"))
    assert "WouldBlock" == kind
    assert "'a'" in message
    assert "itself" in message
    assert "deadlock" in message


async def test_call_cycle_is_refused_with_would_block() -> None:
    """a -> b -> a: the inner call gets WouldBlock naming the cycle; nothing hangs."""
    async with node_of(otpy.Child("a", Caller), otpy.Child("b", Caller)) as node:
        reply = await node.call("a", ("call", "b", ("call", "a", "x")))
    assert "ok" == reply[0]
    kind, message = reply[1]
    assert "WouldBlock" == kind
    assert "cycle" in message


async def test_self_call_to_an_unknown_name_raises_no_such_server() -> None:
    """``self.call`` to an unknown name raises NoSuchServer in the callback."""
    async with node_of(otpy.Child("a", Caller)) as node:
        kind, message = await node.call("a", ("call", "nobody", "x"))
    assert "NoSuchServer" == kind
    assert "'nobody'" in message


async def test_self_call_to_a_suspended_server_is_refused_with_would_block() -> None:
    """``self.call`` cannot wait for a suspended server: WouldBlock says it is suspended."""
    async with node_of(otpy.Child("a", Caller), otpy.Child("c", Counter)) as node:
        node.suspend("c")
        kind, message = await node.call("a", ("call", "c", "count"))
    assert "WouldBlock" == kind
    assert "suspended" in message


class Deferrer(otpy.GenServer[list[otpy.Caller]]):
    """Keeps its callers waiting until a ``("release", value)`` cast answers them all."""

    vsn = "1"

    def init(self, arg: Any) -> list[otpy.Caller]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[otpy.Caller]) -> Any:
        if request == "wait":
            return otpy.NoReply([*state, caller])
        if request == "alive":
            return otpy.Reply([c.alive for c in state], state)
        if request == ("via", "helper"):
            self.cast("helper", ("reply_to", caller))
            return otpy.NoReply(state)
        return otpy.Reply(request, state)

    def handle_cast(self, message: Any, state: list[otpy.Caller]) -> list[otpy.Caller]:
        _, value = message
        for caller in state:
            caller.reply(value)
            caller.reply("second reply")  # dropped: a caller is answered once
        return []


class Helper(otpy.GenServer[int]):
    """Answers callers that other servers hand it."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_cast(self, message: Any, state: int) -> int:
        _, caller = message
        caller.reply(("answered by", self.name))
        return state + 1


async def test_self_call_to_a_server_that_defers_is_refused_with_would_block() -> None:
    """``self.call`` to a server that returns NoReply raises WouldBlock saying so."""
    async with node_of(otpy.Child("a", Caller), otpy.Child("d", Deferrer)) as node:
        kind, message = await node.call("a", ("call", "d", "wait"))
    assert "WouldBlock" == kind
    assert "NoReply" in message


async def test_deferred_reply_from_a_later_callback_answers_the_call() -> None:
    """NoReply now, ``caller.reply(value)`` from a later cast: the call returns value;
    a second reply is dropped."""
    async with node_of(otpy.Child("d", Deferrer)) as node:
        results: list[Any] = []
        async with trio.open_nursery() as nursery:

            async def wait() -> None:
                results.append(await node.call("d", "wait"))

            nursery.start_soon(wait)
            nursery.start_soon(wait)
            await trio.testing.wait_all_tasks_blocked()
            assert [True, True] == await node.call("d", "alive")
            node.cast("d", ("release", 7))
        assert [7, 7] == results
        assert "next" == await node.call("d", "next")


async def test_deferred_reply_from_another_servers_callback_answers_the_call() -> None:
    """A caller handed to another server can be answered from that server's callback."""
    async with node_of(otpy.Child("d", Deferrer), otpy.Child("helper", Helper)) as node:
        assert ("answered by", "helper") == await node.call("d", ("via", "helper"))


async def test_name_is_the_registered_name() -> None:
    """``self.name`` is the child id the server runs under."""
    async with node_of(otpy.Child("a-name", Caller)) as node:
        assert "a-name" == await node.call("a-name", "name")


class Tracer(otpy.GenServer[int]):
    """Appends what it handles to the shared list ``arg``."""

    vsn = "1"

    def init(self, arg: list[str]) -> int:
        self.trace = arg
        return 0

    def handle_cast(self, message: Any, state: int) -> int:
        match message:
            case ("cast_to", target):
                self.trace.append(f"{self.name} before")
                self.cast(target, "hello")
                self.send(target, "hi")
                self.trace.append(f"{self.name} after")
            case _:
                self.trace.append(f"{self.name} cast {message}")
        return state

    def handle_info(self, message: Any, state: int) -> int:
        self.trace.append(f"{self.name} info {message}")
        return state

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(None, state)


async def test_cast_and_send_from_a_callback_run_after_the_callback() -> None:
    """``self.cast``/``self.send`` only queue: the target handles them after the step,
    in the order sent."""
    trace: list[str] = []
    async with node_of(otpy.Child("a", Tracer, trace), otpy.Child("b", Tracer, trace)) as node:
        node.cast("a", ("cast_to", "b"))
        await node.call("b", "sync")
    assert ["a before", "a after", "b cast hello", "b info hi"] == trace
