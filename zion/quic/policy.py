"""What the master does with QUIC steering: bind nothing, decide nothing
about sockets; load the program for a UDP group and attach it, or say in one
warning line why the kernel's reuseport hash routes QUIC instead. Never
fatal: boot goes on without it (the same rules as the TCP demux).

Initials are admitted least-loaded only when the TCP demux is routing: its
status board (zion_slots) is the map the program reads. Otherwise the
program still keeps every connection on its worker by its server CID and
pins each handshake's Initials together, choosing by the hash.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from zion.demux import headers, preflight
from zion.demux.policy import DemuxOutcome, classify, describe
from zion.demux.reasons import DemuxState, FallbackReason, Unavailable
from zion.demux.shim import ShimError
from zion.errors import BindError
from zion.listeners import ListenerGroup
from zion.log import get_logger
from zion.quic import steering
from zion.quic.sockets import UdpGroup, WorkerQuic, bind_udp, bind_udp_group
from zion.settings import Settings

logger = get_logger("zion.quic")


@dataclass
class QuicOutcome:
    state: DemuxState
    reason: FallbackReason | None = None
    error: str | None = None
    program: steering.QuicProgram | None = None
    admission: str | None = None  # "least-loaded" (the status board) or "hash"

    @property
    def routing(self) -> bool:
        return self.state is DemuxState.ATTACHED

    @property
    def master_fds(self) -> tuple[int, ...]:
        return self.program.master_fds if self.program else ()

    def info(self) -> dict[str, Any]:
        program = self.program
        return {"state": str(self.state), "reason": str(self.reason) if self.reason else None,
                "error": self.error, "prog_id": program.prog_id if program else None,
                "admission": self.admission,
                "counters": program.stats() if program else None}

    def close(self) -> None:
        if self.program is not None:
            self.program.close()
            self.program = None


def preflight_and_headers(settings: Settings) -> str | None:
    """The demux's checks (kernel, capabilities), then the kernel headers bcc
    compiles against (BCC_KERNEL_SOURCE; None: bcc's default). The QUIC
    program is compiled by bcc at every start: no kept object yet."""
    preflight.check(settings)
    source, _how = headers.find(settings.demux.kernel_headers, preflight.cache_dir(settings))
    return source


def setup(settings: Settings, group: UdpGroup, demux: DemuxOutcome,
          generation: int = 0) -> QuicOutcome:
    """Load and attach the steering program to `group`, or explain why not.
    Never raises."""
    if not settings.demux.enabled:
        logger.info("quic_steering_disabled", bpf_quic="disabled", reason="flag",
                    using="kernel reuseport hash")
        return QuicOutcome(DemuxState.DISABLED, FallbackReason.FLAG)
    slots_fd = demux.program.slots_fd if demux.routing and demux.program else None
    program = None
    try:
        source = steering.source_path().read_text()
        kernel_source = preflight_and_headers(settings)
        program = steering.load(source, group.sockets, generation, slots_fd,
                                settings.demux.stall_threshold_ms * 1_000_000, kernel_source)
        program.attach(group.sockets[0])
    except OSError as exc:
        return _fallback(FallbackReason.PROBE_FAILED, f"cannot read the program: {exc}", None,
                         program)
    except Unavailable as exc:
        return _fallback(exc.reason, exc.detail, exc.errno, program)
    except ShimError as exc:
        return _fallback(classify(exc), describe(exc), exc.errno, program)
    except Exception as exc:  # an unexpected bcc failure must not stop boot either
        return _fallback(FallbackReason.PROBE_FAILED, repr(exc), None, program)
    admission = "least-loaded" if slots_fd is not None else "hash"
    logger.info("quic_steering_attached", bpf_quic="attached", prog_id=program.prog_id,
                workers=program.workers, port=group.port, generation=generation,
                initials=admission)
    return QuicOutcome(DemuxState.ATTACHED, program=program, admission=admission)


def _fallback(reason: FallbackReason, detail: str, errno: int | None,
              program: steering.QuicProgram | None) -> QuicOutcome:
    if program is not None:
        program.close()
    logger.warning("quic_steering_fallback", bpf_quic="fallback", reason=str(reason),
                   error=detail, errno=errno, using="kernel reuseport hash")
    return QuicOutcome(DemuxState.FALLBACK, reason, detail)


@dataclass
class QuicGroup:
    """The UDP group the master holds for HTTP/3 and its steering, for one
    generation of workers (whose server CIDs carry `generation`)."""

    udp: UdpGroup
    # The program steering the port: shared by the generations, but for one
    # worker count and status board (a reload that changes them prepares
    # its own, on the same maps: next_generation).
    outcome: QuicOutcome
    generation: int = 0

    @property
    def master_fds(self) -> tuple[int, ...]:
        return self.outcome.master_fds

    def for_worker(self, index: int) -> WorkerQuic:
        return self.udp.for_worker(index, self.generation)

    def next_generation(self, number: int, count: int, settings: Settings,
                        demux: DemuxOutcome, same_demux: bool) -> QuicGroup:
        """The group of a reload's generation `number`. With the program
        routing: new sockets in the same reuseport group, entered in the
        program's sockarray under `number`, so the old workers keep their
        sockets (and connections) while the new ones start; new connections
        move to them at commit. The program is compiled for a worker count
        and reads one status board: when the reload changes either
        (`same_demux` False: another count or demux settings), a new program
        for the new count and board is loaded on the same maps (the
        sockarray keeps the old generations' sockets, so their CIDs stay
        routable) and replaces the old one at commit. Without the program
        (whose absence would let the kernel hash spread every connection
        over old and new sockets), or if loading the new one fails, the
        group is carried over: new workers replace the old ones on the same
        sockets, and the old connections end with a stateless reset."""
        program = self.outcome.program
        if not self.outcome.routing or program is None:
            return self._carried(count)
        try:
            udp = bind_udp_group(self.udp.host, self.udp.port, self.udp.family, count)
        except BindError as exc:
            logger.warning("quic_generation_failed", error=str(exc), using="the same sockets")
            return self._carried(count)
        udp = replace(udp, reset_key=self.udp.reset_key)  # tokens stay derivable
        outcome = self.outcome
        if not same_demux or program.workers != count:
            prepared = _reprogram(settings, udp, number, demux, self.outcome)
            if prepared is None:
                udp.close()
                return self._carried(count)
            outcome = prepared
        else:
            try:
                for slot, sock in enumerate(udp.sockets):
                    program.set_socket(slot, number, sock)
            except ShimError as exc:
                udp.close()
                logger.warning("quic_generation_failed", error=describe(exc),
                               using="the same sockets")
                return self._carried(count)
        return QuicGroup(udp, outcome, number)

    def _carried(self, count: int) -> QuicGroup:
        """The same sockets for the first `count` slots, and new ones in the
        group for slots past them (a reload that adds workers); the
        generation's CIDs stay this one's."""
        if count == len(self.udp.sockets):
            return self
        socks = list(self.udp.sockets[:count])
        try:
            while len(socks) < count:
                socks.append(bind_udp(self.udp.host, self.udp.port, self.udp.family))
        except BindError as exc:
            for sock in socks[len(self.udp.sockets):]:
                sock.close()
            # The worker of a slot with no socket serves no HTTP/3.
            logger.warning("quic_generation_failed", error=str(exc), using="fewer sockets")
        return QuicGroup(replace(self.udp, sockets=tuple(socks)), self.outcome,
                         self.generation)

    def commit(self, old: QuicGroup) -> None:
        """New connections (first Initials) go to this generation from now
        on (its program attached first if it has its own: the kernel
        replaces a group's program in one setsockopt); the master lets go of
        the old sockets. The old workers hold their own until they exit:
        their connections' packets reach them by their CIDs' generation
        until then."""
        if self is old:
            return
        program = self.outcome.program
        if self.generation == old.generation or program is None:
            old.udp.close(keep=self.udp.sockets)  # carried over: nothing to tell a program
            return
        outcome = self.outcome
        if outcome is not old.outcome:
            try:
                program.attach(self.udp.sockets[0])
            except (ShimError, OSError) as exc:
                # The old program still routes, on the same maps, with its
                # own worker count (slots it does not know: the hash).
                logger.warning("quic_generation_failed", error=str(exc),
                               using="the previous program")
            else:
                outcome.state = DemuxState.ATTACHED
                old.outcome.close()  # the maps stay: the new program holds them
                logger.info("quic_steering_attached", bpf_quic="attached",
                            prog_id=program.prog_id, workers=program.workers,
                            port=self.udp.port, generation=self.generation,
                            initials=outcome.admission)
        try:
            program.set_generation(self.generation)
        except ShimError as exc:
            logger.warning("quic_generation_failed", error=describe(exc),
                           using="the previous generation for new connections")
        old.udp.close(keep=self.udp.sockets)

    def abort(self, current: QuicGroup) -> None:
        """A failed reload: its sockets leave the group (their sockarray
        entries go with them)."""
        if self is not current:
            self.udp.close(keep=current.udp.sockets)
            if self.outcome is not current.outcome:
                self.outcome.close()

    def close(self) -> None:
        self.outcome.close()
        self.udp.close()


def _reprogram(settings: Settings, udp: UdpGroup, generation: int, demux: DemuxOutcome,
               current: QuicOutcome) -> QuicOutcome | None:
    """A program for a reload's worker count and status board, on the maps
    of the running one (`current`): loaded, not attached. None (and a
    warning) if it cannot be loaded."""
    assert current.program is not None
    # The reload's TCP demux is PREPARED: it routes from the same commit.
    slots_fd = (demux.program.slots_fd if demux.program is not None
                and demux.state in (DemuxState.ATTACHED, DemuxState.PREPARED) else None)
    try:
        program = steering.load(steering.source_path().read_text(), udp.sockets, generation,
                                slots_fd, settings.demux.stall_threshold_ms * 1_000_000,
                                preflight_and_headers(settings), maps_of=current.program)
    except Exception as exc:  # bcc or the kernel: the reload goes on without it
        logger.warning("quic_generation_failed", error=str(exc), using="the same sockets")
        return None
    admission = "least-loaded" if slots_fd is not None else "hash"
    logger.info("quic_steering_prepared", prog_id=program.prog_id, workers=program.workers,
                generation=generation, initials=admission)
    return QuicOutcome(DemuxState.PREPARED, program=program, admission=admission)


def bind_and_steer(settings: Settings, tcp: ListenerGroup,
                   demux: DemuxOutcome) -> QuicGroup | None:
    """One UDP socket per worker on the TCP group's address and port, with
    the steering program attached. A UDP port someone else holds costs
    HTTP/3, not the server: a warning, and None."""
    try:
        udp = bind_udp_group(tcp.host, tcp.port, tcp.family, len(tcp.sockets))
    except BindError as exc:
        logger.warning("quic_bind_failed", error=str(exc), http3="off")
        return None
    outcome = setup(settings, udp, demux)
    logger.info("http3_listening", sockets=len(udp.sockets), port=udp.port,
                steering=str(outcome.state))
    return QuicGroup(udp, outcome)
