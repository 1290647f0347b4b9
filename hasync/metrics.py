"""Prometheus metrics, rendered from the last status snapshot the failover loop published.

The loop owns every live object; the HTTP server thread (prometheus_client's) must never
touch them. So the loop hands over a deep copy of its status dict (`publish`, at most
every `PUBLISH_INTERVAL_S`) and the collector renders only from that copy. Off unless
the node config sets `metrics_port`.

The snapshot is `FailoverService.status()` plus the transition counts, which the
daemon keeps from the loop's on_transition callback (TransitionCounter) and merges in:

    "transitions": {new_state: {cause: count}}   # TransitionCounter.as_dict()

and, from the sync service when it has them, `sync.entries_lost` and
`sync.config = {"generation": n, "conflicts": n}`. A missing field means the metric
is left out, never reported as zero.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from failover.machine import BACKUP, DISABLED, FAULT, INIT, MASTER, STOPPED

log = logging.getLogger("hasync.metrics")

PUBLISH_INTERVAL_S = 0.5
STATES = (INIT, BACKUP, MASTER, FAULT, DISABLED, STOPPED, "NO GROUP")
ICONS = ("green", "red", "grey")


class TransitionCounter:
    """State changes by new state and cause; the loop calls `record` in its transition handler."""

    def __init__(self) -> None:
        self.counts: Counter[tuple[str, str]] = Counter()

    def record(self, new_state: str, cause: str) -> None:
        self.counts[(new_state, cause)] += 1

    def as_dict(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for (state, cause), n in self.counts.items():
            out.setdefault(state, {})[cause] = n
        return out


class StatusCollector:
    """A prometheus_client collector over the last published snapshot (read-only)."""

    def __init__(self, transitions: TransitionCounter | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.transitions = transitions  # merged into snapshots that lack "transitions"
        self._snapshot: tuple[float, dict[str, Any]] | None = None  # (published at, status)
        self._next_publish = 0.0

    # ---- the loop's side ------------------------------------------------------------

    def publish(self, status: Mapping[str, Any], now: float | None = None) -> None:
        """Hand over a snapshot. Copied, so the loop may keep mutating its own objects."""
        now = self.clock() if now is None else now
        snapshot = copy.deepcopy(dict(status))
        if self.transitions is not None and "transitions" not in snapshot:
            snapshot["transitions"] = self.transitions.as_dict()
        # one reference assignment: the scraping thread sees the old or the new tuple, whole
        self._snapshot = (now, snapshot)
        self._next_publish = now + PUBLISH_INTERVAL_S

    def maybe_publish(self, now: float, status: Callable[[], Mapping[str, Any]]) -> bool:
        """Call every loop turn: builds and publishes the status only when one is due."""
        if now < self._next_publish:
            return False
        self.publish(status(), now)
        return True

    # ---- the HTTP thread's side -----------------------------------------------------

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot
        if snap is None:
            return
        published_at, s = snap
        age = max(0.0, self.clock() - published_at)
        yield _gauge("hasync_status_snapshot_age_seconds",
                     "Seconds since the failover loop last published its status (a stuck loop grows this)",
                     age)
        info = GaugeMetricFamily("hasync_info", "This node's software release and host name",
                                 labels=["version", "hostname"])
        info.add_metric([str(s.get("version", "")), str(s.get("hostname", ""))], 1)
        yield info
        yield from _node_state(s)
        yield from _transitions(s.get("transitions"))
        yield from _heartbeats(s.get("heartbeats"))
        yield from _peer(s.get("peer"), age)
        links = GaugeMetricFamily("hasync_link_up", "Monitored interface / HA link carrier (1 = up)",
                                  labels=["interface"])
        for name, up in sorted((s.get("links") or {}).items()):
            links.add_metric([name], 1 if up else 0)
        yield links
        yield from _hooks(s.get("hooks"))
        yield from _sync(s.get("sync"))


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def _counter(name: str, doc: str, value: Any) -> CounterMetricFamily | None:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return None
    return CounterMetricFamily(name, doc, value=value)


def _node_state(s: Mapping[str, Any]) -> Iterator[Metric]:
    state = s.get("state")
    fam = GaugeMetricFamily("hasync_state", "The failover state of this node (1 for the current one)",
                            labels=["state"])
    for name in STATES + ((state,) if state and state not in STATES else ()):
        fam.add_metric([name], 1 if name == state else 0)
    yield fam
    yield _gauge("hasync_master", "1 when this node is Master (holds the floating IPs)",
                 1 if state == MASTER else 0)
    yield _gauge("hasync_enabled", "Global Settings Config Status (1 = enabled)", 1 if s.get("enabled") else 0)
    icon = GaugeMetricFamily("hasync_icon", "The HA icon: green (working), red (failover would not "
                                            "work), grey (disabled)", labels=["icon"])
    for name in ICONS:
        icon.add_metric([name], 1 if s.get("icon") == name else 0)
    yield icon
    yield _gauge("hasync_red_reasons", "Number of reasons the icon is red", len(s.get("reasons") or ()))


def _transitions(transitions: Mapping[str, Mapping[str, int]] | None) -> Iterator[Metric]:
    if transitions is None:
        return
    fam = CounterMetricFamily("hasync_state_transitions", "State changes by new state and cause",
                              labels=["state", "cause"])
    for state, causes in sorted(transitions.items()):
        for cause, n in sorted(causes.items()):
            fam.add_metric([state, cause], n)
    yield fam


def _heartbeats(hb: Mapping[str, Any] | None) -> Iterator[Metric]:
    if not hb:
        return
    received = _counter("hasync_heartbeats_received", "Valid heartbeats received from the peer",
                        hb.get("received"))
    if received is not None:
        yield received
    dropped = CounterMetricFamily("hasync_heartbeats_dropped", "Heartbeats dropped, by reason",
                                  labels=["reason"])
    for reason, n in sorted((hb.get("dropped") or {}).items()):
        dropped.add_metric([reason], n)
    yield dropped
    sent = CounterMetricFamily("hasync_heartbeats_sent", "Heartbeats sent, by interface", labels=["interface"])
    for name, n in sorted((hb.get("sent") or {}).items()):
        sent.add_metric([name], n)
    yield sent
    errors = CounterMetricFamily("hasync_heartbeat_send_errors", "Heartbeat sends that failed, by interface",
                                 labels=["interface"])
    for name, n in sorted((hb.get("send_errors") or {}).items()):
        errors.add_metric([name], n)
    yield errors


def _peer(peer: Mapping[str, Any] | None, snapshot_age: float) -> Iterator[Metric]:
    yield _gauge("hasync_peer_up", "1 while heartbeats from the peer arrive within the dead interval",
                 1 if peer and peer.get("alive") else 0)
    if not peer:
        return
    if peer.get("last_seen_ms_ago") is not None:
        # aged by the time since the snapshot, so a scrape between publishes stays exact
        yield _gauge("hasync_peer_last_seen_seconds", "Seconds since the last heartbeat from the peer",
                     peer["last_seen_ms_ago"] / 1000 + snapshot_age)
    fam = GaugeMetricFamily("hasync_peer_state", "The peer's failover state as its heartbeats say",
                            labels=["state", "peer"])
    fam.add_metric([str(peer.get("state")), str(peer.get("hostname"))], 1)
    yield fam
    paths = GaugeMetricFamily("hasync_peer_paths_alive", "Interfaces on which the peer's heartbeats arrive",
                              value=len(peer.get("paths_alive") or ()))
    yield paths


def _hooks(hooks: Mapping[str, Any] | None) -> Iterator[Metric]:
    if not hooks:
        return
    for key, doc in (("runs", "Notify hook runs"), ("failures", "Notify hook runs that failed"),
                     ("timeouts", "Notify hook runs killed after notify_timeout_s")):
        metric = _counter(f"hasync_hook_{key}", doc, hooks.get(key))
        if metric is not None:
            yield metric


def _sync(sync: Mapping[str, Any] | None) -> Iterator[Metric]:
    yield _gauge("hasync_sync_running", "1 while the state sync service runs", 1 if sync and sync.get("running") else 0)
    if not sync:
        return
    yield _gauge("hasync_sync_connected", "1 while the sync channel to the peer is up",
                 1 if sync.get("connected") else 0)
    sender = sync.get("sender") or {}
    receiver = sync.get("receiver") or {}
    counters = (
        ("hasync_sync_restarts", "Restarts of the sync service process", sync.get("restarts")),
        ("hasync_sync_entries_sent", "Conntrack entries sent to the peer", sync.get("entries_sent")),
        ("hasync_sync_entries_applied", "Conntrack entries applied from the peer", sync.get("entries_applied")),
        ("hasync_sync_entries_lost", "Conntrack entries known lost (not healed by a resend)",
         sync.get("entries_lost")),
        ("hasync_sync_entries_resynced", "Conntrack entries sent in full resyncs",
         sender.get("snapshot_records_sent")),
        ("hasync_sync_resyncs", "Full resyncs (sent as Master plus received as Backup)",
         _sum(sender.get("resyncs"), receiver.get("resyncs"))),
        ("hasync_sync_gaps", "Sequence gaps seen by the receiving side", receiver.get("gaps")),
        ("hasync_sync_event_overruns", "Conntrack event overruns (ENOBUFS), each healed by a resync",
         sync.get("overruns")),
        ("hasync_sync_table_dumps", "Conntrack table dumps (each stalls a CPU for a moment)", sync.get("dumps")),
        ("hasync_sync_holds_released", "Held entries given their kernel timeout back after a takeover",
         sync.get("holds_released")),
    )
    for name, doc, value in counters:
        metric = _counter(name, doc, value)
        if metric is not None:
            yield metric
    errors = CounterMetricFamily("hasync_sync_errors", "Sync errors by kind", labels=["kind"])
    for kind, n in sorted((sync.get("errors") or {}).items()):
        errors.add_metric([kind], n)
    yield errors
    if isinstance(sync.get("lag_ms"), (int, float)):
        yield _gauge("hasync_sync_lag_seconds", "Age of the oldest change not yet confirmed by the peer",
                     sync["lag_ms"] / 1000)
    config = sync.get("config") or {}
    if isinstance(config.get("generation"), int):
        yield _gauge("hasync_config_generation", "Generation of the replicated configuration",
                     config["generation"])
    conflicts = _counter("hasync_config_sync_conflicts", "Replicated config changes refused as conflicts",
                         config.get("conflicts"))
    if conflicts is not None:
        yield conflicts


def _sum(*values: Any) -> int | None:
    numbers = [v for v in values if isinstance(v, int)]
    return sum(numbers) if numbers else None


class MetricsServer:
    """The HTTP endpoint (prometheus_client's WSGI server in a daemon thread) and its collector."""

    def __init__(self, address: str, port: int, transitions: TransitionCounter | None = None):
        self.collector = StatusCollector(transitions)
        self.registry = CollectorRegistry()
        self.registry.register(self.collector)
        self.registry.register(ProcessCollector(registry=None))
        self._server, self._thread = start_http_server(port, addr=address, registry=self.registry)
        self.port = self._server.server_port  # the real one when port 0 was asked for
        log.info("metrics on http://%s:%d/metrics", address, self.port)

    def publish(self, status: Mapping[str, Any], now: float | None = None) -> None:
        self.collector.publish(status, now)

    def maybe_publish(self, now: float, status: Callable[[], Mapping[str, Any]]) -> bool:
        return self.collector.maybe_publish(now, status)

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=2.0)
