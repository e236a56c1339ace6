"""Checking a state against a server class's declared state type.

A plain class is checked with ``isinstance`` (the common case, and the one on the start
path). Anything richer -- tuples, containers, unions, ``Literal``, nested generics,
dataclasses (field by field) -- is checked completely by pydantic in strict mode, which
validates every element of every container without converting anything, and names the
path to the first wrong element. The validator for each type is built once.
"""

from __future__ import annotations

import typing
from typing import Any

import pydantic

from ._exceptions import StateTypeError

_STRICT = pydantic.ConfigDict(
    strict=True, arbitrary_types_allowed=True, revalidate_instances="always"
)
_validators: dict[Any, pydantic.TypeAdapter[Any]] = {}


def type_name(tp: Any) -> str:
    if isinstance(tp, type) and typing.get_origin(tp) is None:
        return tp.__qualname__
    return repr(tp).replace("typing.", "")


def _validator(tp: Any) -> pydantic.TypeAdapter[Any]:
    try:
        return _validators[tp]
    except KeyError:
        pass
    except TypeError:  # an unhashable type expression: build it every time
        return pydantic.TypeAdapter(tp, config=_STRICT)
    adapter = _validators[tp] = pydantic.TypeAdapter(tp, config=_STRICT)
    return adapter


def _describe(err: pydantic.ValidationError) -> str:
    first = err.errors()[0]
    path = "".join(f"[{p!r}]" for p in first["loc"]) or "the state itself"
    more = f" (and {err.error_count() - 1} more)" if err.error_count() > 1 else ""
    return f"at {path}: {first['msg']}, got {first['input']!r:.80}{more}"


def check_state(tp: Any, state: Any, *, server: str, when: str) -> None:
    """Raise :class:`StateTypeError` unless ``state`` matches ``tp`` completely."""
    if tp is Any:
        return
    if isinstance(tp, type) and typing.get_origin(tp) is None and not _is_dataclass(tp):
        if isinstance(state, tp):
            return
        problem = f"got {type(state).__qualname__} {state!r:.80}"
    else:
        try:
            _validator(tp).validate_python(state)
            return
        except pydantic.ValidationError as exc:
            problem = _describe(exc)
        except pydantic.PydanticSchemaGenerationError as exc:
            problem = f"otpy cannot check this type ({exc})"
    raise StateTypeError(
        f"server {server!r}: the state {when} does not match the declared state type "
        f"{type_name(tp)}: {problem}. Return a state of the declared type, or declare "
        f"the type the state really has (GenServer[...])."
    )


def _is_dataclass(tp: type) -> bool:
    return hasattr(tp, "__dataclass_fields__")
