"""The Prometheus endpoint: a published status snapshot, scraped over HTTP on loopback."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from hasync import config
from hasync.metrics import MetricsServer, StatusCollector, TransitionCounter


def status(**overrides) -> dict:
    """The shape FailoverService.status() returns (plus the sync service's status)."""
    s = {
        "icon": "red", "role": "Master", "state": "MASTER", "cause": "peer fw2 is FAULT",
        "reasons": ["peer fw2 is FAULT: it could not take over", "state sync: resync in progress"],
        "peer": {"hostname": "fw2", "state": "FAULT", "priority": 0, "version": "0.1.0", "alive": True,
                 "last_seen_ms_ago": 4.0, "paths_alive": ["lan1", "lan2"]},
        "hostname": "fw1", "version": "0.1.0", "enabled": True, "group": 1,
        "links": {"lan1": True, "lan2": True, "wan1": False},
        "heartbeats": {"received": 1234, "dropped": {"bad_mac": 7, "replay": 2},
                       "sent": {"lan1": 500, "lan2": 501, "wan1": 499}, "send_errors": {"wan1": 3}},
        "hooks": {"runs": 4, "failures": 1, "timeouts": 0},
        "last_transition": {"old": "BACKUP", "new": "MASTER", "cause": "peer fw2 is FAULT", "time": 1.0},
        "sync": {"running": True, "restarts": 1, "connected": True, "entries_sent": 200000,
                 "entries_applied": 0, "entries_lost": 0, "lag_ms": 12.5, "overruns": 2, "dumps": 6, "holds_released": 41,
                 "errors": {"apply": 5}, "sender": {"snapshot_records_sent": 150000, "resyncs": 3},
                 "receiver": {"resyncs": 1, "gaps": 4}, "config": {"generation": 17, "conflicts": 2}},
    }
    s.update(overrides)
    return s


class FakeClock:
    def __init__(self, t: float = 50.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def samples(collector) -> dict[tuple[str, tuple], float]:
    out = {}
    for family in collector.collect():
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def value(got, name, **labels):
    return got[(name, tuple(sorted(labels.items())))]


@pytest.fixture
def server():
    transitions = TransitionCounter()
    srv = MetricsServer("127.0.0.1", 0, transitions=transitions)
    try:
        yield srv, transitions
    finally:
        srv.close()


def scrape(srv: MetricsServer) -> dict[tuple[str, tuple], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{srv.port}/metrics", timeout=5) as reply:
        assert reply.status == 200
        text = reply.read().decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_scrape_over_http_renders_the_published_snapshot(server):
    srv, transitions = server
    transitions.record("BACKUP", "peer fw2 is Master")
    transitions.record("MASTER", "peer fw2 is FAULT")
    transitions.record("MASTER", "peer fw2 is FAULT")
    srv.publish(status())
    got = scrape(srv)
    assert value(got, "hasync_info", version="0.1.0", hostname="fw1") == 1
    assert value(got, "hasync_state", state="MASTER") == 1
    assert value(got, "hasync_state", state="BACKUP") == 0
    assert value(got, "hasync_master") == 1
    assert value(got, "hasync_icon", icon="red") == 1 and value(got, "hasync_icon", icon="green") == 0
    assert value(got, "hasync_red_reasons") == 2
    assert value(got, "hasync_state_transitions_total", state="MASTER", cause="peer fw2 is FAULT") == 2
    assert value(got, "hasync_state_transitions_total", state="BACKUP", cause="peer fw2 is Master") == 1
    assert value(got, "hasync_heartbeats_received_total") == 1234
    assert value(got, "hasync_heartbeats_dropped_total", reason="bad_mac") == 7
    assert value(got, "hasync_heartbeats_sent_total", interface="lan2") == 501
    assert value(got, "hasync_heartbeat_send_errors_total", interface="wan1") == 3
    assert value(got, "hasync_peer_up") == 1
    assert value(got, "hasync_peer_state", state="FAULT", peer="fw2") == 1
    assert 0.004 <= value(got, "hasync_peer_last_seen_seconds") < 5
    assert value(got, "hasync_link_up", interface="wan1") == 0
    assert value(got, "hasync_hook_failures_total") == 1
    assert value(got, "hasync_sync_entries_sent_total") == 200000
    assert value(got, "hasync_sync_entries_lost_total") == 0
    assert value(got, "hasync_sync_entries_resynced_total") == 150000
    assert value(got, "hasync_sync_resyncs_total") == 4
    assert value(got, "hasync_sync_gaps_total") == 4
    assert value(got, "hasync_sync_lag_seconds") == pytest.approx(0.0125)
    assert value(got, "hasync_sync_event_overruns_total") == 2
    assert value(got, "hasync_sync_table_dumps_total") == 6
    assert value(got, "hasync_sync_holds_released_total") == 41
    assert value(got, "hasync_sync_errors_total", kind="apply") == 5
    assert value(got, "hasync_config_generation") == 17
    assert value(got, "hasync_config_sync_conflicts_total") == 2
    assert ("process_resident_memory_bytes", ()) in got


def test_nothing_is_rendered_before_the_first_snapshot(server):
    srv, _ = server
    got = scrape(srv)
    assert not any(name.startswith("hasync_") for name, _ in got)


def test_snapshot_is_a_copy_the_loop_may_keep_mutating():
    collector = StatusCollector(clock=FakeClock())
    live = status()
    collector.publish(live)
    live["heartbeats"]["received"] = 99999
    live["heartbeats"]["dropped"]["bad_mac"] = 99999
    got = samples(collector)
    assert value(got, "hasync_heartbeats_received_total") == 1234
    assert value(got, "hasync_heartbeats_dropped_total", reason="bad_mac") == 7


def test_publish_rate_limit_and_snapshot_age():
    clock = FakeClock(100.0)
    collector = StatusCollector(clock=clock)
    calls = []

    def build():
        calls.append(clock.t)
        return status(state="BACKUP", role="Backup")

    for now, due in ((100.0, True), (100.3, False), (100.49, False), (100.5, True), (100.7, False)):
        clock.t = now
        assert collector.maybe_publish(now, build) is due
    assert calls == [100.0, 100.5]  # the status is not even built when no publish is due
    clock.t = 102.5  # the loop stopped publishing two seconds ago
    got = samples(collector)
    assert value(got, "hasync_status_snapshot_age_seconds") == pytest.approx(2.0)
    assert value(got, "hasync_peer_last_seen_seconds") == pytest.approx(2.004)
    assert value(got, "hasync_state", state="BACKUP") == 1 and value(got, "hasync_master") == 0


def test_missing_fields_leave_metrics_out_instead_of_zero():
    collector = StatusCollector(clock=FakeClock())
    collector.publish({"icon": "grey", "role": "", "state": "DISABLED", "reasons": [], "peer": None,
                       "enabled": False, "sync": None})
    got = samples(collector)
    names = {name for name, _ in got}
    assert value(got, "hasync_state", state="DISABLED") == 1
    assert value(got, "hasync_peer_up") == 0 and value(got, "hasync_sync_running") == 0
    for absent in ("hasync_state_transitions_total", "hasync_sync_entries_lost_total",
                   "hasync_config_generation", "hasync_peer_last_seen_seconds", "hasync_heartbeats_received_total"):
        assert absent not in names


def test_an_unknown_state_still_shows():
    collector = StatusCollector(clock=FakeClock())
    collector.publish(status(state="SOMETHING NEW"))
    got = samples(collector)
    assert value(got, "hasync_state", state="SOMETHING NEW") == 1
    assert value(got, "hasync_state", state="MASTER") == 0


# ---- the node config's metrics settings --------------------------------------------------------

def _doc(tmp_path, **node):
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    return {"node": {"hostname": "fw1", **node}, "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}},
            "sync": {"enabled": False}}


def test_metrics_are_off_by_default_and_round_trip(tmp_path):
    cfg = config.parse(_doc(tmp_path), base_dir=tmp_path)
    assert cfg.metrics_port == 0 and cfg.metrics_address == "127.0.0.1"
    cfg = config.parse(_doc(tmp_path, metrics_address="2001:db8::1", metrics_port=9609), base_dir=tmp_path)
    assert (cfg.metrics_address, cfg.metrics_port) == ("2001:db8::1", 9609)
    node = config.to_toml_dict(cfg)["node"]
    assert (node["metrics_address"], node["metrics_port"]) == ("2001:db8::1", 9609)
    assert config.parse(config.to_toml_dict(cfg), base_dir=tmp_path).metrics_port == 9609


@pytest.mark.parametrize("key, value, words", [
    ("metrics_port", 70000, "range"),
    ("metrics_port", -1, "range"),
    ("metrics_port", "9609", "integer"),
    ("metrics_address", "localhost", "not a valid IP address"),
    ("metrics_address", "192.0.2.1/24", "without a prefix"),
])
def test_metrics_settings_errors_name_the_field(tmp_path, key, value, words):
    with pytest.raises(config.ConfigError) as err:
        config.parse(_doc(tmp_path, **{key: value}), base_dir=tmp_path)
    assert err.value.field == f"node.{key}" and words in str(err.value)
