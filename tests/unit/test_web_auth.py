"""Sessions, CSRF, login throttling, password hashes and the certificate of the web page."""

from __future__ import annotations

import ipaddress
import stat

from cryptography import x509
from hypothesis import given, settings, strategies as st

from hasync.web import auth
from hasync.web.cert import certificate_hostname, ensure_certificate
from hasync.web.password import hash_password, parse_hash, verify_password


def test_sessions_are_unique_and_bounded():
    store = auth.SessionStore(max_sessions=3)
    sessions = [store.create(float(i)) for i in range(5)]
    assert len({s.token for s in sessions}) == 5 and len({s.csrf for s in sessions}) == 5
    assert len(store) == 3
    assert store.get(sessions[0].token, 5.0) is None  # the oldest went first
    assert store.get(sessions[4].token, 5.0) is sessions[4]


def test_session_absolute_age_limit_holds_even_when_active():
    store = auth.SessionStore(idle_timeout_s=100, max_age_s=250)
    s = store.create(0.0)
    for t in (90.0, 180.0, 249.0):
        assert store.get(s.token, t) is s
    assert store.get(s.token, 251.0) is None


def test_csrf_check():
    s = auth.SessionStore().create(0.0)
    assert auth.csrf_ok(s, s.csrf)
    assert not auth.csrf_ok(s, None) and not auth.csrf_ok(s, "") and not auth.csrf_ok(s, s.csrf + "x")


@given(st.text(max_size=200))
def test_cookie_header_parsing_never_raises(header):
    token = auth.token_from_cookies(header)
    assert token is None or isinstance(token, str)


def test_cookie_found_among_others():
    assert auth.token_from_cookies(f"a=1; {auth.COOKIE_NAME}=abc_-9; b=2") == "abc_-9"
    assert auth.token_from_cookies("a=1") is None


def test_throttle_locks_after_failures_and_unlocks_later():
    t = auth.LoginThrottle(failures=3, window_s=60, lock_s=30)
    t.failed("c", 0.0)
    t.failed("c", 70.0)  # the first fell out of the window
    t.failed("c", 71.0)
    assert t.wait_s("c", 71.0) == 0.0
    t.failed("c", 72.0)
    assert t.wait_s("c", 72.0) == 30.0 and t.wait_s("c", 102.5) == 0.0
    assert t.wait_s("other", 72.0) == 0.0
    t.succeeded("c")
    assert t.wait_s("c", 73.0) == 0.0


def test_password_hash_round_trip_and_salting():
    a, b = hash_password("same password"), hash_password("same password")
    assert a != b  # salted
    assert verify_password("same password", a) and verify_password("same password", b)
    assert not verify_password("same passwor", a) and not verify_password("", a)
    parsed = parse_hash(a)
    assert parsed.log2_n >= 14 and len(parsed.salt) == 16


@settings(max_examples=60, deadline=None)
@given(password=st.text(max_size=30), stored=st.text(max_size=80))
def test_verify_never_raises_on_garbage(password, stored):
    assert verify_password(password, stored) in (True, False)
    assert not verify_password(password, "scrypt$" + stored)


def test_certificate_made_once_with_private_key(tmp_path):
    cert, key = tmp_path / "state" / "web-cert.pem", tmp_path / "state" / "web-key.pem"
    assert ensure_certificate(cert, key, "fw1", ["198.51.100.1", "0.0.0.0"])
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert certificate_hostname(cert) == "fw1"
    loaded = x509.load_pem_x509_certificate(cert.read_bytes())
    sans = loaded.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["fw1"]
    assert sans.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("198.51.100.1")]
    before = cert.read_bytes()
    assert not ensure_certificate(cert, key, "fw1")  # kept: a browser's exception stays valid
    assert cert.read_bytes() == before
