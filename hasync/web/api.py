"""The web page's JSON API: HTTP-shaped requests in, responses out, the daemon behind.

No sockets here: `WebApi.handle(ApiRequest)` returns an `ApiResponse`, and the
daemon is reached through the `ask(cmd, **args)` callable given at construction
(hasync.control.request on the node's control socket in the server; a fake in
tests). Every route but login, session and the OpenAPI document needs a session;
every state-changing one (POST, PUT, DELETE) also needs the session's CSRF token
and a JSON body, which a cross-site HTML form cannot send.

Answers: 200 with {"ok": true, ...}; 422 with {"ok": false, "error", "field"} for a
validation error (the daemon's dotted field name, passed through untouched); 409
for a refused operation; 503 when the daemon does not answer. Bad requests (no
JSON, wrong shapes) get 400 and are counted, never raised.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from hasync.web import auth
from hasync.web.openapi import openapi_document
from hasync.web.password import verify_password

MAX_BODY = 64 * 1024
INTERFACES_CACHE_S = 2.0

Ask = Callable[..., dict[str, Any]]  # ask(cmd, **args) -> the daemon's answer; OSError if none listens
InterfaceView = Callable[[], Mapping[str, Sequence[Any]]]  # name -> addresses (ip_interface objects)


@dataclass(frozen=True)
class ApiRequest:
    method: str
    path: str  # without the query string
    headers: Mapping[str, str]  # names in any case
    body: bytes = b""
    client: str = ""  # the peer address, for login throttling

    def header(self, name: str) -> str | None:
        lower = name.lower()
        for key, value in self.headers.items():
            if key.lower() == lower:
                return value
        return None


@dataclass
class ApiResponse:
    status: int
    body: dict[str, Any]
    headers: list[tuple[str, str]] = field(default_factory=list)

    def json_bytes(self) -> bytes:
        return json.dumps(self.body, default=str).encode()


class BadRequest(Exception):
    pass


def _error(status: int, message: str, **extra: Any) -> ApiResponse:
    return ApiResponse(status, {"ok": False, "error": message, **extra})


# --------------------------------------------------------------------------- form helpers

GROUP_FIELDS = ("id", "state", "ha_link", "peer_address", "peer_mask", "monitors", "priority",
                "heartbeat_interval_ms", "dead_count", "preempt", "preempt_delay_ms",
                "garp_count", "garp_interval_ms")


def complete_floating_prefix(floating_ip: str, addresses: Sequence[Any]) -> str:
    """'192.0.2.1' -> '192.0.2.1/24' when the interface has an address in a subnet holding it.

    The seed's form asks for a Floating IP Address only; the prefix is the interface's.
    Anything else is returned as given, for the daemon's validation to name.
    """
    text = floating_ip.strip()
    if "/" in text:
        return text
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    for address in addresses:
        if address.version == ip.version and ip in address.network:
            return f"{ip}/{address.network.prefixlen}"
    return text


def group_fields(body: Any, view: Mapping[str, Sequence[Any]]) -> dict[str, Any]:
    """The daemon's form fields from a JSON body; BadRequest for wrong shapes.

    Values are passed on as given (the daemon validates them and names the field);
    only the JSON shape is checked here, and floating IPs get their prefix.
    """
    if not isinstance(body, dict):
        raise BadRequest("the body must be a JSON object of group fields")
    fields: dict[str, Any] = {}
    for key, value in body.items():
        if key == "monitors":
            fields[key] = _monitors(value, view)
        elif isinstance(value, (str, int, float)) or value is None:
            fields[key] = value  # unknown keys too: the daemon answers "unknown key" with the field
        else:
            raise BadRequest(f"field {key!r} must be a string or a number")
    return fields


def _monitors(value: Any, view: Mapping[str, Sequence[Any]]) -> list[list[str]]:
    if not isinstance(value, list):
        raise BadRequest("monitors must be a list of {interface, floating_ip} objects")
    rows = []
    for row in value:
        if isinstance(row, dict):
            interface, floating_ip = row.get("interface"), row.get("floating_ip")
        elif isinstance(row, list) and len(row) == 2:
            interface, floating_ip = row
        else:
            raise BadRequest("each monitor is an {interface, floating_ip} object")
        if not isinstance(interface, str) or not isinstance(floating_ip, str):
            raise BadRequest("a monitor's interface and floating_ip are strings")
        rows.append([interface, complete_floating_prefix(floating_ip, view.get(interface, ()))])
    return rows


# --------------------------------------------------------------------------- the API

_GROUP_PATH = re.compile(r"^/api/groups/(\d{1,3})$")


class WebApi:
    def __init__(self, ask: Ask, interfaces: InterfaceView, password_hash: Callable[[], str],
                 *, hostname: str = "", clock: Callable[[], float] = time.monotonic,
                 sessions: auth.SessionStore | None = None, throttle: auth.LoginThrottle | None = None,
                 check_password: Callable[[str, str], bool] = verify_password):
        self.ask = ask
        self.interfaces = interfaces
        self.password_hash = password_hash
        self.hostname = hostname
        self.clock = clock
        self.sessions = sessions or auth.SessionStore()
        self.throttle = throttle or auth.LoginThrottle()
        self.check_password = check_password
        self.counters: Counter[str] = Counter()  # bad requests, logins, refusals: what the page shows
        self._view_cache: tuple[float, Mapping[str, Sequence[Any]]] | None = None

    # ---- dispatch ---------------------------------------------------------------

    def handle(self, req: ApiRequest) -> ApiResponse:
        try:
            return self._route(req)
        except BadRequest as exc:
            self.counters["bad_requests"] += 1
            return _error(400, f"bad request: {exc}")

    def _route(self, req: ApiRequest) -> ApiResponse:
        method, path = req.method.upper(), req.path.rstrip("/") or "/"
        if path == "/api/openapi.json" and method == "GET":
            return ApiResponse(200, openapi_document())
        if path == "/api/login":
            return self._login(req) if method == "POST" else self._not_allowed("POST")
        if path == "/api/session":
            return self._session_info(req) if method == "GET" else self._not_allowed("GET")

        routes: dict[str, dict[str, Callable[[ApiRequest, Any], ApiResponse]]] = {
            "/api/logout": {"POST": self._logout},
            "/api/status": {"GET": self._status},
            "/api/interfaces": {"GET": self._interfaces},
            "/api/global": {"GET": self._global, "POST": self._set_global},
            "/api/groups": {"GET": self._groups, "POST": self._add_group},
            "/api/switchover": {"POST": self._switchover},
            "/api/resync": {"POST": self._resync},
        }
        match = _GROUP_PATH.match(path)
        if match:
            group_id = int(match.group(1))
            handlers = {"GET": lambda _r, _b: self._group(group_id),
                        "PUT": lambda _r, body: self._edit_group(group_id, body),
                        "DELETE": lambda _r, _b: self._daemon("group_delete", id=group_id)}
        elif path in routes:
            handlers = routes[path]
        else:
            self.counters["not_found"] += 1
            return _error(404, f"no such resource {path}")
        if method not in handlers:
            return self._not_allowed(", ".join(handlers))

        session = self.sessions.get(auth.token_from_cookies(req.header("Cookie")), self.clock())
        if session is None:
            self.counters["unauthenticated"] += 1
            return _error(401, "log in first")
        body: Any = None
        if method != "GET":
            if not auth.csrf_ok(session, req.header(auth.CSRF_HEADER)):
                self.counters["csrf_refused"] += 1
                return _error(403, "missing or wrong CSRF token: reload the page")
            body = self._json_body(req)
        return handlers[method](req, body)

    @staticmethod
    def _not_allowed(allowed: str) -> ApiResponse:
        return ApiResponse(405, {"ok": False, "error": f"method not allowed (allowed: {allowed})"},
                           [("Allow", allowed)])

    def _json_body(self, req: ApiRequest) -> Any:
        if not req.body.strip():
            return {}  # DELETE and bodiless POSTs: the CSRF token (or, at login, no password) decides
        content_type = (req.header("Content-Type") or "").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise BadRequest("the body must be application/json")
        if len(req.body) > MAX_BODY:
            raise BadRequest(f"the body is larger than {MAX_BODY} bytes")
        try:
            return json.loads(req.body)
        except (ValueError, UnicodeDecodeError):
            raise BadRequest("the body is not valid JSON") from None

    def _daemon(self, cmd: str, **args: Any) -> ApiResponse:
        """One control request, mapped to an HTTP answer."""
        try:
            reply = self.ask(cmd, **args)
        except (OSError, ValueError) as exc:
            self.counters["daemon_unreachable"] += 1
            return _error(503, f"the hasync daemon is not answering: {exc}")
        if not isinstance(reply, dict):
            return _error(502, "the hasync daemon gave a malformed answer")
        if reply.get("ok"):
            return ApiResponse(200, reply)
        return ApiResponse(422 if reply.get("field") else 409,
                           {"ok": False, "error": str(reply.get("error", "refused")),
                            **({"field": reply["field"]} if reply.get("field") else {})})

    # ---- login ------------------------------------------------------------------

    def _login(self, req: ApiRequest) -> ApiResponse:
        now = self.clock()
        body = self._json_body(req)  # JSON only: a cross-site form cannot log a victim in
        password = body.get("password") if isinstance(body, dict) else None
        if not isinstance(password, str):
            raise BadRequest("the body must be {\"password\": \"...\"}")
        wait = self.throttle.wait_s(req.client, now)
        if wait > 0:
            self.counters["login_throttled"] += 1
            return ApiResponse(429, {"ok": False, "error": f"too many failed logins: wait {wait:.0f} s"},
                               [("Retry-After", str(int(wait) + 1))])
        stored = self.password_hash()
        if not stored:
            return _error(403, "no admin password is set: run `hasync web passwd` on the node")
        if not self.check_password(password, stored):
            self.throttle.failed(req.client, now)
            self.counters["login_failed"] += 1
            return _error(401, "wrong password")
        self.throttle.succeeded(req.client)
        self.sessions.drop(auth.token_from_cookies(req.header("Cookie")))  # no session fixation
        session = self.sessions.create(now)
        self.counters["login_ok"] += 1
        return ApiResponse(200, {"ok": True, "csrf_token": session.csrf, "hostname": self.hostname},
                           [("Set-Cookie", auth.session_cookie(session.token))])

    def _session_info(self, req: ApiRequest) -> ApiResponse:
        session = self.sessions.get(auth.token_from_cookies(req.header("Cookie")), self.clock())
        body: dict[str, Any] = {"ok": True, "authenticated": session is not None,
                                "hostname": self.hostname, "password_set": bool(self.password_hash())}
        if session is not None:
            body["csrf_token"] = session.csrf
        return ApiResponse(200, body)

    def _logout(self, req: ApiRequest, _body: Any) -> ApiResponse:
        self.sessions.drop(auth.token_from_cookies(req.header("Cookie")))
        return ApiResponse(200, {"ok": True, "message": "logged out"},
                           [("Set-Cookie", auth.clearing_cookie())])

    # ---- status and settings ----------------------------------------------------

    def _status(self, _req: ApiRequest, _body: Any) -> ApiResponse:
        answer = self._daemon("status")
        if answer.status == 200:
            answer.body["web"] = dict(self.counters)
        return answer

    def _view(self) -> Mapping[str, Sequence[Any]]:
        now = self.clock()
        if self._view_cache is None or now - self._view_cache[0] > INTERFACES_CACHE_S:
            self._view_cache = (now, self.interfaces())
        return self._view_cache[1]

    def _interfaces(self, _req: ApiRequest, _body: Any) -> ApiResponse:
        try:
            view = self._view()
        except OSError as exc:
            return _error(503, f"cannot read the interfaces: {exc}")
        rows = [{"name": name, "addresses": [str(a) for a in view[name]]}
                for name in sorted(view) if name != "lo"]
        return ApiResponse(200, {"ok": True, "interfaces": rows})

    def _global(self, _req: ApiRequest, _body: Any) -> ApiResponse:
        answer = self._daemon("status")
        if answer.status != 200:
            return answer
        enabled = bool(answer.body.get("enabled"))
        return ApiResponse(200, {"ok": True, "status": "enable" if enabled else "disable"})

    def _set_global(self, _req: ApiRequest, body: Any) -> ApiResponse:
        status = body.get("status") if isinstance(body, dict) else None
        if status not in ("enable", "disable"):
            return _error(422, "Config Status must be enable or disable", field="global.status")
        return self._daemon(status)

    # ---- groups -----------------------------------------------------------------

    def _groups(self, _req: ApiRequest, _body: Any) -> ApiResponse:
        return self._daemon("group_show")

    def _group(self, group_id: int) -> ApiResponse:
        answer = self._daemon("group_show")
        if answer.status != 200:
            return answer
        for group in answer.body.get("groups", []):
            if group.get("id") == group_id:
                return ApiResponse(200, {"ok": True, "group": group})
        return _error(404, f"no HA group with id {group_id}")

    def _add_group(self, _req: ApiRequest, body: Any) -> ApiResponse:
        return self._daemon("group_add", fields=group_fields(body, self._fresh_view()))

    def _edit_group(self, group_id: int, body: Any) -> ApiResponse:
        fields = group_fields(body, self._fresh_view())
        fields["id"] = group_id  # the path names the group; the body cannot move it
        return self._daemon("group_edit", fields=fields)

    def _fresh_view(self) -> Mapping[str, Sequence[Any]]:
        try:
            return self._view()
        except OSError:
            return {}  # no prefix completion; the daemon still validates everything

    # ---- operations -------------------------------------------------------------

    def _switchover(self, _req: ApiRequest, _body: Any) -> ApiResponse:
        return self._daemon("switchover")

    def _resync(self, _req: ApiRequest, body: Any) -> ApiResponse:
        config_only = body.get("config", False) if isinstance(body, dict) else False
        if not isinstance(config_only, bool):
            raise BadRequest("config must be true or false")
        return self._daemon("resync", config=config_only)


ROUTES = (  # (method, path) of every route: the OpenAPI document must describe exactly these
    ("POST", "/api/login"), ("GET", "/api/session"), ("POST", "/api/logout"),
    ("GET", "/api/status"), ("GET", "/api/interfaces"), ("GET", "/api/global"),
    ("POST", "/api/global"), ("GET", "/api/groups"), ("POST", "/api/groups"),
    ("GET", "/api/groups/{id}"), ("PUT", "/api/groups/{id}"), ("DELETE", "/api/groups/{id}"),
    ("POST", "/api/switchover"), ("POST", "/api/resync"), ("GET", "/api/openapi.json"),
)
