"""otpy.testing.check_code_change: it passes good migrations and names the example
that breaks a bad one (wrong type, not msgpack-safe, lossy downgrade, impure)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st

import otpy
import otpy.testing as ot

RELEASES = Path(__file__).resolve().parent.parent / "examples" / "releases"
sys.path.insert(0, str(RELEASES))

from counter_v1 import Counter as CounterV1  # noqa: E402
from counter_v2 import Counter as CounterV2  # noqa: E402
from counter_v3 import Counter as CounterV3  # noqa: E402

INT64 = st.integers(-(2**63), 2**63 - 1)
FAST = {"max_examples": 30}
# The same examples every run, so that what a test says the check finds, it finds.
FIXED = settings(derandomize=True, database=None)


def test_the_example_counter_migrations_pass() -> None:
    """counter v1 -> v2 -> v3, with their downgrades, pass every check."""
    ot.check_code_change(CounterV1, CounterV2, INT64, **FAST)
    ot.check_code_change(CounterV2, CounterV3, st.tuples(INT64, INT64),
                         extra=st.none() | st.booleans(), **FAST)


def test_an_int_beyond_64_bits_does_not_survive_msgpack() -> None:
    """An int msgpack cannot encode is reported, with the state."""
    with pytest.raises(ot.MigrationCheckFailed, match="cannot be encoded with msgpack") as info:
        ot.check_code_change(CounterV1, CounterV2, st.integers(min_value=2**64), **FAST)
    assert info.value.state >= 2**64


class WrongType(otpy.GenServer[tuple[int, int]]):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return state[1]
        return [state, state]  # a list, where the state type says tuple


def test_a_wrong_type_migration_fails_naming_the_example() -> None:
    """A migration that returns a list for a tuple type fails on the first state."""
    with pytest.raises(ot.MigrationCheckFailed, match=r"is not a tuple\[int, int\]") as info:
        ot.check_code_change(CounterV1, WrongType, INT64, **FAST)
    assert isinstance(info.value, AssertionError)
    assert "old state 0" in str(info.value)  # shrunk to the simplest state


class ListState(otpy.GenServer[list[int]]):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return state[0]
        return [state]


class SetState(otpy.GenServer[frozenset[int]]):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return next(iter(state))
        return frozenset([state])


def test_a_state_msgpack_cannot_carry_fails_the_round_trip() -> None:
    """A list comes back as a tuple, a set cannot be encoded: both are reported; with
    ``round_trip=False`` the same migrations pass."""
    with pytest.raises(ot.MigrationCheckFailed, match="does not survive a msgpack round trip"):
        ot.check_code_change(CounterV1, ListState, INT64, **FAST)
    with pytest.raises(ot.MigrationCheckFailed, match="cannot be encoded with msgpack"):
        ot.check_code_change(CounterV1, SetState, INT64, **FAST)
    ot.check_code_change(CounterV1, ListState, INT64, round_trip=False, **FAST)
    ot.check_code_change(CounterV1, SetState, INT64, round_trip=False, **FAST)


class Lossy(CounterV2):
    vsn = "2lossy"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if old_vsn == otpy.Down("1"):
            return min(state[1], 100)  # loses counts above 100
        return (state, state)


def test_a_lossy_downgrade_fails_on_a_state_it_loses() -> None:
    """The downgrade must give back the original old state; shrinking finds 101."""
    with pytest.raises(ot.MigrationCheckFailed, match="lossy") as info:
        ot.check_code_change(CounterV1, Lossy, INT64, max_examples=200, settings=FIXED)
    assert 101 == info.value.state


def test_settings_are_the_base_and_max_examples_overrides_them() -> None:
    """A settings object's own max_examples is used when none is given."""
    calls = []

    class Counting(CounterV2):
        vsn = "2counting"

        def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
            calls.append(old_vsn)
            return super().code_change(old_vsn, state, extra)

    ot.check_code_change(CounterV1, Counting, INT64,
                         settings=settings(max_examples=3, database=None))
    ups = [c for c in calls if c == "1"]
    assert 2 <= len(ups) <= 2 * 3  # each example migrates twice (the purity check)


class NoDowngrade(CounterV2):
    vsn = "2nodown"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if isinstance(old_vsn, otpy.Down):
            raise NotImplementedError("version 2nodown cannot go back")
        return (state, state)


class BrokenDowngrade(CounterV2):
    vsn = "2broken"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        if isinstance(old_vsn, otpy.Down):
            return state[2]  # IndexError
        return (state, state)


def test_downgrade_is_checked_unless_the_version_says_it_has_none() -> None:
    """NotImplementedError means "no downgrade" (skipped by default, a failure with
    ``downgrade=True``); any other error from the downgrade is a failure."""
    ot.check_code_change(CounterV1, NoDowngrade, INT64, **FAST)
    with pytest.raises(ot.MigrationCheckFailed, match="NotImplementedError"):
        ot.check_code_change(CounterV1, NoDowngrade, INT64, downgrade=True, **FAST)
    with pytest.raises(ot.MigrationCheckFailed, match="IndexError"):
        ot.check_code_change(CounterV1, BrokenDowngrade, INT64, **FAST)
    ot.check_code_change(CounterV1, BrokenDowngrade, INT64, downgrade=False, **FAST)


class DictV1(otpy.GenServer[dict[str, int]]):
    vsn = "1"


class MutatesInPlace(otpy.GenServer[dict[str, int]]):
    vsn = "2"

    def code_change(self, old_vsn: Any, state: Any, extra: Any) -> Any:
        state["migrated"] = 1  # changes the old state: a rollback would keep this
        return state


def test_a_migration_that_changes_the_old_state_in_place_fails() -> None:
    """An upgrade that rolls back keeps the old state, so code_change must not touch
    it."""
    with pytest.raises(ot.MigrationCheckFailed, match="in place"):
        ot.check_code_change(DictV1, MutatesInPlace, st.dictionaries(st.text(), INT64),
                             **FAST)


def test_a_strategy_of_wrong_old_states_is_reported() -> None:
    """States that are not of the old type are the test's mistake, and it says so."""
    with pytest.raises(ot.MigrationCheckFailed, match="strategy generated a state"):
        ot.check_code_change(CounterV1, CounterV2, st.text(), **FAST)


def test_round_trip_keeps_tuples_and_apart_str_and_bytes() -> None:
    """The round trip is the wire's: arrays are tuples, str and bytes stay apart."""
    assert ((1, "a", b"b"), {"k": (2.5,)}) == ot.msgpack_round_trip(
        [[1, "a", b"b"], {"k": [2.5]}])
