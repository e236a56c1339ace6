"""A random mix of calls, casts, crashes and suspensions against a simple model.

A few counters run as permanent children of one supervisor in a live node (virtual
time). Each operation is applied to the node and to the model; every reply and every
final state must match. The model's rules are the contract:

- one sender's messages are served in order, so a call sees every earlier cast;
- a crash resets a permanent server to its ``init`` state, and the messages queued
  behind the crash are served by the restarted server;
- a suspended server queues everything: ``call_nowait`` raises WouldBlock and queues
  nothing, ``call`` times out but its request is still executed after ``resume``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog.testing
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import otpy

NAMES = ("c0", "c1", "c2")


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        if request == "get":
            return otpy.Reply(state, state)
        raise ZeroDivisionError("crash requested")

    def handle_cast(self, message: Any, state: int) -> int:
        if message == "crash":
            raise ZeroDivisionError("crash requested")
        return state + message


@dataclass
class Model:
    """What one counter should hold, and what waits for it while it is suspended."""

    value: int = 0
    suspended: bool = False
    queue: list[tuple[str, int]] = field(default_factory=list)
    crashes: int = 0

    def apply(self, op: str, n: int = 0) -> None:
        if op == "add":
            self.value += n
        elif op == "incr":
            self.value += 1
        elif op == "crash":
            self.value = 0
            self.crashes += 1

    def deliver(self, op: str, n: int = 0) -> None:
        if self.suspended:
            self.queue.append((op, n))
        else:
            self.apply(op, n)

    def resume(self) -> None:
        self.suspended = False
        for op, n in self.queue:
            self.apply(op, n)
        self.queue.clear()


names = st.sampled_from(NAMES)
operations = st.one_of(
    st.tuples(st.just("cast_add"), names, st.integers(1, 5)),
    st.tuples(st.sampled_from(["call_incr", "call_get", "call_nowait_get", "crash_cast",
                               "crash_call", "suspend", "resume"]), names, st.just(0)),
)


async def drive(ops: list[tuple[str, str, int]]) -> None:
    models = {name: Model() for name in NAMES}
    root = otpy.Supervisor([otpy.Child(name, Counter) for name in NAMES],
                           max_restarts=1_000_000, max_seconds=1.0)
    with structlog.testing.capture_logs() as logs:
        async with otpy.open_node(root) as node:
            for op, name, n in ops:
                model = models[name]
                if op == "cast_add":
                    node.cast(name, n)
                    model.deliver("add", n)
                elif op == "crash_cast":
                    node.cast(name, "crash")
                    model.deliver("crash")
                elif op == "suspend":
                    node.suspend(name)
                    model.suspended = True
                elif op == "resume":
                    node.resume(name)
                    model.resume()
                elif op == "call_nowait_get":
                    try:
                        got: Any = node.call_nowait(name, "get")
                    except otpy.WouldBlock:
                        got = "WouldBlock"
                    assert ("WouldBlock" if model.suspended else model.value) == got
                else:
                    request = {"call_incr": "incr", "call_get": "get",
                               "crash_call": "crash"}[op]
                    try:
                        got = await node.call(name, request, timeout=0.5)
                    except otpy.CallTimeout:
                        got = "CallTimeout"
                    except otpy.ServerCrashed:
                        got = "ServerCrashed"
                    model.deliver({"incr": "incr", "get": "get", "crash": "crash"}[request])
                    expected = ("CallTimeout" if model.suspended else
                                "ServerCrashed" if request == "crash" else model.value)
                    assert expected == got
            for name, model in models.items():
                node.resume(name)
                model.resume()
                assert model.value == await node.call(name, "get")
                assert model.value == node.get_state(name)
            restarts = {c.id: c.restarts for c in node.which_children("root")}
    assert {name: m.crashes for name, m in models.items()} == restarts
    crashes = sum(m.crashes for m in models.values())
    assert crashes == len([e for e in logs if e["event"] == "server_crashed"])


@settings(max_examples=150, deadline=None)
@given(st.lists(operations, max_size=40))
def test_calls_casts_and_crashes_match_the_model(ops: list[tuple[str, str, int]]) -> None:
    """Every reply and every final state of a random run matches the model."""
    trio.run(drive, ops, clock=trio.testing.MockClock(autojump_threshold=0))
