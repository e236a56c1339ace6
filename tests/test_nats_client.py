"""The trio NATS client (otpy._cluster.nats_client) against a real nats-server started
by the test, and against a hostile fake server the test controls."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import trio
from _nats import FAST, fake_server, handshake, restart, running_server

from otpy._cluster.nats_client import (
    Client,
    ClientClosed,
    ConnectError,
    ConnectionLost,
    Msg,
    NatsError,
    NoResponders,
    NotConnected,
    OutgoingFull,
    PayloadTooLarge,
    RequestTimeout,
    open_client,
)
from otpy._cluster.server import NatsServer

LIMIT = 5.0  # no test waits longer than this for anything


def echo(nc: Client) -> Any:
    """A responder that answers each request with its payload."""
    def respond(msg: Msg) -> None:
        assert msg.reply is not None
        nc.publish_nowait(msg.reply, msg.payload)
    return respond


# -- request/reply --------------------------------------------------------------------------


async def test_request_gets_the_reply(nats_server: NatsServer) -> None:
    """A request reaches a subscriber on another connection and returns its reply."""
    async with open_client(nats_server.url) as a, open_client(nats_server.url) as b:
        b.subscribe("svc.echo", echo(b))
        await b.flush()
        with trio.fail_after(LIMIT):
            reply = await a.request("svc.echo", b"ping")
    assert b"ping" == reply.payload


async def test_many_requests_in_flight_each_get_their_own_reply(nats_server: NatsServer
                                                                ) -> None:
    """64 concurrent requests over the one inbox subscription: each gets its own reply."""
    results: dict[int, bytes] = {}
    async with open_client(nats_server.url) as a, open_client(nats_server.url) as b:
        b.subscribe("svc.echo", echo(b))
        await b.flush()

        async def one(i: int) -> None:
            results[i] = (await a.request("svc.echo", b"%d" % i)).payload

        with trio.fail_after(LIMIT):
            async with trio.open_nursery() as nursery:
                for i in range(64):
                    nursery.start_soon(one, i)
    assert {i: b"%d" % i for i in range(64)} == results


async def test_no_responders_fails_at_once(nats_server: NatsServer) -> None:
    """A request to a subject nobody subscribes to raises NoResponders (the server's
    503), long before its timeout."""
    async with open_client(nats_server.url) as a:
        with trio.fail_after(LIMIT), pytest.raises(NoResponders, match=r"'nobody\.home'"):
            await a.request("nobody.home", b"x", timeout=60.0)


async def test_request_times_out(nats_server: NatsServer) -> None:
    """A subscriber that never answers: RequestTimeout after the request's timeout."""
    async with open_client(nats_server.url) as a:
        a.subscribe("svc.mute", lambda msg: None)
        await a.flush()
        with trio.fail_after(LIMIT), pytest.raises(RequestTimeout):
            await a.request("svc.mute", b"x", timeout=0.05)
        assert 0 == a.stats()["requests_in_flight"]


async def test_request_nowait_calls_back_with_reply_or_error(nats_server: NatsServer
                                                             ) -> None:
    """The callback form gets the reply Msg, or the error, from the client's tasks."""
    got: list[Any] = []
    done = trio.Event()

    def on_result(result: Msg | NatsError) -> None:
        got.append(result)
        if len(got) == 2:
            done.set()

    async with open_client(nats_server.url) as a:
        a.subscribe("svc.echo", echo(a))
        await a.flush()
        a.request_nowait("svc.echo", b"one", on_result)
        a.request_nowait("nobody", b"two", on_result)
        with trio.fail_after(LIMIT):
            await done.wait()
    [reply] = [r for r in got if isinstance(r, Msg)]
    [error] = [r for r in got if not isinstance(r, Msg)]
    assert b"one" == reply.payload
    assert isinstance(error, NoResponders)


async def test_cancelled_request_leaves_nothing_behind(nats_server: NatsServer) -> None:
    """Cancelling a waiting request removes it; its late reply is counted and dropped."""
    async with open_client(nats_server.url) as a:
        held: list[Msg] = []
        a.subscribe("svc.slow", held.append)
        await a.flush()
        with trio.move_on_after(0.05):
            await a.request("svc.slow", b"x")
        assert 0 == a.stats()["requests_in_flight"]
        assert held[0].reply is not None
        a.publish_nowait(held[0].reply, b"late")
        await a.flush()
        assert 1 == a.stats()["late_replies"]


# -- publish and subscribe -------------------------------------------------------------------


async def test_callback_gets_every_message_in_order(nats_server: NatsServer) -> None:
    """A synchronous callback is called for each message, in the order published."""
    got: list[bytes] = []
    async with open_client(nats_server.url) as a:
        a.subscribe("feed.*", lambda m: got.append(m.payload))
        await a.flush()
        for i in range(100):
            a.publish_nowait(f"feed.{i % 3}", b"%d" % i)
        await a.flush()
        with trio.fail_after(LIMIT):
            while len(got) < 100:
                await trio.sleep(0.001)
    assert [b"%d" % i for i in range(100)] == got


async def test_headers_travel(nats_server: NatsServer) -> None:
    """Headers published (several values for one key) arrive as sent."""
    got: list[Msg] = []
    async with open_client(nats_server.url) as a:
        a.subscribe("h", got.append)
        await a.flush()
        a.publish_nowait("h", b"body", headers={"X-One": "1", "X-Many": ["a", "b"]})
        await a.flush()
        with trio.fail_after(LIMIT):
            while not got:
                await trio.sleep(0.001)
    assert got[0].headers is not None
    assert {"X-One": ["1"], "X-Many": ["a", "b"]} == dict(got[0].headers)


async def test_unsubscribe_stops_delivery(nats_server: NatsServer) -> None:
    """After unsubscribe (and a flush) nothing more is delivered."""
    got: list[bytes] = []
    async with open_client(nats_server.url) as a:
        sub = a.subscribe("u", lambda m: got.append(m.payload))
        await a.flush()
        a.publish_nowait("u", b"1")
        await a.flush()
        sub.unsubscribe()
        a.publish_nowait("u", b"2")
        await a.flush()
        await a.flush()
    assert [b"1"] == got


async def test_callback_error_is_logged_and_delivery_goes_on(
        nats_server: NatsServer, logs: list[dict[str, Any]]) -> None:
    """A callback that raises gets one nats_callback_failed event; the next message is
    delivered."""
    got: list[bytes] = []

    def callback(msg: Msg) -> None:
        if msg.payload == b"bad":
            raise ValueError("boom")
        got.append(msg.payload)

    async with open_client(nats_server.url) as a:
        a.subscribe("c", callback)
        await a.flush()
        a.publish_nowait("c", b"bad")
        a.publish_nowait("c", b"good")
        await a.flush()
        await a.flush()
    assert [b"good"] == got
    assert ["c"] == [e["subject"] for e in logs if e["event"] == "nats_callback_failed"]


async def test_async_iteration_and_slow_consumer(nats_server: NatsServer,
                                                 logs: list[dict[str, Any]]) -> None:
    """``async for`` over a subscription gets the messages; beyond max_pending_msgs
    queued they are dropped and counted, with one nats_slow_consumer event."""
    async with open_client(nats_server.url) as a:
        sub = a.subscribe("it", max_pending_msgs=3)
        await a.flush()
        for i in range(5):
            a.publish_nowait("it", b"%d" % i)
        await a.flush()
        await a.flush()
        got = []
        with trio.fail_after(LIMIT):
            async for msg in sub:
                got.append(msg.payload)
                if len(got) == 3:
                    break
    assert [b"0", b"1", b"2"] == got
    assert 2 == sub.dropped
    assert 1 == len([e for e in logs if e["event"] == "nats_slow_consumer"])


async def test_iteration_ends_when_unsubscribed(nats_server: NatsServer) -> None:
    """An ``async for`` ends after the queued messages once the subscription ends."""
    async with open_client(nats_server.url) as a:
        sub = a.subscribe("end")
        await a.flush()
        a.publish_nowait("end", b"last")
        await a.flush()
        await a.flush()
        sub.unsubscribe()
        with trio.fail_after(LIMIT):
            assert [b"last"] == [m.payload async for m in sub]


async def test_publishes_of_one_loop_turn_share_a_write(nats_server: NatsServer) -> None:
    """100 publishes in one loop turn cost at most two socket writes: the first goes out
    at once (the writer was idle), the other 99 together on the writer's next turn."""
    got: list[bytes] = []
    async with open_client(nats_server.url) as a:
        a.subscribe("burst", lambda m: got.append(m.payload))
        await a.flush()
        before = a.stats()["writes"]
        for i in range(100):
            a.publish_nowait("burst", b"%d" % i)
        with trio.fail_after(LIMIT):
            while len(got) < 100:
                await trio.sleep(0.001)
        assert 2 >= a.stats()["writes"] - before
    assert [b"%d" % i for i in range(100)] == got


async def test_outgoing_buffer_is_bounded_with_back_pressure(nats_server: NatsServer
                                                             ) -> None:
    """Publishes in one loop turn fill the outgoing buffer (the first of the turn goes
    out at once, the rest wait for the writer): past max_outgoing, publish_nowait
    raises OutgoingFull; ``await publish`` waits for the writer."""
    got: list[bytes] = []
    async with open_client(nats_server.url, max_outgoing=1000) as a:
        a.subscribe("bp", lambda m: got.append(m.payload))
        await a.flush()
        a.publish_nowait("bp", b"first")
        a.publish_nowait("bp", b"a" * 600)
        with pytest.raises(OutgoingFull, match="max_outgoing=1000"):
            a.publish_nowait("bp", b"b" * 600)
        await a.publish("bp", b"c" * 600)
        await a.flush()
        await a.flush()
    assert [b"first", b"a" * 600, b"c" * 600] == got


async def test_payload_over_max_payload_is_refused(tmp_path: Path) -> None:
    """A message larger than the server's max_payload is refused before it is sent."""
    with running_server(tmp_path, max_payload=1024) as server:
        async with open_client(server.url) as a:
            assert 1024 == a.max_payload
            with pytest.raises(PayloadTooLarge, match="max_payload of 1024"):
                a.publish_nowait("big", b"x" * 1025)


async def test_bad_subject_is_refused(nats_server: NatsServer) -> None:
    """A subject that would break the protocol line raises ValueError, sends nothing."""
    async with open_client(nats_server.url) as a:
        with pytest.raises(ValueError, match="expected a NATS subject"):
            a.publish_nowait("a b\r\nPUB x 1", b"")


async def test_send_after_close_raises_client_closed(nats_server: NatsServer) -> None:
    """After close, sends raise ClientClosed; close is idempotent."""
    async with open_client(nats_server.url) as a:
        pass
    assert a.is_closed
    with pytest.raises(ClientClosed):
        a.publish_nowait("x", b"")
    await a.close()


async def test_close_delivers_what_was_published(nats_server: NatsServer) -> None:
    """What was published before close reaches the server (close flushes)."""
    got: list[bytes] = []
    async with open_client(nats_server.url) as b:
        b.subscribe("last", lambda m: got.append(m.payload))
        await b.flush()
        async with open_client(nats_server.url) as a:
            a.publish_nowait("last", b"words")
        with trio.fail_after(LIMIT):
            while not got:
                await trio.sleep(0.001)
    assert [b"words"] == got


async def test_body_errors_reach_the_caller_bare(nats_server: NatsServer) -> None:
    """An error raised in the body of open_client is not wrapped in an ExceptionGroup."""
    with pytest.raises(KeyError):
        async with open_client(nats_server.url):
            raise KeyError("mine")


# -- connecting -----------------------------------------------------------------------------


async def test_connect_refused_is_a_connect_error() -> None:
    """No server: ConnectError naming the address."""
    with trio.fail_after(LIMIT):
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        port = listeners[0].socket.getsockname()[1]
        await listeners[0].aclose()
        with pytest.raises(ConnectError, match=f"127.0.0.1:{port}"):
            async with open_client(f"nats://127.0.0.1:{port}"):
                pass


async def test_user_and_password(tmp_path: Path) -> None:
    """A server with a user: the right password connects (in the URL or as options);
    a wrong one is refused with the server's reason."""
    with running_server(tmp_path, user="node", password="s3cret") as server:
        async with open_client(f"nats://node:s3cret@127.0.0.1:{server.port}") as a:
            await a.flush()
        async with open_client(server.url, user="node", password="s3cret") as a:
            await a.flush()
        with pytest.raises(ConnectError, match="Authorization Violation"):
            async with open_client(server.url, user="node", password="wrong"):
                pass


async def test_token(tmp_path: Path) -> None:
    """A token in the URL authenticates."""
    with running_server(tmp_path, token="t0ken") as server:
        async with open_client(f"nats://t0ken@127.0.0.1:{server.port}") as a:
            await a.flush()


# -- losing the server ----------------------------------------------------------------------


async def test_reconnect_restores_subscriptions(tmp_path: Path) -> None:
    """The server is killed and restarted on the same port: in-flight requests fail with
    ConnectionLost at once, sends raise NotConnected meanwhile, on_disconnect and
    on_reconnect are called, and the subscriptions work again without being redone."""
    events: list[str] = []
    reconnected = trio.Event()

    def on_reconnect() -> None:
        events.append("reconnect")
        reconnected.set()

    with running_server(tmp_path) as server:
        async with open_client(server.url, **FAST) as b, open_client(
                server.url, **FAST, on_disconnect=lambda r: events.append("disconnect"),
                on_reconnect=on_reconnect) as a:
            b.subscribe("svc.echo", echo(b))
            a.subscribe("svc.mute", lambda m: None)
            await a.flush()
            await b.flush()
            with trio.fail_after(LIMIT):
                async with trio.open_nursery() as nursery:
                    async def in_flight() -> None:
                        with pytest.raises(ConnectionLost):
                            await a.request("svc.mute", b"x", timeout=30)
                    nursery.start_soon(in_flight)
                    await trio.sleep(0.02)
                    server.kill()
            with pytest.raises(NotConnected):
                a.publish_nowait("x", b"")
            server = restart(server)
            with trio.fail_after(LIMIT):
                await reconnected.wait()
                while not b.is_connected:
                    await trio.sleep(0.005)
                await b.flush()
                reply = await a.request("svc.echo", b"back")
    server.stop()
    assert b"back" == reply.payload
    assert ["disconnect", "reconnect"] == events
    assert 1 == a.stats()["reconnects"]


async def test_silent_cut_is_detected_by_pings(tmp_path: Path,
                                               logs: list[dict[str, Any]]) -> None:
    """A server frozen with SIGSTOP sends nothing (no FIN): the client's PINGs go
    unanswered and it drops the connection after max_pings_out of them."""
    reasons: list[str] = []
    lost = trio.Event()

    def on_disconnect(reason: str) -> None:
        reasons.append(reason)
        lost.set()

    with running_server(tmp_path) as server:
        async with open_client(server.url, ping_interval=0.05, max_pings_out=2,
                               on_disconnect=on_disconnect, max_reconnect_attempts=0,
                               **FAST) as a:
            await a.flush()
            server.signal(signal.SIGSTOP)
            try:
                with trio.fail_after(LIMIT):
                    await lost.wait()
            finally:
                server.signal(signal.SIGCONT)
            error = await a.wait_closed()
    assert "stale connection" in reasons[0]
    assert isinstance(error, ConnectionLost)
    assert ["nats_disconnected", "nats_gave_up"] == [
        e["event"] for e in logs if e["event"] in ("nats_disconnected", "nats_gave_up")]


async def test_gives_up_after_max_reconnect_attempts(tmp_path: Path) -> None:
    """With the server gone for good, the client closes after max_reconnect_attempts and
    calls on_close with the error; waiting requests got ConnectionLost."""
    closed: list[BaseException | None] = []
    with running_server(tmp_path) as server:
        async with open_client(server.url, max_reconnect_attempts=2,
                               on_close=closed.append, **FAST) as a:
            server.kill()
            with trio.fail_after(LIMIT):
                error = await a.wait_closed()
            assert a.is_closed
            with pytest.raises(ClientClosed):
                a.publish_nowait("x", b"")
    assert isinstance(error, ConnectionLost)
    assert "gave up reconnecting" in str(error)
    assert [error] == closed


# -- a hostile server -----------------------------------------------------------------------


async def hostile(payload: bytes, *, info: bytes = b'{"max_payload":1048576}',
                  repeat: int = 1) -> tuple[BaseException | None, int]:
    """Connect to a fake server that completes the handshake, then sends ``payload``
    ``repeat`` times; the client's closing error and the bytes the server got out."""
    sent = 0

    async def handler(stream: trio.SocketStream) -> None:
        nonlocal sent
        await handshake(stream, info)
        for _ in range(repeat):
            await stream.send_all(payload)
            sent += len(payload)
        await trio.sleep_forever()

    async with fake_server(handler) as url:
        async with open_client(url, reconnect=False) as a:
            with trio.fail_after(LIMIT):
                error = await a.wait_closed()
    return error, sent


async def test_hostile_endless_control_line() -> None:
    """Megabytes with no CRLF: the client closes with an error naming the control line
    limit, having read little more than that limit (the sender is stopped by the closed
    socket long before its 64 MB are through)."""
    error, sent = await hostile(b"x" * (1 << 20), repeat=64)
    assert isinstance(error, ConnectionLost)
    assert "control line longer than 16384 bytes" in str(error)
    assert sent < 32 * (1 << 20)


async def test_hostile_huge_payload() -> None:
    """A MSG declaring a gigabyte is refused from its control line."""
    error, _ = await hostile(b"MSG a 1 1000000000\r\n")
    assert "payload of 1000000000 bytes exceeds the limit of 1048576" in str(error)


async def test_hostile_payload_over_its_own_max_payload() -> None:
    """The limit is the server's own INFO max_payload when that is lower than ours."""
    error, _ = await hostile(b"MSG a 1 2000\r\n", info=b'{"max_payload":1000}')
    assert "exceeds the limit of 1000" in str(error)


async def test_hostile_garbage() -> None:
    """Bytes that are not the protocol close the connection with a clear error."""
    error, _ = await hostile(b"\x00\x01GARBAGE\r\n")
    assert "expected a server operation" in str(error)


async def test_hostile_err_closes_with_its_text() -> None:
    """A -ERR (not a permissions violation) drops the connection, naming it."""
    error, _ = await hostile(b"-ERR 'Unknown Protocol Operation'\r\n")
    assert "Unknown Protocol Operation" in str(error)


# -- TLS ----------------------------------------------------------------------------------


async def test_tls(tmp_path: Path) -> None:
    """A server that requires TLS: a client trusting its CA connects and works; one
    without TLS is refused with a message saying how to enable it."""
    import ssl

    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = (f'tls {{\n  cert_file: "{tmp_path / "cert.pem"}"\n'
           f'  key_file: "{tmp_path / "key.pem"}"\n}}')
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    with running_server(tmp_path / "nats", extra_config=tls) as server:
        async with open_client(server.url, tls=ctx) as a:
            a.subscribe("svc.echo", echo(a))
            await a.flush()
            with trio.fail_after(LIMIT):
                assert b"secret" == (await a.request("svc.echo", b"secret")).payload
        with pytest.raises(ConnectError, match="requires TLS"):
            async with open_client(server.url):
                pass


async def test_hostile_server_that_never_answers_pings(monkeypatch: pytest.MonkeyPatch
                                                       ) -> None:
    """A server that keeps sending (so the connection never looks silent) but never
    answers a PING: the queue of PINGs awaiting a PONG is bounded, and past the bound
    the connection is dropped, saying why."""
    from otpy._cluster import nats_client

    monkeypatch.setattr(nats_client, "MAX_UNANSWERED_PINGS", 3)

    async def handler(stream: trio.SocketStream) -> None:
        await handshake(stream)
        while True:
            await stream.send_all(b"+OK\r\n")
            await trio.sleep(0.005)

    async with fake_server(handler) as url:
        async with open_client(url, reconnect=False, ping_interval=0.01) as a:
            with trio.fail_after(LIMIT):
                error = await a.wait_closed()
    assert "3 PINGs unanswered" in str(error)
