"""The web page's HTTPS server: `python -m hasync.web.server --config PATH`.

Runs as its own process (started by the daemon when [web] enabled = true), in the
node's network namespace, so a slow browser never shares a loop with heartbeats.
It listens only on the configured addresses, one stdlib ThreadingHTTPServer per
address; the TLS handshake happens in the connection's own thread, so a client
that stalls mid-handshake holds up nobody else. Everything under /api/ goes to
hasync.web.api; the rest is the one static page.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import ssl
import sys
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from hasync import config as cfgmod
from hasync import control
from hasync.web.api import MAX_BODY, ApiRequest, WebApi
from hasync.web.cert import ensure_certificate

log = logging.getLogger("hasync.web")

STATIC_DIR = Path(__file__).with_name("static")
PAGES = {  # URL path -> (file in static/, content type); nothing else is served
    "/": ("index.html", "text/html; charset=utf-8"),
    "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
    "/static/style.css": ("style.css", "text/css; charset=utf-8"),
    "/static/favicon.svg": ("favicon.svg", "image/svg+xml"),
}
SECURITY_HEADERS = (
    ("Content-Security-Policy", "default-src 'self'; script-src 'self'; style-src 'self'; "
                                "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; "
                                "base-uri 'none'; form-action 'self'"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Referrer-Policy", "no-referrer"),
    ("Strict-Transport-Security", "max-age=31536000"),
)
MAX_CONNECTIONS = 64  # per listening address: beyond it new connections are closed at once
IO_TIMEOUT_S = 15.0  # handshake, headers and body; also the keep-alive idle limit
DAEMON_TIMEOUT_S = 5.0


class PasswordSource:
    """The admin password hash, re-read when the config file changes, so
    `hasync web passwd` takes effect without restarting the web process."""

    def __init__(self, cfg: cfgmod.NodeConfig):
        self.path = cfg.path
        self.hash = cfg.web.password_hash
        self._stamp = self._stat()
        self._lock = threading.Lock()

    def _stat(self) -> tuple[int, int] | None:
        try:
            st = os.stat(self.path) if self.path else None
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size) if st else None

    def __call__(self) -> str:
        with self._lock:
            stamp = self._stat()
            if stamp is not None and stamp != self._stamp:
                self._stamp = stamp
                try:
                    self.hash = cfgmod.load(self.path).web.password_hash
                except cfgmod.ConfigError as exc:  # keep the last good hash
                    log.error("config %s not re-read: %s", self.path, exc)
            return self.hash


class Handler(BaseHTTPRequestHandler):
    server: "WebServer"
    protocol_version = "HTTP/1.1"  # keep-alive: the page polls the status every second
    server_version = "hasync-web"
    sys_version = ""

    def log_message(self, fmt: str, *args: Any) -> None:  # quiet: one line per error only
        pass

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        # the stdlib calls this for malformed request lines and headers: count them
        self.server.counters["malformed_http"] += 1
        super().send_error(code, message, explain)

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._reply(405, b"", "text/plain", [("Allow", "GET, POST, PUT, DELETE")])

    def _dispatch(self) -> None:
        path = self.path.split("?", 1)[0]
        if path.startswith("/api/"):
            body = self._read_body()
            if body is None:
                return
            response = self.server.api.handle(ApiRequest(
                method=self.command, path=path, headers=dict(self.headers.items()),
                body=body, client=self.client_address[0]))
            self._reply(response.status, response.json_bytes(), "application/json",
                        [*response.headers, ("Cache-Control", "no-store")])
            return
        page = PAGES.get(path)
        if page is None or self.command != "GET":
            self.server.counters["not_found"] += 1
            self._reply(404, b"not found\n", "text/plain")
            return
        name, content_type = page
        self._reply(200, self.server.static[name], content_type, [("Cache-Control", "no-cache")])

    def _read_body(self) -> bytes | None:
        text = self.headers.get("Content-Length", "0") or "0"
        if self.headers.get("Transfer-Encoding"):
            self.server.counters["bad_requests"] += 1
            self._reply(411, b'{"ok": false, "error": "send a Content-Length"}', "application/json")
            self.close_connection = True
            return None
        if not text.isdigit() or int(text) > MAX_BODY:
            self.server.counters["bad_requests"] += 1
            self._reply(413, b'{"ok": false, "error": "body too large"}', "application/json")
            self.close_connection = True
            return None
        return self.rfile.read(int(text)) if int(text) else b""

    def _reply(self, status: int, body: bytes, content_type: str,
               headers: list[tuple[str, str]] = ()) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (*SECURITY_HEADERS, *headers):
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class WebServer(ThreadingHTTPServer):
    """One listening address. TLS is applied per connection, in its thread."""

    daemon_threads = True
    request_queue_size = 32

    def __init__(self, address: str, port: int, tls: ssl.SSLContext, api: WebApi,
                 static: dict[str, bytes], counters: Counter):
        self.address_family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
        self.tls = tls
        self.api = api
        self.static = static
        self.counters = counters
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        super().__init__((address, port), Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.counters["connections_refused"] += 1
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def finish_request(self, request: socket.socket, client_address: Any) -> None:
        request.settimeout(IO_TIMEOUT_S)
        try:
            tls_sock = self.tls.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError):
            self.counters["tls_failures"] += 1  # plain HTTP, scanners, stalled handshakes
            return
        try:
            self.RequestHandlerClass(tls_sock, client_address, self)
        finally:
            try:
                tls_sock.close()
            except OSError:
                pass

    def handle_error(self, request: Any, client_address: Any) -> None:
        # a handler bug or a reset mid-request: count it, keep serving
        self.counters["connection_errors"] += 1
        log.debug("error serving %s", client_address, exc_info=True)


def tls_context(cert_file: Path, key_file: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cert_file, key_file)
    return ctx


def read_static() -> dict[str, bytes]:
    return {name: (STATIC_DIR / name).read_bytes() for name, _ in PAGES.values()}


def build_api(cfg: cfgmod.NodeConfig, counters: Counter) -> WebApi:
    def ask(cmd: str, **args: Any) -> dict[str, Any]:
        return control.request(cfg.control_socket, cmd, timeout=DAEMON_TIMEOUT_S, **args)

    api = WebApi(ask, cfgmod.read_system_view, PasswordSource(cfg), hostname=cfg.hostname)
    api.counters = counters  # one set of counters for HTTP and API refusals
    return api


def start_servers(cfg: cfgmod.NodeConfig) -> list[WebServer]:
    """Certificate (made on first start), API, one server per bind address, each serving in a thread."""
    made = ensure_certificate(cfg.web_cert_file, cfg.web_key_file, cfg.hostname, cfg.web.bind)
    if made:
        log.info("made a self-signed certificate for %s: %s", cfg.hostname, cfg.web_cert_file)
    tls = tls_context(cfg.web_cert_file, cfg.web_key_file)
    counters: Counter = Counter()
    api = build_api(cfg, counters)
    static = read_static()
    servers: list[WebServer] = []
    try:
        for address in cfg.web.bind:
            servers.append(WebServer(address, cfg.web.port, tls, api, static, counters))
    except OSError:
        for server in servers:
            server.server_close()
        raise
    for server in servers:
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                         name=f"web-{server.server_address[0]}", daemon=True).start()
    return servers


def _normal_scheduling() -> None:
    # the daemon may run at SCHED_FIFO; a web page must never compete with heartbeats
    try:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except (AttributeError, OSError):
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hasync-web", description=__doc__)
    parser.add_argument("--config", required=True)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="hasync-web: %(message)s", stream=sys.stderr)
    _normal_scheduling()
    try:
        cfg = cfgmod.load(args.config)
    except cfgmod.ConfigError as exc:
        log.error("invalid config: %s", exc)
        return 2
    if not cfg.web.password_hash:
        log.warning("no admin password is set: nobody can log in until `hasync web passwd` is run")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        servers = start_servers(cfg)
    except OSError as exc:
        log.error("cannot listen on %s port %d: %s", ", ".join(cfg.web.bind), cfg.web.port, exc)
        return 1
    log.info("serving https on %s port %d", ", ".join(cfg.web.bind), cfg.web.port)
    while not stop.wait(1.0):
        pass
    for server in servers:
        server.shutdown()
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
