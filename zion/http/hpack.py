"""HPACK (RFC 7541) for HTTP/2 response heads: the header block zion sends
instead of zttp's. I/O-free; h2_stream.py puts the block into the HEADERS
frame zttp made (zttp_shim.own_head).

Why: zttp 0.0.35 writes every response field as a literal "without
indexing" (RFC 7541 6.2.2), so every response repeats `server`, `date`,
`content-type` in full, and each field costs ~1.8k instructions in zttp
(bench: 4 fields ~25k against ~18k for none). Here a field seen twice on a
connection goes into the client's dynamic table (6.2.1) and is sent as a
one-byte index (6.1) from then on; the block of a repeated head is a few
table lookups. Removed by an indexing encoder in zttp.

It can own the client's dynamic table because zttp never adds to it: zttp's
blocks (1xx, trailers, a WebSocket's head) are literals without indexing
and static indices, so they change nothing the indices here count on.

Fields zttp would refuse are refused here too (`head` returns None and the
caller lets zttp refuse them: the same error either way): names of token
characters in lower case, values without control characters or edge
whitespace, no connection-specific fields (RFC 9113 8.2.1, 8.2.2).
"""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Sequence

# The client's decoder table before its SETTINGS say otherwise (RFC 9113
# 6.5.2); also the most we use when it allows more: enough for a response's
# repeated fields, and bounded per connection whatever the client says.
DEFAULT_TABLE = 4096
# A header block zion makes fits one HEADERS frame: SETTINGS_MAX_FRAME_SIZE
# is at least 16384 (RFC 9113 6.5.2); larger heads are zttp's (CONTINUATION).
_MAX_BLOCK = 16000
# Not indexed: per-client secrets (RFC 7541 7.1.3).
_SENSITIVE = frozenset({b"set-cookie", b"authorization", b"proxy-authorization", b"cookie"})
# Fields seen once (their hashes: a collision only indexes a field one head
# early), waiting for a second sighting to be indexed; forgotten past this.
_SEEN_MAX = 256
# Heads whose blocks are kept for reuse (h2_stream: repeated answers): at most
# this many, each of at most _CACHED_HEAD bytes of fields, so a connection
# holds at most ~16 KiB here whatever its answers are.
_CACHED_HEADS, _CACHED_HEAD = 16, 1024

# RFC 7541 Appendix A: the static table's names (first index of each).
_STATIC_NAMES = {name: i for i, name in reversed(list(enumerate((
    b":authority", b":method", b":method", b":path", b":path", b":scheme", b":scheme",
    b":status", b":status", b":status", b":status", b":status", b":status", b":status",
    b"accept-charset", b"accept-encoding", b"accept-language", b"accept-ranges", b"accept",
    b"access-control-allow-origin", b"age", b"allow", b"authorization", b"cache-control",
    b"content-disposition", b"content-encoding", b"content-language", b"content-length",
    b"content-location", b"content-range", b"content-type", b"cookie", b"date", b"etag",
    b"expect", b"expires", b"from", b"host", b"if-match", b"if-modified-since",
    b"if-none-match", b"if-range", b"if-unmodified-since", b"last-modified", b"link",
    b"location", b"max-forwards", b"proxy-authenticate", b"proxy-authorization", b"range",
    b"referer", b"refresh", b"retry-after", b"server", b"set-cookie",
    b"strict-transport-security", b"transfer-encoding", b"user-agent", b"vary", b"via",
    b"www-authenticate"), start=1)))}
_STATIC_ENTRIES = 61
# :status values with a static entry (indexed, one byte); others are a
# literal on the static name :status (8), as zttp writes them.
_STATUS = {200: b"\x88", 204: b"\x89", 206: b"\x8a", 304: b"\x8b", 400: b"\x8c",
           404: b"\x8d", 500: b"\x8e"}
# The fields zttp refuses (probed byte by byte; tests/http/test_hpack.py
# holds the two to the same answers).
_NAME = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+").fullmatch
_VALUE = re.compile(rb"(?:[^\x00-\x20\x7f](?:[^\x00-\x1f\x7f]*[^\x00-\x20\x7f])?)?").fullmatch
_CONNECTION_SPECIFIC = frozenset({b"connection", b"keep-alive", b"proxy-connection",
                                  b"transfer-encoding", b"upgrade"})


def integer(value: int, prefix: int, first: int) -> bytes:
    """RFC 7541 5.1: `value` on a `prefix`-bit prefix of a byte starting `first`."""
    limit = (1 << prefix) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(data: bytes) -> bytes:
    """RFC 7541 5.2, not Huffman-coded (as zttp sends them)."""
    return integer(len(data), 7, 0) + data


def valid(name: bytes, value: bytes) -> bool:
    """A response field zttp would send (and RFC 9113 8.2 allows)."""
    if _NAME(name) is None or _VALUE(value) is None:
        return False
    if name in _CONNECTION_SPECIFIC:
        return False
    return name != b"te" or value == b"trailers"


class Encoder:
    """One connection's response header blocks and the client's dynamic
    table as they leave it (RFC 7541 2.3.2: entries indexed from the newest,
    evicted oldest first)."""

    __slots__ = ("table", "entries", "inserted", "size", "max_size", "updates", "seen",
                 "blocks", "sightings", "last_status", "last_fields", "last_block",
                 "head_size")

    def __init__(self) -> None:
        self.table: dict[tuple[bytes, bytes], int] = {}  # field -> its insertion number
        self.entries: deque[tuple[tuple[bytes, bytes], int]] = deque()  # oldest first
        self.inserted = 0
        self.size = 0  # RFC 7541 4.1: 32 + name + value a field
        self.max_size = DEFAULT_TABLE
        # Dynamic table size updates the next block must open with (4.2).
        self.updates: list[int] = []
        self.seen: set[int] = set()
        # The blocks of heads made while the table has not changed: a repeated
        # head (the same status and fields) is one dict lookup. Emptied by every
        # change of the table, as their indices would be wrong after it.
        self.blocks: dict[tuple[object, ...], bytes] = {}
        self.sightings = 0  # fields added to `seen`
        # The last head's block, for a connection that repeats one answer:
        # comparing its fields costs less than hashing them (h2_stream).
        self.last_status = 0
        self.last_fields: list[tuple[bytes, bytes]] | None = None
        self.last_block = b""
        self.head_size = 0  # the last head's field bytes (_head)

    def resize(self, limit: int) -> None:
        """The client's SETTINGS_HEADER_TABLE_SIZE (its decoder's limit,
        RFC 7541 4.2): the table shrinks now, and the next block says the
        size it uses (the smallest since the last block, then the final)."""
        size = min(limit, DEFAULT_TABLE)
        if size == self.max_size:
            return
        updates = self.updates
        if not updates:
            updates.append(size)
        elif size < updates[0]:
            updates[:] = [size]
        else:
            updates[1:] = [size]
        self.max_size = size
        self.blocks.clear()
        self.last_fields = None
        self._evict(0)

    def head(self, status: int, fields: list[tuple[bytes, bytes]]) -> bytes | None:
        """The header block of a response head; None if a field is one zttp
        refuses, or the block would need CONTINUATION frames. (h2_stream
        looks at last_fields itself first.)"""
        try:
            key = (status, *fields)
            block = self.blocks.get(key)
            if block is None:
                changes = self.sightings + self.inserted
                block = self._head(status, fields)
                # Only a block that changed nothing may be sent again: one that
                # indexes a field must not be, one with a field seen for the
                # first time is followed by one that indexes it.
                if (block is None or changes != self.sightings + self.inserted
                        or self.head_size > _CACHED_HEAD):
                    return block
                if len(self.blocks) >= _CACHED_HEADS:
                    self.blocks.clear()
                self.blocks[key] = block
        except TypeError:  # a field that is not a pair of bytes: zttp's to refuse
            return None
        self.last_status = status
        self.last_fields = fields
        self.last_block = block
        return block

    @staticmethod
    def _status(status: int) -> bytes:
        return b"\x08" + _string(b"%d" % status)

    def _head(self, status: int, headers: Sequence[tuple[bytes, bytes]]) -> bytes | None:
        """The fields are checked first (nothing is indexed for a head that
        zttp will refuse), then each one is indexed once seen twice."""
        table = self.table
        total = 0
        for name, value in headers:
            total += len(name) + len(value)
            if (name, value) not in table and not valid(name, value):
                return None
        if total + 8 * len(headers) > _MAX_BLOCK or not 200 <= status <= 999:
            return None
        self.head_size = total
        parts = [integer(size, 5, 0x20) for size in self.updates]
        self.updates = []
        parts.append(_STATUS.get(status) or self._status(status))
        seen = self.seen
        most = self.max_size // 4  # a field that would empty the table is never worth it
        for field in headers:
            number = table.get(field)
            if number is not None:
                parts.append(integer(_STATIC_ENTRIES + self.inserted - number, 7, 0x80))
                continue
            name, value = field
            size = 32 + len(name) + len(value)
            first = 0x00  # literal without indexing (6.2.2), 4-bit name index
            prefix = 4
            if size <= most and name not in _SENSITIVE:
                sighting = hash(field)
                if sighting in seen:
                    seen.discard(sighting)
                    first = 0x40  # with incremental indexing (6.2.1)
                    prefix = 6
                else:
                    if len(seen) >= _SEEN_MAX:
                        seen.clear()
                    seen.add(sighting)
                    self.sightings += 1
            static = _STATIC_NAMES.get(name)
            if static is not None:
                parts.append(integer(static, prefix, first))
            else:
                parts.append(bytes((first,)) + _string(name))
            parts.append(_string(value))
            if first:
                self._insert(field, size)
        return b"".join(parts)

    def _insert(self, field: tuple[bytes, bytes], size: int) -> None:
        self.blocks.clear()
        self.last_fields = None
        self._evict(size)
        self.table[field] = self.inserted
        self.inserted += 1
        self.entries.append((field, size))
        self.size += size

    def _evict(self, room: int) -> None:
        """RFC 7541 4.4: oldest first, until `room` more bytes fit."""
        entries = self.entries
        while entries and self.size + room > self.max_size:
            field, size = entries.popleft()
            self.size -= size
            del self.table[field]
