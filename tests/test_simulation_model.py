"""A model check run under otpy.testing.Simulation: concurrent clients, injected
crashes, upgrades, failing upgrades and downgrades, in an order the seed picks.

Counters run as permanent children of one supervisor. Each incarnation of a counter
knows its number (``Env.incarnations``) and tags its ``incr`` replies with it. The
model needs no knowledge of the interleaving the seed chose:

- every call gets exactly one answer, and every client finishes;
- a counter's final count is the number of ``incr`` calls its current incarnation
  acknowledged (so no increment is lost, duplicated, or survives a restart);
- a counter has been restarted once per crash (injected at a step, or by a client),
  and exactly the calls served by an injected crashing step got ``ServerCrashed``;
- a watcher that each incarnation asks to monitor it gets exactly one ServerDown per
  incarnation that ended, and none for a running one (an upgrade keeps the pid);
- the release history follows the admin's script: an upgrade fails exactly when it
  has an injected ``code_change`` fault or a bad class, or (as the release handler
  promises) when a server it migrates restarted meanwhile; every server runs the
  version the model says.
"""

from __future__ import annotations

import random
from collections import Counter as Tally
from collections.abc import Generator
from typing import Any

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import otpy
import otpy.testing as ot

N = 3
NAMES = [f"m{i}" for i in range(N)]
Script = Generator[Any, Any, Any]


class Env:
    def __init__(self) -> None:
        self.incarnations: Tally[str] = Tally()
        self.pids: list[otpy.Pid] = []  # every incarnation's pid, in start order


def started(server: otpy.GenServer[Any], env: Env) -> int:
    """Count the new incarnation and ask the watcher to monitor it."""
    env.incarnations[server.name] += 1
    env.pids.append(server.pid)
    server.cast("watcher", server.pid)
    return env.incarnations[server.name]


class Watcher(otpy.GenServer[list[otpy.Pid]]):
    """Monitors each pid it is sent; keeps the pid of every ServerDown it gets."""

    vsn = "1"

    def init(self, env: Env) -> list[otpy.Pid]:
        return []

    def handle_cast(self, pid: otpy.Pid, state: list[otpy.Pid]) -> list[otpy.Pid]:
        self.monitor(pid)
        return state

    def handle_info(self, message: Any, state: list[otpy.Pid]) -> list[otpy.Pid]:
        assert isinstance(message, otpy.ServerDown)
        return [*state, message.pid]


class MV1(otpy.GenServer[int]):
    vsn = "1"

    def init(self, env: Env) -> int:
        self.incarnation = started(self, env)
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(("ok", self.incarnation), state + 1)
        return otpy.Reply(state, state)


class MV2(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def init(self, env: Env) -> tuple[int, int]:
        self.incarnation = started(self, env)
        return (0, 0)

    def handle_call(self, request: Any, caller: otpy.Caller, state: tuple[int, int]) -> Any:
        if request == "incr":
            return otpy.Reply(("ok", self.incarnation), (state[0], state[1] + 1))
        return otpy.Reply(state[1], state)

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return state[1]
        return (state, state)


class BadV2(MV2):
    """Its migration of m1 fails, so the whole release must roll back."""

    vsn = "2bad"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if self.name == "m1":
            raise ValueError("m1 refuses")
        return super().code_change(old_vsn, state, extra)


server = st.integers(0, N - 1)
client_op = st.one_of(
    st.tuples(st.just("incr"), server),
    st.tuples(st.just("incr"), server),
    st.tuples(st.just("get"), server),
    st.tuples(st.just("sleep"), st.sampled_from([0.0, 0.5, 2.0])),
    st.tuples(st.just("crash"), server),
)
admin_op = st.tuples(st.sampled_from(["upgrade", "bad_upgrade", "downgrade"]),
                     st.sampled_from([0.0, 0.0, 1.0]))
fault = st.one_of(
    st.tuples(st.just("crash_at"), server, st.integers(1, 8)),
    st.tuples(st.just("fail_code_change"), server),
)


class Outcomes:
    def __init__(self) -> None:
        self.calls = 0
        self.answers = 0
        self.acks: Tally[tuple[str, int]] = Tally()  # (server, incarnation)
        self.crashed: Tally[str] = Tally()
        self.client_crashes: Tally[str] = Tally()


def client(script: list[tuple[Any, ...]], out: Outcomes) -> Script:
    for op in script:
        if op[0] == "sleep":
            yield ot.sleep(op[1])
        elif op[0] == "crash":
            yield ot.crash(NAMES[op[1]])
            out.client_crashes[NAMES[op[1]]] += 1
        else:
            name = NAMES[op[1]]
            out.calls += 1
            try:
                reply = yield ot.call(name, op[0])
            except otpy.ServerCrashed as exc:
                assert isinstance(exc.__cause__, ot.InjectedFault)
                out.crashed[name] += 1
            else:
                if op[0] == "incr":
                    assert "ok" == reply[0]
                    out.acks[(name, reply[1])] += 1
                else:
                    assert isinstance(reply, int)
            out.answers += 1


def admin(script: list[tuple[str, float]], pending_faults: set[str],
          versions: list[str]) -> Script:
    """Runs the release script against a sequential model of the release history."""
    version, n = "1", 0
    for kind, pause in script:
        yield ot.sleep(pause)
        n += 1
        migrates = (kind == "downgrade") == (version == "2")  # else the plan refuses
        expect_fail = {"m1"} if kind == "bad_upgrade" and migrates else set()
        if migrates:
            expect_fail |= pending_faults
            pending_faults.clear()  # a migration consumes the faults of its servers
        try:
            if kind == "downgrade":
                yield ot.downgrade()
            else:
                new = BadV2 if kind == "bad_upgrade" else MV2
                yield ot.upgrade(otpy.Release(f"r{n}", [otpy.Update(MV1, new)]))
        except otpy.UpgradeFailed as exc:
            if not migrates:  # refused before anything was touched
                assert "refused" in str(exc) or "no installed release" in str(exc), str(exc)
                versions.append(version)
                continue
            failures = dict(exc.failures)
            assert expect_fail <= set(failures), (expect_fail, failures)
            for name, why in failures.items():
                if name not in expect_fail:  # only a restart during the migration
                    assert "restarted during the upgrade" in why, why
                    event("a server restarted during a migration")
            event(f"{kind} rolled back")
        else:
            assert migrates and not expect_fail, (kind, version, expect_fail)
            event(f"{kind} committed")
            version = "2" if kind == "upgrade" else "1"
        versions.append(version)


plans = {
    "scripts": st.lists(st.lists(client_op, max_size=8), min_size=1, max_size=3),
    "releases": st.lists(admin_op, max_size=4),
    "faults": st.lists(fault, max_size=3),
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32), **plans)
def test_simulated_traffic_crashes_and_upgrades_match_the_model(
    seed: int, scripts: list[list[tuple[Any, ...]]], releases: list[tuple[str, float]],
    faults: list[tuple[Any, ...]],
) -> None:
    check_run(seed, scripts, releases, faults)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rng=st.randoms(use_true_random=False), **plans)
def test_the_model_holds_when_hypothesis_makes_every_scheduling_choice(
    rng: random.Random, scripts: list[list[tuple[Any, ...]]],
    releases: list[tuple[str, float]], faults: list[tuple[Any, ...]],
) -> None:
    """The same check with each choice of the schedule drawn by hypothesis, so that a
    failure would shrink choice by choice."""
    check_run(rng, scripts, releases, faults)


def check_run(
    seed: int | random.Random, scripts: list[list[tuple[Any, ...]]],
    releases: list[tuple[str, float]], faults: list[tuple[Any, ...]],
) -> None:
    env = Env()
    # A mailbox of one: concurrent calls often wait in line for room, so the model
    # also checks that line across crashes, restarts and releases.
    root = otpy.Supervisor(
        [otpy.Child("watcher", Watcher, env),
         *(otpy.Child(name, MV1, env, max_mailbox=1) for name in NAMES)],
        max_restarts=1000)
    sim = ot.Simulation(root, seed=seed)
    crash_steps: set[tuple[str, int]] = set()
    failing: set[str] = set()
    for f in faults:
        if f[0] == "crash_at":
            sim.crash_at(NAMES[f[1]], step=f[2])
            crash_steps.add((NAMES[f[1]], f[2]))
        else:
            sim.fail_code_change(NAMES[f[1]])
            failing.add(NAMES[f[1]])
    out = Outcomes()
    clients = [sim.spawn(client, script, out) for script in scripts]
    versions: list[str] = []
    clients.append(sim.spawn(admin, releases, failing, versions))
    sim.run()

    assert all(c.done for c in clients)
    assert out.calls == out.answers
    version = versions[-1] if versions else "1"
    for name in NAMES:
        fired = sum(1 for n, step in crash_steps if n == name and sim.steps_of(n) >= step)
        assert fired == out.crashed[name]  # every crashing step served a client's call
        incarnation = env.incarnations[name]
        assert 1 + fired + out.client_crashes[name] == incarnation
        assert incarnation - 1 == next(
            c.restarts for c in sim.which_children() if c.id == name)
        state = sim.get_state(name)
        count = state if version == "1" else state[1]
        assert out.acks[(name, incarnation)] == count
        assert version == sim.vsn_of(name)
    running = {sim.whereis(name) for name in NAMES}
    ended = [pid for pid in env.pids if pid not in running]
    assert Tally(ended) == Tally(sim.get_state("watcher"))
