"""Checking a state against a server class's declared state type.

Plain classes are checked with ``isinstance`` (the common case, and the one on the
start path); anything richer (containers, unions, ``Literal``, nested generics,
dataclasses' fields are the class itself) goes to typeguard, told to check every item
of every container so that a migration cannot slip a wrong element past the check.
"""

from __future__ import annotations

import typing
from typing import Any

import typeguard

from ._exceptions import StateTypeError

_CONFIG = typeguard.TypeCheckConfiguration(
    collection_check_strategy=typeguard.CollectionCheckStrategy.ALL_ITEMS,
)


def _is_plain_class(tp: Any) -> bool:
    return isinstance(tp, type) and typing.get_origin(tp) is None


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def check_state(tp: Any, state: Any, *, server: str, when: str) -> None:
    """Raise :class:`StateTypeError` unless ``state`` matches ``tp`` completely."""
    if tp is Any:
        return
    if _is_plain_class(tp):
        if isinstance(state, tp):
            return
        problem = f"got {type(state).__qualname__} {state!r:.120}"
    else:
        try:
            typeguard.check_type(
                state,
                tp,
                collection_check_strategy=_CONFIG.collection_check_strategy,
            )
            return
        except typeguard.TypeCheckError as exc:
            problem = str(exc)
    raise StateTypeError(
        f"server {server!r}: the state {when} does not match the declared state type "
        f"{type_name(tp)}: {problem}. Return a state of the declared type, or declare "
        f"the type the state really has (GenServer[...])."
    )
