"""The lab's persistent record: which namespaces, processes and faults belong to it.

A lab outlives the process that built it (a benchmark builds it, a test or an
operator tears it down), so everything needed to clean it up is kept in a JSON
file under `/run/hasync/lab/`, written before anything is created.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

# Overridable so unit tests (and a non-root run) can keep state elsewhere.
STATE_ROOT = Path(os.environ.get("HASYNC_LAB_DIR", "/run/hasync/lab"))

FIREWALLS = ("fw1", "fw2")
HOSTS = ("client", "server")
SWITCHES = ("lsw", "wsw")
NODES = FIREWALLS + HOSTS
ROLES = NODES + SWITCHES

# The lab's addressing plan (documentation ranges only); the floating IPs are
# added by whichever daemon holds the Master role.
ADDRESSES: dict = {
    "client": {"eth0": "192.0.2.10/24"},
    "client_gateway": "192.0.2.1",
    "server": {"eth0": "203.0.113.10/24"},
    "fw1": {"lan1": "192.0.2.2/24", "wan1": "203.0.113.2/24", "lan2": "198.51.100.1/30"},
    "fw2": {"lan1": "192.0.2.3/24", "wan1": "203.0.113.3/24", "lan2": "198.51.100.2/30"},
    "floating": {"lan1": "192.0.2.1/24", "wan1": "203.0.113.1/24"},
    "ha_link_prefix": 30,
}


def state_path(name: str) -> Path:
    return STATE_ROOT / f"{name}.json"


def workdir_path(name: str) -> Path:
    return STATE_ROOT / name


def peer_of(node: str) -> str:
    """The other firewall of the pair."""
    if node not in FIREWALLS:
        raise ValueError(f"{node!r} is not a firewall (expected one of {FIREWALLS})")
    return "fw2" if node == "fw1" else "fw1"


@dataclass
class Lab:
    name: str
    tag: str
    namespaces: dict[str, str]  # role (fw1, fw2, client, server, lsw, wsw) -> netns name
    workdir: str
    daemon: str = "none"  # "none" | "hasync" | "keepalived": what the fw nodes run
    pids: dict[str, int] = field(default_factory=dict)  # fw1/fw2 daemons, plus any helper process
    addresses: dict = field(default_factory=lambda: json.loads(json.dumps(ADDRESSES)))
    replicated_dirs: dict[str, str] = field(default_factory=dict)  # fw -> dir synced by config sync
    configs: dict[str, str] = field(default_factory=dict)  # fw -> daemon config file
    faults: dict[str, list[str]] = field(default_factory=dict)  # node -> active fault kinds
    owner_pid: int | None = None  # set for throw-away labs: reaped once this process is gone

    @property
    def state_file(self) -> Path:
        return state_path(self.name)

    def ns(self, role: str) -> str:
        try:
            return self.namespaces[role]
        except KeyError:
            raise ValueError(f"unknown lab node {role!r} (expected one of {ROLES})") from None

    def node_dir(self, node: str) -> Path:
        return Path(self.workdir) / node

    def floating_ip(self, interface: str) -> str:
        return self.addresses["floating"][interface]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Lab":
        data = json.loads(text)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def save(self) -> Path:
        """Write the state file atomically, so a reader never sees half a lab."""
        path = self.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{self.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as f:
                f.write(self.to_json())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return path


def load(name: str) -> Lab:
    path = state_path(name)
    try:
        return Lab.from_json(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no lab named {name!r} (no {path})") from None


def list_labs() -> list[str]:
    if not STATE_ROOT.is_dir():
        return []
    return sorted(p.stem for p in STATE_ROOT.glob("*.json"))


def new_lab(name: str, tag: str, owner_pid: int | None = None) -> Lab:
    workdir = workdir_path(name)
    namespaces = {role: f"hs{tag}-{role}" for role in ROLES}
    return Lab(
        name=name,
        tag=tag,
        namespaces=namespaces,
        workdir=str(workdir),
        replicated_dirs={fw: str(workdir / fw / "etc") for fw in FIREWALLS},
        owner_pid=owner_pid,
    )
