"""A model check of durable servers under otpy.testing.Simulation with a MemoryStore:
concurrent clients, steps that change their state in place and then crash, steps that
the store cannot record, and node restarts (a new Simulation on the same store, the old
one abandoned mid-run: a kill -9), in an order the seed picks.

What the model says, knowing nothing of the interleaving:

- after a kill, a server's state holds every acknowledged increment, and at most the
  calls in flight besides (recorded, their reply not yet delivered): nothing
  acknowledged is lost, and nothing of a crashed or unrecorded step survives (it is
  not retried, and its change in place is undone);
- a run that is not killed answers every call.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import otpy
import otpy.testing as ot

NAMES = ("a", "b")
KEYS = ("x", "y", "z")


class Tallies(otpy.GenServer[dict[str, int]]):
    """Counts per key, changed in place, each step naming the key it changed."""

    vsn = "1"
    durable = True

    def init(self, arg: Any) -> dict[str, int]:
        return {}

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[str, int]) -> Any:
        op, key = request
        state[key] = state.get(key, 0) + 1  # in place, before anything can fail
        if op == "crash":
            raise RuntimeError("crash after a change in place")
        self.changed(key)
        return otpy.Reply(state[key], state)


def root() -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child(n, Tallies) for n in NAMES], max_restarts=1000)


Script = Generator[Any, Any, Any]


def client(ops: list[tuple[str, str, str]], acked: dict[str, dict[str, int]],
           in_flight: list[tuple[str, str]], answers: list[str]) -> Script:
    for op, name, key in ops:
        in_flight.append((name, key))
        try:
            yield ot.call(name, (op, key))
        except (otpy.ServerCrashed, otpy.NoSuchServer) as exc:
            answers.append(type(exc).__name__)
        else:
            acked[name][key] = acked[name].get(key, 0) + 1
            answers.append("ok")
        in_flight.remove((name, key))


def check(acked: dict[str, dict[str, int]], in_flight: list[tuple[str, str]],
          found: dict[str, dict[str, int]]) -> None:
    """Every acknowledged increment is there, and at most the calls in flight besides
    (recorded, but their reply never reached the client)."""
    for name in NAMES:
        for key in KEYS:
            a, f = acked[name].get(key, 0), found[name].get(key, 0)
            assert a <= f <= a + in_flight.count((name, key)), (name, key, a, f)


op = st.tuples(st.sampled_from(["incr", "incr", "incr", "crash"]), st.sampled_from(NAMES),
               st.sampled_from(KEYS))
phase = st.tuples(st.lists(st.lists(op, max_size=6), min_size=1, max_size=3),
                  st.booleans(), st.integers(0, 40))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(phase, min_size=1, max_size=4), st.randoms(use_true_random=False))
def test_durable_servers_keep_exactly_what_was_acknowledged(phases: Any, rng: Any) -> None:
    """Each phase starts a node on the same store, runs clients, may make the store
    fail for a while, and is killed after some steps (or runs to the end)."""
    store = ot.MemoryStore()
    acked: dict[str, dict[str, int]] = {n: {} for n in NAMES}
    in_flight: list[tuple[str, str]] = []
    for clients, failing, steps in phases:
        sim = ot.Simulation(root(), seed=rng, store=store)
        found = {n: dict(sim.get_state(n)) for n in NAMES}
        check(acked, in_flight, found)
        acked, in_flight = found, []
        answers: list[str] = []
        for ops in clients:
            sim.spawn(client, ops, acked, in_flight, answers)
        store.failing = failing
        for _ in range(steps):  # then the node is killed: nothing more runs
            if not sim.step():
                assert len(answers) == sum(len(ops) for ops in clients)
                break
        store.failing = False
    sim = ot.Simulation(root(), seed=rng, store=store)
    check(acked, in_flight, {n: sim.get_state(n) for n in NAMES})
    sim.close()
