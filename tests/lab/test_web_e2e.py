"""The High Availability web page end to end: the seed's Master and Backup steps in
headless Chromium against both lab nodes, and the HTTPS server's surface.

Both firewalls start with HA disabled and no [[group]]; the web page runs as the
daemon's child in each node's namespace. The browser is driven by Playwright in a
process started inside the node's namespace (`ip netns exec`), so it reaches the
node's web server at 127.0.0.1:8443 there. This file is also that process:
`python tests/lab/test_web_e2e.py drive ...` (see main()).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import secrets
import socket
import ssl
import sys
import time
import tomllib
from pathlib import Path

import tomli_w

PASSWORD = "lab admin password"
PORT = 8443
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]

# ===================================================================== the browser side


def drive(args: argparse.Namespace) -> dict:
    """The seed's steps on one node, then watch the HA icon. Raises on any mismatch."""
    from playwright.sync_api import expect, sync_playwright

    shots: list[str] = []
    seen: dict = {"node": args.node, "screenshots": shots}
    out = Path(args.out_dir)

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_context(ignore_https_errors=True,
                                       viewport={"width": 1180, "height": 1100}).new_page()
            page.set_default_timeout(15_000)

            def shot(name: str) -> None:
                path = out / f"{args.node}-{len(shots):02d}-{name}.png"
                page.screenshot(path=str(path), full_page=True)
                shots.append(str(path))

            icon, role = page.locator("#ha-icon"), page.locator("#ha-role")
            page.goto(f"https://127.0.0.1:{PORT}/")
            expect(page.locator("#login-view")).to_be_visible()
            page.fill("#login-password", "not the password")
            page.click("#login-submit")
            expect(page.locator("#login-error")).to_have_text("wrong password")
            shot("login")
            page.fill("#login-password", PASSWORD)
            page.click("#login-submit")
            expect(page.locator("#ha-view")).to_be_visible()
            expect(icon).to_have_class("ha-icon grey")  # HA disabled
            expect(page.locator("#global-status-text")).to_have_text("Disabled")
            shot("disabled")

            # Steps 1-2: Global Settings -> edit -> Config Status Enable -> Update
            page.click("#global-edit")
            expect(page.locator("#global-form")).to_be_visible()
            page.select_option("#config-status", "enable")
            page.click("#global-update")
            expect(page.locator("#global-status-text")).to_have_text("Enabled")
            expect(icon).to_have_class("ha-icon green")  # the seed: enabling turns the icon green

            # Steps 3-7: Add Group, HA State, HA Link Interface, Peer HA Link Address and Mask
            page.click("#add-group")
            expect(page.locator("#group-form-title")).to_have_text("Add HA Group")
            options = page.locator("#f-ha-link option").evaluate_all("os => os.map(o => o.value)")
            assert {"lan1", "lan2", "wan1"} <= set(options), options  # the node's real interfaces
            page.select_option("#f-state", args.role)
            page.select_option("#f-ha-link", "lan2")
            page.fill("#f-peer-address", args.peer)
            page.fill("#f-peer-mask", "255.0.255.0")  # a typo first: the error shows beside the field

            # Steps 8-11: WAN1 and its floating IP, Add Monitoring Interface, LAN1 and its floating IP
            rows = page.locator(".monitor-row")
            rows.nth(0).locator("select").select_option("wan1")
            rows.nth(0).locator("input").fill("203.0.113.1")
            page.click("#add-monitor")
            expect(rows).to_have_count(2)
            rows.nth(1).locator("select").select_option("lan1")
            rows.nth(1).locator("input").fill("192.0.2.1")
            page.click("#group-submit")
            mask_error = page.locator('[data-error-for="peer_mask"]')
            expect(mask_error).to_contain_text("not a valid mask")
            expect(page.locator("#f-peer-mask")).to_have_class("invalid")
            expect(page.locator("#info-message")).to_be_hidden()
            shot("validation-error")
            saved = page.evaluate("fetch('/api/groups').then(r => r.json())")
            assert saved["groups"] == [], saved  # nothing was saved

            page.fill("#f-peer-mask", "255.255.255.252")
            page.click("#group-submit")
            # Step 12: the Information Message and the HA Group Details
            expect(page.locator("#info-text")).to_have_text("HA Group Added Successfully")
            expect(page.locator("#group-details")).to_be_visible()
            details = page.locator("#group-details-rows").inner_text()
            for text in ("lan2", args.peer, "/30", "wan1 — Floating IP 203.0.113.1/24",
                         "lan1 — Floating IP 192.0.2.1/24"):
                assert text in details, (text, details)
            expect(page.locator("#group-form-card")).to_be_hidden()
            shot("group-added")

            # Step 13: the role word beside the icon (and green once the pair is whole)
            word = "Master" if args.role == "master" else "Backup"
            expect(role).to_have_text(word, timeout=20_000)
            Path(args.out_dir, f"{args.node}.configured").touch()
            expect(icon).to_have_class("ha-icon green", timeout=30_000)
            expect(role).to_have_text(word)
            seen["green_role"] = role.inner_text()
            shot("green")
            Path(args.out_dir, f"{args.node}.green").touch()  # the test crashes the peer only after this

            if args.watch_red_after:
                # the peer is crashed by the test: the icon turns red with the reasons, live
                flag = Path(args.watch_red_after)
                deadline = time.monotonic() + 30
                while not flag.exists():
                    assert time.monotonic() < deadline, "the test never crashed the peer"
                    time.sleep(0.05)
                expect(icon).to_have_class("ha-icon red", timeout=15_000)
                expect(page.locator("#reasons-box")).to_be_visible()
                seen["red_reasons"] = page.locator("#reasons li").all_inner_texts()
                seen["red_role"] = role.inner_text()
                shot("red")

                # Switchover asks first; cancelling leaves everything as it was
                page.click("#switchover")
                expect(page.locator("#confirm-dialog")).to_be_visible()
                expect(page.locator("#confirm-text")).to_contain_text("Master role")
                shot("confirm")
                page.click("#confirm-cancel")
                expect(page.locator("#confirm-dialog")).to_be_hidden()
                expect(role).to_have_text(word)
        finally:
            browser.close()
    return seen


def main() -> int:
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("drive")
    d.add_argument("--node", required=True)
    d.add_argument("--role", choices=["master", "backup"], required=True)
    d.add_argument("--peer", required=True)
    d.add_argument("--out-dir", required=True)
    d.add_argument("--watch-red-after", default="")
    args = parser.parse_args()
    result = drive(args)
    Path(args.out_dir, f"{args.node}.json").write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

# ===================================================================== the test side

import pytest  # noqa: E402  (the browser process above needs no pytest)

from hasync.lab import commands, faults, nsctl  # noqa: E402
from hasync.lab.nodeconfigs import write_hasync_configs  # noqa: E402
from hasync.lab.process import is_running, start_process, stop_process, wait_exit  # noqa: E402
from hasync.web.password import hash_password  # noqa: E402

pytestmark = pytest.mark.lab


def _lan2_address(lab, fw: str) -> str:
    return lab.addresses[fw]["lan2"].split("/")[0]


def _write_web_configs(lab) -> None:
    """The lab's configs with HA disabled, no [[group]], and the web page on."""
    write_hasync_configs(lab, status="disable")
    password_hash = hash_password(PASSWORD)
    for fw, path in lab.configs.items():
        data = tomllib.loads(Path(path).read_text())
        data.pop("group")
        data["web"] = {"enabled": True, "bind": ["127.0.0.1", _lan2_address(lab, fw)], "port": PORT,
                       "password_hash": password_hash}
        Path(path).write_text(tomli_w.dumps(data))


def _wait_listening(lab, fw: str, timeout: float = 15.0) -> None:
    def probe() -> bool:
        try:
            socket.create_connection(("127.0.0.1", PORT), timeout=0.5).close()
            return True
        except OSError:
            return False

    deadline = time.monotonic() + timeout
    while not nsctl.in_netns(lab.ns(fw), probe):
        if time.monotonic() > deadline:
            log = (lab.node_dir(fw) / "hasync.log").read_text(errors="replace")[-2000:]
            raise TimeoutError(f"{fw}: the web page is not listening on {PORT}; log:\n{log}")
        time.sleep(0.1)


@pytest.fixture(scope="module")
def web_lab(module_lab_factory):
    pytest.importorskip("playwright")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing (Debian package chromium)")
    lab = module_lab_factory(tag=f"x-web-{secrets.token_hex(3)}")
    _write_web_configs(lab)
    commands.start_daemons(lab)
    for fw in ("fw1", "fw2"):
        _wait_listening(lab, fw)
    return lab


def _https(host: str, method: str, path: str, body: dict | None = None,
           headers: dict | None = None) -> tuple[int, dict, bytes, bytes]:
    """(status, headers, body, server certificate DER), certificate not verified (self-signed)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(host, PORT, timeout=5, context=ctx)
    try:
        data = json.dumps(body).encode() if body is not None else None
        all_headers = {"Content-Type": "application/json", **(headers or {})} if data else dict(headers or {})
        conn.request(method, path, body=data, headers=all_headers)
        response = conn.getresponse()
        cert = conn.sock.getpeercert(binary_form=True)
        return response.status, dict(response.getheaders()), response.read(), cert
    finally:
        conn.close()


def test_https_surface(web_lab):
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    lab = web_lab
    ns = lab.ns("fw1")
    lan2 = _lan2_address(lab, "fw1")
    status, headers, body, der = nsctl.in_netns(ns, _https, lan2, "GET", "/")
    assert status == 200 and b"High Availability" in body
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    cert = x509.load_der_x509_certificate(der)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "fw1"  # its own hostname
    key_file = Path(lab.node_dir("fw1")) / "state" / "web-key.pem"
    assert oct(key_file.stat().st_mode & 0o777) == "0o600"

    # only the configured addresses: not lan1's
    lan1 = lab.addresses["fw1"]["lan1"].split("/")[0]
    with pytest.raises(ConnectionRefusedError):
        nsctl.in_netns(ns, socket.create_connection, (lan1, PORT), 2)

    # plain HTTP on the TLS port is dropped and counted; the server carries on
    def plain_http() -> bytes:
        with socket.create_connection(("127.0.0.1", PORT), timeout=5) as s:
            s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            try:
                return s.recv(100)
            except ConnectionResetError:
                return b""
    assert b"200 OK" not in nsctl.in_netns(ns, plain_http)

    status, headers, body, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "GET", "/api/status")
    assert status == 401
    status, headers, body, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "POST", "/api/login",
                                              {"password": PASSWORD})
    assert status == 200
    cookie = headers["Set-Cookie"]
    assert all(flag in cookie for flag in ("Secure", "HttpOnly", "SameSite=Strict"))
    session = {"Cookie": cookie.split(";", 1)[0]}
    csrf = json.loads(body)["csrf_token"]
    status, _, body, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "GET", "/api/status", None, session)
    answer = json.loads(body)
    assert status == 200 and answer["icon"] == "grey" and answer["web"]["tls_failures"] >= 1
    # a state change without the CSRF token is refused; with it, accepted (and undone: the
    # browser test starts from HA disabled)
    status, _, _, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "POST", "/api/global", {"status": "enable"},
                                     session)
    assert status == 403 and nsctl.ask(lab, "fw1", "status")["enabled"] is False
    with_token = {**session, "X-CSRF-Token": csrf}
    for wanted in ("enable", "disable"):
        status, _, _, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "POST", "/api/global",
                                         {"status": wanted}, with_token)
        assert status == 200 and nsctl.ask(lab, "fw1", "status")["enabled"] is (wanted == "enable")
    status, _, body, _ = nsctl.in_netns(ns, _https, "127.0.0.1", "GET", "/api/openapi.json")
    assert status == 200 and json.loads(body)["openapi"].startswith("3.")


def _drive(lab, fw: str, role: str, out_dir: Path, watch_red_after: str = "") -> int:
    peer = _lan2_address(lab, "fw2" if fw == "fw1" else "fw1")
    argv = [sys.executable, __file__, "drive", "--node", fw, "--role", role, "--peer", peer,
            "--out-dir", str(out_dir)]
    if watch_red_after:
        argv += ["--watch-red-after", watch_red_after]
    return start_process(lab, fw, argv, f"browser-{fw}")


def _wait_done(lab, fw: str, pid: int, timeout: float) -> None:
    if not wait_exit(pid, timeout):
        stop_process(pid)
        raise TimeoutError(f"{fw}: the browser did not finish in {timeout} s")


def _browser_log(lab, fw: str) -> str:
    """What went wrong, for the assertion message: both browsers' and daemons' last words."""
    parts = []
    for node in ("fw1", "fw2"):
        for name in (f"browser-{node}", "hasync"):
            path = lab.node_dir(node) / f"{name}.log"
            if path.exists():
                parts.append(f"--- {node} {name}.log\n" + path.read_text(errors="replace")[-1500:])
        parts.append(f"--- {node} status: {nsctl.try_status(lab, node)}")
    return "\n".join(parts)


def _wait_marker(lab, marker: Path, pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not marker.exists():
        assert time.monotonic() < deadline, f"no {marker.name}\n" + _browser_log(lab, "fw1")
        assert is_running(pid), f"no {marker.name}\n" + _browser_log(lab, "fw1")
        time.sleep(0.1)


def test_seed_master_and_backup_steps_in_the_browser(web_lab, tmp_path):
    lab = web_lab
    crashed = tmp_path / "peer-crashed"
    pids = {}
    try:
        pids["fw1"] = _drive(lab, "fw1", "master", tmp_path, watch_red_after=str(crashed))
        _wait_marker(lab, tmp_path / "fw1.configured", pids["fw1"], 40)  # the Master first, as the seed orders
        pids["fw2"] = _drive(lab, "fw2", "backup", tmp_path)
        _wait_done(lab, "fw2", pids.pop("fw2"), 45)
        fw2 = tmp_path / "fw2.json"
        assert fw2.exists(), _browser_log(lab, "fw2")
        _wait_marker(lab, tmp_path / "fw1.green", pids["fw1"], 30)
        # the daemons agree with what the pages showed
        assert nsctl.ask(lab, "fw1", "status")["state"] == "MASTER"
        assert nsctl.ask(lab, "fw2", "status")["state"] == "BACKUP"
        faults.fail(lab, "fw2", "crash")
        crashed.touch()
        _wait_done(lab, "fw1", pids.pop("fw1"), 30)
        fw1 = tmp_path / "fw1.json"
        assert fw1.exists(), _browser_log(lab, "fw1")
    finally:
        for pid in pids.values():
            stop_process(pid)
    results = {fw: json.loads((tmp_path / f"{fw}.json").read_text()) for fw in ("fw1", "fw2")}
    assert results["fw1"]["green_role"] == "Master" and results["fw2"]["green_role"] == "Backup"
    assert results["fw1"]["red_role"] == "Master"
    assert any("peer" in r for r in results["fw1"]["red_reasons"]), results["fw1"]["red_reasons"]
    for fw in ("fw1", "fw2"):
        for path in results[fw]["screenshots"]:
            assert Path(path).stat().st_size > 5000
            print(f"screenshot {fw}: {path}")
