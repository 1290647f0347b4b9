"""pytest fixtures for lab tests: labs with unique names that are always torn down.

Imported by tests/lab/conftest.py. A lab built here records this process as its
owner, so a run killed before its teardown is reaped by the next run's
`reap_orphan_labs` (labs of live owners — parallel runs — are left alone).
"""

from __future__ import annotations

import os
import secrets
import shutil

import pytest

from hasync.lab.state import Lab
from hasync.lab.topology import build, reap_orphans, teardown


class LabFactory:
    """`factory(name=None, tag=None) -> Lab`; `close()` tears down every lab it built."""

    def __init__(self) -> None:
        self._names: list[str] = []

    def __call__(self, name: str | None = None, tag: str | None = None) -> Lab:
        # "hsx-" + a random suffix: never collides with parallel runs' namespaces
        tag = tag or f"x-{secrets.token_hex(3)}"
        name = name or f"t-{tag}"
        self._names.append(name)
        return build(name, tag, owner_pid=os.getpid())

    def close(self) -> None:
        errors = []
        for name in reversed(self._names):
            try:
                teardown(name)
            except Exception as exc:  # keep tearing down the others
                errors.append(f"{name}: {exc}")
        self._names.clear()
        if errors:
            raise RuntimeError("lab teardown failed: " + "; ".join(errors))


def _require_lab_host() -> None:
    if os.geteuid() != 0:
        pytest.skip("lab tests need root (network namespaces)")
    if shutil.which("ip") is None or shutil.which("nft") is None:
        pytest.skip("lab tests need iproute2 and nftables")


@pytest.fixture(scope="session", autouse=True)
def reap_orphan_labs():
    """Tear down labs left by earlier runs that died before their teardown."""
    if os.geteuid() == 0:
        reap_orphans()
    yield


@pytest.fixture
def lab_factory():
    _require_lab_host()
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture(scope="module")
def module_lab_factory():
    """Like lab_factory, but the labs live for the whole test module (build once, test many)."""
    _require_lab_host()
    factory = LabFactory()
    try:
        yield factory
    finally:
        factory.close()
