"""Login sessions, CSRF tokens and login throttling for the web page. Pure: `now` is passed in.

A session is a random cookie value (secure, HttpOnly, SameSite=Strict) mapped to
its own CSRF token; every state-changing request must echo that token in the
X-CSRF-Token header. A cross-site page can neither read the token nor (with
SameSite=Strict) send the cookie, so a forged request fails twice over.
Sessions live in the web process's memory only: restarting it logs everyone out.
"""

from __future__ import annotations

import hmac
import secrets
import threading
from dataclasses import dataclass, field
from http.cookies import CookieError, SimpleCookie

COOKIE_NAME = "hasync_session"
CSRF_HEADER = "X-CSRF-Token"
IDLE_TIMEOUT_S = 30 * 60
MAX_AGE_S = 12 * 3600
MAX_SESSIONS = 64  # the oldest is dropped beyond this: a login flood cannot grow memory

FAILURES_BEFORE_LOCK = 5
FAILURE_WINDOW_S = 300.0
LOCK_S = 60.0
MAX_TRACKED_CLIENTS = 1024


@dataclass
class Session:
    token: str  # the cookie value
    csrf: str
    created: float
    last_seen: float


class SessionStore:
    """Thread-safe (the HTTP server runs a thread per connection)."""

    def __init__(self, idle_timeout_s: float = IDLE_TIMEOUT_S, max_age_s: float = MAX_AGE_S,
                 max_sessions: int = MAX_SESSIONS):
        self.idle_timeout_s = idle_timeout_s
        self.max_age_s = max_age_s
        self.max_sessions = max_sessions
        self._sessions: dict[str, Session] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sessions)

    def create(self, now: float) -> Session:
        session = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), now, now)
        with self._lock:
            self._expire(now)
            while len(self._sessions) >= self.max_sessions:
                oldest = min(self._sessions.values(), key=lambda s: s.last_seen)
                del self._sessions[oldest.token]
            self._sessions[session.token] = session
        return session

    def get(self, token: str | None, now: float) -> Session | None:
        """The live session for a cookie value (its idle timer restarts), else None."""
        if not token:
            return None
        with self._lock:
            session = self._sessions.get(token)
            if session is None:
                return None
            if self._expired(session, now):
                del self._sessions[token]
                return None
            session.last_seen = now
            return session

    def drop(self, token: str | None) -> None:
        with self._lock:
            self._sessions.pop(token or "", None)

    def _expired(self, s: Session, now: float) -> bool:
        return now - s.last_seen > self.idle_timeout_s or now - s.created > self.max_age_s

    def _expire(self, now: float) -> None:
        for token in [t for t, s in self._sessions.items() if self._expired(s, now)]:
            del self._sessions[token]


def csrf_ok(session: Session, presented: str | None) -> bool:
    return bool(presented) and hmac.compare_digest(session.csrf.encode(), presented.encode())


def session_cookie(token: str, max_age_s: int = int(MAX_AGE_S)) -> str:
    return f"{COOKIE_NAME}={token}; Path=/; Max-Age={max_age_s}; Secure; HttpOnly; SameSite=Strict"


def clearing_cookie() -> str:
    return f"{COOKIE_NAME}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Strict"


def token_from_cookies(header: str | None) -> str | None:
    """Our session cookie's value from a Cookie header; None if absent or unparsable."""
    if not header:
        return None
    jar = SimpleCookie()
    try:
        jar.load(header)
    except CookieError:
        return None
    morsel = jar.get(COOKIE_NAME)
    return morsel.value if morsel is not None and morsel.value else None


@dataclass
class _Failures:
    times: list[float] = field(default_factory=list)
    locked_until: float = 0.0


class LoginThrottle:
    """Per client address: after FAILURES_BEFORE_LOCK wrong passwords within
    FAILURE_WINDOW_S, refuse logins for LOCK_S (the scrypt cost alone is not enough
    against a guesser with time)."""

    def __init__(self, failures: int = FAILURES_BEFORE_LOCK, window_s: float = FAILURE_WINDOW_S,
                 lock_s: float = LOCK_S):
        self.failures = failures
        self.window_s = window_s
        self.lock_s = lock_s
        self._clients: dict[str, _Failures] = {}
        self._lock = threading.Lock()

    def wait_s(self, client: str, now: float) -> float:
        """Seconds until `client` may try again (0.0: now)."""
        with self._lock:
            entry = self._clients.get(client)
            return max(0.0, entry.locked_until - now) if entry else 0.0

    def failed(self, client: str, now: float) -> None:
        with self._lock:
            if client not in self._clients and len(self._clients) >= MAX_TRACKED_CLIENTS:
                # forget the client whose last failure is oldest
                stale = min(self._clients, key=lambda c: max(self._clients[c].times, default=0.0))
                del self._clients[stale]
            entry = self._clients.setdefault(client, _Failures())
            entry.times = [t for t in entry.times if now - t < self.window_s] + [now]
            if len(entry.times) >= self.failures:
                entry.locked_until = now + self.lock_s
                entry.times.clear()

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._clients.pop(client, None)
