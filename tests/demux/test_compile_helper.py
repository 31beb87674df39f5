"""bcc and LLVM stay in the short-lived compile helper: the master and its
workers never map them, and the program still routes (and is replaced on a
resizing reload) through descriptors alone."""

from __future__ import annotations

import asyncio
import signal
from pathlib import Path

import pytest

from tests.conftest import get, wait_for
from tests.support.bpf import cannot_load_bpf, zion_prog_ids

pytestmark = pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))


def _mapped_llvm_or_bcc(pid: int) -> set[str]:
    found = set()
    for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
        path = line.split()[-1] if len(line.split()) >= 6 else ""
        if "libbcc" in path or "LLVM" in path or "libclang" in path:
            found.add(path)
    return found


async def test_master_and_workers_never_map_bcc_or_llvm(start_zion, tmp_path):
    cfg = tmp_path / "z.toml"
    cfg.write_text("[server]\nworkers = 2\n")
    srv = start_zion("--config", str(cfg), workers=None)
    attached = srv.wait_event("demux_attached")
    assert attached["prog_id"] in zion_prog_ids()
    for pid in (srv.pid, *srv.worker_pids()):
        assert _mapped_llvm_or_bcc(pid) == set(), pid
    # A resizing reload compiles a new program: again in a helper.
    cfg.write_text("[server]\nworkers = 3\n")
    srv.signal(signal.SIGHUP)
    await asyncio.to_thread(srv.wait_event, "reload_complete", 30)
    await asyncio.to_thread(wait_for, lambda: len(srv.events("demux_attached")) == 2, 10,
                            "the new program")
    assert _mapped_llvm_or_bcc(srv.pid) == set()
    seen = {(await get(srv.port, "/")).headers["x-zion-worker"] for _ in range(60)}
    assert seen == {"0", "1", "2"}
