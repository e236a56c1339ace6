"""The ``otpy`` command: operate a running node through its admin endpoint.

::

    otpy tree                       --node 127.0.0.1:4370
    otpy state NAME
    otpy stats [NAME]               counters of the node, or of server NAME (mailbox,
                                    refused messages, restarts, ...); a node with a
                                    store shows its figures as store.records, ...
    otpy call NAME REQUEST          REQUEST is JSON ('"incr"', '["store", "x", 1]'):
                                    arrays are sent as tuples, {"$bytes": base64} as
                                    bytes, {"$pid": [...]} as a pid; the reply is printed
                                    as JSON by the same rule (otpy._protocol.json_rules)
                                    as the HTTP endpoint's. NAME may be a pid in that
                                    JSON form, as a reply printed it
    otpy upgrade RELEASE_FILE       the release file and the modules of its code
                                    directory are sent to the node (see below)
    otpy upgrade --node-path PATH   PATH is a release file on the node's host
    otpy downgrade
    otpy upgrade RELEASE_FILE --cluster nats://HOST:PORT   every node of the cluster,
    otpy downgrade --cluster nats://HOST:PORT              all or none
    otpy releases
    otpy cluster                    the node's cluster: its members and whether each
                                    answers, and the node each cluster-scoped name
                                    runs on

The node is ``--node HOST:PORT`` (default ``$OTPY_NODE``, else 127.0.0.1:4370); the
cookie is ``$OTPY_COOKIE``, else the file ``$OTPY_COOKIE_FILE`` or ``~/.otpy_cookie``.

``otpy upgrade`` reads the release on the operator's side into a bundle (its file and
every module of its code directory, with their digests: at most 256 files and 960 KiB,
no module over 256 KiB)
and sends it over the authenticated admin channel; the node loads it from there and
needs no copy of the files.

Exit codes: 0 done, 1 the node answered with an error, 2 bad usage (a bad argument: an
address, a REQUEST that is not JSON, a release that cannot be read or sent), 69 the
node cannot be reached (or does not answer), 77 authentication failed (or no cookie),
130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import trio

from ._client import Client, connect_admin
from ._cookie import read_cookie
from ._exceptions import (
    AuthFailed,
    BadRequest,
    CallTimeout,
    ConnectionLost,
    CookieError,
    RemoteError,
    UpgradeFailed,
)
from ._protocol.json_rules import (
    Undecodable,
    Unencodable,
    address_of,
    decode_json,
    encode_json,
)
from ._protocol.release_bundle import encode_bundle
from ._release_files import read_bundle

DEFAULT_NODE = "127.0.0.1:4370"
EX_ERROR, EX_USAGE, EX_UNAVAILABLE, EX_NOPERM = 1, 2, 69, 77


class _Fail(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _address(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise _Fail(f"--node must be HOST:PORT, e.g. 127.0.0.1:4370; got {text!r}", EX_USAGE)
    return host.strip("[]") or "127.0.0.1", int(port)


def _show(value: Any) -> str:
    def default(obj: Any) -> Any:
        if isinstance(obj, bytes):
            return obj.decode("utf-8", "backslashreplace")
        return repr(obj)

    return json.dumps(value, default=default)


def _servers(names: Sequence[str], shown: int = 5) -> str:
    """``3 servers (c0, c1, c2)``; past ``shown`` names, the rest are counted."""
    if not names:
        return "no servers"
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return f"{len(names)} server{'s' if len(names) > 1 else ''} " \
           f"({', '.join(names[:shown])}{more})"


def _cluster_lines(info: dict[str, Any] | None) -> list[str]:
    """What ``otpy cluster`` prints for the admin operation's answer."""
    if info is None:
        return ["this node is in no cluster (it was started without cluster=...)"]
    me = info["node"]
    lines = [f"cluster {info['cluster']}, as node {me} sees it", "members:"]
    members = info["members"]
    width = max(map(len, members))
    for node, status in members.items():
        what = "this node" if node == me else (
            "answers" if status == "up" else "does not answer (down)")
        lines.append(f"  {node.ljust(width)}  {what}")
    names = info["names"]
    lines.append(f"cluster-scoped names: {len(names)}")
    if names:
        width = max(map(len, names))
        lines += [f"  {name.ljust(width)}  on {node}" for name, node in names.items()]
    lines.append(f"calls in flight to other nodes: {info['calls_in_flight']}")
    return lines


async def _tree(admin: Client, sup: str, prefix: str, out: list[str]) -> None:
    children = await admin.request("which_children", sup)
    for n, child in enumerate(children):
        last = n == len(children) - 1
        vsn = f"vsn {child['vsn']}" if child.get("vsn") is not None else "-"
        out.append(f"{prefix}{'└── ' if last else '├── '}{child['id']}  {child['kind']}  "
                   f"{child['status']}  {vsn}  restarts {child['restarts']}")
        if child["kind"] == "supervisor" and child["status"] == "running":
            await _tree(admin, child["id"], prefix + ("    " if last else "│   "), out)


def _request(text: str) -> Any:
    """REQUEST as ``handle_call`` will receive it: JSON by the HTTP endpoint's rule."""
    try:
        return decode_json(text)
    except Undecodable as exc:
        raise _Fail(f"REQUEST must be JSON: {exc}. A string is quoted in JSON: otpy call "
                    f"NAME '\"{text[:40]}\"'", EX_USAGE) from None


def _name(text: str) -> Any:
    """NAME as the HTTP endpoint reads an address: a name, or a pid in JSON."""
    try:
        return address_of(text)
    except BadRequest as exc:
        raise _Fail(f"NAME must be a server name or a pid as {{\"$pid\": [node, creation, "
                    f"name, serial]}}: {exc}", EX_USAGE) from None


def _release(args: argparse.Namespace) -> bytes | str:
    """What ``upgrade`` sends: the release as a bundle, or the node-side path."""
    if args.node_path:
        path: str = args.release_file
        return path
    try:
        return encode_bundle(read_bundle(args.release_file))
    except UpgradeFailed as exc:
        raise _Fail(str(exc), EX_USAGE) from None


async def _cluster_release(args: argparse.Namespace) -> int:
    """``upgrade``/``downgrade`` with ``--cluster URL``: every node, all or none."""
    from ._cluster.releases import release_from_outside
    from ._protocol.release_bundle import encode_bundle as encode

    bundle = None
    if args.command == "upgrade":
        try:
            bundle = encode(read_bundle(args.release_file))
        except UpgradeFailed as exc:
            raise _Fail(str(exc), EX_USAGE) from None
    try:
        report = await release_from_outside(args.cluster, args.cluster_name, bundle,
                                            timeout=args.timeout)
    except UpgradeFailed as exc:
        raise _Fail(str(exc), EX_ERROR) from None
    except OSError as exc:
        raise _Fail(f"cannot reach the cluster's NATS server at {args.cluster}: {exc}",
                    EX_UNAVAILABLE) from None
    done = "taken back" if report["downgrade"] else "installed"
    print(f"release {report['release']} {done} on {len(report['nodes'])} nodes: "
          f"{_servers(report['servers'])}")
    if report["unconfirmed"]:
        print(f"not yet confirmed by {', '.join(report['unconfirmed'])}: each applies it "
              f"when it is back, before it serves")
    return 0


async def _run(args: argparse.Namespace) -> int:
    if getattr(args, "cluster", None):
        return await _cluster_release(args)
    host, port = _address(args.node)
    # What can be checked on this side is, before any node is contacted.
    request = _request(args.request) if args.command == "call" else None
    name = _name(args.name) if args.command == "call" else None
    release = _release(args) if args.command == "upgrade" else None
    try:
        cookie = read_cookie()
    except CookieError as exc:
        raise _Fail(str(exc), EX_NOPERM) from None
    try:
        async with connect_admin(host, port, cookie) as admin:
            cmd = args.command
            if cmd == "tree":
                lines = ["root  supervisor"]
                await _tree(admin, "root", "", lines)
                print("\n".join(lines))
            elif cmd == "state":
                print(_show(await admin.request("get_state", args.name)))
            elif cmd == "stats":
                stats = await admin.request("statistics", *(
                    [args.name] if args.name else []))
                for key, value in stats.items():
                    if key == "store" and isinstance(value, dict):
                        for name, figure in value.items():  # store.records: 12, ...
                            print(f"store.{name}: {_show(figure)}")
                    else:
                        print(f"{key}: {_show(value)}")
            elif cmd == "call":
                reply = await admin.request("call", name, request,
                                            timeout=args.timeout)
                try:
                    print(encode_json(reply).decode())
                except Unencodable:  # the admin endpoint sent what msgpack carries
                    print(_show(reply))
            elif cmd == "upgrade":
                report = await admin.request("upgrade", release, timeout=args.timeout)
                print(f"release {report['release']} installed: {_servers(report['servers'])}")
            elif cmd == "downgrade":
                report = await admin.request("downgrade", timeout=args.timeout)
                print(f"release {report['release']} taken back: "
                      f"{_servers(report['servers'])}")
            elif cmd == "cluster":
                print("\n".join(_cluster_lines(await admin.request("cluster"))))
            elif cmd == "releases":
                releases = await admin.request("releases")
                if not releases:
                    print("no releases installed")
                for rel in releases:
                    desc = f"  {rel['description']}" if rel["description"] else ""
                    print(f"{rel['vsn']}  servers: {_servers(rel['servers'])}{desc}")
    except AuthFailed as exc:
        raise _Fail(f"authentication failed at {host}:{port}: {exc}. Use the node's "
                    f"cookie: set OTPY_COOKIE, or OTPY_COOKIE_FILE to its file", EX_NOPERM) \
            from None
    except RemoteError as exc:
        raise _Fail(f"the node answered: {exc}", EX_ERROR) from None
    except CallTimeout as exc:  # before OSError: it is a TimeoutError
        raise _Fail(f"the node at {host}:{port} did not answer: {exc}; pass a larger "
                    f"--timeout", EX_UNAVAILABLE) from None
    except trio.TooSlowError:  # connect_admin's wait for the challenge
        raise _Fail(f"{host}:{port} accepted the connection but sent no challenge in "
                    f"time: it is not a node's admin endpoint, or the node is stuck. "
                    f"Pass --node HOST:PORT of the node's admin=(host, port)",
                    EX_UNAVAILABLE) from None
    except (OSError, ConnectionLost, trio.BrokenResourceError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        raise _Fail(f"cannot reach the node's admin endpoint at {host}:{port}: {reason}. "
                    f"Is the node running with admin=({host!r}, {port})? Pass "
                    f"--node HOST:PORT", EX_UNAVAILABLE) from None
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="otpy", description="Operate a running otpy node through its admin endpoint.",
        epilog="The cookie comes from $OTPY_COOKIE, else the file $OTPY_COOKIE_FILE "
               "(default ~/.otpy_cookie). Exit codes: 1 error reply, 2 usage, "
               "69 node unreachable, 77 authentication failed.")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--node", default=os.environ.get("OTPY_NODE") or DEFAULT_NODE,
                        metavar="HOST:PORT",
                        help="the node's admin endpoint (default $OTPY_NODE or %(default)s)")
    common.add_argument("--timeout", type=float, default=30.0,
                        help="seconds to wait for the node's answer (default %(default)s)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    sub.add_parser("tree", parents=[common], help="the live supervision tree")
    p = sub.add_parser("state", parents=[common], help="the state of server NAME")
    p.add_argument("name")
    p = sub.add_parser("stats", parents=[common],
                       help="counters of the node, or of server NAME")
    p.add_argument("name", nargs="?")
    p = sub.add_parser("call", parents=[common], help="call server NAME with REQUEST (JSON)")
    p.add_argument("name")
    p.add_argument("request", help="JSON, e.g. '\"incr\"' or '[\"add\", 1]'; arrays are "
                                   "sent as tuples")
    p = sub.add_parser("upgrade", parents=[common],
                       help="install a release: its file (TOML) and the modules of its "
                            "code directory are sent to the node")
    p.add_argument("release_file")
    p.add_argument("--node-path", action="store_true",
                   help="RELEASE_FILE is a path on the node's host, for the node to read "
                        "(nothing is sent)")
    clustered = argparse.ArgumentParser(add_help=False)
    clustered.add_argument("--cluster", metavar="URL",
                           help="the whole cluster whose NATS server is URL "
                                "(nats://host:port): every node, all or none")
    clustered.add_argument("--cluster-name", default="otpy",
                           help="the cluster's name (default %(default)s)")
    p._add_container_actions(clustered)
    sub.add_parser("downgrade", parents=[common, clustered],
                   help="go back to the release before")
    sub.add_parser("releases", parents=[common], help="the installed releases, oldest first")
    sub.add_parser("cluster", parents=[common],
                   help="the node's cluster: members, whether each answers, and where "
                        "each cluster-scoped name runs")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``otpy`` console script; returns the exit code."""
    args = _parser().parse_args(argv)
    try:
        return trio.run(_run, args)
    except _Fail as exc:
        print(f"otpy: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        if args.command in ("upgrade", "downgrade"):
            # The request may be on the node already, which goes on with it.
            print(f"otpy: interrupted. If the node got the {args.command} request, it "
                  f"goes on with it and may still commit it (all of it, or nothing). "
                  f"Check with: otpy releases --node {args.node}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
