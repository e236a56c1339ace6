"""Supervision trees: start, strategies, restart types, intensity, escalation,
shutdown and dynamic control (issue 3; OTP reference sections E, F, G).

Every test builds a small tree of ``Worker`` counters that record their ``init`` and
``terminate`` calls in a shared ``Trace``, so the order of stops and starts is asserted
exactly. Anything time-based runs on trio's ``MockClock`` (``autojump_clock``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import structlog
import trio
import trio.testing
from structlog.typing import EventDict

import otpy


class Boom(Exception):
    """The exception a worker raises when told to crash."""


class Trace:
    """What the workers of one test did, in order, and how they are told to misbehave."""

    def __init__(self) -> None:
        self.events: list[tuple[Any, ...]] = []
        self.broken: set[str] = set()  # init raises
        self.ignore: set[str] = set()  # init returns Ignore
        self.bad_terminate: set[str] = set()  # terminate raises

    def take(self) -> list[tuple[Any, ...]]:
        """The events so far; forget them."""
        events, self.events = self.events, []
        return events


def _kind(reason: Any) -> Any:
    return "crash" if isinstance(reason, Exception) else reason


class Worker(otpy.GenServer[int]):
    """A counter: ``"get"``, ``"incr"``, ``"crash"``, ``("stop", reason)``."""

    vsn = "1"

    def init(self, arg: Trace) -> int:
        self.trace = arg
        arg.events.append(("init", self.name))
        if self.name in arg.broken:
            raise Boom(f"{self.name} cannot start")
        if self.name in arg.ignore:
            return otpy.Ignore  # type: ignore[no-any-return]
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        match request:
            case "get":
                return otpy.Reply(state, state)
            case "incr":
                return otpy.Reply(state + 1, state + 1)
            case ("stop", reason):
                return otpy.Stop(reason, state, reply="stopping")
        raise Boom(f"{self.name} crashed on {request!r}")

    def handle_cast(self, message: Any, state: int) -> Any:
        match message:
            case "incr":
                return state + 1
            case ("stop", reason):
                return otpy.Stop(reason, state)
        raise Boom(f"{self.name} crashed on {message!r}")

    def terminate(self, reason: Any, state: int) -> None:
        self.trace.events.append(("terminate", self.name, _kind(reason)))
        if self.name in self.trace.bad_terminate:
            raise Boom(f"{self.name} failed in terminate")


def w(id: str, trace: Trace, **kw: Any) -> otpy.Child:
    return otpy.Child(id, Worker, trace, **kw)


def statuses(node: otpy.Node, sup: str = "root") -> list[tuple[str, str, int]]:
    return [(c.id, c.status, c.restarts) for c in node.which_children(sup)]


def events_named(logs: list[EventDict], *names: str) -> list[EventDict]:
    return [e for e in logs if e["event"] in names]


@pytest.fixture
def trace() -> Trace:
    return Trace()


@pytest.fixture
def logs() -> Iterator[list[EventDict]]:
    """Every structlog event, whatever level filtering another test configured."""
    old = structlog.get_config()
    structlog.reset_defaults()
    try:
        with structlog.testing.capture_logs() as captured:
            yield captured
    finally:
        structlog.configure(**old)


async def settle() -> None:
    """Let the node's dispatcher serve everything queued (retries, mailboxes)."""
    await trio.testing.wait_all_tasks_blocked()


# -- specs -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"strategy": "one_for_some"}, ["strategy", "'one_for_some'", "'one_for_one'"]),
        ({"strategy": "simple_one_for_one"}, ["strategy", "'simple_one_for_one'"]),
        ({"max_restarts": -1}, ["max_restarts", "-1"]),
        ({"max_restarts": 2.5}, ["max_restarts", "2.5"]),
        ({"max_restarts": "3"}, ["max_restarts", "'3'"]),
        ({"max_seconds": 0}, ["max_seconds", "0"]),
        ({"max_seconds": -5.0}, ["max_seconds", "-5.0"]),
        ({"max_seconds": "5"}, ["max_seconds", "'5'"]),
        ({"restart": "always"}, ["restart", "'always'", "'permanent'"]),
        ({"name": ""}, ["name", "''"]),
        ({"name": 7}, ["name", "7"]),
    ],
)
def test_bad_supervisor_arguments_are_refused_naming_the_value(
    trace: Trace, kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        otpy.Supervisor([w("a", trace)], **kwargs)
    message = str(info.value)
    assert [] == [word for word in words if word not in message]


@pytest.mark.parametrize(
    ("args", "kwargs", "words"),
    [
        (("", Worker), {}, ["id", "''"]),
        ((5, Worker), {}, ["id", "5"]),
        (("a", Worker), {"restart": "sometimes"}, ["'a'", "restart", "'sometimes'",
                                                    "'transient'"]),
        (("a", Worker), {"shutdown": -1}, ["'a'", "shutdown", "-1"]),
        (("a", Worker), {"shutdown": "5"}, ["'a'", "shutdown", "'5'"]),
    ],
)
def test_bad_child_arguments_are_refused_naming_the_value(
    args: tuple[Any, ...], kwargs: dict[str, Any], words: list[str]
) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        otpy.Child(*args, **kwargs)
    message = str(info.value)
    assert [] == [word for word in words if word not in message]


@pytest.mark.parametrize("server_class", [int, object, "Worker", Worker()])
def test_child_server_class_must_be_a_genserver_subclass(server_class: Any) -> None:
    with pytest.raises(TypeError) as info:
        otpy.Child("a", server_class)
    assert "otpy.GenServer" in str(info.value)
    assert "'a'" in str(info.value)


@pytest.mark.parametrize("children", [None, 5, "ab"])
def test_supervisor_children_must_be_a_list_of_specs(children: Any) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        otpy.Supervisor(children)
    assert "otpy.Child" in str(info.value)


def test_a_single_child_not_in_a_list_is_refused(trace: Trace) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        otpy.Supervisor(w("a", trace))  # type: ignore[arg-type]
    assert "must be a list" in str(info.value)


def test_duplicate_ids_within_a_supervisor_are_refused(trace: Trace) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        otpy.Supervisor([w("a", trace), w("b", trace), w("a", trace)], name="top")
    assert "'top'" in str(info.value)
    assert "'a'" in str(info.value)


def test_strategy_and_restart_accept_the_enums(trace: Trace) -> None:
    sup = otpy.Supervisor([w("a", trace, restart=otpy.Restart.TRANSIENT)],
                          strategy=otpy.Strategy.REST_FOR_ONE)
    assert (otpy.Strategy.REST_FOR_ONE, otpy.Restart.TRANSIENT) == (
        sup.strategy, sup.children[0].restart)


def test_spec_defaults_follow_otp_and_elixir(trace: Trace) -> None:
    sup = otpy.Supervisor([w("a", trace)])
    child = sup.children[0]
    assert ("root", "one_for_one", 3, 5.0, "permanent", 5.0) == (
        sup.name, sup.strategy, sup.max_restarts, sup.max_seconds, child.restart,
        child.shutdown)


@pytest.mark.parametrize(
    "build",
    [
        lambda t: otpy.Supervisor([w("a", t), otpy.Supervisor([w("a", t)], name="sub")]),
        lambda t: otpy.Supervisor([otpy.Supervisor([w("b", t)], name="sub"),
                                   otpy.Supervisor([w("sub", t)], name="other")]),
        lambda t: otpy.Supervisor([w("root", t)]),
        lambda t: otpy.Supervisor([otpy.Supervisor([w("x", t)], name="s1"),
                                   otpy.Supervisor([otpy.Supervisor([w("x", t)], name="s3")],
                                                   name="s2")]),
    ],
    ids=["worker-worker", "worker-supervisor", "worker-root", "deep"],
)
async def test_name_clash_across_the_tree_is_refused_at_start(trace: Trace, build: Any) -> None:
    with pytest.raises(otpy.SupervisorError) as info:
        async with otpy.open_node(build(trace)):
            pass  # pragma: no cover
    assert "unique within a node" in str(info.value)
    assert [] == trace.events  # nothing was started


# -- start -----------------------------------------------------------------------------


def _tree(trace: Trace, **sub: Any) -> otpy.Supervisor:
    """root[a, sub[b, c], d]"""
    return otpy.Supervisor([
        w("a", trace),
        otpy.Supervisor([w("b", trace), w("c", trace)], name="sub", **sub),
        w("d", trace),
    ])


async def test_children_start_depth_first_in_list_order(trace: Trace) -> None:
    tree = otpy.Supervisor([
        w("a", trace),
        otpy.Supervisor([w("b", trace), otpy.Supervisor([w("c", trace)], name="s2")],
                        name="s1"),
        w("d", trace),
    ])
    async with otpy.open_node(tree) as node:
        assert [("init", "a"), ("init", "b"), ("init", "c"), ("init", "d")] == trace.events
        assert ["a", "s1", "d"] == [c.id for c in node.which_children("root")]


async def test_static_start_logs_child_started_for_each_child(
    trace: Trace, logs: list[EventDict]
) -> None:
    async with otpy.open_node(_tree(trace)):
        pass
    started = [(e["supervisor"], e["child"]) for e in events_named(logs, "child_started")]
    # A child is reported by its supervisor once its start returned, as in OTP.
    assert [("root", "a"), ("sub", "b"), ("sub", "c"), ("root", "sub"), ("root", "d")] == started


async def test_init_failure_at_start_stops_started_children_in_reverse_order(
    trace: Trace,
) -> None:
    trace.broken.add("c")
    with pytest.raises(otpy.StartFailed):
        async with otpy.open_node(_tree(trace)):
            pass  # pragma: no cover
    assert [
        ("init", "a"), ("init", "b"), ("init", "c"),
        ("terminate", "b", "shutdown"), ("terminate", "a", "shutdown"),
    ] == trace.events  # d never starts


async def test_start_failed_names_the_child_and_carries_the_cause(trace: Trace) -> None:
    trace.broken.add("c")
    with pytest.raises(otpy.StartFailed) as info:
        async with otpy.open_node(_tree(trace)):
            pass  # pragma: no cover
    exc = info.value
    assert ("c", Boom, "c cannot start") == (
        exc.child, type(exc.__cause__), str(exc.__cause__))
    assert "'c'" in str(exc)


async def test_init_returning_stop_fails_the_start(trace: Trace) -> None:
    class Refuses(otpy.GenServer[int]):
        def init(self, arg: Any) -> Any:
            return otpy.Stop("no_config", 0)

    with pytest.raises(otpy.StartFailed) as info:
        async with otpy.open_node(otpy.Supervisor([w("a", trace), otpy.Child("r", Refuses)])):
            pass  # pragma: no cover
    assert ("r", "no_config") == (info.value.child, info.value.reason)
    assert [("init", "a"), ("terminate", "a", "shutdown")] == trace.events


async def test_ignore_from_init_leaves_the_child_listed_as_not_running(trace: Trace) -> None:
    trace.ignore.add("b")
    tree = otpy.Supervisor([w("a", trace), w("b", trace, restart="transient"), w("c", trace)])
    async with otpy.open_node(tree) as node:
        assert [("a", "running", 0), ("b", "not running", 0), ("c", "running", 0)] == (
            statuses(node))
        assert {"specs": 3, "active": 2, "supervisors": 0, "workers": 3} == (
            node.count_children())
        assert ["a", "c"] == sorted(node.servers())


async def test_temporary_child_whose_init_ignores_is_dropped(trace: Trace) -> None:
    trace.ignore.add("b")
    tree = otpy.Supervisor([w("a", trace), w("b", trace, restart="temporary")])
    async with otpy.open_node(tree) as node:
        assert [("a", "running", 0)] == statuses(node)


# -- strategies ------------------------------------------------------------------------


async def test_one_for_one_restarts_only_the_failed_child(trace: Trace) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace), w("c", trace)])
    async with otpy.open_node(tree) as node:
        for name in ("a", "b", "c"):
            await node.call(name, "incr")
        trace.take()
        node.cast("b", "crash")
        assert [("terminate", "b", "crash"), ("init", "b")] == trace.events
        assert {"a": 1, "b": 0, "c": 1} == {n: node.get_state(n) for n in "abc"}
        assert [("a", "running", 0), ("b", "running", 1), ("c", "running", 0)] == (
            statuses(node))


async def test_rest_for_one_stops_later_children_newest_first_then_starts_in_order(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor([w(n, trace) for n in "abcd"], strategy="rest_for_one")
    async with otpy.open_node(tree) as node:
        for name in "abcd":
            await node.call(name, "incr")
        trace.take()
        node.cast("b", "crash")
        assert [
            ("terminate", "b", "crash"),
            ("terminate", "d", "shutdown"), ("terminate", "c", "shutdown"),
            ("init", "b"), ("init", "c"), ("init", "d"),
        ] == trace.events
        assert {"a": 1, "b": 0, "c": 0, "d": 0} == {n: node.get_state(n) for n in "abcd"}


async def test_one_for_all_stops_all_in_reverse_then_starts_all_in_order(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor([w(n, trace) for n in "abc"], strategy="one_for_all")
    async with otpy.open_node(tree) as node:
        for name in "abc":
            await node.call(name, "incr")
        trace.take()
        node.cast("b", "crash")
        assert [
            ("terminate", "b", "crash"),
            ("terminate", "c", "shutdown"), ("terminate", "a", "shutdown"),
            ("init", "a"), ("init", "b"), ("init", "c"),
        ] == trace.events
        assert {"a": 0, "b": 0, "c": 0} == {n: node.get_state(n) for n in "abc"}
        assert [("a", "running", 1), ("b", "running", 1), ("c", "running", 1)] == (
            statuses(node))


async def test_rest_for_one_restarts_a_later_sibling_supervisor_subtree(trace: Trace) -> None:
    tree = otpy.Supervisor(
        [w("a", trace), otpy.Supervisor([w("b", trace), w("c", trace)], name="sub"),
         w("d", trace)],
        strategy="rest_for_one")
    async with otpy.open_node(tree) as node:
        trace.take()
        node.cast("a", "crash")
        assert [
            ("terminate", "a", "crash"),
            ("terminate", "d", "shutdown"),
            ("terminate", "c", "shutdown"), ("terminate", "b", "shutdown"),
            ("init", "a"), ("init", "b"), ("init", "c"), ("init", "d"),
        ] == trace.events


async def test_only_siblings_under_the_failed_childs_own_supervisor_are_touched(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor(
        [w("x", trace),
         otpy.Supervisor([w("y", trace), w("z", trace)], strategy="one_for_all", name="sub"),
         w("v", trace)],
        strategy="one_for_all")
    async with otpy.open_node(tree) as node:
        for name in "xyzv":
            await node.call(name, "incr")
        trace.take()
        node.cast("z", "crash")
        assert [
            ("terminate", "z", "crash"), ("terminate", "y", "shutdown"),
            ("init", "y"), ("init", "z"),
        ] == trace.events
        assert {"x": 1, "y": 0, "z": 0, "v": 1} == {n: node.get_state(n) for n in "xyzv"}
        assert [("x", "running", 0), ("sub", "running", 0), ("v", "running", 0)] == (
            statuses(node))


# -- restart types ---------------------------------------------------------------------

EXITS = {
    "Stop normal": ("stop", "normal"),
    "Stop shutdown": ("stop", "shutdown"),
    "Stop (shutdown, detail)": ("stop", ("shutdown", "detail")),
    "Stop abnormal": ("stop", "boom"),
    "raise": "crash",
}
NORMAL_EXIT = {"Stop normal": True, "Stop shutdown": True, "Stop (shutdown, detail)": True,
               "Stop abnormal": False, "raise": False}


@pytest.mark.parametrize("exit", list(EXITS))
@pytest.mark.parametrize("restart", ["permanent", "transient", "temporary"])
async def test_restart_type_decides_whether_an_exited_child_is_restarted(
    trace: Trace, restart: str, exit: str
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace, restart=restart)])
    async with otpy.open_node(tree) as node:
        await node.call("b", "incr")
        node.cast("b", EXITS[exit])
        restarted = restart == "permanent" or (restart == "transient" and not NORMAL_EXIT[exit])
        expected = [("a", "running", 0)]
        if restarted:
            expected.append(("b", "running", 1))
        elif restart == "transient":
            expected.append(("b", "not running", 0))
        assert expected == statuses(node)
        assert (0 if restarted else None) == (
            node.get_state("b") if "b" in node.servers() else None)


@pytest.mark.parametrize("strategy", ["one_for_all", "rest_for_one"])
async def test_temporary_bystanders_are_not_restarted_and_their_specs_go(
    trace: Trace, strategy: str
) -> None:
    tree = otpy.Supervisor(
        [w("a", trace), w("t", trace, restart="temporary"), w("c", trace)],
        strategy=strategy, max_restarts=1)
    async with otpy.open_node(tree) as node:
        trace.take()
        node.cast("a", "crash")
        assert [
            ("terminate", "a", "crash"),
            ("terminate", "c", "shutdown"), ("terminate", "t", "shutdown"),
            ("init", "a"), ("init", "c"),
        ] == trace.events
        assert [("a", "running", 1), ("c", "running", 1)] == statuses(node)


async def test_a_temporary_bystander_does_not_count_against_intensity(trace: Trace) -> None:
    tree = otpy.Supervisor(
        [w("a", trace), w("t1", trace, restart="temporary"),
         w("t2", trace, restart="temporary")],
        strategy="one_for_all", max_restarts=1)
    async with otpy.open_node(tree) as node:
        node.cast("a", "crash")  # one restart; t1 and t2 are stopped, not restarted
        assert [("a", "running", 1)] == statuses(node)


async def test_a_temporary_childs_own_exit_does_not_restart_its_siblings(trace: Trace) -> None:
    tree = otpy.Supervisor([w("a", trace), w("t", trace, restart="temporary")],
                           strategy="one_for_all", max_restarts=0)
    async with otpy.open_node(tree) as node:
        trace.take()
        node.cast("t", "crash")
        assert [("terminate", "t", "crash")] == trace.events
        assert [("a", "running", 0)] == statuses(node)


# -- restart intensity -----------------------------------------------------------------


async def test_max_restarts_restarts_within_the_window_are_survived(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=3, max_seconds=5.0)
    async with otpy.open_node(tree) as node:
        for name in ("a", "b", "a"):
            node.cast(name, "crash")
        assert [("a", "running", 2), ("b", "running", 1)] == statuses(node)
    assert [] == events_named(logs, "supervisor_gave_up")


async def test_restart_number_max_restarts_plus_one_makes_the_supervisor_give_up(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=3, max_seconds=5.0)
    reached = []
    with pytest.raises(otpy.RestartIntensityExceeded):
        async with otpy.open_node(tree) as node:
            for name in ("a", "b", "a"):
                node.cast(name, "crash")
            trace.take()
            reached.append("third restart survived")
            node.cast("b", "crash")  # counted over all children: the fourth gives up
            reached.append("body went on")
            await trio.sleep(0)
            reached.append("after a checkpoint")  # pragma: no cover
    assert ["third restart survived", "body went on"] == reached
    # It stops the children that still run, in reverse order, and starts nothing.
    assert [("terminate", "b", "crash"), ("terminate", "a", "shutdown")] == trace.events


async def test_max_restarts_zero_gives_up_at_the_first_crash(trace: Trace) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=0)
    with pytest.raises(otpy.RestartIntensityExceeded) as info:
        async with otpy.open_node(tree) as node:
            trace.take()
            node.cast("a", "crash")
            await trio.sleep_forever()
    assert [("terminate", "a", "crash"), ("terminate", "b", "shutdown")] == trace.events
    assert ("root", Boom) == (info.value.supervisor, type(info.value.last_failure))


async def test_restarts_spaced_over_a_sliding_window_are_survived(
    trace: Trace, autojump_clock: trio.testing.MockClock
) -> None:
    tree = otpy.Supervisor([w("a", trace)], max_restarts=2, max_seconds=10.0)
    async with otpy.open_node(tree) as node:
        for pause in (0.0, 6.0, 5.0, 10.5, 9.0):  # at most 2 in any 10 s window
            await trio.sleep(pause)
            node.cast("a", "crash")
        assert [("a", "running", 5)] == statuses(node)


async def test_the_window_slides_rather_than_resetting(
    trace: Trace, autojump_clock: trio.testing.MockClock
) -> None:
    tree = otpy.Supervisor([w("a", trace)], max_restarts=2, max_seconds=10.0)
    crashed_at = []
    with pytest.raises(otpy.RestartIntensityExceeded):
        async with otpy.open_node(tree) as node:
            start = trio.current_time()
            # t = 0, 6, 11, 15: the restarts at 6, 11 and 15 fall within 10 s.
            for pause in (0.0, 6.0, 5.0, 4.0):
                await trio.sleep(pause)
                crashed_at.append(trio.current_time() - start)
                node.cast("a", "crash")
            await trio.sleep_forever()
    assert [0.0, 6.0, 11.0, 15.0] == crashed_at


async def test_supervisor_gave_up_is_one_event_naming_the_supervisor_and_child(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor([w("a", trace)], max_restarts=1, max_seconds=7.0)
    with pytest.raises(otpy.RestartIntensityExceeded):
        async with otpy.open_node(tree) as node:
            node.cast("a", "crash")
            node.cast("a", "crash")
            await trio.sleep_forever()
    [event] = events_named(logs, "supervisor_gave_up")
    assert ("error", "root", "a", 1, 7.0) == (
        event["log_level"], event["supervisor"], event["child"], event["max_restarts"],
        event["max_seconds"])
    assert "a crashed on 'crash'" in event["reason"]


async def test_child_restarted_event_carries_the_restart_count_and_window(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)])
    async with otpy.open_node(tree) as node:
        node.cast("a", "crash")
        node.cast("b", "crash")
        node.cast("a", "crash")
    assert [("a", 1, 1), ("b", 1, 2), ("a", 2, 3)] == [
        (e["child"], e["restarts"], e["in_window"])
        for e in events_named(logs, "child_restarted")]


async def test_a_sub_supervisor_that_gave_up_is_restarted_by_its_parent(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor(
        [w("a", trace), otpy.Supervisor([w("b", trace), w("c", trace)], name="sub",
                                        max_restarts=0)])
    async with otpy.open_node(tree) as node:
        await node.call("a", "incr")
        await node.call("c", "incr")
        trace.take()
        node.cast("b", "crash")
        assert [
            ("terminate", "b", "crash"), ("terminate", "c", "shutdown"),
            ("init", "b"), ("init", "c"),
        ] == trace.events
        assert [("a", "running", 0), ("sub", "running", 1)] == statuses(node)
        assert {"a": 1, "b": 0, "c": 0} == {n: node.get_state(n) for n in "abc"}
    assert ["sub"] == [e["supervisor"] for e in events_named(logs, "supervisor_gave_up")]


async def test_a_transient_sub_supervisor_that_gave_up_is_not_restarted(trace: Trace) -> None:
    tree = otpy.Supervisor(
        [w("a", trace),
         otpy.Supervisor([w("b", trace)], name="sub", max_restarts=0, restart="transient")],
        max_restarts=0)
    async with otpy.open_node(tree) as node:
        node.cast("b", "crash")
        assert [("a", "running", 0), ("sub", "not running", 0)] == statuses(node)
        assert ["a"] == node.servers()


async def test_escalation_through_two_levels_raises_from_open_node(
    trace: Trace, logs: list[EventDict]
) -> None:
    leaf = otpy.Supervisor([w("w", trace)], name="leaf", max_restarts=0)
    mid = otpy.Supervisor([leaf], name="mid", max_restarts=1)
    root = otpy.Supervisor([w("a", trace), mid], max_restarts=0)
    with pytest.raises(otpy.RestartIntensityExceeded) as info:
        async with otpy.open_node(root) as node:
            node.cast("w", "crash")  # leaf gives up; mid restarts it
            assert [("leaf", "running", 1)] == statuses(node, "mid")
            node.cast("w", "crash")  # leaf gives up; mid gives up; root gives up
            await trio.sleep_forever()
    assert ["leaf", "leaf", "mid", "root"] == [
        e["supervisor"] for e in events_named(logs, "supervisor_gave_up")]
    exc = info.value
    assert "root" == exc.supervisor
    assert "'root'" in str(exc)
    assert "'mid'" in str(exc)  # the child whose failure was the last straw
    # The last failure leads back, level by level, to the crash that started it.
    reason, mid_exc = exc.last_failure
    assert ("shutdown", "mid") == (reason, mid_exc.supervisor)
    reason, leaf_exc = mid_exc.last_failure
    assert ("shutdown", "leaf") == (reason, leaf_exc.supervisor)
    assert Boom is type(leaf_exc.last_failure)


async def test_when_the_root_gives_up_the_node_stops_everything(trace: Trace) -> None:
    tree = _tree(trace)
    with pytest.raises(otpy.RestartIntensityExceeded):
        async with otpy.open_node(otpy.Supervisor([tree], name="top", max_restarts=0)) as node:
            await node.call("c", "incr")
            trace.take()
            node.cast("d", ("stop", "boom"))  # root restarts d
            node.cast("d", ("stop", "boom"))
            node.cast("d", ("stop", "boom"))
            node.cast("d", ("stop", "boom"))  # root gives up; top gives up
            await trio.sleep_forever()
    terminated = [e for e in trace.events if e[0] == "terminate"]
    assert [
        ("terminate", "d", "boom"), ("terminate", "d", "boom"), ("terminate", "d", "boom"),
        ("terminate", "d", "boom"),
        ("terminate", "c", "shutdown"), ("terminate", "b", "shutdown"),
        ("terminate", "a", "shutdown"),
    ] == terminated


# -- a child whose restart keeps failing -----------------------------------------------


async def test_a_child_whose_restart_fails_is_shown_restarting_and_is_retried(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=10)
    async with otpy.open_node(tree) as node:
        trace.broken.add("b")
        node.cast("b", "crash")
        assert [("a", "running", 0), ("b", "restarting", 1)] == statuses(node)
        trace.broken.discard("b")
        await settle()
        assert [("a", "running", 0), ("b", "running", 2)] == statuses(node)
        assert 0 == await node.call("b", "get")


async def test_a_restart_that_keeps_failing_makes_the_supervisor_give_up(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=3)
    with pytest.raises(otpy.RestartIntensityExceeded) as info:
        async with otpy.open_node(tree) as node:
            trace.broken.add("b")
            node.cast("b", "crash")
            await trio.sleep_forever()
    # The crash is restart 1; each retry is one more, until number 4 is refused.
    assert ["server_crashed", "child_restart_failed", "child_restart_failed",
            "child_restart_failed", "supervisor_gave_up"] == [
        e["event"] for e in logs if e["log_level"] == "error"]
    assert [("init", "b")] * 3 == [e for e in trace.events if e == ("init", "b")][1:]
    assert "root" == info.value.supervisor


async def test_a_pending_child_restarted_by_a_sibling_crash_is_no_longer_restarting(
    trace: Trace,
) -> None:
    """Found by the model: a group restart that succeeds must clear the children it
    restarted from the retry set, or a later normal exit of a transient child shows it
    as "restarting" and the queued retry restarts it."""
    tree = otpy.Supervisor([w("z", trace), w("a", trace), w("b", trace, restart="transient")],
                           strategy="rest_for_one", max_restarts=10)
    async with otpy.open_node(tree) as node:
        node.cast("b", ("stop", "normal"))  # transient: stays stopped
        trace.broken.add("a")
        node.cast("a", "crash")  # a cannot start: a and b wait for a retry
        assert ["running", "restarting", "restarting"] == [
            c.status for c in node.which_children()]
        trace.broken.discard("a")
        node.cast("z", "crash")  # restarts z, a, b: the retry has nothing left to do
        node.cast("b", ("stop", "normal"))
        expected = [("z", "running", 1), ("a", "running", 2), ("b", "not running", 1)]
        assert expected == statuses(node)
        await settle()  # the retry queued by a's failed start
        assert expected == statuses(node)


async def test_terminate_child_stops_the_retries_of_a_restarting_child(
    trace: Trace, logs: list[EventDict]
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("b", trace)], max_restarts=1000)
    async with otpy.open_node(tree) as node:
        trace.broken.add("b")
        node.cast("b", "crash")
        await node.terminate_child("root", "b")  # the dispatcher may retry once before
        failed = len(events_named(logs, "child_restart_failed"))
        assert ["running", "not running"] == [c.status for c in node.which_children()]
        await settle()
        assert failed == len(events_named(logs, "child_restart_failed"))


# -- shutdown --------------------------------------------------------------------------


async def test_shutdown_stops_children_in_reverse_start_order_with_reason_shutdown(
    trace: Trace,
) -> None:
    async with otpy.open_node(_tree(trace)):
        trace.take()
    assert [("terminate", n, "shutdown") for n in "dcba"] == trace.events


async def test_a_terminate_that_raises_is_logged_and_the_shutdown_goes_on(
    trace: Trace, logs: list[EventDict]
) -> None:
    trace.bad_terminate.add("c")
    async with otpy.open_node(_tree(trace)):
        trace.take()
    assert [("terminate", n, "shutdown") for n in "dcba"] == trace.events
    [event] = events_named(logs, "terminate_crashed")
    assert ("c", "'shutdown'", Boom) == (
        event["server"], event["reason"], type(event["exc_info"]))


class Tasker(otpy.GenServer[int]):
    """Starts two tasks in init, one of 1 s and one of 100 s, that record how they end."""

    def init(self, arg: list[tuple[str, str, float]]) -> int:
        self.ends = arg
        for seconds, tag in ((1.0, "short"), (100.0, "long")):
            self.start_task(self._sleep, seconds, tag, tag=tag)
        return 0

    async def _sleep(self, seconds: float, tag: str) -> None:
        t0 = trio.current_time()
        try:
            await trio.sleep(seconds)
        except trio.Cancelled:
            self.ends.append(("cancelled", tag, trio.current_time() - t0))
            raise
        self.ends.append(("finished", tag, trio.current_time() - t0))


async def test_the_shutdown_grace_bounds_how_long_a_servers_tasks_get(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends: list[tuple[str, str, float]] = []
    async with otpy.open_node(otpy.Supervisor([otpy.Child("t", Tasker, ends, shutdown=2.0)])):
        pass
    assert [("finished", "short", 1.0), ("cancelled", "long", 2.0)] == ends


async def test_terminate_child_gives_the_tasks_the_shutdown_grace(
    autojump_clock: trio.testing.MockClock,
) -> None:
    ends: list[tuple[str, str, float]] = []
    tree = otpy.Supervisor([otpy.Child("t", Tasker, ends, shutdown=3.0)])
    async with otpy.open_node(tree) as node:
        await node.terminate_child("root", "t")
        await trio.sleep(50)
        assert [("finished", "short", 1.0), ("cancelled", "long", 3.0)] == ends


async def test_a_crashed_servers_tasks_are_cancelled_at_once(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class CrashingTasker(Tasker):
        def handle_cast(self, message: Any, state: int) -> int:
            raise Boom("crash")

    ends: list[tuple[str, str, float]] = []
    tree = otpy.Supervisor([otpy.Child("t", CrashingTasker, ends, shutdown=3.0)],
                           max_restarts=0)
    with pytest.raises(otpy.RestartIntensityExceeded):
        async with otpy.open_node(tree) as node:
            node.cast("t", "crash")
            await trio.sleep_forever()
    assert [("cancelled", "long", 0.0), ("cancelled", "short", 0.0)] == sorted(ends)


# -- messages around a restart ---------------------------------------------------------


async def test_messages_queued_for_a_crashed_server_are_served_by_its_restart(
    trace: Trace,
) -> None:
    async with otpy.open_node(otpy.Supervisor([w("a", trace)])) as node:
        await node.call("a", "incr")
        node.suspend("a")
        node.cast("a", "crash")
        node.cast("a", "incr")
        node.cast("a", "incr")
        node.resume("a")
        assert 3 == await node.call("a", "incr")
        assert [("a", "running", 1)] == statuses(node)


async def test_a_call_right_after_a_crash_finds_the_restarted_server(trace: Trace) -> None:
    class Prober(otpy.GenServer[None]):
        def handle_call(self, request: Any, caller: otpy.Caller, state: None) -> Any:
            try:
                self.call("a", "crash")
            except otpy.ServerCrashed as exc:
                crashed = type(exc.__cause__)
            return otpy.Reply((crashed, self.call("a", "get")), state)

    tree = otpy.Supervisor([w("a", trace), otpy.Child("p", Prober)])
    async with otpy.open_node(tree) as node:
        await node.call("a", "incr")
        assert (Boom, 0) == await node.call("p", "probe")


async def test_a_queued_call_to_a_child_that_is_not_restarted_fails_at_once(
    trace: Trace,
) -> None:
    tree = otpy.Supervisor([w("a", trace), w("t", trace, restart="temporary")])
    async with otpy.open_node(tree) as node:
        node.suspend("t")
        node.cast("t", ("stop", "normal"))
        async with trio.open_nursery() as nursery:
            failures: list[type[BaseException]] = []

            async def waiting_call() -> None:
                try:
                    await node.call("t", "get")
                except otpy.OtpyError as exc:
                    failures.append(type(exc))

            nursery.start_soon(waiting_call)
            await settle()
            node.resume("t")
        assert [otpy.ServerStopped] == failures


# -- dynamic control -------------------------------------------------------------------


async def test_which_children_lists_id_kind_status_vsn_and_restarts(trace: Trace) -> None:
    trace.ignore.add("c")
    async with otpy.open_node(_tree(trace)) as node:
        node.cast("a", "crash")
        assert [
            otpy.ChildInfo("a", "worker", "running", "1", 1),
            otpy.ChildInfo("sub", "supervisor", "running", None, 0),
            otpy.ChildInfo("d", "worker", "running", "1", 0),
        ] == node.which_children("root")
        assert [
            otpy.ChildInfo("b", "worker", "running", "1", 0),
            otpy.ChildInfo("c", "worker", "not running", "1", 0),
        ] == node.which_children("sub")


async def test_count_children_counts_specs_active_supervisors_and_workers(
    trace: Trace,
) -> None:
    trace.ignore.add("d")
    async with otpy.open_node(_tree(trace)) as node:
        assert {"specs": 3, "active": 2, "supervisors": 1, "workers": 2} == (
            node.count_children("root"))
        assert {"specs": 2, "active": 2, "supervisors": 0, "workers": 2} == (
            node.count_children("sub"))


async def test_start_child_starts_and_lists_a_worker(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.take()
        info = await node.start_child("sub", w("e", trace))
        assert otpy.ChildInfo("e", "worker", "running", "1", 0) == info
        assert [("init", "e")] == trace.events
        assert ["b", "c", "e"] == [c.id for c in node.which_children("sub")]
        assert 1 == await node.call("e", "incr")


async def test_start_child_starts_a_supervisor_with_its_children(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.take()
        info = await node.start_child(
            "root", otpy.Supervisor([w("x", trace), w("y", trace)], name="sub2"))
        assert otpy.ChildInfo("sub2", "supervisor", "running", None, 0) == info
        assert [("init", "x"), ("init", "y")] == trace.events
        assert [("x", "running", 0), ("y", "running", 0)] == statuses(node, "sub2")


async def test_a_dynamically_started_child_is_supervised(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.start_child("sub", w("e", trace))
        await node.call("e", "incr")
        node.cast("e", "crash")
        assert [("b", "running", 0), ("c", "running", 0), ("e", "running", 1)] == (
            statuses(node, "sub"))
        assert 0 == node.get_state("e")


async def test_start_child_with_the_id_of_a_running_child_is_refused(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await node.start_child("sub", w("b", trace))
        assert "supervisor 'sub' already has a child 'b' (running)" in str(info.value)


async def test_start_child_with_the_id_of_a_stopped_child_is_refused(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("sub", "b")
        with pytest.raises(otpy.SupervisorError) as info:
            await node.start_child("sub", w("b", trace))
        assert "supervisor 'sub' already has a child 'b' (not running)" in str(info.value)


@pytest.mark.parametrize("name", ["a", "sub", "root"])
async def test_start_child_with_a_name_used_elsewhere_in_the_node_is_refused(
    trace: Trace, name: str
) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.take()
        with pytest.raises(otpy.SupervisorError) as info:
            await node.start_child("sub", w(name, trace))
        assert f"the name {name!r} is already used in the node" in str(info.value)
        assert ([], ["b", "c"]) == (trace.events, [c.id for c in node.which_children("sub")])


async def test_start_child_of_a_supervisor_whose_subtree_clashes_is_refused(
    trace: Trace,
) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await node.start_child("root", otpy.Supervisor([w("b", trace)], name="sub2"))
        assert "'b'" in str(info.value)
        assert ["a", "sub", "d"] == [c.id for c in node.which_children("root")]


async def test_a_name_held_by_a_stopped_child_cannot_be_taken_twice(trace: Trace) -> None:
    """A worker started elsewhere under the name of a stopped child must not be
    replaced in the registry when that child is restarted."""
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("sub", "b")
        try:
            await node.start_child("root", w("b", trace))
        except otpy.SupervisorError:
            return  # refused up front: fine
        await node.call("b", "incr")
        with pytest.raises(otpy.StartFailed) as info:
            await node.restart_child("sub", "b")
        assert "the name 'b' is already used by another server" in str(info.value)
        assert 1 == node.get_state("b")  # root's b still holds the name
        assert ("running", "not running") == (
            node.which_children("root")[-1].status, node.which_children("sub")[0].status)


@pytest.mark.parametrize("spec", [Worker, "b", {"id": "b"}, None])
async def test_start_child_needs_a_child_or_supervisor_spec(trace: Trace, spec: Any) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await node.start_child("sub", spec)
        assert "start_child needs an otpy.Child or otpy.Supervisor" in str(info.value)


async def test_start_child_whose_init_fails_raises_and_keeps_no_spec(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.broken.add("e")
        with pytest.raises(otpy.StartFailed) as info:
            await node.start_child("sub", w("e", trace))
        assert ("e", Boom) == (info.value.child, type(info.value.__cause__))
        assert ["b", "c"] == [c.id for c in node.which_children("sub")]


@pytest.mark.parametrize(("restart", "kept"), [("permanent", True), ("temporary", False)])
async def test_start_child_whose_init_ignores(trace: Trace, restart: str, kept: bool) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.ignore.add("e")
        info = await node.start_child("sub", w("e", trace, restart=restart))
        assert ("e", "not running") == (info.id, info.status)
        assert kept == ("e" in [c.id for c in node.which_children("sub")])


async def test_terminate_child_stops_it_and_keeps_its_spec(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.take()
        await node.terminate_child("sub", "b")
        assert [("terminate", "b", "shutdown")] == trace.events  # not restarted
        assert [("b", "not running", 0), ("c", "running", 0)] == statuses(node, "sub")
        with pytest.raises(otpy.NoSuchServer):
            await node.call("b", "get")


async def test_terminate_child_twice_is_fine(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("sub", "b")
        trace.take()
        await node.terminate_child("sub", "b")
        assert ([], "not running") == (trace.events, node.which_children("sub")[0].status)


async def test_terminate_child_of_a_temporary_child_removes_its_spec(trace: Trace) -> None:
    tree = otpy.Supervisor([w("a", trace), w("t", trace, restart="temporary")])
    async with otpy.open_node(tree) as node:
        await node.terminate_child("root", "t")
        assert [("a", "running", 0)] == statuses(node)


async def test_terminate_child_of_a_supervisor_stops_its_subtree_in_reverse(
    trace: Trace,
) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        trace.take()
        await node.terminate_child("root", "sub")
        assert [("terminate", "c", "shutdown"), ("terminate", "b", "shutdown")] == (
            trace.events)
        assert [("a", "running", 0), ("sub", "not running", 0), ("d", "running", 0)] == (
            statuses(node))
        with pytest.raises(otpy.NoSuchServer):
            node.which_children("sub")


async def test_restart_child_starts_a_stopped_child_afresh(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.call("b", "incr")
        await node.terminate_child("sub", "b")
        trace.take()
        info = await node.restart_child("sub", "b")
        assert otpy.ChildInfo("b", "worker", "running", "1", 0) == info
        assert [("init", "b")] == trace.events
        assert 0 == await node.call("b", "get")


async def test_restart_child_of_a_stopped_supervisor_starts_its_subtree(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("root", "sub")
        trace.take()
        await node.restart_child("root", "sub")
        assert [("init", "b"), ("init", "c")] == trace.events
        assert [("b", "running", 0), ("c", "running", 0)] == statuses(node, "sub")


async def test_restart_child_of_a_running_child_is_refused(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await node.restart_child("sub", "b")
        assert "child 'b' of supervisor 'sub' is running" in str(info.value)


async def test_restart_child_whose_init_fails_keeps_the_spec_not_running(
    trace: Trace,
) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("sub", "b")
        trace.broken.add("b")
        with pytest.raises(otpy.StartFailed) as info:
            await node.restart_child("sub", "b")
        assert "b" == info.value.child
        assert [("b", "not running", 0), ("c", "running", 0)] == statuses(node, "sub")


async def test_delete_child_removes_a_stopped_childs_spec(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        await node.terminate_child("sub", "b")
        await node.delete_child("sub", "b")
        assert [("c", "running", 0)] == statuses(node, "sub")
        await node.start_child("sub", w("b", trace))  # the id is free again
        assert [("c", "running", 0), ("b", "running", 0)] == statuses(node, "sub")


async def test_delete_child_of_a_running_child_is_refused(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await node.delete_child("sub", "b")
        assert "child 'b' of supervisor 'sub' is running" in str(info.value)
        assert "terminate_child" in str(info.value)


@pytest.mark.parametrize("op", ["terminate_child", "restart_child", "delete_child"])
async def test_an_unknown_child_id_is_refused_naming_it(trace: Trace, op: str) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.SupervisorError) as info:
            await getattr(node, op)("sub", "nope")
        assert "supervisor 'sub' has no child 'nope'; its children are ['b', 'c']" in str(
            info.value)


@pytest.mark.parametrize(
    ("op", "args"),
    [("which_children", ()), ("count_children", ()), ("start_child", (None,)),
     ("terminate_child", ("b",)), ("restart_child", ("b",)), ("delete_child", ("b",))],
)
async def test_an_unknown_supervisor_is_no_such_server(
    trace: Trace, op: str, args: tuple[Any, ...]
) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.NoSuchServer) as info:
            result = getattr(node, op)("nosup", *args)
            if op not in ("which_children", "count_children"):
                await result
        assert "'nosup'" in str(info.value)


async def test_a_worker_is_not_a_supervisor_for_control_calls(trace: Trace) -> None:
    async with otpy.open_node(_tree(trace)) as node:
        with pytest.raises(otpy.NoSuchServer):
            node.which_children("a")
