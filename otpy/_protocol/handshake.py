"""The admin channel's mutual authentication and sealed session: no I/O, no trio.

Both sides prove that they hold the node's cookie, and what follows is bound to the
exchange that proved it::

    node    [2, "challenge", [node_nonce]]                  32 random bytes
    client  [0, msgid, "auth", [client_nonce, client_proof]]
    node    [1, msgid, nil, node_proof]                     (or AuthFailed, and close)

    client_proof = HMAC-SHA256(cookie, "otpy admin client" 0x00 node_nonce client_nonce)
    node_proof   = HMAC-SHA256(cookie, "otpy admin node"   0x00 node_nonce client_nonce)

The client checks ``node_proof`` before it sends anything else, so a listener that
does not hold the cookie (a wrong port, a stale address) gets no request from it. Every
message after the exchange, both ways, is sealed::

    [3, body, mac]   body: one MessagePack-RPC message, msgpack-encoded
                     mac = HMAC-SHA256(key, seq body), seq its 8-byte big-endian count
    key = HMAC-SHA256(cookie, "otpy admin session" 0x00 direction node_nonce client_nonce)
          direction "client->node" or "node->client"; seq counts that direction's
          sealed messages from 0

What must stay true: a proof is never valid for another exchange (each side's nonce is
fresh per connection, and the role label keeps a node's proof from passing as a
client's); a message is accepted only with the mac of its place in its own session, so
whoever relays the exchange without the cookie can forward the client's messages
unchanged, in order, and nothing else: a replayed, reordered, altered or injected
message ends the session (a sealed message too large to be read is skipped unopened
and answered FrameTooLarge: it runs nothing). The cookie never crosses the wire;
comparisons take constant time.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Any

import msgpack  # type: ignore[import-untyped]

from .msgpack_rpc import SEALED, Decoder, Fatal, Invalid, Message, Sealed

NONCE_SIZE = 32
# What sealing adds to a message: [3, body, mac] around it (array and type bytes, the
# body's bin32 header, the mac's 34 bytes), with room to spare.
SEAL_OVERHEAD = 64
_CLIENT = b"otpy admin client\x00"
_NODE = b"otpy admin node\x00"
_SESSION = b"otpy admin session\x00"
TO_NODE, TO_CLIENT = b"client->node", b"node->client"


def new_nonce() -> bytes:
    """A fresh random nonce; one per connection and side."""
    return secrets.token_bytes(NONCE_SIZE)


def _key(cookie: str | bytes) -> bytes:
    return cookie.encode() if isinstance(cookie, str) else cookie


def _mac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


def client_proof(cookie: str | bytes, node_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the client sends to prove it holds ``cookie``."""
    return _mac(_key(cookie), _CLIENT + node_nonce + client_nonce)


def node_proof(cookie: str | bytes, node_nonce: bytes, client_nonce: bytes) -> bytes:
    """What the node answers to prove it holds ``cookie`` too."""
    return _mac(_key(cookie), _NODE + node_nonce + client_nonce)


def proves(expected: bytes, proof: object) -> bool:
    """Whether ``proof`` is ``expected``, compared in constant time."""
    return isinstance(proof, bytes) and hmac.compare_digest(expected, proof)


def is_nonce(value: object) -> bool:
    return isinstance(value, bytes) and len(value) == NONCE_SIZE


class Session:
    """One side of an authenticated session: seals what it sends and opens what it
    receives, each direction with its own key and count.

    ::

        node = Session(cookie, node_nonce, client_nonce, node_side=True)
        client = Session(cookie, node_nonce, client_nonce, node_side=False)
        [msg] = node.open(client.seal(encode_request(1, "releases", ())))
    """

    __slots__ = ("_decoder", "_in_key", "_out_key", "_received", "_sent")

    def __init__(self, cookie: str | bytes, node_nonce: bytes, client_nonce: bytes, *,
                 node_side: bool, decoder: Decoder | None = None) -> None:
        key, nonces = _key(cookie), node_nonce + client_nonce
        to_node = _mac(key, _SESSION + TO_NODE + nonces)
        to_client = _mac(key, _SESSION + TO_CLIENT + nonces)
        self._out_key, self._in_key = ((to_client, to_node) if node_side
                                       else (to_node, to_client))
        self._sent = 0
        self._received = 0
        # Decodes each sealed body: one message, within the connection's limits.
        self._decoder = decoder or Decoder(replies=not node_side)

    def seal(self, frame: bytes | bytearray) -> bytes:
        """``[3, frame, mac]`` for one encoded message ``frame``."""
        body = bytes(frame)
        mac = _mac(self._out_key, self._sent.to_bytes(8, "big") + body)
        self._sent += 1
        data: bytes = msgpack.packb((SEALED, body, mac), use_bin_type=True)
        return data

    def seal_all(self, frames: list[bytes]) -> bytes:
        return b"".join(self.seal(f) for f in frames)

    def open(self, sealed: Sealed) -> list[Message]:
        """The message inside ``sealed``, if its mac is the one due next: else a
        :class:`Fatal`, and the session is over."""
        expected = _mac(self._in_key, self._received.to_bytes(8, "big") + sealed.body)
        if not hmac.compare_digest(expected, sealed.mac):
            return [Fatal(f"sealed message {self._received} of the session does not carry "
                          f"its mac: replayed, reordered, altered or injected")]
        self._received += 1
        decoder = self._decoder
        if decoder.buffered or decoder.broken:  # pragma: no cover - a whole body each
            return [Fatal("a sealed body was not one whole message")]
        out = decoder.feed(sealed.body)
        if len(out) != 1 or decoder.buffered:
            return [Fatal(f"a sealed body must hold one whole message; it held "
                          f"{len(out)} and {decoder.buffered} bytes more")]
        return out

    def open_all(self, messages: list[Any]) -> list[Message]:
        """Open every message of a read; anything unsealed is Fatal (and ends the list)."""
        out: list[Message] = []
        for msg in messages:
            if type(msg) is Sealed:
                opened = self.open(msg)
            elif type(msg) is Invalid and msg.sealed:
                # Skipped unopened for its size: its mac was never checked, so all it
                # earns is its error reply; it still takes its place in the count.
                self._received += 1
                opened = [msg]
            elif type(msg) is Fatal:
                opened = [msg]
            else:
                opened = [Fatal(f"an unsealed message in an authenticated session: "
                                f"{type(msg).__name__}")]
            out.extend(opened)
            if type(opened[-1]) is Fatal:
                break
        return out
