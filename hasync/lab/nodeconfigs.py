"""hasync node configs for the lab's two firewalls (TOML, the format of hasync/config.py).

Lab defaults are aggressive (5 ms heartbeats, dead after 3) so failover tests
and benchmarks run quickly; every value can be overridden per call.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

import tomli_w

from hasync.lab.state import FIREWALLS, Lab, peer_of

AUTH_KEY_ID = 1
SYNC_PORT = 7610

_GROUP_KEYS = {"id", "state", "priority", "ha_link", "peer_address", "peer_mask", "heartbeat_interval_ms",
               "dead_count", "preempt", "preempt_delay_ms", "garp_count", "garp_interval_ms", "monitor"}
_NODE_KEYS = {"hostname", "control_socket", "state_dir", "heartbeat_port", "realtime_priority", "notify",
              "notify_timeout_s"}
_SECTIONS = ("node", "global", "security", "sync", "group")


def _write_secret(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def auth_key_file(lab: Lab) -> Path:
    """The pair's shared heartbeat key (32 random bytes, hex, 0600), made once per lab."""
    path = Path(lab.workdir) / f"auth-{AUTH_KEY_ID}.key"
    if not path.exists():
        _write_secret(path, os.urandom(32).hex().encode() + b"\n")
    return path


def curve_keys(lab: Lab, fw: str) -> tuple[Path, str]:
    """`fw`'s CURVE certificate pair (zmq.auth format): (secret file, public key z85), made once."""
    import zmq.auth  # here, not at module level: `python -m hasync.lab.<tool>` in a namespace stays light

    keys_dir = lab.node_dir(fw) / "keys"
    keys_dir.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = keys_dir / "curve.key", keys_dir / "curve.key_secret"
    if not secret_file.exists():
        zmq.auth.create_certificates(str(keys_dir), "curve")
        os.chmod(secret_file, 0o600)
    public, _ = zmq.auth.load_certificate(str(public_file))
    return secret_file, public.decode()


def base_config(lab: Lab, fw: str) -> dict:
    """The lab default TOML dict for firewall `fw` (before overrides)."""
    peer = peer_of(fw)
    master = fw == "fw1"
    node_dir = lab.node_dir(fw)
    secret_file, _ = curve_keys(lab, fw)
    _, peer_public = curve_keys(lab, peer)
    peer_address, prefix = lab.addresses[peer]["lan2"].split("/")
    return {
        "node": {
            "hostname": fw,
            "control_socket": "@hasync",  # abstract: one per namespace, found without a path
            "state_dir": str(node_dir / "state"),
            # SCHED_FIFO heartbeats: with 5 ms adverts a 15 ms stall on this shared 2-core
            # machine is a false failover (children run in the normal class)
            "realtime_priority": 50,
        },
        "global": {"status": "enable"},
        "security": {"auth_key_id": AUTH_KEY_ID, "auth_keys": {str(AUTH_KEY_ID): str(auth_key_file(lab))}},
        "sync": {
            "enabled": False,
            "port": SYNC_PORT,
            "curve_secret_key_file": str(secret_file),
            "peer_public_key": peer_public,
            "replicated_paths": [f"{lab.replicated_dirs[fw]}/*"],
        },
        "group": [{
            "id": 1,
            "state": "master" if master else "backup",
            "priority": 150 if master else 100,
            "ha_link": "lan2",
            "peer_address": peer_address,
            "peer_mask": int(prefix),
            "heartbeat_interval_ms": 5,
            "dead_count": 3,
            "monitor": [
                {"interface": "wan1", "floating_ip": lab.floating_ip("wan1")},
                {"interface": "lan1", "floating_ip": lab.floating_ip("lan1")},
            ],
        }],
    }


def _merge(into: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        else:
            into[key] = copy.deepcopy(value)


def apply_overrides(config: dict, fw: str, overrides: dict) -> dict:
    """Apply `write_hasync_configs` overrides to one node's dict (see there); returns it."""
    for key, value in overrides.items():
        if key in FIREWALLS:
            continue  # per-node overrides go last
        if key in _GROUP_KEYS:
            config["group"][0][key] = copy.deepcopy(value)
        elif key in _NODE_KEYS:
            config["node"][key] = copy.deepcopy(value)
        elif key == "status":
            config["global"]["status"] = value
        elif key.startswith("sync_") and key != "sync_":
            config["sync"][key[len("sync_"):]] = copy.deepcopy(value)
        elif key in _SECTIONS and isinstance(value, dict):
            if key == "group":
                _merge(config["group"][0], value)
            else:
                _merge(config[key], value)
        else:
            raise TypeError(f"unknown lab config override {key!r}")
    per_node = overrides.get(fw, {})
    if "group" in per_node and isinstance(per_node["group"], dict):
        _merge(config["group"][0], per_node["group"])
        per_node = {k: v for k, v in per_node.items() if k != "group"}
    _merge(config, per_node)
    return config


def write_hasync_configs(lab: Lab, **overrides) -> dict[str, str]:
    """Write fw1's and fw2's hasync.toml under workdir/<fw>/ and return {fw: path}.

    Overrides: a [[group]] key (`heartbeat_interval_ms=10`, `preempt="off"`), a
    [node] key (`notify=[...]`), `status="disable"`, a [sync] key prefixed with
    `sync_` (`sync_enabled=True`), a whole section merged in (`sync={...}`,
    `group={...}`), or per node (`fw2={"group": {"priority": 200}}`), applied last.
    Records the paths in lab.configs and sets lab.daemon = "hasync".
    """
    paths = {}
    for fw in FIREWALLS:
        config = apply_overrides(base_config(lab, fw), fw, overrides)
        for key in ("etc", "state"):
            (lab.node_dir(fw) / key).mkdir(parents=True, exist_ok=True)
        path = lab.node_dir(fw) / "hasync.toml"
        tmp = path.with_suffix(".toml.tmp")
        tmp.write_bytes(tomli_w.dumps(config).encode())
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
        paths[fw] = str(path)
    lab.configs = dict(paths)
    lab.daemon = "hasync"
    lab.save()
    return paths
