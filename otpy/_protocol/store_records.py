"""The durable store's log records: framing, checksums and a streaming decoder; no I/O.

A log segment is a file of one header and records back to back::

    segment header  b"OTPYLOG\\x01"  u64 segment number                       16 bytes
    record          u32 crc  u32 size  u8 kind  u64 seq  u16 klen  u16 vlen
                    key (klen bytes, UTF-8)  vsn (vlen bytes, UTF-8)  payload
                    size = 13 + klen + vlen + len(payload): the bytes after the size
                    field; crc = CRC-32 of the size field and those bytes

All integers are little-endian. ``kind`` is :data:`PUT` (the payload is a whole state),
:data:`PATCH` (the payload changes some entries of a mapping state), :data:`DELETE`
(no payload) or :data:`BATCH` (an empty key and vsn, and a u32 count as the payload: the
next ``count`` records are one atomic batch, written together). Payloads are opaque
here: the engine (``otpy._store``) pickles them. Sequence numbers grow by exactly one
from record to record, across segments.

:class:`Decoder` turns the bytes of one segment, fed in any chunks, into
:class:`Record` values. What must stay true, whatever the bytes (a log cut short by a
kill -9 mid-write, a torn page, a flipped bit):

- it never raises on the data it is fed;
- what it returns is a prefix of the records that were written: it stops at the first
  record that is incomplete, fails its CRC, claims a size outside ``[13, max_record]``,
  or breaks the sequence, and :meth:`Decoder.close` reports that damaged tail
  (:class:`Damage`: where it starts, why, how many bytes it spans);
- it holds at most one incomplete record, so never more than ``8 + max_record`` bytes
  between feeds (:attr:`Decoder.buffered`), and it counts what it decoded (records,
  bytes) and what it dropped.

Why a CRC and not a length alone: a kill -9 leaves a torn record only at the tail, which
the length catches; a torn page or a flipped bit can sit anywhere, which only a checksum
catches. CRC-32 catches every single-bit flip and burst shorter than 32 bits, and a
damaged size field makes the CRC cover other bytes, so it fails as well (but for a
2**-32 chance).
"""

from __future__ import annotations

import struct
from typing import NamedTuple
from zlib import crc32

MAGIC = b"OTPYLOG\x01"
SEGMENT_HEADER = struct.Struct("<8sQ")
HEADER_SIZE = SEGMENT_HEADER.size  # 16

PUT, PATCH, DELETE, BATCH = 1, 2, 3, 4
KINDS = {PUT: "put", PATCH: "patch", DELETE: "delete", BATCH: "batch"}

_CRC = struct.Struct("<I")
_COUNT = struct.Struct("<I")
_FIXED = struct.Struct("<IBQHH")  # size, kind, seq, klen, vlen: what follows the crc
_PREFIX = struct.Struct("<II")  # crc, size
_AFTER_SIZE = struct.Struct("<BQHH")
PREFIX_SIZE = _PREFIX.size  # 8: crc and size
MIN_SIZE = _AFTER_SIZE.size  # 13: a record with an empty key, vsn and payload
RECORD_OVERHEAD = PREFIX_SIZE + MIN_SIZE  # 21 bytes besides key, vsn and payload
MAX_NAME = 0xFFFF  # bytes of a key or a vsn, encoded

DEFAULT_MAX_RECORD = 16 << 20
"""The default bound on a record's ``size`` field, so on a stored state's pickle."""


def segment_header(segment: int) -> bytes:
    """The 16 bytes a segment file starts with."""
    return SEGMENT_HEADER.pack(MAGIC, segment)


_pack_fixed = _FIXED.pack
_pack_crc = _CRC.pack


def encode_record(kind: int, seq: int, key: str, vsn: str, payload: bytes = b"") -> bytes:
    """One record, ready to append. Raises ``ValueError`` when the key or the vsn encodes
    to more than 65535 bytes of UTF-8 (or holds a lone surrogate), ``TypeError`` when
    either is not a ``str``. The caller bounds the payload (see :class:`Decoder`)."""
    try:
        kb = key.encode()
        vb = vsn.encode()
        rest = _pack_fixed(MIN_SIZE + len(kb) + len(vb) + len(payload), kind, seq,
                           len(kb), len(vb)) + kb + vb + payload
    except AttributeError:
        raise TypeError(f"a store key and vsn must be str, got {key!r} and {vsn!r}") from None
    except UnicodeEncodeError as exc:
        raise ValueError(f"a store key and vsn must be encodable as UTF-8 ({exc}); "
                         f"got {key!r} and {vsn!r}") from None
    except struct.error:
        raise ValueError(
            f"a store key and vsn are at most {MAX_NAME} bytes of UTF-8 each, got "
            f"{len(key.encode())} and {len(vsn.encode())} bytes; use shorter names"
        ) from None
    return _pack_crc(crc32(rest)) + rest


def encode_batch(seq: int, count: int) -> bytes:
    """The record that opens an atomic batch of the ``count`` records that follow it
    (seqs ``seq + 1`` to ``seq + count``), to be written together with them."""
    return encode_record(BATCH, seq, "", "", _COUNT.pack(count))


def batch_count(payload: bytes) -> int:
    """How many records the batch record with this payload announces (0 if the payload
    is not a count: such a batch holds nothing)."""
    return _COUNT.unpack(payload)[0] if len(payload) == _COUNT.size else 0


def whole_batches(records: list[Record], start: int) -> tuple[list[Record], int | None]:
    """Cut ``records`` (a segment's, in order; ``start`` the offset of the first) before
    a batch that is not whole: a batch is written in one write, so one that is cut
    short (by the end of what could be decoded) was never acknowledged, and none of it
    may be kept. Returns the records kept, and the offset where the cut batch starts
    (None when nothing was cut)."""
    for i in range(len(records) - 1, -1, -1):
        rec = records[i]
        if rec.kind == BATCH:
            if len(records) - i - 1 >= batch_count(rec.payload):
                return records, None
            return records[:i], records[i - 1].end if i else start
    return records, None


class Record(NamedTuple):
    """One decoded record. ``end`` is the offset just past it in the segment file."""

    kind: int
    seq: int
    key: str
    vsn: str
    payload: bytes
    end: int


_new = tuple.__new__  # builds a Record without NamedTuple's Python-level __new__


class Damage(NamedTuple):
    """The damaged tail of a segment: from ``offset`` to its end, ``dropped`` bytes that
    hold no record the decoder could trust, and why."""

    offset: int
    reason: str
    dropped: int


class Decoder:
    """A streaming decoder for one segment: :meth:`feed` it the file's bytes in order,
    get back the records they complete; :meth:`close` at the end of the file says
    whether a damaged tail was left.

    ::

        dec = Decoder(segment=1, next_seq=1)
        data = segment_header(1) + encode_record(PUT, 1, "k", "1", b"state")
        [rec] = dec.feed(data[:30]) + dec.feed(data[30:])
        assert (rec.key, rec.seq, rec.payload) == ("k", 1, b"state")
        assert dec.close() is None

    ``segment`` (if given) must be the number in the file's header; ``next_seq`` (if
    given) the first record's seq. With ``header=False`` the bytes are records only.
    """

    __slots__ = ("_buf", "_damage", "_header", "_offset", "bytes", "dropped",
                 "max_record", "next_seq", "records", "segment")

    def __init__(self, *, segment: int | None = None, next_seq: int | None = None,
                 max_record: int = DEFAULT_MAX_RECORD, header: bool = True) -> None:
        self.segment = segment
        self.next_seq = next_seq
        self.max_record = max_record
        self.records = 0
        """Records decoded so far."""
        self.bytes = 0
        """Bytes of the header and of the records decoded so far."""
        self.dropped = 0
        """Bytes fed after the damage (and the damaged record itself)."""
        self._buf = b""
        self._offset = 0  # the stream offset of _buf[0]
        self._header = header
        self._damage: tuple[int, str] | None = None

    @property
    def buffered(self) -> int:
        """Bytes held between feeds: the start of one incomplete record, at most."""
        return len(self._buf)

    @property
    def broken(self) -> bool:
        """True once damage was found: what follows is dropped, not decoded."""
        return self._damage is not None

    def feed(self, data: bytes) -> list[Record]:
        """The records that ``data`` completes, in order. Never raises."""
        if self._damage is not None:
            self.dropped += len(data)
            return []
        buf = self._buf + data if self._buf else bytes(data)
        out: list[Record] = []
        pos = 0
        if self._header:
            if len(buf) < HEADER_SIZE:
                self._buf = buf
                return out
            magic, number = SEGMENT_HEADER.unpack_from(buf)
            if magic != MAGIC:
                return self._broke(buf, 0, f"the file does not start with an otpy log "
                                           f"header (got {bytes(magic)!r})", out)
            if self.segment is not None and number != self.segment:
                return self._broke(buf, 0, f"the header names segment {number}, but the "
                                           f"file is segment {self.segment}", out)
            self._header = False
            pos = HEADER_SIZE
            self.bytes += HEADER_SIZE
        n = len(buf)
        max_record = self.max_record
        unpack_prefix = _PREFIX.unpack_from
        unpack_rest = _AFTER_SIZE.unpack_from
        view = memoryview(buf)
        try:
            while n - pos >= PREFIX_SIZE:
                crc, size = unpack_prefix(buf, pos)
                if size < MIN_SIZE or size > max_record:
                    return self._broke(buf, pos, f"a record claims {size} bytes, outside "
                                                 f"[{MIN_SIZE}, {max_record}]", out)
                end = pos + PREFIX_SIZE + size
                if end > n:
                    break
                if crc32(view[pos + 4:end]) != crc:
                    return self._broke(buf, pos, "a record fails its CRC check", out)
                kind, seq, klen, vlen = unpack_rest(buf, pos + PREFIX_SIZE)
                start = pos + RECORD_OVERHEAD
                if kind not in KINDS or MIN_SIZE + klen + vlen > size:
                    return self._broke(buf, pos, f"a record of kind {kind} has a key and "
                                                 f"vsn of {klen} and {vlen} bytes in "
                                                 f"{size}", out)
                if self.next_seq is not None and seq != self.next_seq:
                    return self._broke(buf, pos, f"expected the record of seq "
                                                 f"{self.next_seq}, found seq {seq}", out)
                try:
                    key = str(view[start:start + klen], "utf-8")
                    vsn = str(view[start + klen:start + klen + vlen], "utf-8")
                except UnicodeDecodeError:
                    return self._broke(buf, pos, "a record's key or vsn is not UTF-8", out)
                self.next_seq = seq + 1
                out.append(_new(Record, (kind, seq, key, vsn, buf[start + klen + vlen:end],
                                         self._offset + end)))
                self.records += 1
                self.bytes += end - pos
                pos = end
        finally:
            view.release()
        self._buf = buf[pos:]
        self._offset += pos
        return out

    def _broke(self, buf: bytes, pos: int, reason: str, out: list[Record]) -> list[Record]:
        self._damage = (self._offset + pos, reason)
        self.dropped += len(buf) - pos
        self._buf = b""
        return out

    def close(self) -> Damage | None:
        """The end of the segment: the damaged tail, if any (an incomplete last record
        is one). An empty segment (no bytes at all) has none."""
        if self._damage is not None:
            return Damage(self._damage[0], self._damage[1], self.dropped)
        if not self._buf:
            return None
        left = len(self._buf)
        self._damage = (self._offset, self._incomplete(left))
        self.dropped += left
        self._buf = b""
        return Damage(self._damage[0], self._damage[1], self.dropped)

    def _incomplete(self, left: int) -> str:
        if self._header:
            return f"the segment header is incomplete ({left} of {HEADER_SIZE} bytes)"
        if left < PREFIX_SIZE:
            return f"the last record is incomplete ({left} bytes, its size not even whole)"
        size = _PREFIX.unpack_from(self._buf)[1]
        return (f"the last record is incomplete ({left} of {PREFIX_SIZE + size} bytes): "
                f"the write was cut short")
