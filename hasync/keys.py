"""`hasync keys generate`: a node's key files.

- the pair's heartbeat key (HMAC, shared: copy it to the peer), `auth-1.key`;
- this node's CURVE key pair for the sync link (`curve.key` public, `curve.key_secret`
  secret, zmq's certificate format): give the public key to the peer's
  `sync.peer_public_key`.
"""

from __future__ import annotations

from pathlib import Path

from hasync.config import generate_auth_key, write_key_file
from statesync import keys as curve_keys


def generate_node_keys(directory: Path, shared_auth_key: bool = True) -> dict[str, str]:
    directory.mkdir(parents=True, exist_ok=True)
    out: dict[str, str] = {}
    if shared_auth_key:
        out["heartbeat key (copy to the peer)"] = str(
            write_key_file(directory / "auth-1.key", generate_auth_key()))
    public_file, secret_file = curve_keys.generate(directory)
    out["CURVE secret key"] = str(secret_file)
    out["CURVE public key (the peer's sync.peer_public_key)"] = curve_keys.load_public(public_file).decode()
    return out
