"""The web page's JSON API against a fake daemon on a real control socket.

The fake speaks hasync.control's JSON-lines protocol on an abstract unix socket
(no network) and validates groups with the real config code, so the field names
in its errors are the daemon's own.
"""

from __future__ import annotations

import ipaddress
import json
import secrets
import selectors
import threading

import pytest
from hypothesis import given, settings, strategies as st

from hasync import config as cfgmod
from hasync import control
from hasync.web import auth
from hasync.web.api import ROUTES, ApiRequest, WebApi, complete_floating_prefix
from hasync.web.openapi import openapi_document
from hasync.web.password import hash_password

PASSWORD = "correct horse battery"
PASSWORD_HASH = hash_password(PASSWORD)
VIEW = {
    "lo": [ipaddress.ip_interface("127.0.0.1/8")],
    "lan1": [ipaddress.ip_interface("192.0.2.2/24")],
    "wan1": [ipaddress.ip_interface("203.0.113.2/24")],
    "lan2": [ipaddress.ip_interface("198.51.100.1/30")],
}


class FakeDaemon:
    """Answers the failover service's commands; group fields are validated for real."""

    def __init__(self) -> None:
        self.name = f"@hsx-web-test-{secrets.token_hex(6)}"
        self.requests: list[dict] = []
        self.enabled = False
        self.groups: list[dict] = []
        self.server = control.ControlServer(self.name, self.handle)
        self.sel = selectors.DefaultSelector()
        self.sel.register(self.server, selectors.EVENT_READ, None)
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            for key, _ in self.sel.select(0.05):
                if key.data is None:
                    conn = self.server.accept()
                    if conn is not None:
                        self.sel.register(conn, selectors.EVENT_READ, "conn")
                else:
                    self.sel.unregister(key.fileobj)
                    if not self.server.readable(key.fileobj):
                        self.sel.register(key.fileobj, selectors.EVENT_READ, "conn")

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        self.server.close()

    def handle(self, req: dict) -> dict:
        self.requests.append(req)
        cmd = req["cmd"]
        if cmd == "status":
            return {"ok": True, "icon": "green" if self.enabled else "grey", "role": "",
                    "state": "NO GROUP" if self.enabled else "DISABLED", "enabled": self.enabled,
                    "reasons": [], "hostname": "fw1"}
        if cmd in ("enable", "disable"):
            self.enabled = cmd == "enable"
            return {"ok": True, "message": f"HA {cmd}d"}
        if cmd == "group_show":
            return {"ok": True, "groups": self.groups}
        if cmd in ("group_add", "group_edit"):
            fields = dict(req["fields"])
            if cmd == "group_edit":
                base = cfgmod.group_to_form(cfgmod.group_from_form(_form(self.groups[0])))
                fields = {**base, **fields}
            try:
                group = cfgmod.group_from_form(fields)
            except cfgmod.ConfigError as exc:
                return {"ok": False, "error": str(exc), "field": exc.field}
            self.groups = [cfgmod.group_to_dict(group)]
            return {"ok": True, "message": "HA Group Added Successfully" if cmd == "group_add"
                    else "HA Group Updated Successfully"}
        if cmd == "group_delete":
            self.groups = []
            return {"ok": True, "message": "HA Group Deleted"}
        if cmd == "switchover":
            return {"ok": False, "error": "no HA group configured"}
        if cmd == "resync":
            return {"ok": True, "message": "resync started"}
        return {"ok": False, "error": f"unknown command {cmd!r}"}

    def commands(self) -> list[str]:
        return [r["cmd"] for r in self.requests]


def _form(group_dict: dict) -> dict:
    form = {k: v for k, v in group_dict.items() if k != "monitor"}
    form["monitors"] = [(m["interface"], m["floating_ip"]) for m in group_dict["monitor"]]
    return form


@pytest.fixture
def daemon():
    fake = FakeDaemon()
    try:
        yield fake
    finally:
        fake.close()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def web(daemon, clock) -> WebApi:
    def ask(cmd, **args):
        return control.request(daemon.name, cmd, timeout=2.0, **args)
    return WebApi(ask, lambda: VIEW, lambda: PASSWORD_HASH, hostname="fw1", clock=clock)


def req(method: str, path: str, body=None, *, cookie: str | None = None, csrf: str | None = None,
        content_type: str = "application/json", client: str = "192.0.2.10") -> ApiRequest:
    headers = {"Host": "fw1:8443"}
    if cookie:
        headers["Cookie"] = f"{auth.COOKIE_NAME}={cookie}"
    if csrf is not None:
        headers[auth.CSRF_HEADER] = csrf
    if body is not None:
        headers["Content-Type"] = content_type
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else (body or b"")
    return ApiRequest(method, path, headers, data, client)


def cookie_of(response) -> str:
    header = dict(response.headers)["Set-Cookie"]
    return header.split(";", 1)[0].split("=", 1)[1]


def login(web: WebApi) -> tuple[str, str]:
    response = web.handle(req("POST", "/api/login", {"password": PASSWORD}))
    assert response.status == 200, response.body
    return cookie_of(response), response.body["csrf_token"]


# ---- login and sessions -----------------------------------------------------------------


@pytest.mark.parametrize("method, path", [(m, p.replace("{id}", "1")) for m, p in ROUTES
                                          if p not in ("/api/login", "/api/session", "/api/openapi.json")])
def test_every_route_but_login_needs_a_session(web, daemon, method, path):
    response = web.handle(req(method, path, {} if method != "GET" else None))
    assert response.status == 401 and response.body["ok"] is False
    assert daemon.requests == []  # refused before the daemon hears of it


def test_login_sets_a_strict_cookie_and_gives_the_csrf_token(web):
    response = web.handle(req("POST", "/api/login", {"password": PASSWORD}))
    assert response.status == 200 and response.body["hostname"] == "fw1"
    cookie = dict(response.headers)["Set-Cookie"]
    for attribute in ("Secure", "HttpOnly", "SameSite=Strict", "Path=/"):
        assert attribute in cookie
    token = cookie_of(response)
    session = web.handle(req("GET", "/api/session", cookie=token))
    assert session.body["authenticated"] and session.body["csrf_token"] == response.body["csrf_token"]
    assert web.handle(req("GET", "/api/status", cookie=token)).status == 200


def test_wrong_password_is_refused_then_throttled(web):
    for _ in range(auth.FAILURES_BEFORE_LOCK):
        assert web.handle(req("POST", "/api/login", {"password": "guess"})).status == 401
    throttled = web.handle(req("POST", "/api/login", {"password": PASSWORD}))
    assert throttled.status == 429 and "Retry-After" in dict(throttled.headers)
    # another client is not locked out by this one's guesses
    assert web.handle(req("POST", "/api/login", {"password": PASSWORD}, client="192.0.2.11")).status == 200
    assert web.counters["login_failed"] == auth.FAILURES_BEFORE_LOCK


def test_login_needs_a_json_body(web):
    # a cross-site HTML form can only send form encodings: refused before any password check
    response = web.handle(req("POST", "/api/login", b"password=x",
                              content_type="application/x-www-form-urlencoded"))
    assert response.status == 400 and web.counters["bad_requests"] == 1


def test_no_password_set_explains_how_to_set_one(daemon, clock):
    web = WebApi(lambda cmd, **a: {}, lambda: VIEW, lambda: "", clock=clock)
    response = web.handle(req("POST", "/api/login", {"password": "anything"}))
    assert response.status == 403 and "hasync web passwd" in response.body["error"]
    assert web.handle(req("GET", "/api/session")).body["password_set"] is False


def test_logout_ends_the_session(web):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/logout", {}, cookie=cookie, csrf=csrf))
    assert response.status == 200 and "Max-Age=0" in dict(response.headers)["Set-Cookie"]
    assert web.handle(req("GET", "/api/status", cookie=cookie)).status == 401


def test_login_replaces_an_existing_session(web):
    old_cookie, _ = login(web)
    response = web.handle(req("POST", "/api/login", {"password": PASSWORD}, cookie=old_cookie))
    assert cookie_of(response) != old_cookie
    assert web.handle(req("GET", "/api/status", cookie=old_cookie)).status == 401


def test_idle_session_expires(web, clock):
    cookie, _ = login(web)
    clock.now += auth.IDLE_TIMEOUT_S - 1
    assert web.handle(req("GET", "/api/status", cookie=cookie)).status == 200  # restarts the idle timer
    clock.now += auth.IDLE_TIMEOUT_S + 1
    assert web.handle(req("GET", "/api/status", cookie=cookie)).status == 401


# ---- CSRF -------------------------------------------------------------------------------


@pytest.mark.parametrize("csrf", [None, "", "wrong-token"])
def test_state_changes_need_the_sessions_csrf_token(web, daemon, csrf):
    cookie, _ = login(web)
    response = web.handle(req("POST", "/api/global", {"status": "enable"}, cookie=cookie, csrf=csrf))
    assert response.status == 403 and "CSRF" in response.body["error"]
    assert "enable" not in daemon.commands()


def test_another_sessions_csrf_token_is_refused(web, daemon):
    cookie, _ = login(web)
    _, other_csrf = login(web)
    response = web.handle(req("POST", "/api/switchover", {}, cookie=cookie, csrf=other_csrf))
    assert response.status == 403 and "switchover" not in daemon.commands()


def test_global_settings_update_with_the_token(web, daemon):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/global", {"status": "enable"}, cookie=cookie, csrf=csrf))
    assert response.status == 200 and response.body["message"] == "HA enabled"
    assert daemon.enabled
    assert web.handle(req("GET", "/api/global", cookie=cookie)).body["status"] == "enable"
    bad = web.handle(req("POST", "/api/global", {"status": "maybe"}, cookie=cookie, csrf=csrf))
    assert bad.status == 422 and bad.body["field"] == "global.status"


# ---- groups -----------------------------------------------------------------------------

SEED_FORM = {"state": "master", "ha_link": "lan2", "peer_address": "198.51.100.2",
             "peer_mask": "255.255.255.252",
             "monitors": [{"interface": "wan1", "floating_ip": "203.0.113.1"},
                          {"interface": "lan1", "floating_ip": "192.0.2.1/24"}]}


def test_add_group_answers_the_seeds_message_and_shows_details(web, daemon):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/groups", SEED_FORM, cookie=cookie, csrf=csrf))
    assert response.status == 200 and response.body["message"] == "HA Group Added Successfully"
    sent = daemon.requests[-1]
    assert sent["cmd"] == "group_add"
    # the form's bare floating IP got the interface's prefix
    assert sent["fields"]["monitors"] == [["wan1", "203.0.113.1/24"], ["lan1", "192.0.2.1/24"]]
    details = web.handle(req("GET", "/api/groups/1", cookie=cookie))
    assert details.body["group"]["peer_mask"] == 30 and details.body["group"]["ha_link"] == "lan2"
    assert web.handle(req("GET", "/api/groups/7", cookie=cookie)).status == 404


@pytest.mark.parametrize("change, field", [
    ({"peer_address": "198.51.100.300"}, "group[0].peer_address"),
    ({"peer_mask": "255.0.255.0"}, "group[0].peer_mask"),
    ({"ha_link": "wan1"}, "group[0].monitor[0].interface"),
    ({"monitors": [{"interface": "lan1", "floating_ip": "192.0.2.0/24"}]}, "group[0].monitor[0].floating_ip"),
    ({"monitors": []}, "group[0].monitor"),
    ({"state": "primary"}, "group[0].state"),
    ({"priority": "high"}, "group[0].priority"),
])
def test_validation_error_passes_the_field_through_and_saves_nothing(web, daemon, change, field):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/groups", {**SEED_FORM, **change}, cookie=cookie, csrf=csrf))
    assert response.status == 422
    assert response.body["field"] == field and response.body["error"].startswith(field + ": ")
    assert daemon.groups == []


def test_edit_changes_one_field_of_the_group_named_by_the_path(web, daemon):
    cookie, csrf = login(web)
    web.handle(req("POST", "/api/groups", SEED_FORM, cookie=cookie, csrf=csrf))
    response = web.handle(req("PUT", "/api/groups/1", {"priority": "200", "id": 9}, cookie=cookie, csrf=csrf))
    assert response.status == 200 and response.body["message"] == "HA Group Updated Successfully"
    assert daemon.requests[-1]["fields"]["id"] == 1  # the body cannot move the group
    assert daemon.groups[0]["priority"] == 200 and daemon.groups[0]["ha_link"] == "lan2"
    deleted = web.handle(req("DELETE", "/api/groups/1", cookie=cookie, csrf=csrf))
    assert deleted.status == 200 and daemon.requests[-1] == {"cmd": "group_delete", "id": 1}


def test_refused_operation_is_a_conflict(web):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/switchover", {}, cookie=cookie, csrf=csrf))
    assert response.status == 409 and response.body["error"] == "no HA group configured"
    resync = web.handle(req("POST", "/api/resync", {"config": True}, cookie=cookie, csrf=csrf))
    assert resync.status == 200


def test_interfaces_come_from_the_view_without_loopback(web):
    cookie, _ = login(web)
    rows = web.handle(req("GET", "/api/interfaces", cookie=cookie)).body["interfaces"]
    assert [r["name"] for r in rows] == ["lan1", "lan2", "wan1"]
    assert rows[1]["addresses"] == ["198.51.100.1/30"]


def test_daemon_not_answering_is_503(clock):
    def ask(cmd, **args):
        return control.request(f"@hsx-web-nobody-{secrets.token_hex(6)}", cmd, timeout=1.0)
    web = WebApi(ask, lambda: VIEW, lambda: PASSWORD_HASH, clock=clock)
    cookie, _ = login(web)
    response = web.handle(req("GET", "/api/status", cookie=cookie))
    assert response.status == 503 and "not answering" in response.body["error"]


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2", json.dumps([1, 2]).encode(),
                                  json.dumps({"monitors": "lan1"}).encode(),
                                  json.dumps({"monitors": [{"interface": 1, "floating_ip": "x"}]}).encode(),
                                  json.dumps({"state": ["master"]}).encode()])
def test_malformed_bodies_are_400_and_counted(web, daemon, body):
    cookie, csrf = login(web)
    response = web.handle(req("POST", "/api/groups", body, cookie=cookie, csrf=csrf))
    assert response.status == 400 and web.counters["bad_requests"] == 1
    assert "group_add" not in daemon.commands()


@settings(max_examples=150, deadline=None)
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "get", ""]),
       path=st.one_of(st.sampled_from([p.replace("{id}", "1") for _, p in ROUTES]), st.text(max_size=40)),
       body=st.binary(max_size=200), cookie=st.text(max_size=60), csrf=st.text(max_size=40),
       content_type=st.sampled_from(["application/json", "text/plain", "", "application/json; charset=x"]))
def test_any_request_gets_an_answer_never_an_exception(method, path, body, cookie, csrf, content_type):
    web = WebApi(lambda cmd, **a: {"ok": True}, lambda: VIEW, lambda: PASSWORD_HASH,
                 check_password=lambda p, h: False)
    headers = {"Cookie": cookie, auth.CSRF_HEADER: csrf, "Content-Type": content_type}
    response = web.handle(ApiRequest(method, path, headers, body, "192.0.2.10"))
    assert response.status in (200, 400, 401, 403, 404, 405, 429)
    json.loads(response.json_bytes())


def test_floating_prefix_completion():
    lan1 = VIEW["lan1"]
    assert complete_floating_prefix("192.0.2.1", lan1) == "192.0.2.1/24"
    assert complete_floating_prefix(" 192.0.2.1/25 ", lan1) == "192.0.2.1/25"  # given prefix kept
    assert complete_floating_prefix("203.0.113.1", lan1) == "203.0.113.1"  # not in any subnet: daemon says so
    assert complete_floating_prefix("nonsense", lan1) == "nonsense"


# ---- the OpenAPI document ---------------------------------------------------------------


def test_openapi_document_validates_and_describes_exactly_the_routes(web):
    validator = pytest.importorskip("openapi_spec_validator")
    document = web.handle(req("GET", "/api/openapi.json")).body
    validator.validate(document)
    described = {(method.upper(), path) for path, item in document["paths"].items() for method in item}
    assert described == set(ROUTES)
    assert document == openapi_document()


def test_every_listed_route_is_served(web, daemon):
    cookie, csrf = login(web)
    web.handle(req("POST", "/api/groups", SEED_FORM, cookie=cookie, csrf=csrf))
    for method, path in ROUTES:
        if path in ("/api/logout", "/api/groups/{id}") and method in ("POST", "DELETE"):
            continue  # would end the session or remove the group under the other checks
        response = web.handle(req(method, path.replace("{id}", "1"), {} if method != "GET" else None,
                                  cookie=cookie, csrf=csrf))
        assert response.status not in (404, 405), (method, path, response.body)
