"""Which HTTP/2 frame + HPACK layer zion builds on: the server's CPU per small
request - parse the client's HEADERS frame, answer with a response head, a
12-byte body and END_STREAM, serialize the frames - for `zttp` (Zig core) and
`h2` (pure Python), in-process (no sockets, no TLS). httptools parsing the
same request as HTTP/1.1 plus a joined response is the baseline zion pays on
HTTP/1.1 today.

The client bytes come from h2's client, one connection, streams 1, 3, 5, ...
with the headers a browser sends (HPACK-indexed after the first, as on a
real connection). Both servers get the same bytes.

    .venv/bin/python bench/h2_codec.py [--out bench/results]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

N = 4000  # streams per timed run
_HEADERS = [
    (":method", "GET"), (":scheme", "https"), (":authority", "localhost:8443"),
    (":path", "/api/items?page=2"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64) Gecko/20100101 Firefox/128.0"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-language", "en-US,en;q=0.5"), ("accept-encoding", "gzip, deflate, br"),
    ("cookie", "session=abcdef0123456789"),
]
_RESPONSE = [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", b"12"),
             (b"server", b"zion"), (b"date", b"Wed, 25 Nov 2026 04:00:00 GMT")]
_BODY = b"hello, world"


def client_bytes(n: int) -> tuple[bytes, list[bytes]]:
    """The preface and one HEADERS frame (END_STREAM) per request."""
    import h2.config
    import h2.connection
    import h2.settings

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 2**31 - 1,
                                     h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 2**20})
    client.initiate_connection()
    client.increment_flow_control_window(2**31 - 1 - 65535)
    preface = client.data_to_send()
    requests = []
    for i in range(n):
        client.send_headers(1 + 2 * i, _HEADERS, end_stream=True)
        requests.append(client.data_to_send())
    return preface, requests


def _zttp(n: int) -> Callable[[], None]:
    import zttp

    preface, requests = client_bytes(n)

    def run() -> None:
        server = zttp.Connection(zttp.SERVER, zttp.HTTP2)
        server.initiate_connection()
        server.receive_data(preface)
        while server.next_event() is not zttp.NEED_DATA:
            pass
        server.data_to_send()
        answered = 0
        for data in requests:
            server.receive_data(data)
            while True:
                event = server.next_event()
                if event is zttp.NEED_DATA:
                    break
                if type(event) is zttp.Request:
                    stream = server.stream(event.stream_id)
                    stream.send_response(200, _RESPONSE)
                    stream.send_data(_BODY)
                    stream.end_message()
                    answered += 1
            server.data_to_send()
        assert answered == n, answered

    return run


def _h2(n: int) -> Callable[[], None]:
    import h2.config
    import h2.connection
    import h2.events

    preface, requests = client_bytes(n)

    def run() -> None:
        server = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding=None))
        server.initiate_connection()
        server.receive_data(preface)
        server.data_to_send()
        answered = 0
        for data in requests:
            for event in server.receive_data(data):
                if type(event) is h2.events.RequestReceived:
                    sid = event.stream_id
                    server.send_headers(sid, [(b":status", b"200"), *_RESPONSE])
                    server.send_data(sid, _BODY, end_stream=True)
                    answered += 1
            server.data_to_send()
        assert answered == n, answered

    return run


def _httptools(n: int) -> Callable[[], None]:
    import httptools

    request = (b"GET /api/items?page=2 HTTP/1.1\r\nhost: localhost:8443\r\n"
               + b"".join(f"{k}: {v}\r\n".encode() for k, v in _HEADERS[4:]) + b"\r\n")
    head = b"".join(k + b": " + v + b"\r\n" for k, v in _RESPONSE)

    class Sink:
        def __init__(self) -> None:
            self.out: list[bytes] = []

        def on_header(self, name: bytes, value: bytes) -> None:
            pass

        def on_message_complete(self) -> None:
            self.out.append(b"".join((b"HTTP/1.1 200 OK\r\n", head, b"\r\n", _BODY)))

    def run() -> None:
        sink = Sink()
        parser = httptools.HttpRequestParser(sink)
        for _ in range(n):
            parser.feed_data(request)
        assert len(sink.out) == n

    return run


def _correctness() -> list[str]:
    """What each layer does with inputs a server must refuse or handle."""
    import h2.config
    import h2.connection
    import zttp

    notes = []
    server = zttp.Connection(zttp.SERVER, zttp.HTTP2)
    server.initiate_connection()
    preface, _ = client_bytes(0)
    server.receive_data(preface)
    while server.next_event() is not zttp.NEED_DATA:
        pass
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    client.send_headers(1, _HEADERS, end_stream=True)
    server = zttp.Connection(zttp.SERVER, zttp.HTTP2)
    server.receive_data(client.data_to_send())
    while (event := server.next_event()) is not zttp.NEED_DATA:
        if isinstance(event, zttp.Request):
            try:
                server.stream(1).send_response(200, [(b"connection", b"close")])
            except zttp.LocalProtocolError:
                notes.append("zttp: refuses to send a connection-specific header "
                             "(LocalProtocolError): the caller must filter them")
    return notes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for name, build in (("zttp", _zttp), ("h2", _h2), ("httptools (HTTP/1.1)", _httptools)):
        try:
            run = build(N)
        except ImportError as exc:
            rows.append((name, None, str(exc)))
            continue
        run()  # warm up
        times = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            run()
            times.append((time.perf_counter() - t0) / N * 1e6)
        rows.append((name, statistics.median(times), f"min {min(times):.2f}"))
    from importlib.metadata import version

    import h2
    import zttp  # noqa: F401

    lines = [
        f"# HTTP/2 codec: server CPU per small request ({datetime.now(UTC):%Y-%m-%d %H:%M} UTC)",
        "",
        f"zttp {version('zttp')}, h2 {h2.__version__}, httptools {version('httptools')}; "
        f"{N} streams on one connection, median of {args.repeat} runs; parse HEADERS, "
        "answer head + 12-byte body + END_STREAM, serialize.",
        "",
        "| layer | µs/request | note |",
        "|---|---|---|",
    ]
    for name, us, note in rows:
        lines.append(f"| {name} | {'-' if us is None else f'{us:.2f}'} | {note} |")
    lines += ["", "Correctness notes:", ""] + [f"- {n}" for n in _correctness()]
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.out:
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        path = args.out / f"h2_codec-{stamp}.md"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
