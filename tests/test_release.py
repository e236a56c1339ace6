"""Live release upgrades: typed, atomic, zero-loss, with downgrades and versioned clients."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import otpy

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
sys.path.insert(0, str(RELEASES))

from counter_v1 import Counter as CounterV1  # noqa: E402
from counter_v2 import Counter as CounterV2  # noqa: E402
from counter_v3 import Counter as CounterV3  # noqa: E402


def counters(n: int, cls: type[otpy.GenServer[Any]] = CounterV1) -> otpy.Supervisor:
    return otpy.Supervisor([otpy.Child(f"c{i}", cls) for i in range(n)])


async def incr(node: otpy.Node, name: str, times: int) -> None:
    for _ in range(times):
        assert "ok" == await node.call(name, "incr")


V2 = otpy.Release("2", [otpy.Update(CounterV1, CounterV2)])


async def test_upgrade_migrates_state_then_counts_on() -> None:
    """The seed scenario: two increments on v1, upgrade, state (2, 2), then (2, 3)."""
    async with otpy.open_node(counters(1)) as node:
        await incr(node, "c0", 2)
        report = await node.upgrade(V2)
        assert ["c0"] == report["servers"]
        assert (2, 2) == node.get_state("c0")
        assert "2" == node.vsn_of("c0")
        await incr(node, "c0", 1)
        assert (2, 3) == node.get_state("c0")
        assert 3 == await node.call("c0", "count")
        assert "ok" == await node.call("c0", "reset")
        assert (2, 0) == node.get_state("c0")


async def test_second_upgrade_expecting_old_version_changes_nothing(logs: list[Any]) -> None:
    async with otpy.open_node(counters(2)) as node:
        await node.upgrade(V2)
        again = otpy.Release("2b", [otpy.Update(CounterV1, CounterV2)])
        with pytest.raises(otpy.UpgradeFailed) as info:
            await node.upgrade(again)
        assert "server 'c0' runs version 2; this update expects version 1" in str(info.value)
        assert {"c0", "c1"} == set(info.value.failures)
        assert ["2", "2"] == [node.vsn_of("c0"), node.vsn_of("c1")]
        assert ["2"] == [r.vsn for r in node.releases()]


async def test_name_target_with_wrong_from_vsn_is_refused() -> None:
    async with otpy.open_node(counters(1)) as node:
        update = otpy.Update("c0", CounterV2, from_vsn="7")
        with pytest.raises(otpy.UpgradeFailed, match="runs version 1; this update expects "
                                                     "version 7"):
            await node.upgrade(otpy.Release("2", [update]))
        assert 0 == node.get_state("c0")


@pytest.mark.parametrize(
    ("update", "message"),
    [
        (otpy.Update("nope", CounterV2), "no server named 'nope'"),
        (otpy.Update(CounterV2, CounterV3), "no running server runs"),
        (otpy.Update("c0", CounterV1), "already runs version 1"),
    ],
)
async def test_update_that_cannot_apply_is_refused(update: otpy.Update, message: str) -> None:
    async with otpy.open_node(counters(1)) as node:
        with pytest.raises(otpy.UpgradeFailed, match=message):
            await node.upgrade(otpy.Release("2", [update]))
        assert "1" == node.vsn_of("c0")
        assert [] == node.releases()


class FussyV2(CounterV2):
    """Refuses to migrate a counter that stands at 3."""

    vsn = "2f"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if state == 3:
            raise ValueError("cannot migrate 3")
        return super().code_change(old_vsn, state, extra)


class BadTypeV2(CounterV2):
    """Migrates one server to a state of the wrong shape."""

    vsn = "2t"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        return (state, "three") if state == 3 else (state, state)


@pytest.mark.parametrize(
    ("new_class", "reason"),
    [(FussyV2, "ValueError: cannot migrate 3"), (BadTypeV2, "at [1]")],
)
async def test_one_failed_migration_among_many_changes_nothing(
    new_class: type[otpy.GenServer[Any]], reason: str, logs: list[Any]
) -> None:
    """Atomic: 600 servers (several migration chunks); the one at 3 fails; nobody moves."""
    async with otpy.open_node(counters(600)) as node:
        await incr(node, "c417", 3)
        await incr(node, "c1", 1)
        with pytest.raises(otpy.UpgradeFailed) as info:
            await node.upgrade(otpy.Release("2", [otpy.Update(CounterV1, new_class)]))
        assert ["c417"] == list(info.value.failures)
        assert reason in info.value.failures["c417"]
        assert {"1"} == {node.vsn_of(f"c{i}") for i in range(600)}
        assert (3, 1, 0) == (node.get_state("c417"), node.get_state("c1"),
                             node.get_state("c0"))
        # Every server resumed on its old code.
        assert "ok" == await node.call("c417", "incr")
        assert 4 == await node.call("c417", "count")
    assert ["upgrade_rolled_back"] == [e["event"] for e in logs if "upgrade" in e["event"]]


async def test_wrong_state_type_error_names_server_and_path() -> None:
    async with otpy.open_node(counters(1)) as node:
        await incr(node, "c0", 3)
        with pytest.raises(otpy.UpgradeFailed) as info:
            await node.upgrade(otpy.Release("2", [otpy.Update(CounterV1, BadTypeV2)]))
        message = info.value.failures["c0"]
        assert "StateTypeError" in message
        assert "server 'c0'" in message
        assert "tuple[int, int]" in message
        assert "'three'" in message


async def test_downgrade_restores_v1_states_and_class(logs: list[Any]) -> None:
    async with otpy.open_node(counters(3)) as node:
        await incr(node, "c0", 2)
        await incr(node, "c2", 5)
        await node.upgrade(V2)
        await incr(node, "c0", 1)
        report = await node.downgrade()
        assert report["downgrade"]
        assert [3, 0, 5] == [node.get_state(f"c{i}") for i in range(3)]
        assert {"1"} == {node.vsn_of(f"c{i}") for i in range(3)}
        assert [] == node.releases()
        with pytest.raises(otpy.UpgradeFailed, match="no installed release"):
            await node.downgrade()
    events = [e["event"] for e in logs if e["event"].startswith("upgrade")]
    assert ["upgrade_committed", "upgrade_committed"] == events


async def test_upgrade_chain_and_downgrade_chain() -> None:
    async with otpy.open_node(counters(1)) as node:
        await incr(node, "c0", 2)
        await node.upgrade(V2)
        await node.upgrade(otpy.Release("3", [otpy.Update(CounterV2, CounterV3, extra=True)]))
        assert (2, 2, True) == node.get_state("c0")
        assert False is await node.call("c0", "toggle")
        await incr(node, "c0", 1)  # disabled: does not count
        assert ["2", "3"] == [r.vsn for r in node.releases()]
        await node.downgrade()
        assert (2, 2) == node.get_state("c0")
        await node.downgrade()
        assert 2 == node.get_state("c0")


async def test_ping_pong_with_upgrade_before_fifth_call_gets_ten_replies() -> None:
    """No call fails or is lost across the upgrade; calls after it see the new code."""
    replies: list[Any] = []
    async with otpy.open_node(counters(1)) as node:
        upgraded = trio.Event()
        reached_five = trio.Event()

        async def client() -> None:
            for i in range(10):
                if i == 4:
                    reached_five.set()
                    await upgraded.wait()
                replies.append(await node.call("c0", "incr"))
            replies.append(await node.call("c0", "count"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(client)
            await reached_five.wait()
            await node.upgrade(V2)
            upgraded.set()
        assert (4, 10) == node.get_state("c0")
    assert ["ok"] * 10 + [10] == replies


async def test_calls_during_upgrade_wait_and_are_served_by_new_code() -> None:
    """Calls to held servers queue; others keep serving; none fails."""
    root = otpy.Supervisor([
        otpy.Child("outside", CounterV2),
        *(otpy.Child(f"c{i}", CounterV1) for i in range(2000)),
    ])
    async with otpy.open_node(root) as node:
        await incr(node, "c1999", 1)
        seen: list[Any] = []
        outside_calls = 0
        done = False

        async def caller() -> None:
            while not done:
                seen.append(await node.call("c1999", "count"))

        async def bystander() -> None:
            nonlocal outside_calls
            while not done:
                assert "ok" == await node.call("outside", "incr")
                outside_calls += 1

        async with trio.open_nursery() as nursery:
            nursery.start_soon(caller)
            nursery.start_soon(bystander)
            await trio.sleep(0)
            await node.upgrade(V2)
            done = True
        assert {1} == set(seen)  # v1 count 1, then v2 count of (1, 1): 1
        assert outside_calls > 2  # served between migration chunks
        assert (1, 1) == node.get_state("c1999")


class Ticker(otpy.GenServer[int]):
    vsn = "1"

    def init(self, arg: Any) -> int:
        self.send_after(10.0, self.name, "tick")
        self.start_task(self.fetch, tag="io")
        return 0

    async def fetch(self) -> str:
        await trio.sleep(20.0)
        return "fetched"

    def handle_info(self, message: Any, state: int) -> int:
        return state + 1

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        return otpy.Reply(state, state)


class TickerV2(Ticker):
    vsn = "2"

    def handle_info(self, message: Any, state: int) -> int:
        return state + 100


async def test_timer_and_task_survive_upgrade(autojump_clock: trio.testing.MockClock) -> None:
    async with otpy.open_node(otpy.Supervisor([otpy.Child("t", Ticker)])) as node:
        await node.upgrade(otpy.Release("2", [otpy.Update(Ticker, TickerV2)]))
        await trio.sleep(30.0)
        assert 200 == await node.call("t", "get")  # both arrived, served by v2


class Crashy(CounterV2):
    vsn = "2c"


async def test_restart_after_upgrade_starts_new_class_and_downgrade_puts_old_back() -> None:
    async with otpy.open_node(counters(1)) as node:
        await node.upgrade(otpy.Release("2", [otpy.Update(CounterV1, Crashy)]))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c0", "bogus")
        assert "2c" == node.vsn_of("c0")
        assert (0, 0) == node.get_state("c0")
        await node.downgrade()
        with pytest.raises(otpy.ServerCrashed):
            await node.call("c0", "bogus")
        assert "1" == node.vsn_of("c0")


@pytest.mark.parametrize("strategy", ["rest_for_one", "one_for_all"])
async def test_a_subtree_restart_starts_the_installed_release(strategy: str) -> None:
    """A crash that makes a parent restart the supervisor of an upgraded server brings
    that server back on the new class (as in OTP), and the downgrade still applies."""
    sub = otpy.Supervisor([otpy.Child("deep", CounterV1)], name="sub")
    root = otpy.Supervisor([otpy.Child("first", Crashy), sub], strategy=strategy)
    async with otpy.open_node(root) as node:
        await node.upgrade(otpy.Release("2", [otpy.Update(CounterV1, CounterV2)]))
        with pytest.raises(otpy.ServerCrashed):
            await node.call("first", "bogus")  # restarts first, then sub and deep
        assert 1 == next(c.restarts for c in node.which_children() if c.id == "sub")
        assert "2" == node.vsn_of("deep")
        assert "2" == node.which_children("sub")[0].vsn
        await node.downgrade()
        assert "1" == node.vsn_of("deep")


async def test_restart_child_and_start_child_start_the_installed_release() -> None:
    """restart_child of an upgraded child, and start_child of a spec naming the class a
    release replaced, start the new class; a name-targeted update follows only that
    name, and delete_child forgets it."""
    root = otpy.Supervisor([otpy.Child("a", CounterV1), otpy.Child("b", CounterV1)])
    async with otpy.open_node(root) as node:
        await node.upgrade(otpy.Release("2", [otpy.Update(CounterV1, CounterV2)]))
        await node.terminate_child("root", "a")
        await node.restart_child("root", "a")
        assert "2" == node.vsn_of("a")
        await node.start_child("root", otpy.Child("c", CounterV1))
        assert "2" == node.vsn_of("c")
        await node.upgrade(otpy.Release("3", [otpy.Update("b", CounterV3, from_vsn="2")]))
        await node.terminate_child("root", "b")
        await node.delete_child("root", "b")
        await node.start_child("root", otpy.Child("b", CounterV1))
        assert "2" == node.vsn_of("b")  # the class upgrade of release 2 still applies


class WireV1(otpy.GenServer[int]):
    """Version 1 protocol: "incr" -> "ok"."""

    vsn = "1"

    def init(self, arg: Any) -> int:
        return 0

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request == "incr":
            return otpy.Reply("ok", state + 1)
        return otpy.Reply(state, state)


class WireV2(otpy.GenServer[int]):
    """Version 2 protocol: ("add", n) -> {"count": total}; old clients are adapted."""

    vsn = "2"

    def handle_call(self, request: Any, caller: otpy.Caller, state: int) -> Any:
        if request[0] == "add":
            return otpy.Reply({"count": state + request[1]}, state + request[1])
        return otpy.Reply({"count": state}, state)

    def upgrade_request(self, client_vsn: str, request: Any) -> Any:
        return ("add", 1) if request == "incr" else ("get",)

    def downgrade_reply(self, client_vsn: str, reply: Any) -> Any:
        return "ok" if isinstance(reply, dict) else reply


async def test_versioned_client_keeps_working_after_upgrade() -> None:
    async with otpy.open_node(otpy.Supervisor([otpy.Child("w", WireV1)])) as node:
        assert "ok" == await node.call("w", "incr", vsn="1")
        await node.upgrade(otpy.Release("2", [otpy.Update(WireV1, WireV2)]))
        assert "ok" == await node.call("w", "incr", vsn="1")
        assert {"count": 5} == await node.call("w", ("add", 3), vsn="2")
        assert {"count": 5} == await node.call("w", ("get",))


async def test_release_files_upgrade_and_downgrade() -> None:
    async with otpy.open_node(counters(2)) as node:
        await incr(node, "c1", 2)
        await node.upgrade(otpy.Release.load(RELEASES / "v2.toml"))
        await node.upgrade(otpy.Release.load(RELEASES / "v3.toml"))
        assert (2, 2, True) == node.get_state("c1")
        assert ["2", "3"] == [r.vsn for r in node.releases()]
        with pytest.raises(otpy.UpgradeFailed, match="already installed"):
            await node.upgrade(otpy.Release.load(RELEASES / "v3.toml"))
        await node.downgrade()
        await node.downgrade()
        assert [0, 2] == [node.get_state("c0"), node.get_state("c1")]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('vsn = "9"\n[[updates]]\ntarget = "counter_v1:Counter"\nnew = "missing_mod:C"\n',
         "failed to import"),
        ('vsn = "9"\n[[updates]]\ntarget = "counter_v1:Counter"\nnew = "counter_v2:Nope"\n',
         "has no GenServer class 'Nope'"),
        ('vsn = "9"\n[[updates]]\nnew = "counter_v2:Counter"\n', "exactly one of"),
        ('[[updates]]\ntarget = "a:B"\nnew = "counter_v2:Counter"\n', "needs a string 'vsn'"),
        ('vsn = "9"\n', "at least one \\[\\[updates"),
        ("vsn = [", "cannot read release file"),
        ('vsn = "9"\n[[updates]]\ntarget = "counter_v1:Counter"\nnew = "broken:C"\n',
         "ZeroDivisionError"),
    ],
)
def test_bad_release_file_is_refused_before_anything_runs(
    tmp_path: Path, text: str, message: str
) -> None:
    for name in ("counter_v1", "counter_v2"):
        (tmp_path / f"{name}.py").write_text((RELEASES / f"{name}.py").read_text())
    (tmp_path / "broken.py").write_text("1 / 0\n")
    release = tmp_path / "r.toml"
    release.write_text(f'code = "."\n{text}')
    with pytest.raises(otpy.UpgradeFailed, match=message):
        otpy.Release.load(release)


def test_release_and_update_arguments_are_checked() -> None:
    with pytest.raises(TypeError, match=r"subclass of otpy\.GenServer"):
        otpy.Update(CounterV1, dict)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="no updates"):
        otpy.Release("2", [])
    with pytest.raises(TypeError, match="non-empty string"):
        otpy.Release(2, [otpy.Update(CounterV1, CounterV2)])  # type: ignore[arg-type]


async def test_a_second_upgrade_while_one_runs_is_refused() -> None:
    async with otpy.open_node(counters(1000)) as node:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.upgrade, V2)
            await trio.sleep(0)
            await trio.sleep(0)  # the first upgrade is now between two chunks
            with pytest.raises(otpy.UpgradeFailed, match="is being installed"):
                await node.upgrade(otpy.Release("3", [otpy.Update(CounterV2, CounterV3)]))
        assert ["2"] == [r.vsn for r in node.releases()]


async def test_a_restart_while_a_large_release_is_planned_rolls_it_back() -> None:
    """A release of many servers is planned in chunks, the node serving between them;
    a target that restarts meanwhile makes the whole release fail, nothing changed."""
    async with otpy.open_node(counters(3000)) as node:
        await incr(node, "c0", 2)
        outcome: list[BaseException] = []

        async def upgrade() -> None:
            try:
                await node.upgrade(V2)
            except otpy.UpgradeFailed as exc:
                outcome.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(upgrade)
            await trio.sleep(0)  # the upgrade has planned its first chunk
            assert "ok" == await node.call("c2999", "incr")  # served meanwhile
            await node.terminate_child("root", "c2999")
            await node.restart_child("root", "c2999")
        [failed] = outcome
        assert isinstance(failed, otpy.UpgradeFailed)
        assert {"c2999"} == set(failed.failures)
        assert "restarted during the upgrade" in failed.failures["c2999"]
        assert {"1"} == {node.vsn_of(f"c{i}") for i in range(3000)}
        assert 2 == node.get_state("c0")
        assert [] == node.releases()


PROTECTED: list[bool] = []


class WatchfulV2(CounterV2):
    """Records, for each migration of c0, whether Ctrl-C was held off meanwhile."""

    vsn = "2w"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if self.name == "c0":
            PROTECTED.append(trio.lowlevel.currently_ki_protected())
        return super().code_change(old_vsn, state, extra)


async def test_the_commit_is_shielded_from_keyboard_interrupt() -> None:
    """A Ctrl-C during the commit waits for the next checkpoint, so it can never
    leave a release half swapped: the commit (here re-migrating a server that was
    called during the migration) runs KI-protected; the chunked migration does not."""
    PROTECTED.clear()
    async with otpy.open_node(counters(2000)) as node:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(node.upgrade, otpy.Release("2w", [
                otpy.Update(CounterV1, WatchfulV2)]))
            await trio.sleep(0)
            while not PROTECTED:  # c0 has been migrated: now make it stale
                await trio.sleep(0)
            await incr(node, "c0", 1)
        assert [False, True] == PROTECTED
        assert (1, 1) == node.get_state("c0")
