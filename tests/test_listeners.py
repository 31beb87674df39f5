"""One server per address: a second `zion serve` on a served port is refused
and the first keeps every connection."""

from __future__ import annotations

from tests.conftest import get


async def test_a_second_server_on_the_same_port_is_refused(start_zion):
    first = start_zion("raw_app:app", workers=2)
    second = start_zion("raw_app:app", "--port", str(first.port), workers=2, ready=False)
    assert second.proc.wait(20) == 1
    fatal = second.events("fatal")
    assert len(fatal) == 1
    assert f"127.0.0.1:{first.port}: it is already served by" in fatal[0]["error"]
    served_by = {int((await get(first.port, "/")).headers["x-pid"]) for _ in range(20)}
    assert served_by <= set(first.worker_pids())
