"""The node config: one TOML file per node, the seed's forms plus what a real pair needs.

This module holds the typed model (frozen dataclasses), the TOML parser with
validation that names the field, and the atomic writer used by `hasync group ...`.
Nothing here sends traffic; checks that need the live interfaces take a
`SystemView` (interface name -> its addresses) from the caller, and
`read_system_view()` builds one from the kernel over rtnetlink (read-only).

Errors are `ConfigError(field, reason)`, `field` being the dotted TOML path of the
culprit (`group[0].monitor[1].floating_ip`, `security.auth_keys.2`), so the CLI, the
web page and `hasync check` all report a bad value the same way.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
import re
import secrets
import socket
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import tomli_w

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPInterface = ipaddress.IPv4Interface | ipaddress.IPv6Interface
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# interface name -> the addresses (with prefix) configured on it; used by checks that
# need the real system (floating IP inside the interface's subnet, peer in the HA link's subnet)
SystemView = Mapping[str, Sequence[IPInterface]]

DEFAULT_CONFIG_PATH = Path("/etc/hasync/hasync.toml")
DEFAULT_CONTROL_SOCKET = "@hasync"  # abstract unix socket: one per network namespace
DEFAULT_HEARTBEAT_PORT = 7609
DEFAULT_SYNC_PORT = 7610
DEFAULT_HOLD_TIMEOUT = 432000  # 5 days: as long as an established TCP entry lives by default
DEFAULT_STATE_DIR = Path("/var/lib/hasync")
DEFAULT_PRIORITY = {"master": 150, "backup": 100}
DEFAULT_METRICS_ADDRESS = "127.0.0.1"  # a firewall does not publish its internals by default
DEFAULT_WEB_BIND = ("127.0.0.1",)  # the web page listens where the operator says, never everywhere by default
DEFAULT_WEB_PORT = 8443
LOG_FORMATS = ("journal", "json")

AUTH_KEY_BYTES = 32  # what generate_auth_key() makes
MIN_AUTH_KEY_BYTES = 16  # shorter HMAC keys are refused
ONE_GROUP_PER_NODE = "hasync runs one HA group per node; edit the existing group"

# protocol names accepted in sync.ignore_protocols -> IP protocol number
# (the ones conntrack tracks; a fixed table because /etc/protocols is often absent)
CONNTRACK_PROTOCOLS: Mapping[str, int] = {
    "icmp": 1, "tcp": 6, "udp": 17, "dccp": 33, "gre": 47,
    "icmpv6": 58, "sctp": 132, "udplite": 136,
}


class ConfigError(ValueError):
    """A config that fails validation. `field` is the dotted path of the culprit."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason

    def __reduce__(self):  # survive pickling (errors cross process boundaries)
        return (type(self), (self.field, self.reason))


@dataclass(frozen=True)
class Monitor:
    """A monitoring interface and the floating (virtual) IP it carries."""

    interface: str
    floating_ip: IPInterface  # address with prefix, e.g. 192.0.2.1/24


@dataclass(frozen=True)
class Group:
    """An HA group: the seed's Add HA Group form plus timing and election settings."""

    id: int  # 1..255, carried in every heartbeat
    state: str  # preferred role: "master" | "backup"
    ha_link: str  # dedicated HA link interface (the seed's LAN 2)
    peer_address: IPAddress  # the peer's address on the HA link
    peer_mask: int  # prefix length of the HA link subnet
    monitors: tuple[Monitor, ...]
    priority: int  # 1..254; higher wins an election
    heartbeat_interval_ms: float = 10.0
    dead_count: int = 3
    preempt: str = "on"  # "on" | "off" | "delay"
    preempt_delay_ms: int = 0
    garp_count: int = 3  # gratuitous ARPs sent per floating IP after a takeover
    garp_interval_ms: int = 50

    @property
    def floating_ips(self) -> tuple[IPInterface, ...]:
        return tuple(m.floating_ip for m in self.monitors)

    @property
    def dead_interval_ms(self) -> float:
        return self.heartbeat_interval_ms * self.dead_count

    @property
    def peer_network(self) -> IPNetwork:
        """The HA link subnet as given by peer_address/peer_mask."""
        return ipaddress.ip_network(f"{self.peer_address}/{self.peer_mask}", strict=False)


@dataclass(frozen=True)
class SyncConfig:
    """The replication service (conntrack + config) over ZeroMQ on the HA link."""

    enabled: bool = True
    port: int = DEFAULT_SYNC_PORT
    curve_secret_key_file: Path | None = None  # this node's CURVE key pair (secret file)
    peer_public_key: str = ""  # the peer's CURVE public key (z85), pinned
    mode: str = "kernel"  # "kernel": apply into the Backup's kernel at once; "cache": commit on takeover
    # kernel mode: the Backup's copies get at least this timeout (s) and go when the Master
    # says so; the Master's own timers restart on packets without an event (statesync.service)
    hold_timeout: int = DEFAULT_HOLD_TIMEOUT
    # kernel mode: the Backup keeps a copy of the Master's state table (statesync.table), so a
    # takeover needs no conntrack dump; False gives that memory back and the takeover dumps
    backup_copy: bool = True
    replicated_paths: tuple[str, ...] = ()  # config sync: files, directories, globs
    reload_hooks: Mapping[str, str] = field(default_factory=dict)  # path/glob -> command
    ignore_protocols: tuple[str, ...] = ()
    ignore_addresses: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class WebConfig:
    """The High Availability web page (hasync.web): an HTTPS server in its own process."""

    enabled: bool = False
    bind: tuple[str, ...] = DEFAULT_WEB_BIND  # addresses to listen on, one socket each
    port: int = DEFAULT_WEB_PORT
    password_hash: str = ""  # the admin password (hasync.web.password format); "" = no login possible
    cert_file: Path | None = None  # None: <state_dir>/web-cert.pem, made on first start
    key_file: Path | None = None  # None: <state_dir>/web-key.pem (0600)


@dataclass(frozen=True)
class NodeConfig:
    hostname: str
    enabled: bool  # Global Settings: Config Status Enable/Disable
    groups: tuple[Group, ...]  # the daemon runs at most one group today
    auth_keys: Mapping[int, bytes]  # heartbeat HMAC keys by key id (shared by the pair)
    auth_key_id: int  # the key this node signs with; any key in auth_keys is accepted
    heartbeat_port: int = DEFAULT_HEARTBEAT_PORT
    control_socket: str = DEFAULT_CONTROL_SOCKET
    notify: tuple[str, ...] = ()  # hook commands run in order on every transition
    notify_timeout_s: float = 10.0
    realtime_priority: int = 0  # SCHED_FIFO priority of the heartbeat process; 0 = normal
    state_dir: Path = DEFAULT_STATE_DIR
    metrics_address: str = DEFAULT_METRICS_ADDRESS  # where the Prometheus endpoint listens
    metrics_port: int = 0  # 0 = no metrics endpoint
    log_format: str = "journal"  # "journal" (syslog-prefixed lines) | "json" (one object per line)
    sync: SyncConfig = SyncConfig()
    web: WebConfig = WebConfig()
    path: Path | None = None  # the file it was read from
    # where each auth key came from (key id -> key file); save() writes these paths,
    # never key material, into the TOML file
    auth_key_files: Mapping[int, Path] = field(default_factory=dict)

    @property
    def group(self) -> Group | None:
        return self.groups[0] if self.groups else None

    @property
    def web_cert_file(self) -> Path:
        return self.web.cert_file or self.state_dir / "web-cert.pem"

    @property
    def web_key_file(self) -> Path:
        return self.web.key_file or self.state_dir / "web-key.pem"


# --------------------------------------------------------------------------- reading a table
#
# A `_Table` wraps one TOML table with its dotted path: every getter checks the type and
# names the field on error, and `done()` rejects the keys nobody asked for (typos).

_MISSING = object()


def _type_name(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
            list: "an array", dict: "a table"}.get(type(value), type(value).__name__)


class _Table:
    def __init__(self, data: Any, path: str):
        if not isinstance(data, dict):
            raise ConfigError(path or "<top>", f"expected a table, got {_type_name(data)}")
        self.data = data
        self.path = path
        self.seen: set[str] = set()

    def field(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key in self.data:
            return self.data[key]
        if default is _MISSING:
            raise ConfigError(self.field(key), "required")
        return default

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is not default and not isinstance(value, str):
            raise ConfigError(self.field(key), f"expected a string, got {_type_name(value)}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is not default and not isinstance(value, bool):
            raise ConfigError(self.field(key), f"expected true or false, got {_type_name(value)}")
        return value

    def integer(self, key: str, default: Any = _MISSING, lo: int | None = None,
                hi: int | None = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        # bool is an int subclass in Python; `true` is never a number here
        if not isinstance(value, int) or isinstance(value, bool):
            raise ConfigError(self.field(key), f"expected an integer, got {_type_name(value)}")
        _check_range(self.field(key), value, lo, hi)
        return value

    def number(self, key: str, default: Any = _MISSING, lo: float | None = None,
               hi: float | None = None) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(self.field(key), f"expected a number, got {_type_name(value)}")
        if not math.isfinite(value):  # TOML allows inf and nan
            raise ConfigError(self.field(key), f"must be a finite number, got {value}")
        _check_range(self.field(key), value, lo, hi)
        return float(value)

    def strings(self, key: str) -> tuple[str, ...]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise ConfigError(self.field(key), f"expected an array of strings, got {_type_name(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise ConfigError(f"{self.field(key)}[{i}]", f"expected a string, got {_type_name(item)}")
            if not item.strip():
                raise ConfigError(f"{self.field(key)}[{i}]", "must not be empty")
        return tuple(value)

    def table(self, key: str, required: bool = False) -> _Table:
        value = self.raw(key, _MISSING if required else {})
        return _Table(value, self.field(key))

    def tables(self, key: str) -> list[_Table]:
        value = self.raw(key, [])
        if not isinstance(value, list):
            raise ConfigError(self.field(key), f"expected an array of tables ([[{key}]]), got {_type_name(value)}")
        return [_Table(item, f"{self.field(key)}[{i}]") for i, item in enumerate(value)]

    def done(self) -> None:
        for key in self.data:
            if key not in self.seen:
                raise ConfigError(self.field(key), f"unknown key '{key}'")


def _check_range(name: str, value: float, lo: float | None, hi: float | None) -> None:
    if lo is not None and hi is not None and not lo <= value <= hi:
        raise ConfigError(name, f"{value} is out of range {lo}..{hi}")
    if lo is not None and value < lo:
        raise ConfigError(name, f"{value} is too small: must be >= {lo}")
    if hi is not None and value > hi:
        raise ConfigError(name, f"{value} is too large: must be <= {hi}")


def _choice(name: str, value: str, choices: Sequence[str]) -> str:
    if value not in choices:
        raise ConfigError(name, f"'{value}' is not one of {', '.join(choices)}")
    return value


# --------------------------------------------------------------------------- value checks

_BAD_IFNAME_CHARS = re.compile(r"[/:\s]")


def _interface_name(name: str, value: str) -> str:
    # the kernel's dev_valid_name(): < IFNAMSIZ (16), no '/', ':' or whitespace, not . or ..
    if not value:
        raise ConfigError(name, "interface name is empty")
    if len(value) > 15:
        raise ConfigError(name, f"interface name '{value}' is too long ({len(value)} chars, max 15)")
    if _BAD_IFNAME_CHARS.search(value) or value in (".", ".."):
        raise ConfigError(name, f"interface name '{value}' is invalid (no '/', ':' or spaces)")
    return value


def _port(table: _Table, key: str, default: int) -> int:
    return table.integer(key, default, lo=1, hi=65535)


def _ip_address(name: str, value: str) -> IPAddress:
    if "/" in value:
        raise ConfigError(name, f"'{value}' must be a plain address without a prefix")
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(name, f"'{value}' is not a valid IP address") from None


def _is_host_address(ip: IPAddress, network: IPNetwork) -> bool:
    """Neither the network address nor (IPv4) the broadcast address of a subnet.

    /31 and /32 (IPv4) and /127, /128 (IPv6) have no such reserved addresses (RFC 3021, 6164).
    """
    if network.num_addresses <= 2:
        return True
    if ip == network.network_address:
        return False
    return not (ip.version == 4 and ip == network.broadcast_address)


def _mask_to_prefix(name: str, mask: Any, address: IPAddress) -> int:
    """peer_mask as a prefix length (24, "24") or a dotted mask ("255.255.255.0")."""
    if isinstance(mask, bool) or not isinstance(mask, (int, str)):
        raise ConfigError(name, f"expected a prefix length or a dotted mask, got {_type_name(mask)}")
    if isinstance(mask, str):
        text = mask.strip().removeprefix("/")
        if text.isdigit():
            mask = int(text)
    if isinstance(mask, int):
        prefix = mask
    else:
        try:
            mask_ip = ipaddress.ip_address(text)
        except ValueError:
            raise ConfigError(name, f"'{mask}' is not a valid mask") from None
        if mask_ip.version != address.version:
            raise ConfigError(name, f"mask '{mask}' is IPv{mask_ip.version} but peer_address "
                                    f"{address} is IPv{address.version}: do not mix IPv4 and IPv6")
        bits = int(mask_ip)
        width = address.max_prefixlen
        prefix = bin(bits).count("1")
        # contiguous ones from the left, e.g. 255.255.0.255 is not a netmask
        if bits != ((1 << width) - 1) ^ ((1 << (width - prefix)) - 1):
            raise ConfigError(name, f"'{mask}' is not a valid mask (ones must be contiguous)")
    top = address.max_prefixlen - 1  # /32 leaves no room for this node on the link
    if not 1 <= prefix <= top:
        if prefix > address.max_prefixlen and address.version == 4 and prefix <= 128:
            raise ConfigError(name, f"/{prefix} is an IPv6 prefix length but peer_address "
                                    f"{address} is IPv4: do not mix IPv4 and IPv6")
        raise ConfigError(name, f"/{prefix} is not a valid mask for IPv{address.version} "
                                f"(prefix length 1..{top})")
    return prefix


def _floating_ip(name: str, value: str) -> IPInterface:
    if "/" not in value:
        raise ConfigError(name, f"'{value}' needs a prefix length, e.g. '{value}/24'")
    try:
        interface = ipaddress.ip_interface(value)
    except ValueError:
        raise ConfigError(name, f"'{value}' is not a valid address/prefix") from None
    if interface.network.prefixlen == 0:
        raise ConfigError(name, f"'{value}' has a /0 prefix, which is not a subnet")
    if not _is_host_address(interface.ip, interface.network):
        kind = "network" if interface.ip == interface.network.network_address else "broadcast"
        raise ConfigError(name, f"{interface.ip} is the {kind} address of {interface.network}, not a host address")
    return interface


# --------------------------------------------------------------------------- key files

def generate_auth_key() -> bytes:
    """A fresh heartbeat HMAC key (32 random bytes); share it with the peer."""
    return secrets.token_bytes(AUTH_KEY_BYTES)


def write_key_file(path: str | os.PathLike, key: bytes) -> Path:
    """Write one key as hex text, mode 0600, atomically (same rules as save())."""
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise ValueError(f"key is {len(key)} bytes, at least {MIN_AUTH_KEY_BYTES} are needed")
    return _write_atomically(Path(path), key.hex().encode() + b"\n")


def read_key_file(path: str | os.PathLike, name: str = "key") -> bytes:
    """One key from a hex text file; ConfigError(name, ...) if missing, unreadable or short."""
    path = Path(path)
    try:
        text = path.read_text(encoding="ascii")
    except FileNotFoundError:
        raise ConfigError(name, f"key file {path} is missing") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(name, f"key file {path} is unreadable: {exc}") from None
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ConfigError(name, f"key file {path} is not hex text") from None
    if len(key) < MIN_AUTH_KEY_BYTES:
        raise ConfigError(name, f"key in {path} is too short: {len(key)} bytes, "
                                f"at least {MIN_AUTH_KEY_BYTES} are needed")
    return key


def _relative_to(base_dir: Path, value: str) -> Path:
    path = Path(value)
    return path if path.is_absolute() else base_dir / path


_Z85_CHARS = set("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#")


# --------------------------------------------------------------------------- sections

def _parse_node(t: _Table) -> dict[str, Any]:
    hostname = t.string("hostname", None) or socket.gethostname()
    if len(hostname) > 64 or any(c.isspace() for c in hostname):
        raise ConfigError(t.field("hostname"), f"'{hostname}' is not a valid host name")
    control_socket = t.string("control_socket", DEFAULT_CONTROL_SOCKET)
    # sun_path holds 108 bytes: 107 usable for a path, plus '\0' prefix for abstract names
    if control_socket in ("", "@") or len(control_socket.encode()) > 107:
        raise ConfigError(t.field("control_socket"), "must be '@name' (abstract socket) or a path of at most 107 bytes")
    if not control_socket.startswith(("@", "/")):
        raise ConfigError(t.field("control_socket"), f"'{control_socket}' must start with '@' (abstract) or '/' (path)")
    state_dir = t.string("state_dir", str(DEFAULT_STATE_DIR))
    if not state_dir.startswith("/"):
        raise ConfigError(t.field("state_dir"), f"'{state_dir}' must be an absolute path")
    values = dict(
        hostname=hostname,
        control_socket=control_socket,
        state_dir=Path(state_dir),
        heartbeat_port=_port(t, "heartbeat_port", DEFAULT_HEARTBEAT_PORT),
        realtime_priority=t.integer("realtime_priority", 0, lo=0, hi=99),
        notify=t.strings("notify"),
        notify_timeout_s=t.number("notify_timeout_s", 10.0, lo=0.001),
        metrics_address=str(_ip_address(t.field("metrics_address"),
                                        t.string("metrics_address", DEFAULT_METRICS_ADDRESS))),
        metrics_port=t.integer("metrics_port", 0, lo=0, hi=65535),
        log_format=_choice(t.field("log_format"), t.string("log_format", "journal"), LOG_FORMATS),
    )
    t.done()
    return values


def _parse_security(t: _Table, base_dir: Path) -> dict[str, Any]:
    keys_table = t.table("auth_keys", required=True)
    keys: dict[int, bytes] = {}
    files: dict[int, Path] = {}
    for key_id_text in keys_table.data:
        name = keys_table.field(key_id_text)
        if not key_id_text.isdigit() or not 1 <= int(key_id_text) <= 255:
            raise ConfigError(name, f"key id '{key_id_text}' must be an integer 1..255")
        file_name = keys_table.string(key_id_text)
        key_file = _relative_to(base_dir, file_name)
        keys[int(key_id_text)] = read_key_file(key_file, name)
        files[int(key_id_text)] = key_file
    if not keys:
        raise ConfigError(keys_table.path, "at least one key is required (heartbeats are authenticated)")
    key_id = t.integer("auth_key_id", lo=1, hi=255)
    if key_id not in keys:
        raise ConfigError(t.field("auth_key_id"), f"key id {key_id} is not in auth_keys "
                                                  f"({', '.join(map(str, sorted(keys)))})")
    t.done()
    return dict(auth_keys=keys, auth_key_files=files, auth_key_id=key_id)


def _parse_sync(t: _Table, base_dir: Path) -> SyncConfig:
    enabled = t.boolean("enabled", True)
    port = _port(t, "port", DEFAULT_SYNC_PORT)
    mode = _choice(t.field("mode"), t.string("mode", "kernel"), ("kernel", "cache"))
    hold_timeout = t.integer("hold_timeout", DEFAULT_HOLD_TIMEOUT, lo=0, hi=2**31 - 1)
    backup_copy = t.boolean("backup_copy", True)
    if not backup_copy and mode == "cache":
        raise ConfigError(t.field("backup_copy"), 'false needs mode = "kernel" (in cache mode the copy is the cache)')
    secret_text = t.string("curve_secret_key_file", None)
    secret_file = _relative_to(base_dir, secret_text) if secret_text else None
    if enabled and secret_file is not None:
        if not secret_file.is_file():
            raise ConfigError(t.field("curve_secret_key_file"), f"key file {secret_file} is missing")
        if not os.access(secret_file, os.R_OK):
            raise ConfigError(t.field("curve_secret_key_file"), f"key file {secret_file} is unreadable")
    peer_key = t.string("peer_public_key", "")
    if peer_key and (len(peer_key) != 40 or not set(peer_key) <= _Z85_CHARS):
        raise ConfigError(t.field("peer_public_key"), "must be a CURVE public key in z85 text (40 chars)")

    replicated = t.strings("replicated_paths")
    for i, path in enumerate(replicated):
        if not path.startswith("/"):
            raise ConfigError(f"{t.field('replicated_paths')}[{i}]", f"'{path}' must be an absolute path")
    hooks_table = t.table("reload_hooks")
    hooks: dict[str, str] = {}
    for path in hooks_table.data:
        command = hooks_table.string(path)
        if not path.startswith("/"):
            raise ConfigError(hooks_table.field(path), f"'{path}' must be an absolute path or glob")
        if not command.strip():
            raise ConfigError(hooks_table.field(path), "the reload command is empty")
        hooks[path] = command

    protocols = t.strings("ignore_protocols")
    for i, name in enumerate(protocols):
        _choice(f"{t.field('ignore_protocols')}[{i}]", name, tuple(CONNTRACK_PROTOCOLS))
    networks = []
    for i, text in enumerate(t.strings("ignore_addresses")):
        try:
            networks.append(ipaddress.ip_network(text, strict=True))
        except ValueError as exc:
            raise ConfigError(f"{t.field('ignore_addresses')}[{i}]", f"'{text}' is not a CIDR network: {exc}") from None
    t.done()
    return SyncConfig(enabled=enabled, port=port, curve_secret_key_file=secret_file,
                      peer_public_key=peer_key, mode=mode, hold_timeout=hold_timeout,
                      backup_copy=backup_copy,
                      replicated_paths=replicated, reload_hooks=hooks, ignore_protocols=protocols,
                      ignore_addresses=tuple(networks))


def _parse_web(t: _Table, base_dir: Path) -> WebConfig:
    from hasync.web.password import PasswordHashError, parse_hash  # the format lives with the hasher

    bind = t.strings("bind") if "bind" in t.data else DEFAULT_WEB_BIND
    if not bind:
        raise ConfigError(t.field("bind"), "at least one address is required")
    for i, address in enumerate(bind):
        _ip_address(f"{t.field('bind')}[{i}]", address)
    password_hash = t.string("password_hash", "")
    if password_hash:
        try:
            parse_hash(password_hash)
        except PasswordHashError as exc:
            raise ConfigError(t.field("password_hash"), f"{exc}; set it with `hasync web passwd`") from None
    files = {}
    for key in ("cert_file", "key_file"):
        text = t.string(key, "")
        files[key] = _relative_to(base_dir, text) if text else None
    web = WebConfig(enabled=t.boolean("enabled", False), bind=tuple(bind),
                    port=_port(t, "port", DEFAULT_WEB_PORT), password_hash=password_hash, **files)
    t.done()
    return web


def _parse_monitor(t: _Table) -> Monitor:
    monitor = Monitor(
        interface=_interface_name(t.field("interface"), t.string("interface")),
        floating_ip=_floating_ip(t.field("floating_ip"), t.string("floating_ip")),
    )
    t.done()
    return monitor


def _parse_group(t: _Table) -> Group:
    group_id = t.integer("id", 1, lo=1, hi=255)
    state = _choice(t.field("state"), t.string("state"), ("master", "backup"))
    ha_link = _interface_name(t.field("ha_link"), t.string("ha_link"))
    peer_address = _ip_address(t.field("peer_address"), t.string("peer_address"))
    peer_mask = _mask_to_prefix(t.field("peer_mask"), t.raw("peer_mask"), peer_address)
    network = ipaddress.ip_network(f"{peer_address}/{peer_mask}", strict=False)
    if not _is_host_address(peer_address, network):
        kind = "network" if peer_address == network.network_address else "broadcast"
        raise ConfigError(t.field("peer_address"), f"{peer_address} is the {kind} address of "
                                                   f"{network}, not a host address")
    monitors = tuple(_parse_monitor(m) for m in t.tables("monitor"))
    if not monitors:
        raise ConfigError(t.field("monitor"), "at least one monitoring interface is required")
    preempt = _choice(t.field("preempt"), t.string("preempt", "on"), ("on", "off", "delay"))
    preempt_delay_ms = t.integer("preempt_delay_ms", 0, lo=0)
    if preempt == "delay" and preempt_delay_ms <= 0:
        raise ConfigError(t.field("preempt_delay_ms"), "must be > 0 when preempt = \"delay\" (no delay given)")
    group = Group(
        id=group_id,
        state=state,
        ha_link=ha_link,
        peer_address=peer_address,
        peer_mask=peer_mask,
        monitors=monitors,
        priority=t.integer("priority", DEFAULT_PRIORITY[state], lo=1, hi=254),
        heartbeat_interval_ms=t.number("heartbeat_interval_ms", 10.0, lo=1),
        dead_count=t.integer("dead_count", 3, lo=2),
        preempt=preempt,
        preempt_delay_ms=preempt_delay_ms,
        garp_count=t.integer("garp_count", 3, lo=0, hi=100),
        garp_interval_ms=t.integer("garp_interval_ms", 50, lo=0, hi=10_000),
    )
    t.done()
    _check_group(group, t.path)
    return group


def _check_group(group: Group, prefix: str) -> None:
    """Rules between the fields of one group (the seed form's own checks)."""
    seen_interfaces: dict[str, int] = {}
    seen_ips: dict[IPAddress, int] = {}
    for i, monitor in enumerate(group.monitors):
        name = f"{prefix}.monitor[{i}]"
        if monitor.interface == group.ha_link:
            raise ConfigError(f"{name}.interface", f"{monitor.interface} is the HA link; the HA link "
                                                   "cannot also be a monitoring interface")
        if monitor.interface in seen_interfaces:
            raise ConfigError(f"{name}.interface", f"duplicate monitoring interface {monitor.interface} "
                                                   f"(also monitor[{seen_interfaces[monitor.interface]}])")
        if monitor.floating_ip.ip in seen_ips:
            raise ConfigError(f"{name}.floating_ip", f"duplicate floating IP {monitor.floating_ip.ip} "
                                                     f"(also monitor[{seen_ips[monitor.floating_ip.ip]}])")
        if monitor.floating_ip.ip == group.peer_address:
            raise ConfigError(f"{name}.floating_ip", f"floating IP {monitor.floating_ip.ip} equals the "
                                                     "peer address")
        seen_interfaces[monitor.interface] = i
        seen_ips[monitor.floating_ip.ip] = i


def _check_groups(groups: Sequence[Group]) -> None:
    """Rules across groups: unique ids, unique floating IPs, and one group per node."""
    ids: dict[int, int] = {}
    ips: dict[IPAddress, str] = {}
    for g, group in enumerate(groups):
        if group.id in ids:
            raise ConfigError(f"group[{g}].id", f"duplicate group id {group.id} (also group[{ids[group.id]}])")
        ids[group.id] = g
        for i, ip in enumerate(group.floating_ips):
            name = f"group[{g}].monitor[{i}]"
            if ip.ip in ips:
                raise ConfigError(f"{name}.floating_ip", f"duplicate floating IP {ip.ip} (also {ips[ip.ip]})")
            ips[ip.ip] = name
    if len(groups) > 1:
        raise ConfigError("group[1]", ONE_GROUP_PER_NODE)


# --------------------------------------------------------------------------- public API

_TOP_LEVEL = ("node", "global", "security", "sync", "group", "web")


def parse(data: dict, *, path: str | os.PathLike | None = None, system: SystemView | None = None,
          base_dir: Path | None = None) -> NodeConfig:
    """A validated NodeConfig from a TOML document already read into a dict.

    Relative key-file paths are taken relative to `base_dir`, else to the directory of
    `path`, else to the working directory. With `system`, the live-interface checks of
    validate_against_system() run too.
    """
    if base_dir is None:
        base_dir = Path(path).parent if path is not None else Path(".")
    base_dir = Path(base_dir).absolute()
    top = _Table(data, "")
    node = _parse_node(top.table("node"))
    status_table = top.table("global")
    enabled = _choice(status_table.field("status"), status_table.string("status", "disable"),
                      ("enable", "disable")) == "enable"
    status_table.done()
    security = _parse_security(top.table("security", required=True), base_dir)
    sync = _parse_sync(top.table("sync"), base_dir)
    web = _parse_web(top.table("web"), base_dir)
    groups = tuple(_parse_group(g) for g in top.tables("group"))
    top.done()
    _check_groups(groups)
    cfg = NodeConfig(enabled=enabled, groups=groups, sync=sync, web=web,
                     path=Path(path) if path is not None else None, **node, **security)
    if system is not None:
        validate_against_system(cfg, system)
    return cfg


def load(path: str | os.PathLike, *, system: SystemView | None = None) -> NodeConfig:
    """Read and validate one node config file; raises ConfigError, never half-loads."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(str(path), "config file is missing") from None
    except OSError as exc:
        raise ConfigError(str(path), f"config file is unreadable: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(str(path), f"not valid TOML: {exc}") from None
    return parse(data, path=path, system=system)


def validate_against_system(cfg: NodeConfig, system: SystemView) -> None:
    """Checks that need the live interfaces: they exist and the addresses fit their subnets."""
    for g, group in enumerate(cfg.groups):
        prefix = f"group[{g}]"
        link_addresses = _addresses_of(system, group.ha_link, f"{prefix}.ha_link")
        same_family = [a for a in link_addresses if a.version == group.peer_address.version]
        if not same_family:
            raise ConfigError(f"{prefix}.ha_link", f"the HA link {group.ha_link} has no "
                                                   f"IPv{group.peer_address.version} address")
        if any(a.ip == group.peer_address for a in same_family):
            raise ConfigError(f"{prefix}.peer_address", f"peer address {group.peer_address} is this "
                                                        f"node's own address on {group.ha_link}")
        subnets = [ipaddress.ip_network(f"{a.ip}/{group.peer_mask}", strict=False) for a in same_family]
        if not any(group.peer_address in net for net in subnets):
            raise ConfigError(f"{prefix}.peer_address", f"peer address {group.peer_address} is outside "
                                                        f"the HA link {group.ha_link}'s subnet "
                                                        f"{', '.join(map(str, subnets))}")
        for i, monitor in enumerate(group.monitors):
            name = f"{prefix}.monitor[{i}]"
            addresses = _addresses_of(system, monitor.interface, f"{name}.interface")
            subnets = [a.network for a in addresses if a.version == monitor.floating_ip.version]
            if not any(monitor.floating_ip.ip in net for net in subnets):
                where = ", ".join(map(str, subnets)) or f"none (no IPv{monitor.floating_ip.version} address)"
                raise ConfigError(f"{name}.floating_ip", f"floating IP {monitor.floating_ip.ip} is outside "
                                                         f"{monitor.interface}'s subnets: {where}")


def _addresses_of(system: SystemView, interface: str, name: str) -> Sequence[IPInterface]:
    if interface not in system:
        raise ConfigError(name, f"interface {interface} does not exist")
    return system[interface]


def read_system_view(netns: str | None = None) -> dict[str, list[IPInterface]]:
    """The live interfaces and their addresses, over rtnetlink (read-only).

    `netns` names an existing namespace (/run/netns/NAME); it is never created here.
    """
    from pyroute2 import IPRoute  # only callers that look at the live system pay for it

    kwargs: dict[str, Any] = {"netns": netns, "flags": 0} if netns else {}
    view: dict[str, list[IPInterface]] = {}
    with IPRoute(**kwargs) as ipr:
        names = {link["index"]: link.get("IFLA_IFNAME") for link in ipr.get_links()}
        for name in names.values():
            view[name] = []
        for addr in ipr.get_addr():
            # on point-to-point links IFA_ADDRESS is the remote end; IFA_LOCAL is ours
            local = addr.get("IFA_LOCAL") or addr.get("IFA_ADDRESS")
            name = names.get(addr["index"])
            if local and name is not None:
                view[name].append(ipaddress.ip_interface(f"{local}/{addr['prefixlen']}"))
    return view


# --------------------------------------------------------------------------- building and editing

_FORM_FIELDS = ("id", "state", "ha_link", "peer_address", "peer_mask", "monitors", "priority",
                "heartbeat_interval_ms", "dead_count", "preempt", "preempt_delay_ms",
                "garp_count", "garp_interval_ms")
_FORM_INTEGERS = ("id", "priority", "dead_count", "preempt_delay_ms", "garp_count", "garp_interval_ms")


def group_from_form(fields: Mapping[str, Any], *, prefix: str = "group[0]") -> Group:
    """A Group from flat form/CLI fields, validated exactly like the TOML file.

    `monitors` is a list of (interface, "ip/prefix") pairs. Numbers may arrive as text
    (web forms, argv); empty values mean "use the default". Errors name the same fields
    as load() does, e.g. `group[0].monitor[1].floating_ip`.
    """
    table: dict[str, Any] = {}
    for key, value in fields.items():
        name = f"{prefix}.{key}"
        if key not in _FORM_FIELDS:
            raise ConfigError(name, f"unknown key '{key}'")
        if value is None or value == "":
            continue
        if key in _FORM_INTEGERS and isinstance(value, str):
            value = _text_to_number(name, value, int)
        elif key == "heartbeat_interval_ms" and isinstance(value, str):
            value = _text_to_number(name, value, float)
        table[key] = value
    monitors = table.pop("monitors", [])
    if isinstance(monitors, (str, bytes)) or not isinstance(monitors, Iterable):
        raise ConfigError(f"{prefix}.monitor", "expected a list of (interface, floating_ip) pairs")
    table["monitor"] = []
    for i, pair in enumerate(monitors):
        if isinstance(pair, Mapping):
            table["monitor"].append(dict(pair))
            continue
        if isinstance(pair, (str, bytes)) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise ConfigError(f"{prefix}.monitor[{i}]", "expected an (interface, floating_ip) pair")
        table["monitor"].append({"interface": pair[0], "floating_ip": pair[1]})
    return _parse_group(_Table(table, prefix))


def _text_to_number(name: str, text: str, kind: Callable[[str], Any]) -> Any:
    try:
        return kind(text.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise ConfigError(name, f"expected {noun}, got '{text}'") from None


def with_group(cfg: NodeConfig, group: Group) -> NodeConfig:
    """cfg with `group` added, or replacing the group of the same id (edit)."""
    groups = list(cfg.groups)
    for g, existing in enumerate(groups):
        if existing.id == group.id:
            groups[g] = group
            break
    else:
        groups.append(group)
    for g, each in enumerate(groups):
        _check_group(each, f"group[{g}]")
    _check_groups(groups)
    return dataclasses.replace(cfg, groups=tuple(groups))


def without_group(cfg: NodeConfig, group_id: int) -> NodeConfig:
    """cfg with the group `group_id` removed; ConfigError if there is none."""
    groups = tuple(g for g in cfg.groups if g.id != group_id)
    if len(groups) == len(cfg.groups):
        raise ConfigError("group", f"there is no group with id {group_id}")
    return dataclasses.replace(cfg, groups=groups)


def with_enabled(cfg: NodeConfig, enabled: bool) -> NodeConfig:
    """cfg with the Global Settings Config Status set (True = enable)."""
    return dataclasses.replace(cfg, enabled=bool(enabled))


def with_web_password_hash(cfg: NodeConfig, password_hash: str) -> NodeConfig:
    """cfg with the web page's admin password hash replaced (see hasync.web.password)."""
    return dataclasses.replace(cfg, web=dataclasses.replace(cfg.web, password_hash=password_hash))


# --------------------------------------------------------------------------- writing

def to_toml_dict(cfg: NodeConfig) -> dict:
    """The TOML document for cfg (key material stays in its files; only their paths go here)."""
    missing = sorted(set(cfg.auth_keys) - set(cfg.auth_key_files))
    if missing:
        raise ConfigError(f"security.auth_keys.{missing[0]}", "no key file recorded for this key; "
                                                              "write it with write_key_file() first")
    sync = cfg.sync
    sync_table: dict[str, Any] = {
        "enabled": sync.enabled,
        "port": sync.port,
        "mode": sync.mode,
        "hold_timeout": sync.hold_timeout,
        "backup_copy": sync.backup_copy,
        "peer_public_key": sync.peer_public_key,
        "replicated_paths": list(sync.replicated_paths),
        "reload_hooks": dict(sync.reload_hooks),
        "ignore_protocols": list(sync.ignore_protocols),
        "ignore_addresses": [str(n) for n in sync.ignore_addresses],
    }
    if sync.curve_secret_key_file is not None:
        sync_table["curve_secret_key_file"] = str(sync.curve_secret_key_file)
    return {
        "node": {
            "hostname": cfg.hostname,
            "control_socket": cfg.control_socket,
            "state_dir": str(cfg.state_dir),
            "heartbeat_port": cfg.heartbeat_port,
            "realtime_priority": cfg.realtime_priority,
            "notify": list(cfg.notify),
            "notify_timeout_s": float(cfg.notify_timeout_s),
            "metrics_address": cfg.metrics_address,
            "metrics_port": cfg.metrics_port,
            "log_format": cfg.log_format,
        },
        "global": {"status": "enable" if cfg.enabled else "disable"},
        "security": {
            "auth_key_id": cfg.auth_key_id,
            "auth_keys": {str(k): str(cfg.auth_key_files[k]) for k in sorted(cfg.auth_keys)},
        },
        "sync": sync_table,
        "web": _web_table(cfg.web),
        "group": [group_to_dict(g) for g in cfg.groups],
    }


def _web_table(web: WebConfig) -> dict[str, Any]:
    table: dict[str, Any] = {"enabled": web.enabled, "bind": list(web.bind), "port": web.port,
                             "password_hash": web.password_hash}
    for key in ("cert_file", "key_file"):
        if getattr(web, key) is not None:
            table[key] = str(getattr(web, key))
    return table


def group_to_dict(group: Group) -> dict:
    return {
        "id": group.id,
        "state": group.state,
        "priority": group.priority,
        "ha_link": group.ha_link,
        "peer_address": str(group.peer_address),
        "peer_mask": group.peer_mask,
        "heartbeat_interval_ms": float(group.heartbeat_interval_ms),
        "dead_count": group.dead_count,
        "preempt": group.preempt,
        "preempt_delay_ms": group.preempt_delay_ms,
        "garp_count": group.garp_count,
        "garp_interval_ms": group.garp_interval_ms,
        "monitor": [{"interface": m.interface, "floating_ip": str(m.floating_ip)} for m in group.monitors],
    }


def group_to_form(group: Group) -> dict[str, Any]:
    """The flat form fields of a group: what group_from_form() takes back (for edits)."""
    form = group_to_dict(group)
    form["monitors"] = [(m["interface"], m["floating_ip"]) for m in form.pop("monitor")]
    return form


def save(cfg: NodeConfig, path: str | os.PathLike | None = None) -> Path:
    """Validate cfg, then replace the file atomically (mode 0600). Returns the path.

    What is written is parsed back first, so a file that load() would refuse is never
    written; on any failure the old file is left as it was.
    """
    target = Path(path) if path is not None else (cfg.path or DEFAULT_CONFIG_PATH)
    document = to_toml_dict(cfg)
    parse(document, path=target)  # key paths are absolute or already relative to target's dir
    return _write_atomically(target, tomli_w.dumps(document).encode())


def _write_atomically(target: Path, content: bytes) -> Path:
    # temp file in the same directory (so os.replace is a rename on one filesystem),
    # fsync the data, rename over the target, fsync the directory so the rename is durable
    directory = target.parent if str(target.parent) else Path(".")
    fd, temp_name = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o600)
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp_name, target)
    except BaseException:
        try:
            os.unlink(temp_name)
        except FileNotFoundError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return target
