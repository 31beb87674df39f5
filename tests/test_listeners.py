"""One server per address: a second `zion serve` on a served port is refused
and the first keeps every connection."""

from __future__ import annotations

import socket

from tests.conftest import get
from zion.listeners import bind_group


async def test_a_second_server_on_the_same_port_is_refused(start_zion):
    first = start_zion("raw_app:app", workers=2)
    second = start_zion("raw_app:app", "--port", str(first.port), workers=2, ready=False)
    assert second.proc.wait(20) == 1
    fatal = second.events("fatal")
    assert len(fatal) == 1
    assert f"127.0.0.1:{first.port}: it is already served by" in fatal[0]["error"]
    served_by = {int((await get(first.port, "/")).headers["x-pid"]) for _ in range(20)}
    assert served_by <= set(first.worker_pids())


def test_a_listener_shut_and_listened_again_keeps_the_port_even_when_port_0_chose_it():
    # The master moves a blocked worker's queue by shutdown(2) and listen(2)
    # on its listener; a socket whose port the kernel picked (bound to port
    # 0) gives the port back on shutdown and would listen on another one.
    group = bind_group("127.0.0.1", 0, 3, 16)
    try:
        for sock in group.sockets:
            sock.shutdown(socket.SHUT_RDWR)
            sock.listen(16)
            assert sock.getsockname()[1] == group.port
    finally:
        group.close()
