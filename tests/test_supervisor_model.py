"""Random supervision trees under random crashes, stops and dynamic-child operations,
checked against a small pure-Python model of OTP supervision.

The machine drives the real core (``Scheduler`` + ``SupervisorRuntime``) step by step,
with a fake clock it advances itself, exactly as ``Node._start_tree`` wires them but with
no trio loop: a crash is a cast stepped inline, and ``run_batch`` stands for the node's
dispatcher (it runs the deferred retries of children whose restart failed).

The model is the contract. It knows nothing of the implementation beyond the rules of
``otp-behaviours.md`` sections E-G:

- a child exits: temporary -> its spec goes; transient after a normal exit -> stays
  stopped; otherwise a restart is counted in the supervisor's sliding window, and the
  restart that would be number ``max_restarts + 1`` within ``max_seconds`` makes the
  supervisor stop its children (newest first) and exit ``shutdown`` to its parent;
- one_for_one restarts the child; rest_for_one stops the later children newest first
  and restarts the child and those in order; one_for_all does so for all children;
  temporary bystanders are stopped and dropped;
- a restart whose start fails leaves that child (and the rest of the group) "restarting";
  the dispatcher retries, each retry counting as one restart;
- a counter keeps its value until its server is restarted (then 0).

After every step the machine compares which servers and supervisors run, each
supervisor's ``which_children`` (status and restart count), each counter's value, the
exact sequence of ``init``/``terminate`` calls, and which supervisors gave up.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import otpy
from otpy._core.scheduler import CAST, Scheduler
from otpy._core.supervisor import SupervisorRuntime

# -- the servers under test ------------------------------------------------------------


class Boom(Exception):
    pass


class Env:
    """Shared by every server of one run: what they did, and whose init must fail."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.broken: set[str] = set()


class Counter(otpy.GenServer[int]):
    vsn = "1"

    def init(self, env: Env) -> int:
        self.env = env
        env.events.append(("init", self.name))
        if self.name in env.broken:
            raise Boom(f"{self.name} is broken")
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply(state + 1, state + 1)
        return otpy.Reply(state, state)

    def handle_cast(self, message: Any, state: int) -> Any:
        if message == "crash":
            raise Boom(f"{self.name} crashed")
        return otpy.Stop(message[1], state)

    def terminate(self, reason: Any, state: int) -> None:
        self.env.events.append(
            ("terminate", self.name, "crash" if isinstance(reason, Exception) else reason))


class RecordingLog:
    """Stands in for the structlog logger: keeps (event, fields) pairs."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def _record(self, event: str, **fields: Any) -> None:
        self.events.append((event, fields))

    debug = info = warning = error = exception = _record


# -- the model -------------------------------------------------------------------------


@dataclass
class WSpec:
    id: str
    restart: str


@dataclass
class SSpec:
    id: str
    restart: str
    strategy: str
    max_restarts: int
    max_seconds: float
    children: list[WSpec | SSpec]

    def build(self, env: Env) -> otpy.Supervisor:
        return otpy.Supervisor(
            [c.build(env) if isinstance(c, SSpec) else
             otpy.Child(c.id, Counter, env, restart=c.restart) for c in self.children],
            strategy=self.strategy, max_restarts=self.max_restarts,
            max_seconds=self.max_seconds, name=self.id, restart=self.restart)


class StartFail(Exception):
    pass


@dataclass(eq=False)
class MChild:
    spec: WSpec | SSpec
    restarts: int = 0
    count: int | None = None  # a worker's counter while it runs
    sub: MSup | None = None  # a supervisor child's runtime while it runs

    @property
    def running(self) -> bool:
        if isinstance(self.spec, SSpec):
            return self.sub is not None and self.sub.alive
        return self.count is not None


@dataclass(eq=False)
class MSup:
    spec: SSpec
    parent: MSup | None
    children: dict[str, MChild] = field(default_factory=dict)
    window: list[float] = field(default_factory=list)
    pending: set[str] = field(default_factory=set)
    alive: bool = True


class Model:
    def __init__(self) -> None:
        self.now = 0.0
        self.events: list[tuple[Any, ...]] = []
        self.broken: set[str] = set()
        self.sups: dict[str, MSup] = {}
        self.deferred: list[MSup] = []
        self.gave_up: list[str] = []
        self.fatal = False

    # start and stop

    def start_sup(self, spec: SSpec, parent: MSup | None) -> MSup:
        sup = self.sups[spec.id] = MSup(spec, parent)
        for cs in spec.children:
            ch = sup.children[cs.id] = MChild(cs)
            try:
                self.start(sup, ch)
            except StartFail:
                del sup.children[cs.id]
                self.shutdown(sup)
                raise
        return sup

    def start(self, sup: MSup, ch: MChild) -> None:
        if isinstance(ch.spec, SSpec):
            ch.sub = self.start_sup(ch.spec, sup)
            return
        self.events.append(("init", ch.spec.id))
        if ch.spec.id in self.broken:
            raise StartFail
        ch.count = 0

    def stop(self, ch: MChild) -> None:
        if not ch.running:
            return
        if ch.sub is not None:
            self.shutdown(ch.sub)
            ch.sub = None
        else:
            self.events.append(("terminate", ch.spec.id, "shutdown"))
            ch.count = None

    def shutdown(self, sup: MSup) -> None:
        sup.alive = False
        sup.pending.clear()
        for ch in reversed(list(sup.children.values())):
            self.stop(ch)
        del self.sups[sup.spec.id]

    # exits and restarts

    def worker_exit(self, sup: MSup, id: str, reason: str) -> None:
        self.events.append(("terminate", id, reason))
        sup.children[id].count = None
        self.child_exited(sup, id, normal=reason in ("normal", "shutdown"))

    def child_exited(self, sup: MSup, id: str, normal: bool) -> None:
        ch = sup.children[id]
        if ch.spec.restart == "temporary":
            del sup.children[id]
            return
        if ch.spec.restart == "transient" and normal:
            return
        if not self.count_restart(sup):
            self.give_up(sup)
            return
        group = [id]
        if sup.spec.strategy != "one_for_one":
            ids = list(sup.children)
            group = ids[ids.index(id):] if sup.spec.strategy == "rest_for_one" else ids
            for other in reversed(group):
                self.stop(sup.children[other])
            for other in group:
                if other != id and sup.children[other].spec.restart == "temporary":
                    del sup.children[other]
            group = [g for g in group if g in sup.children]
        self.restart_group(sup, group)

    def restart_group(self, sup: MSup, group: list[str]) -> None:
        for n, id in enumerate(group):
            ch = sup.children[id]
            if ch.running:
                sup.pending.discard(id)
                continue
            ch.restarts += 1
            try:
                self.start(sup, ch)
            except StartFail:
                sup.pending.update(group[n:])
                self.deferred.append(sup)
                return
            sup.pending.discard(id)

    def retry(self, sup: MSup) -> None:
        group = [id for id, ch in sup.children.items() if id in sup.pending and not ch.running]
        sup.pending.clear()
        if not sup.alive or not group:
            return
        if not self.count_restart(sup):
            self.give_up(sup)
            return
        self.restart_group(sup, group)

    def count_restart(self, sup: MSup) -> bool:
        horizon = self.now - sup.spec.max_seconds
        sup.window = [t for t in sup.window if t > horizon] + [self.now]
        return len(sup.window) <= sup.spec.max_restarts

    def give_up(self, sup: MSup) -> None:
        self.gave_up.append(sup.spec.id)
        self.shutdown(sup)
        if sup.parent is None:
            self.fatal = True
        else:
            self.child_exited(sup.parent, sup.spec.id, normal=True)  # ("shutdown", err)

    def dispatch(self) -> None:
        batch, self.deferred = self.deferred, []
        for sup in batch:
            self.retry(sup)

    # views

    def workers(self) -> dict[str, tuple[MSup, MChild]]:
        return {id: (sup, ch) for sup in self.sups.values()
                for id, ch in sup.children.items() if isinstance(ch.spec, WSpec)}

    def running_workers(self) -> dict[str, int]:
        return {id: ch.count for id, (_, ch) in self.workers().items() if ch.count is not None}

    def which_children(self, sup: MSup) -> list[tuple[str, str, str, int]]:
        return [
            (id, "supervisor" if isinstance(ch.spec, SSpec) else "worker",
             "running" if ch.running else
             "restarting" if id in sup.pending else "not running", ch.restarts)
            for id, ch in sup.children.items()]


# -- random trees ----------------------------------------------------------------------

restarts = st.sampled_from(["permanent", "permanent", "transient", "temporary"])
strategies = st.sampled_from(["one_for_one", "rest_for_one", "one_for_all"])
windows = st.sampled_from([1.0, 5.0, 30.0])
shapes = st.recursive(
    st.tuples(st.just("w"), restarts),
    lambda kids: st.tuples(st.just("s"), restarts, strategies, st.integers(0, 3), windows,
                           st.lists(kids, min_size=1, max_size=3)),
    max_leaves=7,
)
roots = st.tuples(strategies, st.integers(0, 4), windows,
                  st.lists(shapes, min_size=1, max_size=4))


def name_tree(root: Any) -> SSpec:
    wn, sn = itertools.count(), itertools.count()

    def build(shape: Any) -> WSpec | SSpec:
        if shape[0] == "w":
            return WSpec(f"w{next(wn)}", shape[1])
        _, restart, strategy, max_r, max_s, kids = shape
        return SSpec(f"s{next(sn)}", restart, strategy, max_r, max_s, [build(k) for k in kids])

    strategy, max_r, max_s, kids = root
    return SSpec("root", "permanent", strategy, max_r, max_s, [build(k) for k in kids])


# -- the machine -----------------------------------------------------------------------


class SupervisionMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.model = Model()
        self.env = Env()
        self.log = RecordingLog()
        self.fresh = itertools.count()
        self.sched = Scheduler(log=self.log, clock=lambda: self.model.now)

    @initialize(tree=roots)
    def start_tree(self, tree: Any) -> None:
        spec = name_tree(tree)
        self.model.start_sup(spec, None)
        root = SupervisorRuntime(spec.build(self.env), self.sched, None)
        self.sched.root = root
        with self.sched.supervision_act():
            root.start()

    # -- helpers ---------------------------------------------------------------------

    def alive(self) -> bool:
        return not self.model.fatal

    def has_running_workers(self) -> bool:
        return self.alive() and bool(self.model.running_workers())

    def pick_running(self, data: st.DataObject) -> str:
        return data.draw(st.sampled_from(sorted(self.model.running_workers())), "worker")

    def pick_sup(self, data: st.DataObject) -> MSup:
        name = data.draw(st.sampled_from(sorted(self.model.sups)), "supervisor")
        return self.model.sups[name]

    def pick_id(self, data: st.DataObject, sup: MSup) -> str:
        return data.draw(st.sampled_from([*sup.children, "nope"]), "child id")

    def runtime(self, sup: MSup) -> SupervisorRuntime:
        return self.sched.sups[sup.spec.id]

    # -- rules -----------------------------------------------------------------------

    @precondition(has_running_workers)
    @rule(data=st.data())
    def incr(self, data: st.DataObject) -> None:
        name = self.pick_running(data)
        _, ch = self.model.workers()[name]
        assert ch.count is not None
        ch.count += 1
        assert ch.count == self.sched.call_nowait(name, "incr")

    @precondition(has_running_workers)
    @rule(data=st.data())
    def crash(self, data: st.DataObject) -> None:
        name = self.pick_running(data)
        self.sched.cast_now(CAST, name, "crash")
        sup, _ = self.model.workers()[name]
        self.model.worker_exit(sup, name, "crash")

    @precondition(has_running_workers)
    @rule(data=st.data(), reason=st.sampled_from(["normal", "shutdown", "boom"]))
    def stop(self, data: st.DataObject, reason: str) -> None:
        name = self.pick_running(data)
        self.sched.cast_now(CAST, name, ("stop", reason))
        sup, _ = self.model.workers()[name]
        self.model.worker_exit(sup, name, reason)

    @rule(seconds=st.sampled_from([0.5, 1.0, 4.0, 30.0]))
    def advance(self, seconds: float) -> None:
        self.model.now += seconds

    @rule()
    def dispatch(self) -> None:
        self.sched.run_batch()
        self.model.dispatch()

    @precondition(alive)
    @rule(data=st.data(), broken=st.booleans())
    def set_broken(self, data: st.DataObject, broken: bool) -> None:
        names = sorted(self.model.workers())
        if not names:
            return
        name = data.draw(st.sampled_from(names), "worker")
        for s in (self.env.broken, self.model.broken):
            if broken:
                s.add(name)
            else:
                s.discard(name)

    @precondition(alive)
    @rule(data=st.data())
    def terminate_child(self, data: st.DataObject) -> None:
        sup = self.pick_sup(data)
        id = self.pick_id(data, sup)
        if id not in sup.children:
            with pytest.raises(otpy.SupervisorError):
                self.runtime(sup).terminate_child(id)
            return
        self.runtime(sup).terminate_child(id)
        ch = sup.children[id]
        sup.pending.discard(id)
        self.model.stop(ch)
        if ch.spec.restart == "temporary":
            del sup.children[id]

    @precondition(alive)
    @rule(data=st.data())
    def restart_child(self, data: st.DataObject) -> None:
        sup = self.pick_sup(data)
        id = self.pick_id(data, sup)
        rt = self.runtime(sup)
        if id not in sup.children or sup.children[id].running:
            with pytest.raises(otpy.SupervisorError):
                rt.restart_child(id)
            return
        sup.pending.discard(id)
        try:
            self.model.start(sup, sup.children[id])
        except StartFail:
            with pytest.raises(otpy.StartFailed):
                rt.restart_child(id)
        else:
            assert "running" == rt.restart_child(id).status

    @precondition(alive)
    @rule(data=st.data())
    def delete_child(self, data: st.DataObject) -> None:
        sup = self.pick_sup(data)
        id = self.pick_id(data, sup)
        if id not in sup.children or sup.children[id].running:
            with pytest.raises(otpy.SupervisorError):
                self.runtime(sup).delete_child(id)
            return
        self.runtime(sup).delete_child(id)
        sup.pending.discard(id)
        del sup.children[id]

    @precondition(alive)
    @rule(data=st.data(), restart=restarts, broken=st.booleans(),
          sub=st.none() | st.tuples(strategies, st.integers(0, 2), st.integers(1, 2)))
    def start_child(
        self, data: st.DataObject, restart: str, broken: bool,
        sub: tuple[str, int, int] | None,
    ) -> None:
        sup = self.pick_sup(data)
        rt = self.runtime(sup)
        n = next(self.fresh)
        if sub is None:
            spec: WSpec | SSpec = WSpec(f"n{n}", restart)
            real: otpy.Child | otpy.Supervisor = otpy.Child(
                spec.id, Counter, self.env, restart=restart)
        else:
            strategy, max_r, size = sub
            spec = SSpec(f"ns{n}", restart, strategy, max_r, 5.0,
                         [WSpec(f"n{n}_{k}", "permanent") for k in range(size)])
            real = spec.build(self.env)
        if broken:
            name = spec.id if isinstance(spec, WSpec) else spec.children[-1].id
            self.env.broken.add(name)
            self.model.broken.add(name)
        ch = sup.children[spec.id] = MChild(spec)
        try:
            self.model.start(sup, ch)
        except StartFail:
            del sup.children[spec.id]
            with pytest.raises(otpy.StartFailed):
                rt.start_child(real)
        else:
            assert "running" == rt.start_child(real).status

    @precondition(alive)
    @rule(data=st.data())
    def start_child_with_a_used_id(self, data: st.DataObject) -> None:
        sup = self.pick_sup(data)
        if not sup.children:
            return
        id = data.draw(st.sampled_from(sorted(sup.children)), "child id")
        with pytest.raises(otpy.SupervisorError, match="already has a child"):
            self.runtime(sup).start_child(otpy.Child(id, Counter, self.env))

    # -- what must agree after every step ---------------------------------------------

    @invariant()
    def same_supervisors_and_servers(self) -> None:
        model = self.model
        assert model.fatal == (self.sched.fatal is not None)
        assert sorted(model.sups) == sorted(self.sched.sups)
        assert model.running_workers() == {
            name: proc._otpy_state for name, proc in self.sched.procs.items()}

    @invariant()
    def same_children(self) -> None:
        for name, sup in self.model.sups.items():
            real = [(c.id, c.kind, c.status, c.restarts)
                    for c in self.sched.sups[name].which_children()]
            assert self.model.which_children(sup) == real, name

    @invariant()
    def same_starts_and_stops_in_the_same_order(self) -> None:
        assert self.model.events == self.env.events

    @invariant()
    def same_supervisors_gave_up(self) -> None:
        assert self.model.gave_up == [
            fields["supervisor"] for event, fields in self.log.events
            if event == "supervisor_gave_up"]


SupervisionMachine.TestCase.settings = settings(
    max_examples=80, stateful_step_count=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestSupervision = SupervisionMachine.TestCase
