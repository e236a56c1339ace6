"""The key-value store of the supervised-state-machines account, under
``one_for_one[kv1, rest_for_one[kv2, kv3]]``.

Looking up the key ``"crash"`` divides by zero: kv2 crashes, its rest_for_one supervisor
restarts kv2 and kv3 (started after it), kv1 is untouched, and kv2's data is gone.
"""

from __future__ import annotations

from typing import Any

import otpy


class KVStore(otpy.GenServer[dict[str, Any]]):
    """``("store", key, value)`` -> "ok"; ``("lookup", key)`` -> value or None."""

    vsn = "1"

    def init(self, arg: Any) -> dict[str, Any]:
        print(f"    KV store starting: {self.name}")
        return dict(arg or {})

    def handle_call(self, request: Any, caller: otpy.Caller, state: dict[str, Any]) -> Any:
        match request:
            case ("store", str(key), value):
                return otpy.Reply("ok", {**state, key: value})
            case ("lookup", "crash"):
                return otpy.Reply(1 // 0, state)  # the deliberate bug
            case ("lookup", key):
                return otpy.Reply(state.get(key), state)
        raise ValueError(f"{self.name}: unknown request {request!r}")

    def terminate(self, reason: Any, state: dict[str, Any]) -> None:
        print(f"    KV store terminating: {self.name} ({reason!r})")


def tree() -> otpy.Supervisor:
    return otpy.Supervisor(
        [
            otpy.Child("kv1", KVStore),
            otpy.Supervisor(
                [otpy.Child("kv2", KVStore), otpy.Child("kv3", KVStore)],
                strategy="rest_for_one",
                name="sub",
            ),
        ],
        strategy="one_for_one",
        name="root",
    )


async def main() -> None:
    async with otpy.open_node(tree()) as node:
        async def call(name: str, request: Any) -> None:
            print(f"Calling {name}: {request!r}")
            try:
                print("   ->", repr(await node.call(name, request)))
            except otpy.ServerCrashed as exc:
                print(f"   -> {name} threw: {exc.__cause__}")

        await call("kv2", ("store", "x", 1))
        await call("kv2", ("lookup", "x"))
        await call("kv2", ("lookup", "crash"))
        await call("kv2", ("lookup", "x"))
        await call("kv2", ("lookup", "y"))
        print("children of 'sub':", [(c.id, c.status, c.restarts)
                                     for c in node.which_children("sub")])


if __name__ == "__main__":
    import structlog
    import trio

    # The crash is logged as one structured event; keep the account readable.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(50))
    trio.run(main)
