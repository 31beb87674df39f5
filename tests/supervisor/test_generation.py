"""A generation and a reload's state machine, with real sockets and no workers."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from tests.support.bpf import cannot_load_bpf
from zion.demux.reasons import DemuxState
from zion.errors import ZionError
from zion.settings import DemuxSettings, ServerSettings, Settings, TLSSettings
from zion.supervisor import generation
from zion.supervisor.generation import Generation, Step


def _settings(state_dir: Path, workers: int, port: int = 0, demux: bool = False) -> Settings:
    return Settings(server=ServerSettings(port=port, workers=workers),
                    tls=TLSSettings(state_dir=str(state_dir)),
                    demux=DemuxSettings(enabled=demux))


def _resized(settings: Settings, workers: int) -> Settings:
    return dataclasses.replace(settings, server=dataclasses.replace(settings.server,
                                                                   workers=workers))


@pytest.fixture
def first(state_dir: Path) -> Iterator[Generation]:
    gen, _ = generation.first(_settings(state_dir, 3))
    yield gen
    gen.group.close()
    gen.demux.close()


def _open(sock: socket.socket) -> bool:
    return sock.fileno() != -1


def test_a_reload_commits_once_every_new_worker_is_ready(first):
    reload = generation.begin(first, first.settings)
    assert reload.new.number == 1 and reload.pending == {0, 1, 2}
    assert reload.on_ready(0) is Step.WAIT
    assert reload.on_ready(0) is Step.WAIT  # the same slot twice is still one slot
    assert reload.on_ready(2) is Step.WAIT
    assert reload.on_ready(1) is Step.COMMIT


def test_a_new_worker_dying_before_commit_aborts_the_reload(first):
    reload = generation.begin(first, first.settings)
    reload.on_ready(0)
    assert reload.on_death(1) is Step.ABORT


def test_same_size_reload_keeps_the_listeners_and_their_queues(first):
    reload = generation.begin(first, first.settings)
    assert reload.new.group is first.group and reload.new.board is first.board
    generation.abort(first, reload.new)  # nothing of the running generation is closed
    assert all(_open(s) for s in first.group.sockets)


def test_growing_binds_extra_listeners_in_the_same_group_and_abort_closes_only_those(first):
    reload = generation.begin(first, _resized(first.settings, 5))
    new = reload.new
    assert new.count == 5 and reload.pending == set(range(5))
    assert new.group.sockets[:3] == first.group.sockets  # kept slots keep their socket
    port = first.group.port
    assert all(s.getsockname()[1] == port for s in new.group.sockets)
    extra = new.group.sockets[3:]
    generation.abort(first, new)
    assert not any(_open(s) for s in extra)
    assert all(_open(s) for s in first.group.sockets)


def test_shrinking_keeps_the_first_listeners(first):
    reload = generation.begin(first, _resized(first.settings, 1))
    assert reload.new.group.sockets == first.group.sockets[:1] and reload.pending == {0}


def test_shrinking_without_the_demux_advises_tcp_migrate_req(first):
    # Without the program the kernel hash keeps queueing on the listeners being
    # retired; with tcp_migrate_req=0 those connections are reset when they close.
    migrate = Path("/proc/sys/net/ipv4/tcp_migrate_req")
    with capture_logs() as logs:
        grown = generation.begin(first, _resized(first.settings, 4))  # growing: no advice
        generation.abort(first, grown.new)
        generation.begin(first, _resized(first.settings, 2))
    advice = [e for e in logs if e["event"] == "reload_shrink_without_demux"]
    expected = 1 if migrate.exists() and migrate.read_text().strip() == "0" else 0
    assert len(advice) == expected
    if advice:
        assert "sysctl -w net.ipv4.tcp_migrate_req=1" in advice[0]["hint"]


def test_changing_the_port_needs_a_restart(first, state_dir):
    with pytest.raises(ZionError, match="needs a restart"):
        generation.begin(first, _settings(state_dir, 3, port=first.group.port + 1))


def test_every_reload_gets_a_fresh_tls_context(first):
    # The context holds the session-ticket keys: a reload rotates them.
    assert generation.begin(first, _resized(first.settings, 2)).new.ssl_ctx is not first.ssl_ctx


@pytest.mark.skipif(cannot_load_bpf() is not None, reason=str(cannot_load_bpf()))
def test_a_resize_prepares_a_program_that_commit_swaps_in_and_abort_drops(state_dir):
    gen, _ = generation.first(_settings(state_dir, 2, demux=True))
    try:
        assert gen.demux.state is DemuxState.ATTACHED
        aborted = generation.begin(gen, _resized(gen.settings, 3)).new
        assert aborted.demux.state is DemuxState.PREPARED  # the running program still routes
        generation.abort(gen, aborted)
        assert aborted.demux.program is None and gen.demux.routing
        new = generation.begin(gen, _resized(gen.settings, 3)).new
        generation.commit(gen, new)
        assert new.demux.state is DemuxState.ATTACHED and gen.demux.program is None
        gen = new
    finally:
        gen.group.close()
        gen.demux.close()
