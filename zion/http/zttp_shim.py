"""zttp (sans-I/O HTTP/2, Zig core) behind a small typed surface, the only
module of zion that imports it: the codec, its events, errors and error
codes by name; frame bytes zion must write or rewrite itself; and a fresh
codec seeded to carry on a connection. No policy here - h2.py decides when
any of it is used.

What zion uses of the frame layer (a replacement must offer this much):

- `new_connection()` / `seeded_connection()`: a server codec (`H2Connection`).
  zion calls `initiate_connection()`, `initiate_upgrade_connection(method,
  target, headers, settings)`, `receive_data(bytes)`, `next_event()`,
  `data_to_send() -> bytes`, `has_pending_send()`, `send_window`, `close(code,
  last_stream_id)` and `stream(id)`, whose handle has `send_response(status,
  headers=None, end_stream=False)`, `send_informational(status)`,
  `send_data(bytes)`, `end_message(trailers=None)`, `reset(code)` and
  `pending_bytes` (bytes waiting for the peer's window).
- Events, told apart by `type(event) is ...` (exact classes, no subclasses),
  and the attributes zion reads of each:
  `NeedData` (none), `ConnectionClosed` (none);
  `Request`: stream_id, method, target, path, query, headers (an iterable
  of (bytes, bytes) pairs, usually a list), protocol (RFC 8441, or None),
  end_stream;
  `Data`: stream_id, data; `EndOfMessage`: stream_id;
  `WindowUpdate`: stream_id; `RstStream`: stream_id;
  `Settings`: params ((id, value) pairs); `Ping`: ack, data;
  `GoAway`: nothing (that it came).
- Errors: `ProtocolError`, and its two kinds, `RemoteProtocolError` (the
  peer broke the protocol; the codec has queued the GOAWAY that says why)
  and `LocalProtocolError` (zion asked for something the stream's state or
  the protocol does not allow); `H2ErrorCode`, the RFC 9113 7 codes.

They are zttp's own objects, re-exported, not translated into zion types:
a name looked up here costs what `zttp.X` did, where a translated event
costs every request an object and a copy of its fields. Measured with
bench/h2_instructions.py --uvloop (instructions per request, one stream /
16 streams per read): zttp imported in h2.py 94.3k / 84.8k; re-exported
here 94.1k / 84.8k; Request and Data events translated into zion's own
slotted classes by a shim next_event() 97.3k / 88.0k (+3.2%, +3.8%).

Why byte surgery at all, and the upstream API that would remove each piece
(zttp 0.0.35, Kludex/zttp#49 asks for settable limits):

- `rewrite_settings`: zttp's SETTINGS preface has fixed values; zion
  advertises its own limits and windows. Removed by a settings argument to
  `Connection(...)` / `initiate_connection(settings=...)`.
- `take_window_updates`: zttp credits receive windows as it parses; zion
  gives credit back only as the app reads. Removed by an HTTP/3-style
  `consume_data(stream_id, n)` on H2Connection (zttp has it for HTTP/3).
- `ping`, `goaway`: zttp has no call that sends a PING, and its `close()`
  sends one final GOAWAY; the graceful two-step GOAWAY of RFC 9113 6.8
  needs two. Removed by `send_ping(data)` and a non-final `goaway(last_id)`.
- `own_head`: zttp writes every response field as a literal without
  indexing; zion sends its own header block (zion/http/hpack.py) in the
  HEADERS frame zttp made for a head without fields. Removed by an
  indexing HPACK encoder in zttp.
- `end_on_last_data`: zttp ends a message with an empty DATA frame of its
  own; zion moves END_STREAM onto the last DATA frame (RFC 9113 8.1 allows
  either): one frame less per response for the client. Removed by an
  `end_stream` argument to `send_data`.
- `seeded_connection` + `FrameRouter`: zttp ends a connection at its 4096th
  stream or 257th reset (ENHANCE_YOUR_CALM, a lifetime count, whatever the
  rate). zion hands the connection to a fresh codec before that, keeping
  the TCP/TLS connection. Removed by settable (or rate-based) flood limits.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

import zttp
from zttp import ConnectionClosed as ConnectionClosed
from zttp import Data as Data
from zttp import EndOfMessage as EndOfMessage
from zttp import GoAway as GoAway
from zttp import H2Connection as H2Connection
from zttp import H2ErrorCode as H2ErrorCode
from zttp import LocalProtocolError as LocalProtocolError
from zttp import NeedData as NeedData
from zttp import Ping as Ping
from zttp import ProtocolError as ProtocolError
from zttp import RemoteProtocolError as RemoteProtocolError
from zttp import Request as Request
from zttp import RstStream as RstStream
from zttp import Settings as Settings
from zttp import WindowUpdate as WindowUpdate

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# Frame types and SETTINGS ids (RFC 9113 6, 6.5.2; RFC 8441 3).
HEADERS_FRAME, PRIORITY_FRAME, SETTINGS_FRAME = 0x1, 0x2, 0x4
PING_FRAME, GOAWAY_FRAME, WINDOW_UPDATE_FRAME = 0x6, 0x7, 0x8
END_STREAM, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x4, 0x8, 0x20
HEADER_TABLE_SIZE, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE = 0x1, 0x3, 0x4
MAX_HEADER_LIST_SIZE, ENABLE_CONNECT_PROTOCOL = 0x6, 0x8
DEFAULT_HEADER_TABLE = 4096  # RFC 9113 6.5.2 (zttp's decoder is sized so)
DEFAULT_WINDOW = 65535  # RFC 9113 6.9.2, before any SETTINGS or WINDOW_UPDATE
MAX_STREAM_ID = 2**31 - 1
_ACK = 0x1


def frame_header(length: int, kind: int, flags: int, stream_id: int) -> bytes:
    return struct.pack("!BHBBI", length >> 16, length & 0xFFFF, kind, flags, stream_id)


def window_update(stream_id: int, increment: int) -> bytes:
    return frame_header(4, WINDOW_UPDATE_FRAME, 0, stream_id) + increment.to_bytes(4, "big")


def ping(opaque: bytes) -> bytes:
    """One PING (RFC 9113 6.7): 8 opaque bytes the ACK echoes."""
    return frame_header(8, PING_FRAME, 0, 0) + opaque


def goaway(last_stream_id: int, code: int = 0) -> bytes:
    """A GOAWAY that zttp's state does not see: the first, non-final one of
    a graceful shutdown (RFC 9113 6.8: last-stream-id 2^31-1)."""
    return frame_header(8, GOAWAY_FRAME, 0, 0) + struct.pack("!II", last_stream_id, code)


def settings(pairs: dict[int, int], ack: bool = False) -> bytes:
    payload = b"".join(struct.pack("!HI", k, v) for k, v in pairs.items())
    return frame_header(len(payload), SETTINGS_FRAME, _ACK if ack else 0, 0) + payload


def rewrite_settings(preface: bytes, values: dict[int, int]) -> bytes:
    """The server preface is one SETTINGS frame of 6-byte (id, value) pairs
    (RFC 9113 6.5.1): change the values of the given ids, add the missing."""
    length = int.from_bytes(preface[:3], "big")
    if preface[3] != SETTINGS_FRAME or len(preface) < 9 + length:
        return preface
    pairs = dict(struct.iter_unpack("!HI", preface[9:9 + length]))
    pairs.update(values)
    payload = b"".join(struct.pack("!HI", k, v) for k, v in pairs.items())
    return (len(payload).to_bytes(3, "big") + preface[3:9] + payload
            + preface[9 + length:])


def take_window_updates(data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
    """`data` without its WINDOW_UPDATE frames, and their (stream id, increment)."""
    kept = []
    taken = []
    start = pos = 0
    end = len(data)
    while pos + 9 <= end:
        length = int.from_bytes(data[pos:pos + 3], "big")
        nxt = pos + 9 + length
        if data[pos + 3] == WINDOW_UPDATE_FRAME and length == 4:
            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            taken.append((sid, int.from_bytes(data[pos + 9:nxt], "big") & 0x7FFFFFFF))
            kept.append(data[start:pos])
            start = nxt
        pos = nxt
    if start == 0:
        return data, taken
    kept.append(data[start:])
    return b"".join(kept), taken


def own_head(data: bytes, stream_id: int, block: bytes) -> bytes | None:
    """zttp's frames for one response head (queued since its last
    data_to_send, so this stream's only), whose first frame is the HEADERS
    frame of a head sent without fields: that frame with `block` as its
    header block instead, its flags kept (END_STREAM for a bodyless answer;
    END_HEADERS: zttp's block of one field fits one frame), and what
    follows with end_on_last_data. None if the first frame is not that."""
    if len(data) < 9 or data[3] != HEADERS_FRAME or data[5:9] != stream_id.to_bytes(4, "big"):
        return None
    rest = 9 + (data[0] << 16 | data[1] << 8 | data[2])
    head = frame_header(len(block), HEADERS_FRAME, data[4], stream_id) + block
    if rest == len(data):
        return head
    return head + end_on_last_data(data[rest:])


def end_on_last_data(data: bytes) -> bytes:
    """Frames of one stream that zttp ended with an empty END_STREAM DATA
    frame: END_STREAM on the DATA frame before it instead, and the empty
    one gone (RFC 9113 6.1: END_STREAM on the last DATA frame). Anything
    else (the body waits for the client's window, no DATA before it) is
    returned as it is."""
    end = len(data) - 9  # where zttp's empty frame would start
    if end < 9 or data[end:end + 5] != b"\x00\x00\x00\x00\x01":
        return data
    pos = last = 0
    while pos < end:
        last = pos
        pos += 9 + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2])
    # A DATA frame without flags (zttp never pads), of the same stream.
    if pos != end or data[last + 3:last + 5] != b"\x00\x00" or (
            data[last + 5:last + 9] != data[end + 5:end + 9]):
        return data
    return data[:last + 4] + b"\x01" + data[last + 5:end]


def new_connection() -> H2Connection:
    return zttp.Connection(zttp.SERVER, zttp.HTTP2)


def seeded_connection(peer_settings: dict[int, int], send_window: int,
                      spare_stream_id: int) -> H2Connection:
    """A fresh server codec that takes over a live connection.

    It is told what the old one knew: the client's SETTINGS (stream windows,
    frame size) and the connection's send window, by feeding it the bytes a
    client would have sent (preface, SETTINGS, the ACK of its own SETTINGS);
    its own preface and ACK are thrown away - the client has seen ours.

    The send window: a larger one is a connection WINDOW_UPDATE; a smaller
    one than the default cannot be sent as a frame, so the codec answers a
    made-up request on `spare_stream_id` (an id the old codec already used,
    below every stream the fresh one will see) with that many bytes, which
    are thrown away like the rest of its output.

    Its HPACK decoder starts empty, which is right only because the client
    has acknowledged a HEADER_TABLE_SIZE 0 first (h2.py sends it before a
    hand-over): its encoder has then emptied its table and refers to no
    earlier header block (RFC 7541 4.2); the size update that says so may
    open the first block the fresh codec decodes, which takes it. Its
    encoder starts empty too, and that needs nothing: HPACK indices count
    from the newest entry (RFC 7541 2.3.3), the client's decoder adds the
    new codec's entries in the same order and evicts its older ones first.
    The made-up answer uses only the static table (":status 200"), so it
    adds no entry the client lacks."""
    if send_window < 0:
        raise ValueError("a negative send window cannot be seeded")
    conn = new_connection()
    conn.initiate_connection()
    conn.data_to_send()
    streams_window = peer_settings.get(INITIAL_WINDOW_SIZE, DEFAULT_WINDOW)
    first = {**peer_settings, INITIAL_WINDOW_SIZE: DEFAULT_WINDOW}
    seed = PREFACE + settings(first) + settings({}, ack=True)
    if send_window > DEFAULT_WINDOW:
        seed += window_update(0, send_window - DEFAULT_WINDOW)
    elif send_window < DEFAULT_WINDOW:
        # GET / with :scheme https, :authority literal without indexing.
        block = b"\x82\x87\x84\x01\x09localhost"
        seed += frame_header(len(block), HEADERS_FRAME, END_STREAM | END_HEADERS,
                             spare_stream_id) + block
    conn.receive_data(seed)
    while type(conn.next_event()) is not NeedData:
        pass
    if send_window < DEFAULT_WINDOW:
        stream = conn.stream(spare_stream_id)
        stream.send_response(200, [])
        stream.send_data(bytes(DEFAULT_WINDOW - send_window))
        stream.end_message()
    if streams_window != DEFAULT_WINDOW:
        conn.receive_data(settings({INITIAL_WINDOW_SIZE: streams_window}))
        while type(conn.next_event()) is not NeedData:
            pass
    conn.data_to_send()  # ACKs and the made-up answer: the client had ours
    return conn


class FrameRouter:
    """While an old codec finishes its streams: frames of the connection
    (stream 0) and of streams up to `boundary` go to the old codec, those of
    newer streams are held for the fresh one. Only runs during a hand-over,
    so the common path parses no frame in Python."""

    __slots__ = ("boundary", "partial", "held")

    def __init__(self, boundary: int) -> None:
        self.boundary = boundary
        self.partial = b""
        self.held = bytearray()

    def split(self, data: bytes) -> bytes:
        """The bytes for the old codec now; the rest is held."""
        if self.partial:
            data = self.partial + data
            self.partial = b""
        old = []
        pos = 0
        end = len(data)
        boundary = self.boundary
        held = self.held
        while pos + 9 <= end:
            nxt = pos + 9 + int.from_bytes(data[pos:pos + 3], "big")
            if nxt > end:
                break
            sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
            if sid == 0 or sid <= boundary:
                old.append(data[pos:nxt])
            else:
                held += data[pos:nxt]
            pos = nxt
        self.partial = data[pos:]
        return b"".join(old)

    def rest(self) -> bytes:
        """Everything held, for the fresh codec (partial frame last)."""
        return bytes(self.held) + self.partial


class FrameScan:
    """The frame headers of every read, walked here (one 9-byte header per
    frame; DATA payloads are skipped, not read) for what zttp 0.0.35 does
    not tell:

    - RFC 9113 5.3.1: a stream cannot depend on itself (PROTOCOL_ERROR);
      zttp reads the priority fields of HEADERS and PRIORITY frames without
      checking this, and ignores a PRIORITY frame on stream 0 (6.3: a
      connection error), reported here as stream 0. Removed by zttp
      rejecting such frames itself.
    - SETTINGS ACKs (`acks`, counted since the preface): zttp surfaces no
      ACK, and ignores one it did not ask for, so a SETTINGS frame zion
      writes itself (settings()) is known to be in force once the count
      reaches it. Removed by an ACK event, or settable SETTINGS."""

    __slots__ = ("skip", "partial", "acks")

    def __init__(self, preface: int = len(PREFACE)) -> None:
        self.skip = preface  # bytes of the current frame (or preface) still to pass
        self.partial = b""
        self.acks = 0

    def scan(self, data: bytes) -> Sequence[int]:
        """The stream ids in `data` that name themselves as their parent.
        Runs for every read but the commonest (h2.py tests for that one
        first): literals and index arithmetic instead of module names and
        slices keep it about a third cheaper (bench: 2 frames, ~1.1 against
        ~1.6 µs)."""
        pos = self.skip
        found: Sequence[int] = ()
        if self.partial:
            data = self.partial + data
            self.partial = b""
        end = len(data)
        while pos + 9 <= end:
            kind = data[pos + 3]
            # PRIORITY (0x2), or HEADERS (0x1) with the PRIORITY flag (0x20).
            if kind == 2 or (kind == 1 and data[pos + 4] & 0x20):
                at = pos + 9 + (1 if kind == HEADERS_FRAME and data[pos + 4] & PADDED else 0)
                if at + 4 > end:
                    break  # its dependency is in the next read
                sid = int.from_bytes(data[pos + 5:pos + 9], "big") & 0x7FFFFFFF
                # Stream 0 whatever its parent: RFC 9113 6.3, zttp ignores it.
                if not sid or int.from_bytes(data[at:at + 4], "big") & 0x7FFFFFFF == sid:
                    found = [*found, sid]
            elif kind == 4 and data[pos + 4] & 1:  # SETTINGS with the ACK flag
                self.acks += 1
            pos += 9 + (data[pos] << 16 | data[pos + 1] << 8 | data[pos + 2])
        if pos >= end:
            self.skip = pos - end
        else:
            self.skip = 0
            self.partial = data[pos:]
        return found
