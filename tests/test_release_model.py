"""A model check of upgrades interleaved with calls, casts, crashes, failing upgrades and
downgrades, with concurrent clients: every call gets exactly one answer, and every
server's version and count are what a simple model says."""

from __future__ import annotations

from typing import Any

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otpy

N = 4


class MV1(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "crash":
            raise RuntimeError("asked to crash")
        if request == "incr":
            return otpy.Reply("ok", state + 1)
        return otpy.Reply(state, state)

    def handle_cast(self, message: Any, state: int) -> int:
        return state + message


class MV2(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def init(self, arg: Any) -> tuple[int, int]:
        return (0, 0)

    def handle_call(self, request: Any, caller: otpy.Caller, state: tuple[int, int]) -> Any:
        if request == "crash":
            raise RuntimeError("asked to crash")
        if request == "incr":
            return otpy.Reply("ok", (state[0], state[1] + 1))
        return otpy.Reply(state[1], state)

    def handle_cast(self, message: Any, state: tuple[int, int]) -> tuple[int, int]:
        return (state[0], state[1] + message)

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return state[1]
        return (state, state)


class BadV2(MV2):
    """Fails to migrate server m2, so the whole upgrade must roll back."""

    vsn = "2bad"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if self.name == "m2":
            raise ValueError("m2 refuses")
        return super().code_change(old_vsn, state, extra)


server = st.integers(0, N - 1)
operation = st.one_of(
    st.tuples(st.just("incr"), server, st.integers(1, 4)),
    st.tuples(st.just("cast"), server, st.integers(1, 5)),
    st.tuples(st.just("crash"), server),
    st.tuples(st.just("upgrade"), st.integers(0, 4)),
    st.tuples(st.just("bad_upgrade"), st.integers(0, 4)),
    st.tuples(st.just("downgrade"), st.integers(0, 4)),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(operation, max_size=25))
def test_upgrades_interleaved_with_traffic_match_the_model(ops: list[tuple[Any, ...]]) -> None:
    counts = [0] * N
    version = "1"
    releases = 0

    async def clients(node: otpy.Node, names: list[str], answers: list[Any]) -> None:
        async def one(name: str) -> None:
            answers.append(await node.call(name, "incr"))

        async with trio.open_nursery() as nursery:
            for name in names:
                nursery.start_soon(one, name)

    async def main() -> None:
        nonlocal version, releases
        root = otpy.Supervisor([otpy.Child(f"m{i}", MV1) for i in range(N)],
                               max_restarts=1000)
        async with otpy.open_node(root) as node:
            for op in ops:
                kind = op[0]
                answers: list[Any] = []
                if kind == "incr":
                    _, i, clients_n = op
                    await clients(node, [f"m{i}"] * clients_n, answers)
                    assert ["ok"] * clients_n == answers
                    counts[i] += clients_n
                elif kind == "cast":
                    _, i, k = op
                    node.cast(f"m{i}", k)
                    counts[i] += k
                elif kind == "crash":
                    try:
                        await node.call(f"m{op[1]}", "crash")
                    except otpy.ServerCrashed:
                        counts[op[1]] = 0
                    else:  # pragma: no cover - the model says it must crash
                        raise AssertionError("crash call did not crash")
                else:
                    busy = [f"m{j % N}" for j in range(op[1])]
                    failed = False
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(clients, node, busy, answers)
                        try:
                            if kind == "upgrade" and version == "1":
                                rel = otpy.Release(f"r{releases}", [otpy.Update(MV1, MV2)])
                                releases += 1
                                await node.upgrade(rel)
                                version = "2"
                            elif kind == "bad_upgrade" and version == "1":
                                rel = otpy.Release("bad", [otpy.Update(MV1, BadV2)])
                                await node.upgrade(rel)
                            elif kind == "downgrade" and version == "2":
                                await node.downgrade()
                                version = "1"
                        except otpy.UpgradeFailed as exc:
                            failed = True
                            assert {"m2"} == set(exc.failures)
                    assert failed == (kind == "bad_upgrade" and version == "1")
                    assert ["ok"] * len(busy) == answers
                    for name in busy:
                        counts[int(name[1:])] += 1
                for i in range(N):
                    assert version == node.vsn_of(f"m{i}")
                    state = node.get_state(f"m{i}")
                    count = state if version == "1" else state[1]
                    assert counts[i] == count
                    assert counts[i] == await node.call(f"m{i}", "get")

    trio.run(main)
