"""Daemon logging: journal prefixes, JSON lines, the repeat limiter, the log_format setting."""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile

import pytest
from hypothesis import given, settings, strategies as st

from hasync import config, logs
from hasync.logs import RepeatLimiter


@pytest.fixture
def root_restored():
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    for h in root.handlers[:]:
        root.removeHandler(h)
    for h in handlers:
        root.addHandler(h)
    root.setLevel(level)


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_journal_lines_carry_syslog_priorities(root_restored):
    with tempfile.TemporaryFile("w+") as stream:
        st_ = os.fstat(stream.fileno())
        logs.setup("fw1", "journal", logging.DEBUG, stream=stream,
                   env={"JOURNAL_STREAM": f"{st_.st_dev}:{st_.st_ino}"})
        log = logging.getLogger("hasync.test")
        log.debug("d")
        log.info("state %s -> %s", "BACKUP", "MASTER")
        log.warning("w")
        log.error("e")
        log.critical("c")
        try:
            raise ValueError("boom")
        except ValueError:
            log.exception("failed")
        stream.seek(0)
        lines = stream.read().splitlines()
    assert lines[:5] == ["<7>hasync.test: d", "<6>hasync.test: state BACKUP -> MASTER", "<4>hasync.test: w",
                         "<3>hasync.test: e", "<2>hasync.test: c"]
    assert lines[5] == "<3>hasync.test: failed"
    traceback = lines[6:]
    assert traceback and all(line.startswith("<3>") for line in traceback)  # one priority per line
    assert traceback[-1] == "<3>ValueError: boom"


def test_plain_lines_when_the_journal_is_not_our_stderr(root_restored):
    stream = io.StringIO()
    logs.setup("fw1", "journal", stream=stream, env={"JOURNAL_STREAM": "1:2"})
    logging.getLogger("hasync").info("hello %d", 5)
    line = stream.getvalue().strip()
    assert not line.startswith("<")
    assert line.endswith(" fw1 hasync INFO hello 5")


def test_json_lines_have_the_fields_and_extras(root_restored):
    stream = io.StringIO()
    logs.setup("fw2", "json", stream=stream)
    log = logging.getLogger("hasync.failover")
    log.warning("dropped %s", "advert", extra={"reason": "bad_mac", "peer": "198.51.100.1"})
    log.debug("not shown")  # level INFO by default
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    obj = json.loads(lines[0])
    assert obj["level"] == "warning" and obj["logger"] == "hasync.failover"
    assert obj["msg"] == "dropped advert" and obj["host"] == "fw2"
    assert obj["reason"] == "bad_mac" and obj["peer"] == "198.51.100.1"
    assert obj["ts"].endswith("+00:00") and "T" in obj["ts"]


def test_unknown_format_is_refused():
    with pytest.raises(ValueError):
        logs.setup("fw1", "xml")


def _limited_logger(clock, burst=3, window_s=10.0):
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    limiter = RepeatLimiter(handler.handle, burst=burst, window_s=window_s, clock=clock)
    handler.addFilter(limiter)
    log = logging.getLogger(f"hsx-ops-limit-{id(stream)}")
    log.propagate = False
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    return log, stream, limiter


def test_a_flood_is_cut_after_the_burst_and_reported_after_the_window():
    clock = FakeClock()
    log, stream, limiter = _limited_logger(clock)
    for i in range(10):
        log.warning("bad advert from %s", f"192.0.2.{i}")  # same template, different values
    log.warning("another message")
    clock.t += 10.0
    log.warning("bad advert from %s", "192.0.2.99")
    lines = stream.getvalue().splitlines()
    assert lines[:4] == ["bad advert from 192.0.2.0", "bad advert from 192.0.2.1", "bad advert from 192.0.2.2",
                         "another message"]
    assert lines[4] == "suppressed 7 repeats of 'bad advert from %s' in 10 s"
    assert lines[5] == "bad advert from 192.0.2.99"
    assert len(lines) == 6
    assert limiter.suppressed_total == 7


def test_suppressed_count_is_reported_even_if_the_flood_stops():
    clock = FakeClock()
    log, stream, limiter = _limited_logger(clock, burst=1)
    for _ in range(5):
        log.error("link flap")
    clock.t += 11.0
    log.info("something else")  # any record after the window sweeps the stale counts
    lines = stream.getvalue().splitlines()
    assert lines == ["link flap", "suppressed 4 repeats of 'link flap' in 10 s", "something else"]
    limiter.flush_suppressed()
    assert stream.getvalue().splitlines()[-1] == "something else"  # nothing left to report


def test_flush_at_shutdown_reports_pending_counts():
    clock = FakeClock()
    log, stream, limiter = _limited_logger(clock, burst=2)
    for _ in range(6):
        log.warning("x")
    limiter.flush_suppressed()
    assert stream.getvalue().splitlines() == ["x", "x", "suppressed 4 repeats of 'x' in 10 s"]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a %s", "b %s", "c"]), st.floats(0, 3)), max_size=200),
       st.integers(1, 5))
def test_limiter_never_loses_count(events, burst):
    """Every record is either written or counted in a later "suppressed" line."""
    clock = FakeClock()
    log, stream, limiter = _limited_logger(clock, burst=burst, window_s=5.0)
    for template, dt in events:
        clock.t += dt
        log.warning(template, "v") if "%s" in template else log.warning(template)
    limiter.flush_suppressed()
    lines = stream.getvalue().splitlines()
    suppressed = sum(int(line.split()[1]) for line in lines if line.startswith("suppressed "))
    written = sum(1 for line in lines if not line.startswith("suppressed "))
    assert written + suppressed == len(events)
    assert suppressed == limiter.suppressed_total


# ---- the node config's log_format --------------------------------------------------------------

def _doc(tmp_path, **node):
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    return {"node": {"hostname": "fw1", **node}, "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}},
            "sync": {"enabled": False}}


def test_log_format_default_and_json(tmp_path):
    assert config.parse(_doc(tmp_path), base_dir=tmp_path).log_format == "journal"
    cfg = config.parse(_doc(tmp_path, log_format="json"), base_dir=tmp_path)
    assert cfg.log_format == "json"
    assert config.to_toml_dict(cfg)["node"]["log_format"] == "json"
    again = config.parse(config.to_toml_dict(cfg), base_dir=tmp_path)
    assert again.log_format == "json"


@pytest.mark.parametrize("value, words", [("syslog", "not one of"), (1, "string")])
def test_log_format_errors_name_the_field(tmp_path, value, words):
    with pytest.raises(config.ConfigError) as err:
        config.parse(_doc(tmp_path, log_format=value), base_dir=tmp_path)
    assert err.value.field == "node.log_format" and words in err.value.reason
