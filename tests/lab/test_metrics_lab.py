"""The Prometheus endpoint through a Master crash: what an operator's dashboard would see.

Both nodes serve /metrics on 127.0.0.1:9600 inside their own namespace; a thread
that joins the namespace scrapes it (nsctl.in_netns), the text is parsed with
prometheus_client's own parser, and the counters are compared before and after
fw1 crashes and comes back.
"""

from __future__ import annotations

import os
import secrets
import time
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.sync import wait_sync_connected
from hasync.lab import commands, faults, nsctl
from hasync.lab.topology import teardown

pytestmark = pytest.mark.lab

METRICS_PORT = 9600
STEADY = {"fw1": "MASTER", "fw2": "BACKUP"}
TIMEOUT_S = 10.0

Samples = dict[tuple[str, frozenset], float]


@pytest.fixture(scope="module")
def metrics_lab():
    if os.geteuid() != 0:
        pytest.skip("lab tests need root")
    tag = f"x-str-{secrets.token_hex(2)}"
    node = {"node": {"metrics_port": METRICS_PORT}}  # per node: each namespace has its own loopback
    lab = commands.up(f"t-str-metrics-{tag}", tag=tag, owner_pid=os.getpid(), sync_enabled=True,
                      fw1=node, fw2=node)
    try:
        yield lab
    finally:
        teardown(lab)


def _get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=2.0) as reply:
        return reply.read().decode()


def scrape(lab, fw: str) -> Samples:
    """Every sample of `fw`'s /metrics, keyed by (sample name, labels)."""
    text = nsctl.in_netns(lab.ns(fw), _get, f"http://127.0.0.1:{METRICS_PORT}/metrics")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape_until(lab, fw: str, predicate, what: str, timeout: float = TIMEOUT_S) -> Samples:
    """Scrape until predicate(samples) holds (the loop publishes every 0.5 s); fail naming `what`."""
    deadline = time.monotonic() + timeout
    samples: Samples = {}
    while time.monotonic() < deadline:
        samples = scrape(lab, fw)
        if predicate(samples):
            return samples
        time.sleep(0.1)
    shown = {k[0]: v for k, v in samples.items() if k[0].startswith("hasync_")}
    raise AssertionError(f"{fw}: {what} not seen within {timeout} s; last scrape {shown}")


def transitions_to(samples: Samples, state: str) -> dict[str, float]:
    """hasync_state_transitions_total{state=...} by cause."""
    out = {}
    for (name, labels), v in samples.items():
        labels = dict(labels)
        if name == "hasync_state_transitions_total" and labels.get("state") == state:
            out[labels["cause"]] = v
    return out


def test_counters_follow_a_master_crash(metrics_lab):
    lab = metrics_lab
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    wait_sync_connected(lab)

    # steady state: both endpoints agree with the control socket
    one = scrape_until(lab, "fw1", lambda s: value(s, "hasync_master") == 1, "fw1 as Master")
    # a fresh pair turns green once the first resync is done (and the next snapshot is out)
    two = scrape_until(lab, "fw2", lambda s: value(s, "hasync_icon", icon="green") == 1, "fw2 green")
    assert value(one, "hasync_state", state="MASTER") == 1
    assert value(two, "hasync_master") == 0
    assert value(two, "hasync_state", state="BACKUP") == 1
    assert value(two, "hasync_state", state="MASTER") == 0
    assert value(two, "hasync_peer_up") == 1
    assert value(two, "hasync_peer_state", state="MASTER", peer="fw1") == 1
    assert value(two, "hasync_sync_connected") == 1
    assert value(two, "hasync_sync_running") == 1
    received0 = value(two, "hasync_heartbeats_received_total")
    assert received0 is not None and received0 > 0
    # heartbeats keep arriving (5 ms interval): the counter grows between scrapes
    two = scrape_until(lab, "fw2", lambda s: value(s, "hasync_heartbeats_received_total") > received0,
                       "fw2's heartbeats received counter growing")
    received1 = value(two, "hasync_heartbeats_received_total")
    sent1 = value(two, "hasync_heartbeats_sent_total", interface="lan2")
    assert sent1 is not None and sent1 > 0
    to_master0 = transitions_to(two, "MASTER")
    to_backup0 = sum(transitions_to(two, "BACKUP").values())
    transitions0 = sum(v for (n, _), v in two.items() if n == "hasync_state_transitions_total")

    faults.fail(lab, "fw1", "crash")
    commands.wait_until(lab, lambda s: s["fw2"] == "MASTER", TIMEOUT_S)
    cause = nsctl.ask(lab, "fw2", "status")["last_transition"]["cause"]

    two = scrape_until(lab, "fw2", lambda s: value(s, "hasync_master") == 1, "fw2 as Master")
    assert value(two, "hasync_state", state="MASTER") == 1
    assert value(two, "hasync_state", state="BACKUP") == 0
    assert value(two, "hasync_peer_up") == 0
    assert value(two, "hasync_icon", icon="red") == 1  # a failover would not work now
    assert value(two, "hasync_red_reasons") >= 1
    # the takeover is counted once, under the cause the control socket reports
    to_master = transitions_to(two, "MASTER")
    assert to_master.get(cause, 0) == to_master0.get(cause, 0) + 1, (cause, to_master0, to_master)
    assert sum(v for (n, _), v in two.items() if n == "hasync_state_transitions_total") == transitions0 + 1
    # counters are monotonic through the takeover; heartbeats still leave, none arrive
    assert value(two, "hasync_heartbeats_received_total") >= received1
    assert value(two, "hasync_heartbeats_sent_total", interface="lan2") > sent1
    received_dead = value(two, "hasync_heartbeats_received_total")
    time.sleep(1.0)  # two publishes later: a dead peer adds nothing
    two = scrape(lab, "fw2")
    assert value(two, "hasync_heartbeats_received_total") == received_dead
    assert value(two, "hasync_peer_last_seen_seconds") is None or \
        value(two, "hasync_peer_last_seen_seconds") >= 1.0
    # the sync channel notices the dead peer by its own liveness timeout (3 s), later
    scrape_until(lab, "fw2", lambda s: value(s, "hasync_sync_connected") == 0, "fw2's sync channel down")
    # the crashed node serves nothing: its daemon is gone
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        scrape(lab, "fw1")

    # fw1 reboots and preempts back: fw2's counters carry on from where they were
    faults.restore(lab, "fw1")
    commands.wait_until(lab, lambda s: s == STEADY, 20)
    two = scrape_until(lab, "fw2", lambda s: value(s, "hasync_master") == 0 and value(s, "hasync_peer_up") == 1,
                       "fw2 back to Backup with its peer up")
    assert value(two, "hasync_heartbeats_received_total") > received_dead
    assert sum(transitions_to(two, "BACKUP").values()) == to_backup0 + 1  # handed back by preemption
    assert transitions_to(two, "MASTER").get(cause) == to_master.get(cause)
    one = scrape_until(lab, "fw1", lambda s: value(s, "hasync_master") == 1, "the restarted fw1 as Master")
    assert value(one, "hasync_peer_state", state="BACKUP", peer="fw2") == 1
