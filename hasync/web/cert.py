"""The web page's TLS certificate: self-signed for the node's own hostname, made once.

Each node of the pair has its own hostname (a prerequisite of the seed: "each box
should have a different internet hostname for configuring certificates"), so each
gets its own certificate naming that host and the addresses it listens on. The
key is written 0600 before anything else can read it, and both files are kept
across restarts: a browser that accepted the certificate once keeps accepting it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
from pathlib import Path
from typing import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

VALID_DAYS = 3650  # an appliance certificate; the operator replaces it with a real one by path


def _write_private(path: Path, data: bytes) -> None:
    # created 0600 under a temporary name, then renamed: never readable by others, never half-written
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def make_self_signed(hostname: str, addresses: Iterable[str] = ()) -> tuple[bytes, bytes]:
    """(certificate PEM, private key PEM) naming `hostname` and `addresses` (SANs)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hostname),
                      x509.NameAttribute(NameOID.ORGANIZATION_NAME, "hasync")])
    alt_names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    for address in addresses:
        ip = ipaddress.ip_address(address)
        if not ip.is_unspecified:
            alt_names.append(x509.IPAddress(ip))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ensure_certificate(cert_file: Path, key_file: Path, hostname: str,
                       addresses: Iterable[str] = ()) -> bool:
    """Make the certificate and key unless both exist; True if they were made now."""
    if cert_file.exists() and key_file.exists():
        return False
    cert_pem, key_pem = make_self_signed(hostname, addresses)
    _write_private(key_file, key_pem)  # the key first: a cert without its key is useless
    cert_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cert_file.with_name(f".{cert_file.name}.tmp")
    tmp.write_bytes(cert_pem)
    os.chmod(tmp, 0o644)
    os.replace(tmp, cert_file)
    return True


def certificate_hostname(cert_file: Path) -> str:
    """The common name of a PEM certificate (for tests and `hasync web` diagnostics)."""
    cert = x509.load_pem_x509_certificate(cert_file.read_bytes())
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
