"""The `hasync` command: the daemon, the operator's commands, keys and the lab."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import hasync
from hasync import config as cfgmod
from hasync import control

COLOURS = {"green": "\033[32m", "red": "\033[31m", "grey": "\033[90m"}


def _socket_name(args: argparse.Namespace) -> str:
    if args.socket:
        return args.socket
    if os.environ.get("HASYNC_SOCKET"):
        return os.environ["HASYNC_SOCKET"]
    path = Path(args.config or os.environ.get("HASYNC_CONFIG") or cfgmod.DEFAULT_CONFIG_PATH)
    if path.exists():
        try:
            return cfgmod.load(path).control_socket
        except (cfgmod.ConfigError, OSError):
            pass
    return cfgmod.DEFAULT_CONTROL_SOCKET


def _ask(args: argparse.Namespace, cmd: str, **kw: Any) -> dict[str, Any]:
    name = _socket_name(args)
    try:
        return control.request(name, cmd, **kw)
    except (FileNotFoundError, ConnectionRefusedError):
        raise SystemExit(f"hasync: no daemon answers on {name} (is `hasync run` running here?)")


def _answer(reply: dict[str, Any], as_json: bool = False) -> int:
    if as_json:
        print(json.dumps(reply, indent=2, default=str))
    elif reply.get("ok"):
        print(reply.get("message", "ok"))
    else:
        field = f" [{reply['field']}]" if reply.get("field") else ""
        print(f"error{field}: {reply.get('error')}", file=sys.stderr)
    return 0 if reply.get("ok") else 1


# ---- commands ---------------------------------------------------------------------


def cmd_run(args: argparse.Namespace) -> int:
    from hasync.daemon import run

    path = Path(args.config or os.environ.get("HASYNC_CONFIG") or cfgmod.DEFAULT_CONFIG_PATH)
    try:
        return run(path)
    except cfgmod.ConfigError as exc:
        print(f"hasync: invalid config {path}: {exc}", file=sys.stderr)
        return 2


def cmd_status(args: argparse.Namespace) -> int:
    reply = _ask(args, "status")
    if args.json:
        print(json.dumps(reply, indent=2, default=str))
        return 0 if reply.get("ok") else 1
    print(render_status(reply, colour=sys.stdout.isatty()))
    return 0


def render_status(s: dict[str, Any], colour: bool = False) -> str:
    icon = s.get("icon", "?")
    dot = f"{COLOURS.get(icon, '')}●\033[0m" if colour else "●"
    lines = [f"HA {dot} {icon}  {s.get('role') or '-'}   ({s.get('hostname')}, state {s.get('state')},"
             f" group {s.get('group')})"]
    if s.get("cause"):
        lines.append(f"  last change: {s['cause']}")
    peer = s.get("peer")
    if peer:
        seen = peer.get("last_seen_ms_ago")
        lines.append(f"  peer: {peer['hostname']} {peer['state']} priority {peer['priority']}"
                     f" release {peer['version']}, seen {seen} ms ago on "
                     f"{', '.join(peer['paths_alive']) or 'no path'}")
    if s.get("floating_ips"):
        lines.append(f"  floating IPs: {', '.join(s['floating_ips'])}")
    if s.get("links"):
        lines.append("  links: " + ", ".join(f"{k} {'up' if v else 'DOWN'}"
                                             for k, v in sorted(s["links"].items())))
    sync = s.get("sync")
    if sync:
        lines.append(f"  sync: {'connected' if sync.get('connected') else 'not connected'},"
                     f" {sync.get('entries_applied', 0)} applied, {sync.get('entries_sent', 0)} sent,"
                     f" lag {sync.get('lag_ms')} ms, last resync {_resync_text(sync.get('last_resync'))}")
        table_line = _table_line(sync)
        if table_line:
            lines.append(table_line)
        commit = sync.get("last_commit")
        if commit:  # cache mode: what the last takeover waited for
            lines.append(f"  sync cache: {commit['entries']} entries committed at the last takeover"
                         f" in {commit['ms']} ms")
        cfg = sync.get("config") or {}
        if cfg:
            state = "in sync" if cfg.get("in_sync") else f"behind by {cfg.get('behind', '?')}"
            if cfg.get("conflicts"):
                state += f", {len(cfg['conflicts'])} conflict(s)"
            lines.append(f"  config sync: {state}, generation {cfg.get('generation')},"
                         f" last applied {cfg.get('last_applied')}")
    for reason in s.get("reasons") or []:
        lines.append(f"  red: {reason}")
    return "\n".join(lines)


def _resync_text(last: dict[str, Any] | None) -> str:
    if not isinstance(last, dict) or not isinstance(last.get("at"), (int, float)):
        return "never"
    return f"{time.time() - last['at']:.0f} s ago ({last.get('entries', '?')} entries)"


def _table_line(sync: dict[str, Any]) -> str:
    """What a takeover or a resync will cost: is there a state table (statesync.table)?"""
    table = sync.get("table")
    if not table:
        return ""
    if sync.get("role") == "master":
        return (f"  sync table: {table.get('entries', 0)} entries, resyncs served from it;"
                f" conntrack dumps so far: {sync.get('dumps', 0)}")
    if table.get("backup_copy") is False:
        return "  sync table: no copy kept (sync.backup_copy = false): a takeover dumps the kernel table"
    return f"  sync table: a copy of {table.get('entries', 0)} entries, which a takeover adopts without a dump"


def cmd_switchover(args: argparse.Namespace) -> int:
    before = _ask(args, "status")
    reply = _ask(args, "switchover")
    if not reply.get("ok") or args.no_wait:
        return _answer(reply)
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        now = _ask(args, "status")
        if now.get("state") != before.get("state"):
            print(f"switched: this node is now {now.get('role')} ({now.get('state')})")
            return 0
        time.sleep(0.02)
    print(f"error: the role did not change within {args.wait} s", file=sys.stderr)
    return 1


def cmd_simple(args: argparse.Namespace) -> int:
    return _answer(_ask(args, args.cmd))


def cmd_resync(args: argparse.Namespace) -> int:
    return _answer(_ask(args, "resync", config=args.config_only))


def _group_fields(args: argparse.Namespace) -> dict[str, Any]:
    fields: dict[str, Any] = {}
    for name in ("id", "state", "ha_link", "peer_address", "peer_mask", "priority",
                 "heartbeat_interval_ms", "dead_count", "preempt", "preempt_delay_ms"):
        value = getattr(args, name, None)
        if value is not None:
            fields[name] = value
    if args.monitor:
        monitors = []
        for item in args.monitor:
            iface, sep, ip = item.partition("=")
            if not sep:
                raise SystemExit(f"error [monitor]: expected IFACE=IP/PREFIX, got {item!r}")
            monitors.append([iface, ip])
        fields["monitors"] = monitors
    return fields


def cmd_group(args: argparse.Namespace) -> int:
    if args.group_cmd == "show":
        reply = _ask(args, "group_show")
        if args.json or not reply.get("ok"):
            return _answer(reply, as_json=True)
        for g in reply["groups"]:
            print(f"HA Group {g['id']}: state {g['state']}, priority {g['priority']}, "
                  f"HA link {g['ha_link']}, peer {g['peer_address']}/{g['peer_mask']}")
            for m in g["monitor"]:
                print(f"  monitoring interface {m['interface']}: floating IP {m['floating_ip']}")
        if not reply["groups"]:
            print("no HA group")
        return 0
    if args.group_cmd == "delete":
        return _answer(_ask(args, "group_delete", id=args.id))
    cmd = "group_add" if args.group_cmd == "add" else "group_edit"
    return _answer(_ask(args, cmd, fields=_group_fields(args)))


def cmd_keys(args: argparse.Namespace) -> int:
    from hasync.keys import generate_node_keys

    for kind, path in generate_node_keys(Path(args.dir), shared_auth_key=not args.no_auth).items():
        print(f"{kind}: {path}")
    return 0


def cmd_install_units(args: argparse.Namespace) -> int:
    from hasync import units

    path = Path(args.config or os.environ.get("HASYNC_CONFIG") or cfgmod.DEFAULT_CONFIG_PATH)
    try:
        written = units.install(Path(args.dest), config_path=path, executable=args.executable)
    except cfgmod.ConfigError as exc:
        print(f"hasync: invalid config {path}: {exc}", file=sys.stderr)
        return 2
    for file in written:
        print(f"wrote {file}")
    print("next: systemctl daemon-reload && systemctl enable --now hasync")
    return 0


# ---- the web page (hasync.web) ------------------------------------------------------

MIN_WEB_PASSWORD = 8


def cmd_web_passwd(args: argparse.Namespace) -> int:
    """Set the web page's admin password: its scrypt hash goes into [web] of the config."""
    from getpass import getpass

    from hasync.web.password import hash_password

    path = Path(args.config or os.environ.get("HASYNC_CONFIG") or cfgmod.DEFAULT_CONFIG_PATH)
    try:
        cfg = cfgmod.load(path)
    except cfgmod.ConfigError as exc:
        print(f"hasync: invalid config {path}: {exc}", file=sys.stderr)
        return 2
    if args.stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass("New admin password: ")
        if getpass("Again: ") != password:
            print("error: the passwords differ; nothing changed", file=sys.stderr)
            return 1
    if len(password) < MIN_WEB_PASSWORD:
        print(f"error: the password needs at least {MIN_WEB_PASSWORD} characters; nothing changed",
              file=sys.stderr)
        return 1
    cfgmod.save(cfgmod.with_web_password_hash(cfg, hash_password(password)), path)
    print(f"admin password set in {path}")
    # a running daemon writes its in-memory config back on the next change: make it re-read the file
    try:
        reply = control.request(cfg.control_socket, "reload", timeout=5.0)
    except OSError:
        return 0  # no daemon here: it reads the file when it starts
    if not reply.get("ok"):
        print(f"warning: the daemon did not reload: {reply.get('error')}", file=sys.stderr)
    return 0


def cmd_lab(args: argparse.Namespace) -> int:
    from hasync.lab import commands

    return commands.main(args)


# ---- parser -----------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hasync", description=__doc__)
    p.add_argument("--version", action="version", version=f"hasync {hasync.__version__}")
    p.add_argument("--config", help="node config file (default $HASYNC_CONFIG or "
                                     f"{cfgmod.DEFAULT_CONFIG_PATH})")
    p.add_argument("--socket", help="control socket (default: from the config, else @hasync)")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    s = sub.add_parser("run", help="run the daemon on this node")
    s.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="the HA icon, role, peer and reasons for red")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_status)

    s = sub.add_parser("switchover", help="graceful hand-over of the Master role to the peer")
    s.add_argument("--wait", type=float, default=5.0, help="seconds to wait for the role change")
    s.add_argument("--no-wait", action="store_true")
    s.set_defaults(func=cmd_switchover)

    for name, text in (("enable", "Global Settings: Config Status Enable"),
                       ("disable", "Global Settings: Config Status Disable (floating IPs released)"),
                       ("reload", "re-read the config file; an invalid one is refused")):
        s = sub.add_parser(name, help=text)
        s.set_defaults(func=cmd_simple)

    s = sub.add_parser("resync", help="force a full resync of state (and config) from the Master")
    s.add_argument("--config-only", dest="config_only", action="store_true",
                   help="resync the replicated configuration only")
    s.set_defaults(func=cmd_resync)

    g = sub.add_parser("group", help="HA groups: the seed's Add HA Group form")
    gsub = g.add_subparsers(dest="group_cmd", required=True)
    for name in ("add", "edit"):
        s = gsub.add_parser(name, help=f"{name} the HA group")
        required = name == "add"
        s.add_argument("--id", type=int, default=1 if required else None)
        s.add_argument("--state", choices=["master", "backup"], required=required,
                       help="HA State: this node's preferred role")
        s.add_argument("--ha-link", dest="ha_link", required=required,
                       help="HA Link Interface (the dedicated port, e.g. lan2)")
        s.add_argument("--peer-address", dest="peer_address", required=required,
                       help="Peer HA Link Address")
        s.add_argument("--peer-mask", dest="peer_mask", required=required,
                       help="Peer HA Link Mask (prefix length or dotted)")
        s.add_argument("--monitor", action="append", metavar="IFACE=IP/PREFIX",
                       help="Monitoring Interface and its Floating IP Address (repeat)")
        s.add_argument("--priority", type=int)
        s.add_argument("--heartbeat-interval-ms", dest="heartbeat_interval_ms", type=float)
        s.add_argument("--dead-count", dest="dead_count", type=int)
        s.add_argument("--preempt", choices=["on", "off", "delay"])
        s.add_argument("--preempt-delay-ms", dest="preempt_delay_ms", type=int)
        s.set_defaults(func=cmd_group)
    s = gsub.add_parser("show", help="HA Group Details")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_group)
    s = gsub.add_parser("delete", help="delete the HA group")
    s.add_argument("--id", type=int, default=1)
    s.set_defaults(func=cmd_group)

    k = sub.add_parser("keys", help="key files")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    s = ksub.add_parser("generate", help="this node's CURVE key pair and the pair's heartbeat key")
    s.add_argument("--dir", default="/etc/hasync")
    s.add_argument("--no-auth", action="store_true", help="do not write a new heartbeat key")
    s.set_defaults(func=cmd_keys)

    s = sub.add_parser("install-units", help="install the systemd unit (and drop-ins for this config)")
    s.add_argument("--dest", default="/etc/systemd/system", help="unit directory (default %(default)s)")
    s.add_argument("--executable", help="the hasync command for ExecStart (default: this one)")
    s.set_defaults(func=cmd_install_units)

    w = sub.add_parser("web", help="the High Availability web page")
    wsub = w.add_subparsers(dest="web_cmd", required=True)
    s = wsub.add_parser("passwd", help="set the admin password (stored as a scrypt hash in [web])")
    s.add_argument("--stdin", action="store_true", help="read the password from one line of stdin")
    s.set_defaults(func=cmd_web_passwd)

    from hasync.lab.commands import add_parser as add_lab_parser

    add_lab_parser(sub, cmd_lab)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)
