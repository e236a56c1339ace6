"""A raw HTTP/1.1 client for the tests of the node's HTTP endpoint, written on
httptools' response parser rather than on otpy's own code."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httptools
import trio


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)

    def __repr__(self) -> str:
        return f"Reply({self.status}, {self.body[:80]!r})"


class Client:
    """A raw HTTP/1.1 client over one connection: send bytes, read whole responses."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.parser = httptools.HttpResponseParser(self)
        self.done: list[Reply] = []
        self.headers: dict[str, str] = {}
        self.body = bytearray()
        self.closed = False

    # httptools' callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode().lower()] = value.decode()

    def on_body(self, body: bytes) -> None:
        self.body += body

    def on_message_complete(self) -> None:
        self.done.append(Reply(self.parser.get_status_code(), self.headers,
                               bytes(self.body)))
        self.headers, self.body = {}, bytearray()

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def read(self, n: int = 1) -> list[Reply]:
        """The next ``n`` responses (fewer if the server closes first)."""
        while len(self.done) < n and not self.closed:
            data = await self.stream.receive_some(65536)
            if not data:
                self.closed = True
                break
            self.parser.feed_data(data)
        out, self.done = self.done[:n], self.done[n:]
        return out

    async def eof(self) -> bool:
        """Whether the server closes the connection (reading and dropping the rest)."""
        while not self.closed:
            try:
                data = await self.stream.receive_some(65536)
            except trio.BrokenResourceError:  # a reset is a close too
                data = b""
            if not data:
                self.closed = True
        return True

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: tuple[tuple[str, str], ...] = ()) -> Reply:
        await self.send(raw(method, path, body, headers))
        [reply] = await self.read(1)
        return reply


def raw(method: str, path: str, body: bytes = b"",
        headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: test\r\n"
    if body or method == "POST":
        head += f"Content-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode() + b"\r\n" + body


@asynccontextmanager
async def connect(port: int) -> AsyncIterator[Client]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        yield Client(stream)


async def call(port: int, name: str, body: bytes, query: str = "",
               headers: tuple[tuple[str, str], ...] = ()) -> Reply:
    async with connect(port) as client:
        return await client.request("POST", f"/call/{name}{query}", body, headers)


async def healthy(port: int) -> bool:
    """Another client is still served."""
    async with connect(port) as client:
        return 200 == (await client.request("GET", "/healthz")).status
