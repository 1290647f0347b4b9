"""The local control socket: JSON lines between the CLI and a daemon.

One request per connection: `{"cmd": "...", ...}\n` answered by one JSON line
(`{"ok": true, ...}` or `{"ok": false, "error": "..."}`). A name starting with '@'
is an abstract unix socket, which lives in the network namespace: in the lab each
firewall namespace has its own `@hasync` without any path to agree on. Only root
may talk to it (checked with SO_PEERCRED, since abstract sockets have no file mode).
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Any, Callable

MAX_REQUEST = 64 * 1024
_UCRED = struct.Struct("3i")


def address(name: str) -> str | bytes:
    return b"\0" + name[1:].encode() if name.startswith("@") else name


def request(name: str, cmd: str, timeout: float = 10.0, **args: Any) -> dict[str, Any]:
    """Send one command to the daemon at `name`; raises OSError if none listens."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(address(name))
        sock.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    return json.loads(b"".join(chunks) or b'{"ok": false, "error": "empty answer"}')


class ControlServer:
    """Non-blocking server driven by the daemon's selector loop."""

    def __init__(self, name: str, handler: Callable[[dict[str, Any]], dict[str, Any]]):
        self.name = name
        self.handler = handler
        self.refused = 0
        if not name.startswith("@"):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(address(name))
        if not name.startswith("@"):
            os.chmod(name, 0o600)
        self.sock.listen(16)
        self.sock.setblocking(False)
        self._buffers: dict[socket.socket, bytearray] = {}

    def fileno(self) -> int:
        return self.sock.fileno()

    def accept(self) -> socket.socket | None:
        try:
            conn, _ = self.sock.accept()
        except BlockingIOError:
            return None
        _pid, uid, _gid = _UCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                        _UCRED.size))
        if uid != 0:
            self.refused += 1
            self._reply(conn, {"ok": False, "error": "permission denied: root only"})
            return None
        conn.setblocking(False)
        self._buffers[conn] = bytearray()
        return conn

    def readable(self, conn: socket.socket) -> bool:
        """Read what is there; answer once a line is complete. True when conn is done."""
        buf = self._buffers[conn]
        try:
            chunk = conn.recv(65536)
        except BlockingIOError:
            return False
        except OSError:
            chunk = b""
        buf += chunk
        if chunk and b"\n" not in buf and len(buf) < MAX_REQUEST:
            return False
        del self._buffers[conn]
        if not chunk and not buf:
            conn.close()
            return True
        try:
            req = json.loads(bytes(buf).split(b"\n", 1)[0])
            if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
                raise ValueError("a request is a JSON object with a 'cmd'")
            answer = self.handler(req)
        except ValueError as exc:
            answer = {"ok": False, "error": f"bad request: {exc}"}
        self._reply(conn, answer)
        return True

    @staticmethod
    def _reply(conn: socket.socket, answer: dict[str, Any]) -> None:
        try:
            conn.setblocking(True)
            conn.settimeout(1.0)
            conn.sendall(json.dumps(answer, default=str).encode() + b"\n")
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        for conn in list(self._buffers):
            conn.close()
        self.sock.close()
        if not self.name.startswith("@"):
            try:
                os.unlink(self.name)
            except FileNotFoundError:
                pass
