"""CURVE key files of the sync channel.

Format: zmq's own certificate files (`zmq.auth.create_certificates`): `NAME.key`
holds the public key, `NAME.key_secret` the public and the secret key, both as
z85 text in ZPL sections, so `zmq.auth.load_certificate` and the czmq tools read
them. Both files are written 0600. A file holding just a 40-character z85 secret
key is accepted too (the public key is derived from it). The peer's public key is
pinned in the config as z85 text (`sync.peer_public_key`).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

Z85_KEY_LEN = 40


class KeyError_(ValueError):
    """A key file or key text that is not a usable CURVE key."""


def generate(directory: str | os.PathLike, name: str = "curve") -> tuple[Path, Path]:
    """Write a new key pair into `directory`; returns (public_path, secret_path)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    old_umask = os.umask(0o077)  # never a moment with the secret readable by others
    try:
        public_file, secret_file = zmq.auth.create_certificates(str(directory), name)
    finally:
        os.umask(old_umask)
    for path in (public_file, secret_file):
        os.chmod(path, 0o600)
    return Path(public_file), Path(secret_file)


def check_z85(text: str | bytes, what: str = "key") -> bytes:
    """A z85 CURVE key as bytes, or KeyError_ saying why not."""
    key = text.encode() if isinstance(text, str) else bytes(text)
    key = key.strip()
    if len(key) != Z85_KEY_LEN:
        raise KeyError_(f"{what}: a CURVE key is {Z85_KEY_LEN} z85 characters, got {len(key)}")
    try:
        zmq.utils.z85.decode(key)
    except (ValueError, KeyError, TypeError) as exc:
        raise KeyError_(f"{what}: not z85 text ({exc})") from None
    return key


def load_secret(path: str | os.PathLike) -> tuple[bytes, bytes]:
    """(public, secret) z85 keys from a secret certificate file or a raw z85 secret key file."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except OSError as exc:
        raise KeyError_(f"{path}: {exc.strerror}") from None
    if len(text.strip()) == Z85_KEY_LEN:
        secret = check_z85(text, str(path))
        return zmq.curve_public(secret), secret
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (ValueError, OSError) as exc:
        raise KeyError_(f"{path}: not a CURVE certificate ({exc})") from None
    if secret is None:
        raise KeyError_(f"{path}: holds no secret key (that is the public certificate)")
    check_z85(public, str(path))
    check_z85(secret, str(path))
    if zmq.curve_public(secret) != public:
        raise KeyError_(f"{path}: public and secret keys do not belong together")
    return public, secret


def load_public(path: str | os.PathLike) -> bytes:
    """The z85 public key from a public (or secret) certificate file."""
    public, _ = zmq.auth.load_certificate(Path(path))
    return check_z85(public, str(path))
