"""Addresses: server names, pids, and ``name@node``.

A server is reached by its registered name (a ``str``), by the :class:`Pid` of one of
its incarnations, or by ``"name@node"`` (a name on one node of a cluster). The
scheduler's ``resolve`` is the one place that turns an address into a running server;
this module holds the values and the rules for reading them.

What must stay true:

- A pid names one incarnation: a restart makes a new pid, a live upgrade keeps it. A
  pid carries its node, that node's *creation* (a number a node picks afresh each time
  it starts, so a pid from an earlier run of the node names nothing now), the server's
  name, and a serial number unique within the node's run.
- Pids are values: equal, hashed and ordered by what they name, printable, and
  encodable as a msgpack extension type (``otpy._protocol.msgpack_rpc``) that any
  MessagePack client can hold and send back unchanged.
- Server names never contain ``@``: ``"name@node"`` is always a remote address.
"""

from __future__ import annotations

from typing import Any

NODE_SEPARATOR = "@"


class Pid:
    """One incarnation of a server (or supervisor): what ``self.pid`` and
    ``node.whereis(name)`` give, accepted wherever a name is.

    A cast, send or timer to a pid whose incarnation has stopped is dropped, as in
    Erlang; a call to it raises :class:`otpy.NoSuchServer` saying which pid holds the
    name now. ``str(pid)`` is ``<name.serial@node>``."""

    __slots__ = ("_hash", "creation", "name", "node", "serial")

    node: str
    creation: int
    name: str
    serial: int

    def __init__(self, node: str, creation: int, name: str, serial: int) -> None:
        self.node = node
        self.creation = creation
        self.name = name
        self.serial = serial
        self._hash = hash((node, creation, serial, name))

    def _key(self) -> tuple[str, int, int, str]:
        return (self.node, self.creation, self.serial, self.name)

    def __eq__(self, other: object) -> bool:
        return (type(other) is Pid and self.serial == other.serial
                and self.creation == other.creation and self.name == other.name
                and self.node == other.node)

    def __hash__(self) -> int:
        return self._hash

    def __lt__(self, other: Pid) -> bool:
        if type(other) is not Pid:
            return NotImplemented
        return self._key() < other._key()

    def __repr__(self) -> str:
        return f"otpy.Pid({self.node!r}, {self.creation}, {self.name!r}, {self.serial})"

    def __str__(self) -> str:
        return f"<{self.name}.{self.serial}@{self.node}>"

    def __reduce__(self) -> tuple[Any, ...]:
        return Pid, (self.node, self.creation, self.name, self.serial)


def split_remote(name: str) -> tuple[str, str] | None:
    """``"kv@b"`` -> ``("kv", "b")``; None for a plain name."""
    server, sep, node = name.partition(NODE_SEPARATOR)
    if not sep:
        return None
    return server, node


def check_server_name(value: object, what: str) -> str | None:
    """The problem with ``value`` as a server or supervisor name, or None."""
    if not isinstance(value, str) or not value:
        return f"{what} must be a non-empty string, got {value!r}"
    if NODE_SEPARATOR in value:
        return (f"{what} {value!r} contains {NODE_SEPARATOR!r}, which addresses a server "
                f"on another node (\"name@node\"); choose a name without it")
    return None
