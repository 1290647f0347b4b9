"""The node config: parsing, every validation rule, round-trip, atomic save, examples."""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import pickle
import secrets
import shutil
import stat
import subprocess
import tempfile
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from hasync import config
from hasync.config import ConfigError, Group, Monitor, NodeConfig, SyncConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "config"


@pytest.fixture
def keydir(tmp_path: Path) -> Path:
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    (tmp_path / "curve.key_secret").write_text("curve secret placeholder\n")
    return tmp_path


def valid() -> dict:
    """A complete, valid document using documentation addresses only."""
    return {
        "node": {"hostname": "fw1", "notify": ["/bin/true"]},
        "global": {"status": "enable"},
        "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}},
        "sync": {"enabled": True, "curve_secret_key_file": "curve.key_secret",
                 "replicated_paths": ["/etc/nftables.conf"]},
        "group": [{
            "id": 1, "state": "master", "ha_link": "lan2",
            "peer_address": "198.51.100.2", "peer_mask": 30,
            "monitor": [{"interface": "wan1", "floating_ip": "203.0.113.1/24"},
                        {"interface": "lan1", "floating_ip": "192.0.2.1/24"}],
        }],
    }


def second_group(d: dict, **overrides) -> None:
    group = {"id": 2, "state": "backup", "ha_link": "lan3", "peer_address": "198.51.100.6",
             "peer_mask": 30, "monitor": [{"interface": "wan2", "floating_ip": "203.0.113.9/24"}]}
    group.update(overrides)
    d["group"].append(group)


def set_in(*keys_and_value):
    """A mutation setting d[k1][k2]...[kn] = value (ints index arrays)."""
    *keys, value = keys_and_value

    def mutate(d: dict) -> None:
        target = d
        for key in keys[:-1]:
            target = target[key]
        target[keys[-1]] = value
    return mutate


def delete_in(*keys):
    def mutate(d: dict) -> None:
        target = d
        for key in keys[:-1]:
            target = target[key]
        del target[keys[-1]]
    return mutate


G = ("group", 0)
M0 = G + ("monitor", 0)
M1 = G + ("monitor", 1)

# (mutation, field the error must name, a word the reason must contain)
STATIC_ERRORS = [
    (set_in("nodes", {}), "nodes", "unknown"),
    (set_in("node", "hostnme", "x"), "node.hostnme", "unknown"),
    (set_in(*M1, "floatingip", "192.0.2.5/24"), "group[0].monitor[1].floatingip", "unknown"),
    (set_in(*G, "peer", "x"), "group[0].peer", "unknown"),
    (set_in("node", "heartbeat_port", "7609"), "node.heartbeat_port", "integer"),
    (set_in(*G, "dead_count", True), "group[0].dead_count", "integer"),
    (set_in(*G, "ha_link", 2), "group[0].ha_link", "string"),
    (set_in("sync", "enabled", "yes"), "sync.enabled", "true or false"),
    (set_in("group", {"id": 1}), "group", "array"),
    (set_in("global", "status", "on"), "global.status", "enable"),
    (set_in(*G, "state", "primary"), "group[0].state", "master"),
    (delete_in(*G, "monitor"), "group[0].monitor", "at least one"),
    (set_in(*G, "monitor", []), "group[0].monitor", "at least one"),
    (delete_in(*G, "peer_mask"), "group[0].peer_mask", "required"),
    (set_in(*M1, "interface", "lan2"), "group[0].monitor[1].interface", "HA link"),
    (set_in(*M1, "interface", "wan1"), "group[0].monitor[1].interface", "duplicate"),
    (set_in(*M1, "floating_ip", "203.0.113.1/25"), "group[0].monitor[1].floating_ip", "duplicate"),
    (set_in(*M0, "floating_ip", "203.0.113.1"), "group[0].monitor[0].floating_ip", "prefix"),
    (set_in(*M0, "floating_ip", "203.0.113.0/24"), "group[0].monitor[0].floating_ip", "network"),
    (set_in(*M0, "floating_ip", "203.0.113.255/24"), "group[0].monitor[0].floating_ip", "broadcast"),
    (set_in(*M0, "floating_ip", "2001:db8::/64"), "group[0].monitor[0].floating_ip", "network"),
    (set_in(*M0, "floating_ip", "203.0.113.300/24"), "group[0].monitor[0].floating_ip", "valid"),
    (set_in(*G, "peer_address", "198.51.100.0"), "group[0].peer_address", "network"),
    (set_in(*G, "peer_address", "198.51.100.3"), "group[0].peer_address", "broadcast"),
    (set_in(*G, "peer_address", "198.51.100.x"), "group[0].peer_address", "valid"),
    (set_in(*G, "peer_mask", "255.0.255.0"), "group[0].peer_mask", "contiguous"),
    (set_in(*G, "peer_mask", "mask"), "group[0].peer_mask", "valid mask"),
    (set_in(*G, "peer_mask", 32), "group[0].peer_mask", "valid mask"),
    (set_in(*G, "peer_mask", 0), "group[0].peer_mask", "valid mask"),
    (set_in(*G, "peer_mask", 2.5), "group[0].peer_mask", "prefix length"),
    (set_in(*G, "peer_mask", 64), "group[0].peer_mask", "mix"),
    (set_in(*G, "peer_mask", "ffff:ffff:ffff:ffff::"), "group[0].peer_mask", "mix"),
    (lambda d: d["group"][0].update(peer_address="2001:db8::2", peer_mask="255.255.255.0"),
     "group[0].peer_mask", "mix"),
    (set_in(*M0, "floating_ip", "198.51.100.2/24"), "group[0].monitor[0].floating_ip", "peer"),
    (set_in(*G, "priority", 0), "group[0].priority", "range"),
    (set_in(*G, "priority", 255), "group[0].priority", "range"),
    (set_in(*G, "heartbeat_interval_ms", 0.5), "group[0].heartbeat_interval_ms", "small"),
    (set_in(*G, "heartbeat_interval_ms", float("nan")), "group[0].heartbeat_interval_ms", "finite"),
    (set_in(*G, "dead_count", 1), "group[0].dead_count", "small"),
    (set_in(*G, "preempt", "yes"), "group[0].preempt", "delay"),
    (set_in(*G, "preempt", "delay"), "group[0].preempt_delay_ms", "delay"),
    (set_in(*G, "id", 256), "group[0].id", "range"),
    (set_in("node", "heartbeat_port", 0), "node.heartbeat_port", "range"),
    (set_in("node", "heartbeat_port", 70000), "node.heartbeat_port", "range"),
    (set_in("sync", "port", 65536), "sync.port", "range"),
    (set_in("node", "realtime_priority", 100), "node.realtime_priority", "range"),
    (set_in("node", "control_socket", "hasync"), "node.control_socket", "@"),
    (lambda d: second_group(d, id=1), "group[1].id", "duplicate"),
    (lambda d: second_group(d), "group[1]", "one HA group per node"),
    (lambda d: second_group(d, monitor=[{"interface": "wan2", "floating_ip": "192.0.2.1/24"}]),
     "group[1].monitor[0].floating_ip", "duplicate"),
    (set_in("security", "auth_key_id", 2), "security.auth_key_id", "not in"),
    (delete_in("security", "auth_key_id"), "security.auth_key_id", "required"),
    (delete_in("security"), "security", "required"),
    (set_in("security", "auth_keys", {}), "security.auth_keys", "at least one"),
    (set_in("security", "auth_keys", "2", "auth-2.key"), "security.auth_keys.2", "missing"),
    (set_in("security", "auth_keys", "abc", "auth-1.key"), "security.auth_keys.abc", "1..255"),
    (set_in("sync", "curve_secret_key_file", "nope.key_secret"), "sync.curve_secret_key_file", "missing"),
    (set_in("sync", "peer_public_key", "short"), "sync.peer_public_key", "z85"),
    (set_in("sync", "mode", "fast"), "sync.mode", "kernel"),
    (set_in("sync", "hold_timeout", -1), "sync.hold_timeout", "0"),
    (set_in("sync", "hold_timeout", "1d"), "sync.hold_timeout", "integer"),
    (set_in("sync", "backup_copy", "no"), "sync.backup_copy", "true or false"),
    (lambda d: d["sync"].update(mode="cache", backup_copy=False), "sync.backup_copy", "kernel"),
    (set_in("sync", "ignore_addresses", ["not-a-net"]), "sync.ignore_addresses[0]", "CIDR"),
    (set_in("sync", "ignore_addresses", ["192.0.2.1/24"]), "sync.ignore_addresses[0]", "host bits"),
    (set_in("sync", "ignore_protocols", ["bogus"]), "sync.ignore_protocols[0]", "tcp"),
    (set_in("sync", "replicated_paths", ["etc/x"]), "sync.replicated_paths[0]", "absolute"),
    (set_in("sync", "reload_hooks", {"/etc/x": 5}), "sync.reload_hooks./etc/x", "string"),
    (set_in(*G, "ha_link", "a" * 16), "group[0].ha_link", "long"),
    (set_in(*G, "ha_link", "lan/2"), "group[0].ha_link", "invalid"),
    (set_in(*M0, "interface", "wan 1"), "group[0].monitor[0].interface", "invalid"),
    (set_in(*M0, "interface", ""), "group[0].monitor[0].interface", "empty"),
]


@pytest.mark.parametrize("mutate, field, word", STATIC_ERRORS,
                         ids=[f"{f}~{w}" for _, f, w in STATIC_ERRORS])
def test_static_validation_names_field_and_reason(keydir, mutate, field, word):
    data = valid()
    mutate(data)
    with pytest.raises(ConfigError) as err:
        config.parse(data, base_dir=keydir)
    assert err.value.field == field
    assert word.lower() in err.value.reason.lower()
    assert str(err.value).startswith(field + ": ")


def test_valid_document_parses_with_defaults(keydir):
    cfg = config.parse(valid(), base_dir=keydir)
    group = cfg.group
    assert cfg.enabled and cfg.hostname == "fw1"
    assert group.peer_address == ipaddress.ip_address("198.51.100.2") and group.peer_mask == 30
    assert group.priority == 150 and group.preempt == "on" and group.dead_count == 3
    assert [str(ip) for ip in group.floating_ips] == ["203.0.113.1/24", "192.0.2.1/24"]
    assert cfg.auth_keys[1] == bytes.fromhex((keydir / "auth-1.key").read_text())
    assert cfg.auth_key_files[1] == keydir / "auth-1.key"
    assert cfg.sync.curve_secret_key_file == keydir / "curve.key_secret"


def test_defaults_for_omitted_tables(keydir):
    data = valid()
    del data["node"], data["global"], data["sync"]
    data["group"][0]["state"] = "backup"
    cfg = config.parse(data, base_dir=keydir)
    assert cfg.hostname == __import__("socket").gethostname()
    assert not cfg.enabled  # the seed: Config Status must be switched to Enable
    assert cfg.group.priority == 100
    assert cfg.sync == SyncConfig()


@pytest.mark.parametrize("mask, prefix", [(30, 30), ("30", 30), ("/30", 30), ("255.255.255.252", 30),
                                          ("255.255.255.254", 31)])
def test_peer_mask_forms(keydir, mask, prefix):
    data = valid()
    data["group"][0].update(peer_address="198.51.100.1", peer_mask=mask)
    assert config.parse(data, base_dir=keydir).group.peer_mask == prefix


def test_ipv6_group(keydir):
    data = valid()
    data["group"][0].update(peer_address="2001:db8:ff::2", peer_mask=64)
    data["group"][0]["monitor"][0]["floating_ip"] = "2001:db8:1::1/64"
    group = config.parse(data, base_dir=keydir).group
    assert group.peer_network == ipaddress.ip_network("2001:db8:ff::/64")


@pytest.mark.parametrize("content, word", [("abcd" * 7, "short"), ("zz" * 20, "hex"), (None, "unreadable")])
def test_bad_key_files(keydir, content, word):
    key_path = keydir / "auth-2.key"
    if content is None:
        key_path.mkdir()  # root reads any file; a directory is reliably unreadable as a key
    else:
        key_path.write_text(content)
    data = valid()
    data["security"]["auth_keys"]["2"] = str(key_path)
    with pytest.raises(ConfigError) as err:
        config.parse(data, base_dir=keydir)
    assert err.value.field == "security.auth_keys.2" and word in err.value.reason


def test_curve_key_not_checked_when_sync_disabled(keydir):
    data = valid()
    data["sync"].update(enabled=False, curve_secret_key_file="absent.key_secret")
    assert not config.parse(data, base_dir=keydir).sync.enabled


# ---------------------------------------------------------------- checks against the live system

SYSTEM = {
    "lan2": [ipaddress.ip_interface("198.51.100.1/30")],
    "wan1": [ipaddress.ip_interface("203.0.113.2/24")],
    "lan1": [ipaddress.ip_interface("2001:db8::2/64"), ipaddress.ip_interface("192.0.2.2/24")],
}


def test_system_view_accepts_matching_interfaces(keydir):
    cfg = config.parse(valid(), base_dir=keydir, system=SYSTEM)
    config.validate_against_system(cfg, SYSTEM)


def _without(name):
    return {k: v for k, v in SYSTEM.items() if k != name}


SYSTEM_ERRORS = [
    (lambda d: None, _without("lan2"), "group[0].ha_link", "does not exist"),
    (lambda d: None, {**SYSTEM, "lan2": [ipaddress.ip_interface("2001:db8::1/64")]}, "group[0].ha_link", "no IPv4"),
    (lambda d: d["group"][0].update(peer_address="198.51.100.9"), SYSTEM, "group[0].peer_address",
     "peer address 198.51.100.9 is outside the HA link lan2's subnet 198.51.100.0/30"),
    (lambda d: d["group"][0].update(peer_address="198.51.100.1"), SYSTEM, "group[0].peer_address", "own address"),
    (lambda d: None, _without("wan1"), "group[0].monitor[0].interface", "does not exist"),
    (set_in(*M0, "floating_ip", "198.18.0.1/24"), SYSTEM, "group[0].monitor[0].floating_ip", "outside"),
    (set_in(*M1, "floating_ip", "2001:db8:5::1/64"), SYSTEM, "group[0].monitor[1].floating_ip", "outside"),
]


@pytest.mark.parametrize("mutate, system, field, reason", SYSTEM_ERRORS)
def test_system_validation(keydir, mutate, system, field, reason):
    data = valid()
    mutate(data)
    cfg = config.parse(data, base_dir=keydir)  # statically fine
    with pytest.raises(ConfigError) as err:
        config.parse(data, base_dir=keydir, system=system)
    assert err.value.field == field and reason in err.value.reason
    with pytest.raises(ConfigError):
        config.validate_against_system(cfg, system)


# ---------------------------------------------------------------- form building and editing

FORM = dict(state="master", ha_link="lan2", peer_address="198.51.100.2", peer_mask="255.255.255.252",
            monitors=[("wan1", "203.0.113.1/24"), ("lan1", "192.0.2.1/24")], priority="120",
            heartbeat_interval_ms="2.5", dead_count="", preempt="delay", preempt_delay_ms="500")


def test_group_from_form_coerces_text_and_uses_defaults():
    group = config.group_from_form(FORM)
    assert group == Group(id=1, state="master", ha_link="lan2",
                          peer_address=ipaddress.ip_address("198.51.100.2"), peer_mask=30,
                          monitors=(Monitor("wan1", ipaddress.ip_interface("203.0.113.1/24")),
                                    Monitor("lan1", ipaddress.ip_interface("192.0.2.1/24"))),
                          priority=120, heartbeat_interval_ms=2.5, dead_count=3,
                          preempt="delay", preempt_delay_ms=500)


@pytest.mark.parametrize("change, field, word", [
    (dict(monitors=[("wan1", "203.0.113.1/24"), ("lan2", "192.0.2.1/24")]), "group[0].monitor[1].interface", "HA link"),
    (dict(monitors=[("wan1", "203.0.113.1/24"), ("lan1", "192.0.2.1")]), "group[0].monitor[1].floating_ip", "prefix"),
    (dict(monitors=[]), "group[0].monitor", "at least one"),
    (dict(monitors=["wan1"]), "group[0].monitor[0]", "pair"),
    (dict(priority="high"), "group[0].priority", "integer"),
    (dict(peer_mask="255.255.0.255"), "group[0].peer_mask", "contiguous"),
    (dict(preempt_delay_ms="0"), "group[0].preempt_delay_ms", "delay"),
    (dict(colour="red"), "group[0].colour", "unknown"),
])
def test_group_from_form_reports_like_the_file(change, field, word):
    with pytest.raises(ConfigError) as err:
        config.group_from_form({**FORM, **change})
    assert err.value.field == field and word in err.value.reason


def test_with_group_edit_add_remove_enable(keydir):
    cfg = config.parse(valid(), base_dir=keydir)
    edited = config.with_group(cfg, config.group_from_form(FORM))
    assert len(edited.groups) == 1 and edited.group.priority == 120
    assert cfg.group.priority == 150  # the original value is untouched
    with pytest.raises(ConfigError) as err:
        config.with_group(cfg, config.group_from_form({**FORM, "id": "2", "monitors": [("wan2", "198.18.0.1/24")]}))
    assert err.value.field == "group[1]" and "one HA group per node" in err.value.reason
    empty = config.without_group(cfg, 1)
    assert empty.groups == () and empty.group is None
    with pytest.raises(ConfigError):
        config.without_group(empty, 1)
    assert config.with_group(empty, cfg.group) == cfg
    assert not config.with_enabled(cfg, False).enabled and config.with_enabled(cfg, True) == cfg


# ---------------------------------------------------------------- keys, saving, round trip

def test_generate_and_write_key_file(tmp_path):
    key = config.generate_auth_key()
    assert len(key) == 32 and key != config.generate_auth_key()
    path = config.write_key_file(tmp_path / "k", key)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.read_text().strip() == key.hex()
    assert config.read_key_file(path) == key
    with pytest.raises(ValueError):
        config.write_key_file(tmp_path / "short", b"x" * 15)


def test_save_is_atomic_and_private(keydir, monkeypatch):
    cfg = config.parse(valid(), base_dir=keydir)
    target = keydir / "hasync.toml"
    assert config.save(cfg, target) == target
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    before = target.read_bytes()
    listing = sorted(os.listdir(keydir))

    def failing_replace(src, dst):
        raise OSError("disk on fire")
    monkeypatch.setattr(config.os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk on fire"):
        config.save(config.with_enabled(cfg, False), target)
    monkeypatch.undo()
    assert target.read_bytes() == before
    assert sorted(os.listdir(keydir)) == listing  # no temp file left behind
    assert config.load(target).enabled


def test_save_refuses_invalid_config(keydir):
    cfg = config.parse(valid(), base_dir=keydir)
    target = config.save(cfg, keydir / "hasync.toml")
    before = target.read_bytes()
    bad = dataclasses.replace(cfg.group, monitors=(Monitor("lan2", ipaddress.ip_interface("192.0.2.1/24")),))
    with pytest.raises(ConfigError) as err:
        config.save(dataclasses.replace(cfg, groups=(bad,)), target)
    assert err.value.field == "group[0].monitor[0].interface"
    assert target.read_bytes() == before


def test_load_reports_bad_toml_and_missing_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[node\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(bad)
    with pytest.raises(ConfigError, match="missing"):
        config.load(tmp_path / "absent.toml")


def test_config_error_pickles():
    err = pickle.loads(pickle.dumps(ConfigError("group[0].peer_mask", "bad")))
    assert (err.field, err.reason) == ("group[0].peer_mask", "bad")


NAMES = st.sampled_from(["lan1", "lan2", "lan3", "wan1", "wan2", "eth0", "dmz", "ha0"])


@st.composite
def groups(draw):
    ha_link = draw(NAMES)
    interfaces = draw(st.lists(NAMES.filter(lambda n: n != ha_link), min_size=1, max_size=4, unique=True))
    hosts = draw(st.lists(st.integers(1, 254), min_size=len(interfaces), max_size=len(interfaces), unique=True))
    v6 = draw(st.booleans())
    monitors = tuple(
        Monitor(name, ipaddress.ip_interface(f"2001:db8:1::{h:x}/64" if v6 and i % 2 else f"203.0.113.{h}/24"))
        for i, (name, h) in enumerate(zip(interfaces, hosts)))
    prefix = draw(st.integers(24, 31))
    network = ipaddress.ip_network(f"198.51.100.0/{prefix}")
    first, last = (0, 1) if prefix == 31 else (1, network.num_addresses - 2)
    peer = network.network_address + draw(st.integers(first, last))
    preempt = draw(st.sampled_from(["on", "off", "delay"]))
    delay = draw(st.integers(1, 60_000)) if preempt == "delay" else draw(st.integers(0, 60_000))
    state = draw(st.sampled_from(["master", "backup"]))
    return Group(id=draw(st.integers(1, 255)), state=state, ha_link=ha_link, peer_address=peer,
                 peer_mask=prefix, monitors=monitors, priority=draw(st.integers(1, 254)),
                 heartbeat_interval_ms=draw(st.floats(1, 1e5, allow_nan=False)),
                 dead_count=draw(st.integers(2, 100)), preempt=preempt, preempt_delay_ms=delay,
                 garp_count=draw(st.integers(0, 100)), garp_interval_ms=draw(st.integers(0, 10_000)))


# not whitespace alone: the loader refuses blank commands, and U+0085 / U+00A0 are whitespace
TEXT = st.text(st.characters(min_codepoint=33, max_codepoint=0x2FF), min_size=1, max_size=20).filter(str.strip)


@st.composite
def node_configs(draw):
    sync = SyncConfig(
        enabled=draw(st.booleans()), port=draw(st.integers(1, 65535)),
        mode=(mode := draw(st.sampled_from(["kernel", "cache"]))),
        hold_timeout=draw(st.integers(0, 2**31 - 1)),
        backup_copy=draw(st.booleans()) if mode == "kernel" else True,
        peer_public_key=draw(st.sampled_from(["", "Y9r:ltFM>m7f@Vk)#xjvO7mWZYu9Xp-8-w/@{[Oy"])),
        replicated_paths=tuple(draw(st.lists(st.sampled_from(["/etc/nftables.conf", "/etc/hasync/r/*"]), unique=True))),
        reload_hooks=draw(st.dictionaries(st.sampled_from(["/etc/a", "/etc/b*"]), TEXT, max_size=2)),
        ignore_protocols=tuple(draw(st.lists(st.sampled_from(sorted(config.CONNTRACK_PROTOCOLS)), unique=True))),
        ignore_addresses=tuple(draw(st.lists(st.sampled_from(
            [ipaddress.ip_network("198.18.0.0/15"), ipaddress.ip_network("2001:db8::/32")]), unique=True))),
    )
    key_ids = draw(st.lists(st.integers(1, 255), min_size=1, max_size=3, unique=True))
    return NodeConfig(
        hostname=draw(TEXT.filter(lambda s: not any(c.isspace() for c in s))),
        enabled=draw(st.booleans()),
        groups=tuple(draw(st.lists(groups(), max_size=1))),
        auth_keys={k: secrets.token_bytes(draw(st.integers(16, 64))) for k in key_ids},
        auth_key_id=draw(st.sampled_from(key_ids)),
        heartbeat_port=draw(st.integers(1, 65535)),
        control_socket=draw(st.sampled_from(["@hasync", "@hsx-x", "/run/hasync.sock"])),
        notify=tuple(draw(st.lists(TEXT, max_size=3))),
        notify_timeout_s=draw(st.floats(0.001, 1e4, allow_nan=False)),
        realtime_priority=draw(st.integers(0, 99)),
        state_dir=Path(draw(st.sampled_from(["/var/lib/hasync", "/run/hasync"]))),
        sync=sync,
    )


@settings(max_examples=60, deadline=None)
@given(node_configs())
def test_round_trip(cfg):
    with tempfile.TemporaryDirectory() as directory:
        directory = Path(directory)
        files = {k: config.write_key_file(directory / f"auth-{k}.key", key) for k, key in cfg.auth_keys.items()}
        cfg = dataclasses.replace(cfg, auth_key_files=files)
        path = config.save(cfg, directory / "hasync.toml")
        loaded = config.load(path)
        assert loaded.path == path
        assert dataclasses.replace(loaded, path=None) == cfg
        assert config.to_toml_dict(loaded) == config.to_toml_dict(cfg)


# ---------------------------------------------------------------- the seed's example pair

@pytest.mark.parametrize("name, state, peer", [("fw1-seed-example.toml", "master", "192.168.1.2"),
                                               ("fw2-seed-example.toml", "backup", "192.168.1.1")])
def test_seed_examples_load(tmp_path, name, state, peer):
    shutil.copy(EXAMPLES / name, tmp_path / name)
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    (tmp_path / "curve.key_secret").write_text("placeholder\n")
    cfg = config.load(tmp_path / name)
    group = cfg.group
    assert cfg.enabled and group.state == state and group.ha_link == "lan2"
    assert str(group.peer_address) == peer and group.peer_mask == 24
    assert [(m.interface, str(m.floating_ip.ip)) for m in group.monitors] == \
        [("wan1", "10.60.1.160"), ("lan1", "10.60.1.100")]


# ---------------------------------------------------------------- live system, read-only

@pytest.mark.lab
def test_read_system_view_in_namespace(keydir):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    ns = f"hsx-cfg-{uuid.uuid4().hex[:8]}"
    run = lambda *args: subprocess.run(["ip", *args], check=True, capture_output=True)  # noqa: E731
    run("netns", "add", ns)
    try:
        for name in ("lan2", "wan1", "lan1"):  # veth: the dummy module may be absent
            run("-n", ns, "link", "add", name, "type", "veth", "peer", "name", f"{name}-p")
        run("-n", ns, "addr", "add", "198.51.100.1/30", "dev", "lan2")
        run("-n", ns, "addr", "add", "203.0.113.2/24", "dev", "wan1")
        run("-n", ns, "addr", "add", "192.0.2.2/24", "dev", "lan1")
        view = config.read_system_view(ns)
        assert view["lan2"] == [ipaddress.ip_interface("198.51.100.1/30")]
        assert "lo" in view
        config.parse(valid(), base_dir=keydir, system=view)
        data = valid()
        data["group"][0]["peer_address"] = "198.51.100.9"
        with pytest.raises(ConfigError, match="outside the HA link lan2's subnet 198.51.100.0/30"):
            config.parse(data, base_dir=keydir, system=view)
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    assert ns not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
