"""Checking a state against a server class's declared state type.

A plain class is checked with ``isinstance`` (the common case, and the one on the start
path). Anything richer -- tuples, containers, unions, ``Literal``, nested generics,
dataclasses (field by field) -- is checked completely by pydantic in strict mode, which
validates every element of every container without converting anything, and names the
path to the first wrong element. Each server class gets its checker built once.
"""

from __future__ import annotations

import typing
from collections.abc import Callable
from typing import Any

import pydantic

from .._exceptions import StateTypeError

_STRICT = pydantic.ConfigDict(
    strict=True, arbitrary_types_allowed=True, revalidate_instances="always"
)

Checker = Callable[[Any], "str | None"]  # the problem with a state, or None


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _describe(err: pydantic.ValidationError, wrapped: bool = False) -> str:
    first = err.errors()[0]
    loc = first["loc"][1:] if wrapped else first["loc"]
    path = "".join(f"[{p!r}]" for p in loc) or "the state itself"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"at {path}: {first['msg']}, got {first['input']!r:.80}{more}"


def _any(state: Any) -> str | None:
    return None


def _make_checker(tp: Any) -> Checker:
    if tp is Any:
        return _any
    if (isinstance(tp, type) and typing.get_origin(tp) is None
            and not hasattr(tp, "__dataclass_fields__")):

        def is_instance(state: Any) -> str | None:
            if isinstance(state, tp):
                return None
            return f"got {type(state).__qualname__} {state!r:.80}"

        return is_instance
    wrapped = False
    try:
        try:
            validate: Callable[[Any], Any] = pydantic.TypeAdapter(
                tp, config=_STRICT).validator.validate_python
        except pydantic.PydanticUserError:
            # pydantic takes no config for a bare dataclass, but applies it to one
            # inside a container: check ``(state,)`` against ``tuple[tp]``.
            inner = pydantic.TypeAdapter(tuple[tp], config=_STRICT).validator.validate_python
            wrapped = True

            def validate(state: Any) -> Any:
                return inner((state,))
    except pydantic.PydanticSchemaGenerationError as exc:
        reason = f"otpy cannot check this type ({exc})"
        return lambda state: reason

    def validated(state: Any) -> str | None:
        try:
            validate(state)
        except pydantic.ValidationError as exc:
            return _describe(exc, wrapped)
        return None

    return validated


def checker(cls: type) -> Checker:
    """The state checker of a server class, built on first use and kept on the class."""
    check: Checker | None = cls.__dict__.get("_otpy_state_check")
    if check is None:
        check = _make_checker(getattr(cls, "_state_type", Any))
        type.__setattr__(cls, "_otpy_state_check", check)
    return check


def check_state(cls: type, state: Any, *, server: str, when: str) -> None:
    """Raise :class:`StateTypeError` unless ``state`` matches ``cls``'s declared state
    type completely."""
    problem = checker(cls)(state)
    if problem is not None:
        raise StateTypeError(
            f"server {server!r}: the state {when} does not match the declared state type "
            f"{type_name(getattr(cls, '_state_type', Any))}: {problem}. Return a state of "
            f"the declared type, or declare the type the state really has (GenServer[...])."
        )
