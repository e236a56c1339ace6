"""The OTP process model: pids, monitors, per-incarnation timers and handle_continue.

Each test pins one promise of the "Processes" section of the API contract.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import otpy
import otpy.testing as ot

# -- servers -----------------------------------------------------------------------------


class Counter(otpy.GenServer[int]):
    """Counts; tells its pid; crashes or stops on request."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "pid":
            return otpy.Reply(self.pid, state)
        if request == "crash":
            raise ValueError("crash requested")
        if request == "stop":
            return otpy.Stop("normal", state, reply="bye")
        return otpy.Reply(state + 1, state + 1)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message


class CounterV2(Counter):
    vsn = "2"


class Watcher(otpy.GenServer[list[Any]]):
    """Monitors what it is told to, and keeps every ServerDown it gets."""

    vsn = "1"

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        op, arg = request
        if op == "monitor":
            return otpy.Reply(self.monitor(arg), state)
        if op == "demonitor":
            return otpy.Reply(self.demonitor(arg), state)
        if op == "downs":
            return otpy.Reply(list(state), state)
        raise ValueError(op)

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        assert isinstance(message, otpy.ServerDown)
        return [*state, message]


def tree(*extra: otpy.Child | otpy.Supervisor) -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child("c", Counter), otpy.Child("w", Watcher), *extra],
                           max_restarts=100)


async def settle() -> None:
    await trio.testing.wait_all_tasks_blocked()


async def crash_cause(node: otpy.Node, name: str, request: Any) -> BaseException:
    """What a call made the server raise (the cause of the ServerCrashed its caller
    got): the errors of self.monitor and self.demonitor are the callback's own."""
    with pytest.raises(otpy.ServerCrashed) as crashed:
        await node.call(name, request)
    cause = crashed.value.__cause__
    assert cause is not None
    return cause


# -- pids --------------------------------------------------------------------------------


async def test_every_incarnation_has_its_own_pid() -> None:
    """``self.pid`` is what ``whereis`` gives; a restart makes a new pid; pids are
    values that name their node and print as ``<name.serial@node>``."""
    async with otpy.open_node(tree(), node_name="n1") as node:
        first = await node.call("c", "pid")
        assert isinstance(first, otpy.Pid)
        assert first == node.whereis("c") == await node.call("c", "pid")
        assert "n1" == first.node and "c" == first.name
        assert str(first) == f"<c.{first.serial}@n1>"
        assert hash(first) == hash(otpy.Pid(first.node, first.creation, "c", first.serial))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        second = node.whereis("c")
        assert second is not None and second != first and first < second
        assert node.whereis("nobody") is None
        assert isinstance(node.whereis("root"), otpy.Pid)


async def test_a_pid_is_accepted_wherever_a_name_is() -> None:
    """call, cast and send take a pid; so does ``"name@node"`` for this node."""
    async with otpy.open_node(tree(), node_name="n1") as node:
        pid = node.whereis("c")
        assert 1 == await node.call(pid, "incr")
        node.cast(pid, 10)
        assert 12 == await node.call("c@n1", "incr")
        assert 12 == node.get_state(pid)


async def test_a_call_to_a_gone_incarnation_says_who_holds_the_name_now() -> None:
    """A call to a pid whose incarnation stopped raises NoSuchServer naming the pid
    that holds the name now; a cast or send to it is dropped, as in Erlang."""
    async with otpy.open_node(tree()) as node:
        old = node.whereis("c")
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        new = node.whereis("c")
        with pytest.raises(otpy.NoSuchServer, match=f"incarnation.*gone.*now {new}"):
            await node.call(old, "incr")
        node.cast(old, 100)  # dropped
        node.send(old, "x")  # dropped
        assert 0 == node.get_state("c")


async def test_a_pid_of_another_node_or_run_names_nothing_here() -> None:
    """A pid of another node on a node with no cluster, or of an earlier run of this
    node, is NoSuchServer with the reason; a name with '@' is refused as a child id."""
    async with otpy.open_node(tree(), node_name="a") as node:
        pid = node.whereis("c")
        assert pid is not None
        with pytest.raises(otpy.NoSuchServer, match=r"node 'b'.*not in a cluster"):
            await node.call(otpy.Pid("b", pid.creation, "c", pid.serial), "incr")
        with pytest.raises(otpy.NoSuchServer, match="earlier run"):
            await node.call(otpy.Pid("a", pid.creation + 1, "c", pid.serial), "incr")
        with pytest.raises(otpy.NoSuchServer, match="node 'b'"):
            node.cast("c@b", 1)
        with pytest.raises(TypeError, match=r"name \(a str\), an otpy.Pid"):
            node.cast(42, 1)  # type: ignore[arg-type]
    with pytest.raises(otpy.SupervisorError, match="contains '@'"):
        otpy.Child("c@x", Counter)


async def test_an_upgrade_keeps_the_pid() -> None:
    """A live upgrade is the same incarnation: the pid stays and still reaches it."""
    async with otpy.open_node(tree()) as node:
        pid = node.whereis("c")
        await node.upgrade(otpy.Release("2", [otpy.Update(Counter, CounterV2)]))
        assert pid == node.whereis("c")
        assert "2" == node.vsn_of(pid)


async def test_a_pid_crosses_the_wire_and_comes_back() -> None:
    """Over MessagePack-RPC a pid travels as an extension type: a client gets one in a
    reply and can call with it."""
    async with otpy.open_node(tree(), listen=("127.0.0.1", 0)) as node:
        assert node.address is not None
        async with otpy.connect(*node.address) as client:
            pid = await client.call("c", "pid")
            assert node.whereis("c") == pid
            assert 1 == await client.call(pid, "incr")


# -- timers ------------------------------------------------------------------------------


class Ticker(otpy.GenServer[int]):
    """The periodic-timer idiom: arm in init, re-arm in handle_info; ``arg`` says
    whether it addresses its pid or its name."""

    vsn = "1"

    def init(self, arg: str) -> int:
        self.by = arg
        self.send_after(1.0, self.pid if arg == "pid" else self.name, "tick")
        return 0

    def handle_info(self, message: Any, state: int) -> int:
        self.send_after(1.0, self.pid if self.by == "pid" else self.name, "tick")
        return state + 1

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        raise ValueError("crash")


@pytest.mark.parametrize(("by", "ticks"), [("pid", 10), ("name", 40)])
async def test_a_timer_to_the_pid_dies_with_its_incarnation(
        by: str, ticks: int, autojump_clock: Any) -> None:
    """Ticks to ``self.pid`` never multiply across restarts: after three crashes the
    ticker still ticks once a second. Addressed by name (OTP's meaning), every old
    incarnation's chain lives on in the new one."""
    root = otpy.Supervisor([otpy.Child("t", Ticker, arg=by)], max_restarts=10)
    async with otpy.open_node(root) as node:
        for _ in range(3):
            with pytest.raises(otpy.ServerCrashed):
                await node.call("t", "crash")
        await trio.sleep(10.5)
        assert ticks == node.get_state("t")


# -- monitors ----------------------------------------------------------------------------


async def test_a_monitor_fires_once_with_the_reason_the_supervisor_saw() -> None:
    """A crash brings one ServerDown with the exception; the restarted incarnation is
    not monitored by that monitor."""
    async with otpy.open_node(tree()) as node:
        pid = node.whereis("c")
        ref = await node.call("w", ("monitor", "c"))
        assert isinstance(ref, otpy.MonitorRef) and ref.active
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        await settle()
        [down] = await node.call("w", ("downs", None))
        assert (ref, pid) == (down.ref, down.pid)
        assert isinstance(down.reason, ValueError)
        assert not ref.active


@pytest.mark.parametrize(("how", "reason"), [("stop", "normal"), ("terminate", "shutdown")])
async def test_a_normal_stop_and_a_shutdown_are_reported(how: str, reason: str) -> None:
    """``Stop("normal")`` and ``terminate_child`` reach the monitor as their reasons."""
    root = tree(otpy.Child("t", Counter, restart="temporary"))
    async with otpy.open_node(root) as node:
        await node.call("w", ("monitor", "t"))
        if how == "stop":
            assert "bye" == await node.call("t", "stop")
        else:
            await node.terminate_child("root", "t")
        await settle()
        [down] = await node.call("w", ("downs", None))
        assert reason == down.reason


async def test_monitoring_what_is_not_running_reports_noproc_at_once() -> None:
    """A monitor of a name nothing runs, or of a gone pid, fires at once: "noproc"."""
    async with otpy.open_node(tree()) as node:
        old = node.whereis("c")
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        ref1 = await node.call("w", ("monitor", "nobody"))
        ref2 = await node.call("w", ("monitor", old))
        await settle()
        downs = await node.call("w", ("downs", None))
        assert [(ref1, "nobody", "noproc"), (ref2, old, "noproc")] == [
            tuple(d) for d in downs]


async def test_demonitor_cancels_and_refuses_what_it_cannot_cancel() -> None:
    """demonitor: True once, then a ValueError (twice); a ref of another server is a
    ValueError; something that is not a ref is a TypeError; after a demonitor the
    stop brings nothing; a ref that fired demonitors to False."""
    root = tree(otpy.Child("w2", Watcher))
    async with otpy.open_node(root) as node:
        ref = await node.call("w", ("monitor", "c"))
        assert True is await node.call("w", ("demonitor", ref))
        twice = await crash_cause(node, "w", ("demonitor", ref))
        assert isinstance(twice, ValueError) and "demonitored already" in str(twice)
        other = await node.call("w2", ("monitor", "c"))
        foreign = await crash_cause(node, "w", ("demonitor", other))
        assert isinstance(foreign, ValueError) and "another server" in str(foreign)
        not_a_ref = await crash_cause(node, "w", ("demonitor", "not a ref"))
        assert isinstance(not_a_ref, TypeError) and "MonitorRef" in str(not_a_ref)
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        await settle()
        assert [] == await node.call("w", ("downs", None))
        assert False is await node.call("w2", ("demonitor", other))


async def test_a_servers_monitors_go_away_with_it() -> None:
    """A watcher that stops monitors nothing: its new incarnation gets no ServerDown
    for what the old one monitored, and the target holds no link to it."""
    async with otpy.open_node(tree()) as node:
        await node.call("w", ("monitor", "c"))
        node._rt.server("w")._otpy_rt.crashed(node._rt.server("w"), ValueError("x"))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c", "crash")
        await settle()
        assert [] == await node.call("w", ("downs", None))
        assert not node._rt.server("c")._otpy_links


async def test_monitoring_a_supervisor() -> None:
    """A supervisor can be monitored: its shutdown, or its giving up, is reported."""
    sub = otpy.Supervisor([otpy.Child("x", Counter)], name="sub", max_restarts=0,
                          restart="temporary")
    async with otpy.open_node(tree(sub)) as node:
        pid = node.whereis("sub")
        await node.call("w", ("monitor", pid))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("x", "crash")  # max_restarts=0: sub gives up
        await settle()
        [down] = await node.call("w", ("downs", None))
        assert pid == down.pid
        assert "shutdown" == down.reason[0]
        assert isinstance(down.reason[1], otpy.RestartIntensityExceeded)


async def test_monitor_refuses_what_is_not_an_address() -> None:
    """Monitoring something that is not a name or a pid is a TypeError."""
    async with otpy.open_node(tree()) as node:
        cause = await crash_cause(node, "w", ("monitor", 3.5))
        assert isinstance(cause, TypeError) and "server address" in str(cause)


# -- handle_continue ---------------------------------------------------------------------


class Continuing(otpy.GenServer[list[Any]]):
    """Records the order in which its callbacks ran."""

    vsn = "1"

    def init(self, arg: Any) -> Any:
        self.cast(self.name, "from init")  # queued: must come after the continuation
        return otpy.Continue(["init"], "after init")

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == "log":
            return otpy.Reply(list(state), state)
        return otpy.Continue(otpy.Reply("ok", [*state, "call"]), "after call")

    def handle_cast(self, message: Any, state: list[Any]) -> Any:
        return otpy.Continue([*state, message], "after cast")

    def handle_continue(self, arg: Any, state: list[Any]) -> Any:
        if arg == "after call":
            return otpy.Continue([*state, arg], "and again")
        return [*state, arg]


async def test_handle_continue_runs_before_any_other_message() -> None:
    """A continuation asked for by init, a call or a cast runs right after it, before
    any other message; a continuation may ask for another."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("k", Continuing)])) as node:
        assert "ok" == await node.call("k", "go")
        assert ["init", "after init", "from init", "after cast", "call", "after call",
                "and again"] == await node.call("k", "log")


async def test_a_continue_without_handle_continue_crashes_the_server() -> None:
    """Asking for a continuation without defining handle_continue is a crash (BadReturn,
    saying what to define)."""

    class Forgetful(otpy.GenServer[int]):
        vsn = "1"

        def init(self, arg: Any) -> int:
            return 0

        def handle_cast(self, message: Any, state: int) -> Any:
            return otpy.Continue(state, "later")

    async with otpy.open_node(otpy.Supervisor([otpy.Child("f", Forgetful)])) as node:
        downs: list[Any] = []
        node._sched.log.observe(lambda level, event, fields: downs.append(fields)
                                if event == "server_crashed" else None)
        node.cast("f", 1)
        assert 1 == len(downs)
        assert "defines no handle_continue" in str(downs[0]["exc_info"])
        assert 1 == node.which_children()[0].restarts


def test_continue_takes_a_result_not_another_continue() -> None:
    """``Continue(Continue(...), arg)`` is refused where it is written."""
    with pytest.raises(TypeError, match="not another Continue"):
        otpy.Continue(otpy.Continue(1, "a"), "b")


# -- under the simulation ----------------------------------------------------------------


def test_a_simulated_watcher_gets_one_server_down_per_incarnation() -> None:
    """Under the simulation, with crashes injected, the watcher (which re-monitors the
    new incarnation each time) gets exactly one ServerDown per ended incarnation."""

    class Follower(otpy.GenServer[list[Any]]):
        vsn = "1"

        def init(self, arg: Any) -> Any:
            self.monitor("c")
            return []

        def handle_info(self, message: Any, state: list[Any]) -> Any:
            self.monitor("c")
            return [*state, message.pid]

    def crasher() -> Any:
        for _ in range(3):
            yield ot.crash("c")
            yield ot.sleep(1)

    root = otpy.Supervisor([otpy.Child("c", Counter), otpy.Child("f", Follower)],
                           max_restarts=10)
    with ot.Simulation(root, seed=4) as sim:
        sim.spawn(crasher)
        sim.run()
        pids = sim.get_state("f")
        assert 3 == len(pids) == len(set(pids))
