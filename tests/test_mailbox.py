"""Bounded mailboxes: a full mailbox refuses cast/send with MailboxFull (nothing is
dropped silently), ``await node.call`` waits for room, refusals are counted, and timers
and a server's own task results are never refused."""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing

import otpy


class Log(otpy.GenServer[list[Any]]):
    """Records every message; ``"log"`` returns the record."""

    vsn = "1"
    max_mailbox = 10

    def init(self, arg: Any) -> list[Any]:
        return []

    def handle_call(self, request: Any, caller: otpy.Caller, state: list[Any]) -> Any:
        if request == "log":
            return otpy.Reply(state, state)
        if request == "timer":
            self.send_after(1.0, self.name, "tick")
        if request == "task":
            self.start_task(trio.sleep, 1.0, tag="slept")
        return otpy.Reply("ok", [*state, ("call", request)])

    def handle_cast(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, ("cast", message)]

    def handle_info(self, message: Any, state: list[Any]) -> list[Any]:
        return [*state, ("info", message)]


def hold_full(node: otpy.Node) -> None:
    """Suspend server "s" and fill its mailbox (max_mailbox 10) with casts 0..9."""
    node.suspend("s")
    for i in range(10):
        node.cast("s", i)


def node_of(*children: otpy.Child) -> Any:
    return otpy.open_node(otpy.Supervisor(list(children)))


async def test_flood_of_casts_is_refused_exactly_past_the_limit() -> None:
    """25 casts to a held server with max_mailbox 10: exactly 10 are queued and
    served, exactly 15 raise MailboxFull and are counted."""
    async with node_of(otpy.Child("s", Log)) as node:
        node.suspend("s")
        refused = 0
        for i in range(25):
            try:
                node.cast("s", i)
            except otpy.MailboxFull as exc:
                assert "s" == exc.name
                refused += 1
        assert 15 == refused
        stats = node.statistics("s")
        assert (10, 10, 15) == (stats["mailbox"], stats["max_mailbox"], stats["refused"])
        assert {"s": 15} == node.statistics()["refused_by_server"]
        node.resume("s")
        assert [("cast", i) for i in range(10)] == await node.call("s", "log")


async def test_call_waits_for_room_and_is_served_in_turn() -> None:
    """A call to a full mailbox is not refused: it waits until there is room, then
    queues behind the messages already there."""
    async with node_of(otpy.Child("s", Log)) as node:
        hold_full(node)
        replies: list[Any] = []
        async with trio.open_nursery() as nursery:
            async def call() -> None:
                replies.append(await node.call("s", "waited"))

            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            assert [] == replies
            assert 10 == node.statistics("s")["mailbox"]  # the call is not queued yet
            assert 0 == node.statistics("s")["refused"]  # and it was not refused
            node.resume("s")
        assert ["ok"] == replies
        log = await node.call("s", "log")
        assert [*(("cast", i) for i in range(10)), ("call", "waited")] == log


async def test_call_to_a_full_mailbox_times_out(
        autojump_clock: trio.testing.MockClock) -> None:
    """A call that finds no room within its timeout raises CallTimeout saying so."""
    async with node_of(otpy.Child("s", Log)) as node:
        hold_full(node)
        with pytest.raises(otpy.CallTimeout, match="full mailbox"):
            await node.call("s", "x", timeout=2.0)
        assert 10 == node.statistics("s")["mailbox"]


async def test_call_waiting_for_room_learns_that_the_server_is_gone() -> None:
    """A call waiting for room in the mailbox of a server that is then stopped (and
    not restarted) fails at once with ServerStopped, as the queued calls do."""
    async with node_of(otpy.Child("s", Log, restart="temporary"), otpy.Child("t", Log)) \
            as node:
        hold_full(node)
        errors: list[BaseException] = []

        async def call() -> None:
            try:
                await node.call("s", "x")
            except otpy.OtpyError as exc:
                errors.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            await trio.testing.wait_all_tasks_blocked()
            await node.terminate_child("root", "s")
        [error] = errors
        assert isinstance(error, otpy.ServerStopped)


async def test_timers_and_task_results_are_never_refused(
        autojump_clock: trio.testing.MockClock) -> None:
    """A timer that fires and a task that finishes are delivered even to a full
    mailbox: the server asked for them."""
    async with node_of(otpy.Child("s", Log)) as node:
        await node.call("s", "timer")
        await node.call("s", "task")
        hold_full(node)
        await trio.sleep(2.0)
        assert 12 == node.statistics("s")["mailbox"]
        assert 0 == node.statistics("s")["refused"]
        node.resume("s")
        log = await node.call("s", "log")
        assert ("info", "tick") in log
        assert ("info", otpy.TaskDone("slept", None)) in log


async def test_child_max_mailbox_overrides_the_class() -> None:
    """``Child(..., max_mailbox=3)`` bounds this child's mailbox at 3."""
    async with node_of(otpy.Child("s", Log, max_mailbox=3)) as node:
        node.suspend("s")
        for i in range(3):
            node.send("s", i)
        with pytest.raises(otpy.MailboxFull, match="max_mailbox=3"):
            node.send("s", 3)
        assert 3 == node.statistics("s")["max_mailbox"]


async def test_node_statistics_count_servers_queues_and_timers() -> None:
    """``node.statistics()`` sums up the node."""
    async with node_of(otpy.Child("s", Log), otpy.Child("t", Log)) as node:
        await node.call("s", "timer")
        node.suspend("t")
        node.cast("t", 1)
        node.cast("t", 2)
        stats = node.statistics()
        assert 2 == stats["servers"]
        assert 1 == stats["supervisors"]
        assert 1 == stats["timers"]
        assert 2 == stats["queued"]
        assert 0 == stats["refused"]
        assert "suspended" == node.statistics("t")["status"]
        assert "idle" == node.statistics("s")["status"]


@pytest.mark.parametrize("value", [0, -5, 2.5, "10", True])
def test_bad_max_mailbox_is_refused(value: Any) -> None:
    """max_mailbox must be an int >= 1, on the class and on the Child spec."""
    with pytest.raises(TypeError, match="max_mailbox must be an int >= 1"):
        type("Bad", (Log,), {"max_mailbox": value})
    with pytest.raises(otpy.SupervisorError, match="max_mailbox must be an int >= 1"):
        otpy.Child("c", Log, max_mailbox=value)


async def test_call_over_the_wire_waits_for_room_and_cast_is_refused() -> None:
    """Over the client endpoint as in process: a cast to a full mailbox gets a
    MailboxFull error reply (and is counted), a call waits for room and is answered
    once the server serves its queue."""
    root = otpy.Supervisor([otpy.Child("s", Log)])
    async with otpy.open_node(root, listen=("127.0.0.1", 0)) as node:
        assert node.address is not None
        hold_full(node)
        async with otpy.connect(*node.address) as client:
            with pytest.raises(otpy.MailboxFull):
                await client.request("cast", "s", 10)
            replies: list[Any] = []
            async with trio.open_nursery() as nursery:
                async def call() -> None:
                    replies.append(await client.call("s", "remote"))

                nursery.start_soon(call)
                await trio.testing.wait_all_tasks_blocked()
                assert 10 == node.statistics("s")["mailbox"]
                node.resume("s")
            assert ["ok"] == replies
        assert 1 == node.statistics("s")["refused"]
        assert ("call", "remote") == (await node.call("s", "log"))[-1]


async def test_calls_waiting_for_room_are_served_in_the_order_sent() -> None:
    """Twenty calls pipelined on one connection to a full mailbox wait in line and are
    served in the order sent; a cast sent after them is refused, not let ahead."""
    async with otpy.open_node(otpy.Supervisor([otpy.Child("s", Log, max_mailbox=2)]),
                              listen=("127.0.0.1", 0)) as node:
        assert node.address is not None
        node.suspend("s")
        node.cast("s", "pre0")
        node.cast("s", "pre1")
        async with otpy.connect(*node.address) as client, trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(client.call, "s", i)
                await trio.testing.wait_all_tasks_blocked()
            assert 20 == node.statistics("s")["waiting"]
            with pytest.raises(otpy.MailboxFull):
                await client.request("cast", "s", "late")
            node.resume("s")
        log = await node.call("s", "log")
        assert [("cast", "pre0"), ("cast", "pre1"), *(("call", i) for i in range(20))] == log


class Roomy(Log):
    vsn = "2"
    max_mailbox = 100


async def test_an_upgrade_that_raises_max_mailbox_lets_waiting_calls_in() -> None:
    """Calls waiting for room move into the mailbox as soon as an upgrade makes room,
    ahead of anything sent after them."""
    async with node_of(otpy.Child("s", Log)) as node:
        hold_full(node)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.call, "s", "waited")
            await trio.testing.wait_all_tasks_blocked()
            await node.upgrade(otpy.Release("2", [otpy.Update(Log, Roomy)]))
            assert (11, 0) == (node.statistics("s")["mailbox"],
                               node.statistics("s")["waiting"])
            node.cast("s", "after")
            node.resume("s")
        log = await node.call("s", "log")
        assert [("call", "waited"), ("cast", "after")] == log[-2:]
