"""The admin password: scrypt hashes in one self-describing text field.

Format: `scrypt$<log2 n>$<r>$<p>$<salt b64>$<hash b64>`, so the cost can be
raised later while old hashes still verify. scrypt is memory-hard (hashlib's
OpenSSL binding; 16 MiB per check at n=2^14, r=8), which is what slows an
offline guesser of a stolen config file down.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import secrets
from dataclasses import dataclass

SCHEME = "scrypt"
LOG2_N = 14
R = 8
P = 1
SALT_BYTES = 16
HASH_BYTES = 32
MAX_PASSWORD_BYTES = 1024  # scrypt would take more, but a login form never needs it


class PasswordHashError(ValueError):
    """A stored hash that is not in our format."""


@dataclass(frozen=True)
class ParsedHash:
    log2_n: int
    r: int
    p: int
    salt: bytes
    digest: bytes


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


def _scrypt(password: str, salt: bytes, log2_n: int, r: int, p: int, length: int) -> bytes:
    n = 1 << log2_n
    # OpenSSL refuses by default past 32 MiB; allow what these parameters need (128*n*r) plus slack
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, dklen=length,
                          maxmem=128 * n * r * (p + 1) + (1 << 20))


def hash_password(password: str) -> str:
    if not password:
        raise ValueError("the password is empty")
    if len(password.encode()) > MAX_PASSWORD_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSWORD_BYTES} bytes")
    salt = secrets.token_bytes(SALT_BYTES)
    digest = _scrypt(password, salt, LOG2_N, R, P, HASH_BYTES)
    return f"{SCHEME}${LOG2_N}${R}${P}${_b64(salt)}${_b64(digest)}"


def parse_hash(text: str) -> ParsedHash:
    parts = text.split("$")
    if len(parts) != 6 or parts[0] != SCHEME:
        raise PasswordHashError("not a password hash of the form scrypt$LOG2N$R$P$SALT$HASH")
    try:
        log2_n, r, p = int(parts[1]), int(parts[2]), int(parts[3])
        salt, digest = _unb64(parts[4]), _unb64(parts[5])
    except ValueError:
        raise PasswordHashError("password hash has a malformed number or base64 field") from None
    # bounds keep a tampered file from making every login allocate gigabytes
    if not (10 <= log2_n <= 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise PasswordHashError("password hash cost parameters are out of range")
    if len(salt) < 8 or len(digest) < 16:
        raise PasswordHashError("password hash salt or digest is too short")
    return ParsedHash(log2_n, r, p, salt, digest)


def verify_password(password: str, stored: str) -> bool:
    """True if `password` matches `stored`; False for any malformed input (never raises)."""
    if not stored or not isinstance(password, str) or not password:
        return False
    if len(password.encode(errors="surrogatepass")) > MAX_PASSWORD_BYTES:
        return False
    try:
        parsed = parse_hash(stored)
        candidate = _scrypt(password, parsed.salt, parsed.log2_n, parsed.r, parsed.p, len(parsed.digest))
    except (PasswordHashError, ValueError, UnicodeEncodeError):
        return False
    return hmac.compare_digest(candidate, parsed.digest)
