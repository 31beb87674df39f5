"""GET /metrics: a HostView in the Prometheus text format.

A custom collector over the view, in a registry of its own per scrape: the
values live in the workers' shared memory, not in prometheus_client's
in-process metric objects, and the master's process and GC collectors are
left out (they describe the master, which does no serving).
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from zion.admin.health import WorkerState
from zion.admin.view import HostView
from zion.demux.reasons import DemuxState

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# (counter name, CounterBoard field, help)
_WORKER_COUNTERS = (
    ("zion_requests", "requests", "Requests answered by the worker slot."),
    ("zion_connections_accepted", "connections", "Connections the worker slot accepted."),
    ("zion_tls_handshakes", "tls_handshakes", "TLS handshakes completed."),
    ("zion_tls_resumptions", "tls_resumed", "TLS handshakes that resumed a session."),
    ("zion_sendfile_bytes", "sendfile_bytes", "File bytes sent with sendfile(2) "
     "(plain HTTP/1.1 file responses)."),
)


class ViewCollector:
    def __init__(self, view: HostView) -> None:
        self.view = view

    def collect(self) -> Iterator[Metric]:
        yield from self._workers()
        yield from self._host()
        yield from self._demux()

    def _workers(self) -> Iterator[Metric]:
        view = self.view
        labels = ["worker"]
        for name, key, help_text in _WORKER_COUNTERS:
            fam = CounterMetricFamily(name, help_text, labels=labels)
            for w, counts in zip(view.workers, view.counters, strict=True):
                fam.add_metric([str(w.index)], counts[key])
            yield fam
        responses = CounterMetricFamily("zion_responses", "Error responses by status class.",
                                        labels=["worker", "code"])
        for w, counts in zip(view.workers, view.counters, strict=True):
            responses.add_metric([str(w.index), "4xx"], counts["responses_4xx"])
            responses.add_metric([str(w.index), "5xx"], counts["responses_5xx"])
        yield responses
        conns = GaugeMetricFamily("zion_open_connections", "Open connections.", labels=labels)
        inflight = GaugeMetricFamily("zion_requests_in_flight", "Requests being handled.",
                                     labels=labels)
        queue = GaugeMetricFamily("zion_accept_queue_length", "Connections waiting in the "
                                  "worker's listener accept queue.", labels=labels)
        age = GaugeMetricFamily("zion_heartbeat_age_seconds", "Seconds since the worker's "
                                "last heartbeat.", labels=labels)
        state = GaugeMetricFamily("zion_worker_state", "1 for the worker's current state.",
                                  labels=["worker", "state"])
        stalls = CounterMetricFamily("zion_stalls", "Times the worker's heartbeat went stale "
                                     "while it was ready.", labels=labels)
        respawns = CounterMetricFamily("zion_respawns", "Workers started again on the slot "
                                       "after one died.", labels=labels)
        requeued = CounterMetricFamily("zion_requeued_connections", "Connections moved from "
                                       "the worker's accept queue to free workers while its "
                                       "loop was blocked.", labels=labels)
        stuck = CounterMetricFamily("zion_stuck_kills", "Workers killed and replaced "
                                    "after their loop was blocked for stuck_timeout.",
                                    labels=labels)
        memory = CounterMetricFamily("zion_memory_replacements", "Workers replaced for "
                                     "passing worker_memory.", labels=labels)
        for w in view.workers:
            index = str(w.index)
            stuck.add_metric([index], view.stuck.get(w.index, 0))
            memory.add_metric([index], view.memory.get(w.index, 0))
            conns.add_metric([index], w.connections)
            inflight.add_metric([index], w.inflight)
            queue.add_metric([index], w.accept_queue)
            if w.heartbeat_age_ms is not None:
                age.add_metric([index], w.heartbeat_age_ms / 1000)
            for s in WorkerState:
                state.add_metric([index, s.value], 1.0 if w.state is s else 0.0)
            stalls.add_metric([index], view.stalls.get(w.index, 0))
            respawns.add_metric([index], view.respawns.get(w.index, 0))
            requeued.add_metric([index], view.requeued.get(w.index, 0))
        yield from (conns, inflight, queue, age, state, stalls, respawns, requeued, stuck,
                    memory)
        if view.dispatches is not None:
            dispatches = CounterMetricFamily("zion_dispatches", "New connections the demux "
                                             "program sent to the worker.", labels=labels)
            for w in view.workers:
                dispatches.add_metric([str(w.index)], view.dispatches[w.index])
            yield dispatches

    def _host(self) -> Iterator[Metric]:
        view = self.view
        ready, _ = view.ready
        yield GaugeMetricFamily("zion_ready", "1 when GET /ready answers 200.",
                                value=1.0 if ready else 0.0)
        yield GaugeMetricFamily("zion_weight_percent", "The weight the agent-check reports "
                                "(0 = no healthy worker).", value=view.weight)
        yield GaugeMetricFamily("zion_generation", "Workers' generation (+1 per reload).",
                                value=view.generation)
        yield CounterMetricFamily("zion_reloads", "Reloads committed.", value=view.reloads)
        yield CounterMetricFamily("zion_reload_failures", "Reloads aborted.",
                                  value=view.reload_failures)

    def _demux(self) -> Iterator[Metric]:
        view = self.view
        state = GaugeMetricFamily("zion_demux_state", "1 for the demux's current state.",
                                  labels=["state"])
        current = view.demux.get("state")
        for s in DemuxState:
            state.add_metric([s.value], 1.0 if s.value == current else 0.0)
        yield state
        info = GaugeMetricFamily("zion_demux_info", "The demux's routing mode (empty when "
                                 "it does not route) and why it falls back, if it does.",
                                 labels=["mode", "reason"])
        info.add_metric([str(view.demux.get("mode") or ""), str(view.demux.get("reason") or "")],
                        1.0)
        yield info
        if view.fallbacks is not None:
            yield CounterMetricFamily("zion_demux_fallbacks", "New connections the program "
                                      "left to the kernel's reuseport hash (no healthy "
                                      "worker).", value=view.fallbacks)


def render(view: HostView) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ViewCollector(view))  # type: ignore[arg-type]
    return generate_latest(registry)
