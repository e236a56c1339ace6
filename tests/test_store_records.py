"""The store's record codec (``otpy._protocol.store_records``): what it encodes it
decodes, in any chunks; and whatever a crash or a bad disk makes of a log (cut short, a
bit flipped, garbage), it decodes a prefix of the records and reports the damaged tail,
never raising, never holding more than one record's bound."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from otpy._protocol.store_records import (
    DELETE,
    HEADER_SIZE,
    PATCH,
    PREFIX_SIZE,
    PUT,
    Damage,
    Decoder,
    Record,
    encode_record,
    segment_header,
)

MAX_RECORD = 4096

names = st.text(max_size=12)
records = st.lists(
    st.tuples(st.sampled_from([PUT, PATCH, DELETE]), names, names,
              st.binary(max_size=300)),
    max_size=12)


def build(ops: list[tuple[int, str, str, bytes]], first_seq: int = 1,
          segment: int = 1) -> tuple[bytes, list[Record]]:
    """A segment's bytes and the records they hold."""
    data = segment_header(segment)
    expected = []
    for seq, (kind, key, vsn, payload) in enumerate(ops, first_seq):
        data += encode_record(kind, seq, key, vsn, payload)
        expected.append(Record(kind, seq, key, vsn, payload, len(data)))
    return data, expected


def decode(data: bytes, cuts: list[int] | None = None, **options: object
           ) -> tuple[list[Record], Damage | None, Decoder]:
    """Feed ``data`` split at ``cuts``; the records, the damage, the decoder."""
    dec = Decoder(max_record=MAX_RECORD, **options)  # type: ignore[arg-type]
    out: list[Record] = []
    bounds = [0, *sorted(c for c in (cuts or []) if 0 < c < len(data)), len(data)]
    for a, b in itertools.pairwise(bounds):
        out += dec.feed(data[a:b])
        assert dec.buffered <= PREFIX_SIZE + MAX_RECORD
    return out, dec.close(), dec


@given(records, st.lists(st.integers(0, 5000), max_size=8))
def test_round_trip_in_any_chunks(ops: list[tuple[int, str, str, bytes]],
                                  cuts: list[int]) -> None:
    """Encoded records decode back, with their end offsets, however the bytes are fed."""
    data, expected = build(ops)
    got, damage, dec = decode(data, cuts, segment=1, next_seq=1)
    assert (expected, None) == (got, damage)
    assert (len(expected), len(data), 0) == (dec.records, dec.bytes, dec.dropped)


@given(records, st.data())
def test_a_truncated_log_decodes_to_a_prefix(ops: list[tuple[int, str, str, bytes]],
                                            data: st.DataObject) -> None:
    """A log cut anywhere (a kill -9 mid-write) gives the records wholly before the cut,
    and a damaged tail exactly when the cut falls inside a record or the header."""
    raw, expected = build(ops)
    cut = data.draw(st.integers(0, len(raw)))
    got, damage, _ = decode(raw[:cut], data.draw(st.lists(st.integers(0, cut))))
    prefix = [r for r in expected if r.end <= cut]
    assert prefix == got
    good_end = prefix[-1].end if prefix else HEADER_SIZE if cut >= HEADER_SIZE else 0
    assert (damage is None) == (cut == good_end)
    if damage is not None:
        assert (good_end, cut - good_end) == (damage.offset, damage.dropped)


@given(records.filter(bool), st.data())
def test_a_flipped_bit_drops_the_record_it_hits_and_all_after(
        ops: list[tuple[int, str, str, bytes]], data: st.DataObject) -> None:
    """A bit flipped anywhere (a torn page, a bad disk): the records before the one it
    hits are decoded, nothing from there on, and the damage is reported."""
    raw, expected = build(ops)
    pos = data.draw(st.integers(0, len(raw) - 1))
    bit = data.draw(st.integers(0, 7))
    flipped = bytearray(raw)
    flipped[pos] ^= 1 << bit
    got, damage, _ = decode(bytes(flipped), data.draw(st.lists(st.integers(0, len(raw)))),
                            segment=1, next_seq=1)
    before = [r for r in expected if r.end <= pos]
    assert before == got
    assert damage is not None
    good_end = before[-1].end if before else HEADER_SIZE if pos >= HEADER_SIZE else 0
    assert good_end == damage.offset


@given(st.binary(max_size=3000), st.lists(st.integers(0, 3000), max_size=8),
       st.booleans())
def test_garbage_never_raises(garbage: bytes, cuts: list[int], header: bool) -> None:
    """Arbitrary bytes decode without an exception, within the buffer bound."""
    got, damage, dec = decode(garbage, cuts, header=header)
    assert dec.records == len(got)
    assert (damage is None) == (dec.bytes == len(garbage))


@settings(max_examples=30)
@given(st.integers(MAX_RECORD + 1, 2**32 - 1), st.integers(1, 10))
def test_an_absurd_length_is_refused_before_it_is_buffered(size: int, chunks: int) -> None:
    """A record claiming more than ``max_record`` bytes is damage at once: the decoder
    does not wait for (or hold) the bytes it claims."""
    head = segment_header(1) + (0).to_bytes(4, "little") + size.to_bytes(4, "little")
    dec = Decoder(max_record=MAX_RECORD)
    assert [] == dec.feed(head)
    assert dec.broken
    for _ in range(chunks):
        assert [] == dec.feed(b"\0" * 1000)
        assert 0 == dec.buffered
    damage = dec.close()
    assert damage is not None
    assert (HEADER_SIZE, 8 + 1000 * chunks) == (damage.offset, damage.dropped)
    assert f"claims {size} bytes" in damage.reason


def test_a_gap_in_the_sequence_is_damage() -> None:
    """Seqs grow by one: a record out of sequence (a lost record, a stale file) ends the
    decoded prefix."""
    data = (segment_header(1) + encode_record(PUT, 5, "a", "1", b"x")
            + encode_record(PUT, 7, "a", "1", b"y"))
    got, damage, _ = decode(data, next_seq=5)
    assert [5] == [r.seq for r in got]
    assert damage is not None
    assert "expected the record of seq 6, found seq 7" in damage.reason


def test_a_header_naming_another_segment_is_damage() -> None:
    """A segment file whose header names another number is not trusted at all."""
    got, damage, _ = decode(segment_header(2) + encode_record(PUT, 1, "a", "1"), segment=1)
    assert [] == got
    assert damage is not None
    assert (0, "the header names segment 2, but the file is segment 1") == (
        damage.offset, damage.reason)


def test_an_empty_segment_has_no_damage() -> None:
    """A segment created and killed before its header was written holds nothing."""
    assert ([], None) == decode(b"")[:2]


@pytest.mark.parametrize(("key", "vsn", "error"), [
    ("k" * 70_000, "1", ValueError), ("k", "\udc80", ValueError), (("k",), "1", TypeError)])
def test_encode_refuses_what_it_cannot_frame(key: object, vsn: str,
                                             error: type[Exception]) -> None:
    """Keys and vsns are str of at most 65535 bytes of UTF-8: anything else is refused
    with a message saying so."""
    with pytest.raises(error, match="store key and vsn"):
        encode_record(PUT, 1, key, vsn)  # type: ignore[arg-type]
