"""Property checks of a server's state migration (``code_change``), driven by hypothesis.

hypothesis is imported only when a check runs: it is a test dependency (otpy's
``[test]`` extra), never needed by ``import otpy`` or ``import otpy.testing``.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .._core.release import Down
from .._core.server import GenServer, check_server_class
from .._core.typecheck import checker, type_name


class MigrationCheckFailed(AssertionError):
    """:func:`check_code_change` found an old state that the migration gets wrong.

    The message names the classes, the old state, the step that failed and what it got;
    ``state`` holds that old state."""

    def __init__(self, message: str, state: Any) -> None:
        super().__init__(message)
        self.state = state


def _same(a: Any, b: Any) -> bool:
    """Equal, and of the same types throughout (a tuple is not a list, True is not 1);
    NaN equals NaN, so that a float state can survive a round trip."""
    if type(a) is not type(b):
        return False
    if type(a) is float:
        return a == b or (math.isnan(a) and math.isnan(b))
    if type(a) in (tuple, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if type(a) is dict:
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    return bool(a == b)


def msgpack_round_trip(state: Any) -> Any:
    """``state`` encoded and decoded as otpy's wire does: arrays come back as tuples,
    maps as dicts, ``str`` and ``bytes`` stay apart. Raises what msgpack raises for a
    value it cannot encode (a set, an object, an int beyond 64 bits)."""
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), use_list=False,
                           raw=False, strict_map_key=False)


def _instance(cls: type[GenServer[Any]], name: str) -> GenServer[Any]:
    server = cls.__new__(cls)
    server._otpy_name = name
    return server


def check_code_change(
    old_class: type[GenServer[Any]],
    new_class: type[GenServer[Any]],
    states: Any,
    *,
    extra: Any = None,
    downgrade: bool | None = None,
    round_trip: bool = True,
    max_examples: int | None = None,
    settings: Any = None,
    name: str = "server",
) -> None:
    """Check ``new_class.code_change`` on old states that hypothesis generates.

    ::

        from hypothesis import strategies as st

        otpy.testing.check_code_change(CounterV1, CounterV2, st.integers())

    ``states`` is a hypothesis strategy of states of ``old_class``. For each one, the
    check requires that:

    1. the state is one of ``old_class``'s declared state type (else the strategy is
       wrong, and that is reported);
    2. ``code_change(old_class.vsn, state, extra)``, run on a ``new_class`` instance
       named ``name``, returns a state of ``new_class``'s declared type, and is pure:
       it leaves the old state unchanged (a rolled-back upgrade keeps the old state)
       and returns the same state when run again (an upgrade may migrate a busy server
       twice);
    3. with ``round_trip`` (the default), the new state survives MessagePack, the
       encoding of otpy's wire: it encodes, and decodes -- arrays as tuples, as the wire
       does -- to a value equal to it with the same types throughout, which still
       checks against the declared type. A state msgpack cannot represent (a set, a
       list where the wire gives back a tuple, a dataclass, an enum) fails this; pass
       ``round_trip=False`` for a server whose state never crosses the wire;
    4. the downgrade, ``code_change(otpy.Down(old_class.vsn), new_state, extra)``,
       gives back a state of ``old_class``'s type equal to the original (no loss).

    ``downgrade``: ``None`` (default) checks the downgrade unless ``code_change``
    raises ``NotImplementedError`` for it, which is how a version says it has no
    downgrade; any other error from the downgrade fails. ``True`` requires a downgrade
    (``NotImplementedError`` fails too); ``False`` skips it. A class that does not
    override ``code_change`` migrates by identity both ways, which passes only when
    the state types agree.

    ``extra`` is passed to ``code_change`` (a hypothesis strategy is drawn from per
    example). ``settings`` (a ``hypothesis.settings``; default: the current profile)
    is what the check runs under -- ``settings(derandomize=True)`` makes it try the
    same states every run -- and ``max_examples`` overrides its number of examples
    (100 when neither says). The first failing example, shrunk, raises
    :class:`MigrationCheckFailed`, an ``AssertionError`` naming it. hypothesis must be
    installed (otpy's ``[test]`` extra); call this from a plain test function, not
    inside another ``@given``.
    """
    import hypothesis
    from hypothesis import strategies as st

    check_server_class(old_class, "check_code_change old_class")
    check_server_class(new_class, "check_code_change new_class")
    extras = extra if isinstance(extra, st.SearchStrategy) else st.just(extra)
    base = settings if settings is not None else hypothesis.settings()
    if max_examples is None:
        max_examples = base.max_examples if settings is not None else 100

    # One shrunk failure, raised as it is (an AssertionError), not an exception group.
    @hypothesis.settings(base, max_examples=max_examples, deadline=None,
                         report_multiple_bugs=False,
                         suppress_health_check=[hypothesis.HealthCheck.too_slow])
    @hypothesis.given(states, extras)
    def check(state: Any, extra_value: Any) -> None:
        _check_one(old_class, new_class, state, extra_value, downgrade, round_trip, name)

    check()


def _check_one(
    old: type[GenServer[Any]], new: type[GenServer[Any]], state: Any, extra: Any,
    downgrade: bool | None, round_trip: bool, name: str,
) -> None:
    what = f"{old.__qualname__} (vsn {old.vsn}) -> {new.__qualname__} (vsn {new.vsn})"

    def fail(problem: str, fix: str) -> MigrationCheckFailed:
        return MigrationCheckFailed(
            f"{what}, old state {state!r:.200}: {problem}. {fix}", state)

    old_type, new_type = type_name(old._state_type), type_name(new._state_type)
    problem = checker(old)(state)
    if problem is not None:
        raise fail(f"the strategy generated a state that is not a {old_type}: {problem}",
                   f"Give check_code_change a strategy of {old.__qualname__}'s states")
    server = _instance(new, name)
    before = copy.deepcopy(state)
    try:
        migrated = new.code_change(server, old.vsn, state, extra)
    except Exception as exc:
        raise fail(f"code_change({old.vsn!r}, state, {extra!r}) raised "
                   f"{type(exc).__name__}: {exc}",
                   "An upgrade from this state would roll back") from exc
    if not _same(before, state):
        raise fail(f"code_change changed the old state in place (to {state!r:.200})",
                   "Build a new state instead: a rolled-back upgrade keeps the old one")
    problem = checker(new)(migrated)
    if problem is not None:
        raise fail(f"code_change returned a state that is not a {new_type}: {problem}",
                   f"Return a {new_type}, or declare the type the state really has")
    again = new.code_change(_instance(new, name), old.vsn, copy.deepcopy(before), extra)
    if not _same(migrated, again):
        raise fail(f"code_change is not a pure function: it returned {migrated!r:.100} "
                   f"and then {again!r:.100} for the same state",
                   "Compute the new state from the arguments only: an upgrade may run "
                   "code_change twice for a busy server")
    if round_trip:
        try:
            decoded = msgpack_round_trip(migrated)
        except Exception as exc:
            raise fail(f"the new state {migrated!r:.200} cannot be encoded with msgpack "
                       f"({type(exc).__name__}: {exc})",
                       "Use msgpack types (None, bool, int, float, str, bytes, tuple, "
                       "dict), or pass round_trip=False") from exc
        if not _same(migrated, decoded) or checker(new)(decoded) is not None:
            raise fail(f"the new state {migrated!r:.200} does not survive a msgpack round "
                       f"trip: it comes back as {decoded!r:.200}",
                       "Arrays decode as tuples, maps as dicts: use tuples, not lists, "
                       "sets or objects; or pass round_trip=False")
    if downgrade is False:
        return
    down_server = _instance(new, name)
    try:
        back = new.code_change(down_server, Down(old.vsn), copy.deepcopy(migrated), extra)
    except NotImplementedError as exc:
        if downgrade is None:
            return
        raise fail(f"the downgrade raised NotImplementedError: {exc}",
                   "Define the downgrade, or pass downgrade=False") from exc
    except Exception as exc:
        raise fail(f"the downgrade, code_change(Down({old.vsn!r}), {migrated!r:.100}, "
                   f"{extra!r}), raised {type(exc).__name__}: {exc}",
                   "Fix it; a version with no downgrade raises NotImplementedError, or "
                   "pass downgrade=False") from exc
    problem = checker(old)(back)
    if problem is not None:
        raise fail(f"the downgrade returned a state that is not a {old_type}: {problem}",
                   f"Return a {old_type} for Down({old.vsn!r})")
    if not _same(back, state):
        raise fail(f"the downgrade is lossy: {migrated!r:.100} went back to {back!r:.100}, "
                   f"not to the original",
                   "Keep what the old version needs in the new state")
