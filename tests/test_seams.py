"""The seams every edge shares: one call path, one resolver, one commit point, the
timer heap, the event feed, and a server class that owns every attribute name but the
runtime's prefix.

Each test pins one promise of those seams, through the public surface where there is
one (a node, a simulation) and through the core's own objects where the seam is the
core's (``Timers``, ``Events``, ``runs_callbacks``).
"""

from __future__ import annotations

from typing import Any

import pytest
import structlog
import trio
import trio.testing

import otpy
import otpy.testing as ot
from otpy._core.events import Events
from otpy._core.server import WAITING, InlineCaller, runs_callbacks
from otpy._core.timers import Timers

# -- a server's attributes are its own ---------------------------------------------------


class Nosy(otpy.GenServer[int]):
    """Sets attributes whose names the runtime once used for itself."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        self._node = "cache-7"
        self._state = "mine"
        self._name = "also mine"
        self._flags = -1
        self._mbox = None
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        self.cast("nosy", 1)
        return otpy.Reply((self._node, self._state, self._name, self.name), state)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message


async def test_a_server_may_use_any_attribute_name_outside_the_runtime_prefix() -> None:
    """A server that sets ``self._node``, ``self._state`` and friends keeps working:
    the runtime's own attributes all start with ``_otpy_``."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("nosy", Nosy)])) as node:
        assert ("cache-7", "mine", "also mine", "nosy") == await node.call("nosy", "who")
        await trio.testing.wait_all_tasks_blocked()
        assert 1 == node.get_state("nosy")


def test_a_class_may_not_define_the_runtime_prefix() -> None:
    """Defining an attribute named ``_otpy_...`` is refused when the class is defined."""
    with pytest.raises(TypeError, match=r"_otpy_state.*belong to otpy.s runtime"):
        class Bad(otpy.GenServer[int]):
            _otpy_state = 1


# -- callback results --------------------------------------------------------------------


def test_callback_results_are_values() -> None:
    """Reply, NoReply and Stop compare by value, unpack and index as their fields, and
    show how they were made."""
    assert otpy.Reply(1, 2) == otpy.Reply(1, 2)
    assert otpy.Reply(1, 2) != otpy.Reply(2, 1)
    assert otpy.Reply(1, 2) != otpy.NoReply(2)
    reply, state = otpy.Reply("ok", 3)
    assert ("ok", 3) == (reply, state)
    assert 3 == otpy.Reply("ok", 3)[1]
    assert "otpy.Stop(reason='normal', state=1, reply=5)" == repr(otpy.Stop("normal", 1, 5))
    assert {otpy.NoReply(1)} == {otpy.NoReply(1)}


# -- the one call path -------------------------------------------------------------------


class Versioned(otpy.GenServer[int]):
    """Speaks protocol "2": a "1" client sends ("add", n) as n and wants a bare int."""

    vsn = "2"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        _op, n = request
        return otpy.Reply({"total": state + n}, state + n)

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return ("add", request)

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return reply["total"]


def test_a_simulated_client_makes_versioned_calls() -> None:
    """The simulation goes through the same call path as a node, so ``vsn=`` adapts the
    request and the reply there too."""

    def old_client() -> Any:
        return (yield ot.call("v", 5, vsn="1"))

    def new_client() -> Any:
        return (yield ot.call("v", ("add", 1)))

    with ot.Simulation(otpy.Supervisor([otpy.Child("v", Versioned)]), seed=1) as sim:
        old, new = sim.spawn(old_client), sim.spawn(new_client)
        sim.run()
        assert {old.result, new.result["total"]} == {5, 6}
        assert "(vsn 1)" in sim.trace_text()


class Deferring(otpy.GenServer[list[Any]]):
    """Keeps every caller and never answers."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        return otpy.NoReply([*state, caller])


def _tasks(task: Any) -> int:
    return 1 + sum(_tasks(child) for nursery in task.child_nurseries
                   for child in nursery.child_tasks)


async def test_a_deferred_call_over_the_wire_needs_no_task(autojump_clock: Any) -> None:
    """Calls over MessagePack-RPC whose server defers the reply add no trio task: their
    deadlines are in the node's timer heap, and each still times out on its own."""
    root = otpy.Supervisor([otpy.Child("d", Deferring)])
    limits = otpy.EndpointLimits(call_timeout=2.0)
    async with otpy.open_node(root, listen=("127.0.0.1", 0), limits=limits) as node:
        assert node.address is not None
        async with otpy.connect(*node.address) as client:
            root_task = trio.lowlevel.current_root_task()
            results: list[str] = []

            async def one(n: int) -> None:
                try:
                    await client.call("d", n, timeout=10.0)
                except otpy.CallTimeout as exc:  # the node's, after its 2 s
                    results.append(getattr(exc, "kind", "the client's own"))

            async with trio.open_nursery() as nursery:
                for n in range(20):
                    nursery.start_soon(one, n)
                await trio.testing.wait_all_tasks_blocked()
                assert 20 == len(node.get_state("d"))
                busy = _tasks(root_task)
                # 20 client tasks here plus the node's own: the node added none per call.
                nursery.start_soon(one, 20)
                await trio.testing.wait_all_tasks_blocked()
                assert busy + 1 == _tasks(root_task)
            assert ["CallTimeout"] * 21 == results


async def test_a_call_with_no_timeout_waits_until_answered(autojump_clock: Any) -> None:
    """``timeout=None`` arms no deadline: the caller waits until the server answers."""

    class Later(otpy.GenServer[Any]):
        vsn = "1"

        def init(self, arg: Any) -> Any:
            return None

        def handle_call(self, request: Any, caller: otpy.Caller, state: Any) -> Any:
            if request == "wait":
                return otpy.NoReply(caller)
            state.reply("answered")
            return otpy.Reply("done", None)

    root = otpy.Supervisor([otpy.Child("later", Later)])
    async with otpy.open_node(root) as node, trio.open_nursery() as nursery:
        got: list[Any] = []

        async def waiter() -> None:
            got.append(await node.call("later", "wait", timeout=None))

        nursery.start_soon(waiter)
        await trio.sleep(3600)
        assert [] == got
        await node.call("later", "answer")
        await trio.testing.wait_all_tasks_blocked()
        assert ["answered"] == got


# -- the timer heap ----------------------------------------------------------------------


def test_answered_deadlines_do_not_pile_up_in_the_timer_heap() -> None:
    """Deadlines of calls answered long before they are due are dropped from the heap
    as it grows: it stays within about twice what is still live."""
    now = [0.0]
    timers = Timers(lambda: now[0], lambda: None)
    live = []
    for n in range(100_000):
        caller = InlineCaller()
        timers.arm(caller, "x", 5.0)
        if n % 100:
            caller.reply(n)  # answered at once: its deadline is dead
        else:
            live.append(caller)
    assert len(timers._heap) <= 2 * len(live) + 1024 + 1
    now[0] = 10.0
    assert len(live) == sum(1 for _ in timers.due())
    assert all(c._status == WAITING for c in live)


def test_timers_due_at_the_same_time_fire_in_the_order_made() -> None:
    """Timers with one deadline come out in the order they were set."""
    now = [0.0]
    timers = Timers(lambda: now[0], lambda: None)
    refs = [timers.send_after(1.0, "s", n) for n in range(5)]
    refs[2].cancel()
    now[0] = 1.0
    assert [0, 1, 3, 4] == [entry[2].message for entry in timers.due()]


# -- events ----------------------------------------------------------------------------


class _Log:
    def __init__(self) -> None:
        self.lines: list[tuple[str, str]] = []

    def __getattr__(self, level: str) -> Any:
        return lambda event, **fields: self.lines.append((level, event))


def test_observers_see_every_event_and_a_failing_one_is_dropped() -> None:
    """An observer gets each event with its level and fields, the log still gets it,
    and an observer that raises is removed with one ``observer_failed`` event."""
    log = _Log()
    events = Events(log)
    seen: list[tuple[str, str, dict[str, Any]]] = []
    stop = events.observe(lambda level, event, fields: seen.append((level, event, fields)))

    def broken(level: str, event: str, fields: dict[str, Any]) -> None:
        raise RuntimeError("observer bug")

    events.observe(broken)
    events.error("server_crashed", server="a")
    events.info("child_restarted", child="a")
    assert [("error", "server_crashed", {"server": "a"}),
            ("info", "child_restarted", {"child": "a"})] == seen
    assert [("error", "observer_failed"), ("error", "server_crashed"),
            ("info", "child_restarted")] == log.lines
    stop()
    events.info("later")
    assert 2 == len(seen)


async def test_a_node_reports_a_crash_and_restart_to_its_observers() -> None:
    """A node's events reach an observer of its runtime (the feed the dashboard and
    the simulation's trace read)."""

    class Crashy(otpy.GenServer[int]):
        vsn = "1"

        def init(self, arg: Any) -> int:
            return 0

        def handle_cast(self, message: Any, state: int) -> int:
            raise ValueError("boom")

    async with otpy.open_node(otpy.Supervisor([otpy.Child("c", Crashy)])) as node:
        seen: list[str] = []
        node._sched.log.observe(lambda level, event, fields: seen.append(event))
        node.cast("c", "x")
        assert ["server_crashed", "child_restarted"] == [
            e for e in seen if e in ("server_crashed", "child_restarted")]


# -- the watchdog's runners --------------------------------------------------------------


def test_a_runner_must_name_a_variable_it_has() -> None:
    """Marking a function as a runner of callbacks with a variable it does not have
    fails at once, instead of leaving the watchdog blind to its callbacks."""

    def runs(server: Any) -> None:
        server.handle_call()

    assert runs is runs_callbacks("server")(runs)
    with pytest.raises(AssertionError, match="has no variable 'proc'"):
        runs_callbacks("proc")(runs)


# -- the hot paths' objects keep CPython's fast attribute loads ----------------------------


def test_the_scheduler_has_slots_however_many_subsystems_hook_it() -> None:
    """Every step loads the scheduler's attributes and methods. An instance dict past
    30 keys stops CPython 3.11 from specializing those loads (node.cast then cost ~10%
    more instructions), so the scheduler declares slots, and its every attribute is one
    of them: a new hook must be added to ``__slots__``, not set on the fly."""
    from otpy._core.scheduler import Scheduler

    sched = Scheduler(log=structlog.get_logger("otpy"), clock=lambda: 0.0)
    assert not hasattr(sched, "__dict__")
    with pytest.raises(AttributeError):
        sched.hook = None  # type: ignore[attr-defined]
