"""The sync service's local control socket: JSON lines, as `hasync.control` speaks them.

The failover daemon (statesync.supervisor) and the CLI talk to the service at
`<node control_socket>-sync` (e.g. `@hasync-sync`, an abstract socket private to
the network namespace). Requests and their answers:

    {"cmd": "role", "role": "master"|"backup"}  -> after the role took effect (in
                                                   "cache" mode: after the commit)
    {"cmd": "status"}                           -> connected, peer, refused_reason,
        entries_sent, entries_applied, lag_ms, last_resync, errors, overruns, mode, ...
    {"cmd": "resync"}                           -> a full resync was started
"""

from __future__ import annotations

from typing import Any, Protocol

from hasync.control import ControlServer, request  # noqa: F401  (request re-exported for callers)

ROLES = ("master", "backup")


def socket_name(node_control_socket: str) -> str:
    """Same rule as statesync.supervisor.sync_socket_name."""
    return node_control_socket + "-sync"


class Commands(Protocol):
    def set_role(self, role: str) -> dict[str, Any]: ...
    def status(self) -> dict[str, Any]: ...
    def resync(self) -> dict[str, Any]: ...


def dispatcher(service: Commands):
    """The request handler ControlServer calls (in the service's loop, so no locking)."""

    def handle(req: dict[str, Any]) -> dict[str, Any]:
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, **service.status()}
        if cmd == "role":
            role = req.get("role")
            if role not in ROLES:
                return {"ok": False, "error": f"role must be one of {', '.join(ROLES)}, not {role!r}"}
            return {"ok": True, **service.set_role(role)}
        if cmd == "resync":
            if req.get("config"):
                return {"ok": False, "error": "config resync is not handled by the state sync service"}
            return {"ok": True, **service.resync()}
        return {"ok": False, "error": f"unknown command {cmd!r} (role, status, resync)"}

    return handle


def open_server(node_control_socket: str, service: Commands) -> ControlServer:
    return ControlServer(socket_name(node_control_socket), dispatcher(service))
