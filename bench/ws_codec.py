"""Which WebSocket library zion builds on: parse + serialize cost per message
of the `websockets` sans-I/O ServerProtocol against `wsproto`, in-process
(no sockets), for small and 16 KiB text messages, with and without
permessage-deflate.

    bench/.work/venv/bin/python bench/ws_codec.py
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable


def _websockets(size: int, deflate: bool) -> Callable[[int], None]:
    from websockets.client import ClientProtocol
    from websockets.extensions.permessage_deflate import (
        ClientPerMessageDeflateFactory,
        ServerPerMessageDeflateFactory,
    )
    from websockets.server import ServerProtocol
    from websockets.uri import parse_uri

    client = ClientProtocol(parse_uri("ws://x/"), max_size=None,
                            extensions=[ClientPerMessageDeflateFactory()] if deflate else None)
    server = ServerProtocol(max_size=None,
                            extensions=[ServerPerMessageDeflateFactory()] if deflate else None)
    client.send_request(client.connect())
    for data in client.data_to_send():
        server.receive_data(data)
    server.send_response(server.accept(server.events_received()[0]))
    for data in server.data_to_send():
        client.receive_data(data)
    client.events_received()
    text = ("x" * size).encode()
    client.send_text(text)
    frame = b"".join(client.data_to_send())  # masked, as a client sends it

    def run(n: int) -> None:  # the server's work: parse a frame, echo it back
        for _ in range(n):
            server.receive_data(frame)
            for event in server.events_received():
                server.send_text(event.data)
            server.data_to_send()

    return run


def _wsproto(size: int, deflate: bool) -> Callable[[int], None]:
    from wsproto import ConnectionType, WSConnection
    from wsproto.events import AcceptConnection, Request, TextMessage
    from wsproto.extensions import PerMessageDeflate

    client = WSConnection(ConnectionType.CLIENT)
    server = WSConnection(ConnectionType.SERVER)
    ext = [PerMessageDeflate()] if deflate else []
    server.receive_data(client.send(Request(host="x", target="/", extensions=ext)))
    for event in server.events():
        if isinstance(event, Request):
            client.receive_data(server.send(AcceptConnection(
                extensions=[PerMessageDeflate()] if deflate else [])))
    list(client.events())
    frame = client.send(TextMessage(data="x" * size))

    def run(n: int) -> None:
        for _ in range(n):
            server.receive_data(frame)
            for event in server.events():
                server.send(TextMessage(data=event.data))

    return run


def measure(build: Callable[[int, bool], Callable[[int], None]], size: int,
            deflate: bool, n: int = 20000) -> float:
    samples = []
    for _ in range(5):
        run = build(size, deflate)
        t0 = time.perf_counter()
        run(n)
        samples.append((time.perf_counter() - t0) / n * 1e6)
    return statistics.median(samples)


def main() -> None:
    print("| message | deflate | websockets µs/msg | wsproto µs/msg |")
    print("|---|---|---|---|")
    for size in (64, 16384):
        for deflate in (False, True):
            n = 20000 if size == 64 else 4000
            a = measure(_websockets, size, deflate, n)
            b = measure(_wsproto, size, deflate, n)
            print(f"| {size} B | {'on' if deflate else 'off'} | {a:.1f} | {b:.1f} |")


if __name__ == "__main__":
    main()
