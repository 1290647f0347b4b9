"""The systemd unit: shipped copy = documented copy, its settings, install-units, systemd-analyze verify."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from hasync import cli, config, units

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTED = ROOT / "config" / "hasync.service"


def directives(text: str) -> dict[str, list[str]]:
    """key -> values in order (unit files repeat keys), comments and sections dropped."""
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def test_the_packaged_unit_is_the_documented_one():
    assert units.unit_text() == DOCUMENTED.read_text()


def test_unit_settings():
    d = directives(units.unit_text())
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    # global --config comes before the subcommand in hasync's argv
    assert d["ExecStart"] == ["/usr/local/bin/hasync --config /etc/hasync/hasync.toml run"]
    args = cli.build_parser().parse_args(d["ExecStart"][0].split()[1:])
    assert args.cmd == "run" and args.config == "/etc/hasync/hasync.toml"
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["Restart"] == ["on-failure"]
    assert 1 <= float(d["WatchdogSec"][0]) <= 5
    assert set(d["CapabilityBoundingSet"][0].split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_NICE"}
    assert set(d["RestrictAddressFamilies"][0].split()) == {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK",
                                                           "AF_PACKET"}
    assert d["ProtectSystem"] == ["strict"] and "/etc/hasync" in d["ReadWritePaths"][0].split()
    for key in ("ProtectHome", "NoNewPrivileges", "PrivateTmp"):
        assert d[key] == ["yes"], key
    assert "RestrictRealtime" not in d  # it would forbid SCHED_FIFO (realtime_priority)


def write_config(tmp_path: Path, **sync) -> Path:
    config.write_key_file(tmp_path / "auth-1.key", config.generate_auth_key())
    doc = {"node": {"hostname": "fw1", "state_dir": "/srv/hasync-state"},
           "security": {"auth_key_id": 1, "auth_keys": {"1": "auth-1.key"}},
           "sync": {"enabled": True, **sync}}
    path = tmp_path / "hasync.toml"
    config.save(config.parse(doc, path=path), path)
    return path


def test_install_writes_unit_and_dropins(tmp_path: Path):
    nft_dir = tmp_path / "nftables.d"
    nft_dir.mkdir()
    cfg_path = write_config(tmp_path, replicated_paths=["/etc/nftables.conf", str(nft_dir),
                                                        "/etc/hasync-extra/*.rules", "/etc/hasync/x.conf"])
    dest = tmp_path / "system"
    written = units.install(dest, config_path=cfg_path, executable="/opt/hasync venv/bin/hasync")
    assert (dest / "hasync.service").read_text() == DOCUMENTED.read_text()
    assert oct((dest / "hasync.service").stat().st_mode & 0o777) == "0o644"
    exec_conf = (dest / "hasync.service.d" / "10-exec.conf").read_text()
    assert directives(exec_conf)["ExecStart"] == [
        "", f'"/opt/hasync venv/bin/hasync" --config {cfg_path} run']
    paths = directives((dest / "hasync.service.d" / "20-paths.conf").read_text())["ReadWritePaths"]
    # file -> its directory (atomic rename), directory -> itself, glob -> its fixed prefix;
    # /etc/hasync and /var/lib/hasync are already writable by the unit itself
    assert paths == ["-/etc", f"-{nft_dir}", "-/etc/hasync-extra", "-/srv/hasync-state", f"-{tmp_path}"]
    assert written == [dest / "hasync.service", dest / "hasync.service.d" / "10-exec.conf",
                       dest / "hasync.service.d" / "20-paths.conf"]


def test_default_install_needs_no_dropins_and_removes_stale_ones(tmp_path: Path, monkeypatch):
    default = tmp_path / "etc-hasync" / "hasync.toml"  # absent, like on a fresh machine
    monkeypatch.setattr(config, "DEFAULT_CONFIG_PATH", default)
    dest = tmp_path / "system"
    (dest / "hasync.service.d").mkdir(parents=True)
    (dest / "hasync.service.d" / "10-exec.conf").write_text("stale")
    (dest / "hasync.service.d" / "20-paths.conf").write_text("stale")
    written = units.install(dest, executable=units.UNIT_EXECUTABLE)
    assert written == [dest / "hasync.service"]
    assert list((dest / "hasync.service.d").iterdir()) == []


def test_install_refuses_an_invalid_config(tmp_path: Path, capsys):
    bad = tmp_path / "hasync.toml"
    bad.write_text("[node]\nhostnme = 'fw1'\n")
    rc = cli.main(["--config", str(bad), "install-units", "--dest", str(tmp_path / "system")])
    assert rc == 2
    assert "node.hostnme" in capsys.readouterr().err
    assert not (tmp_path / "system" / "hasync.service").exists()


def test_cli_install_units(tmp_path: Path, capsys):
    cfg_path = write_config(tmp_path, replicated_paths=["/etc/nftables.conf"])
    dest = tmp_path / "system"
    rc = cli.main(["--config", str(cfg_path), "install-units", "--dest", str(dest), "--executable", "/bin/true"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"wrote {dest / 'hasync.service'}" in out and "systemctl daemon-reload" in out
    assert (dest / "hasync.service.d" / "20-paths.conf").exists()


# ---- systemd-analyze verify: skipped only where the tool is missing ------------------------------

ANALYZE = shutil.which("systemd-analyze")
needs_analyze = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed "
                                                          "(Debian package `systemd`)")


def verify(unit_dir: Path) -> subprocess.CompletedProcess:
    # SYSTEMD_UNIT_PATH puts unit_dir first, so its drop-ins are read; the trailing ':'
    # keeps the default path for the targets the unit names
    env = {**os.environ, "SYSTEMD_UNIT_PATH": f"{unit_dir}:"}
    return subprocess.run([ANALYZE, "verify", "--man=no", str(unit_dir / "hasync.service")],
                          env=env, capture_output=True, text=True, timeout=60)


def real_executable() -> str:
    # ExecStart must name an existing executable for verify; the shipped path
    # /usr/local/bin/hasync may not exist on a development machine, so the exec drop-in
    # (which install-units writes in that case) points at the hasync being tested
    found = shutil.which("hasync") or shutil.which("true")
    assert found
    return found


@needs_analyze
def test_systemd_analyze_verifies_the_installed_unit(tmp_path: Path):
    cfg_path = write_config(tmp_path, replicated_paths=["/etc/nftables.conf"])
    dest = tmp_path / "system"
    units.install(dest, config_path=cfg_path, executable=real_executable())
    result = verify(dest)
    assert result.returncode == 0 and result.stderr == "", result.stderr


@needs_analyze
@pytest.mark.parametrize("mistake", ["Type=notifyy", "ProtectSystem=strictly",
                                     "RestrictAddressFamilies=AF_NOPE", "WatchdogSec=soon"])
def test_systemd_analyze_catches_a_broken_unit(tmp_path: Path, mistake: str):
    """The check above can fail: the same unit with one bad setting is reported.
    (verify ignores unknown capability names, hence the exact set in test_unit_settings.)"""
    dest = tmp_path / "system"
    units.install(dest, config_path=tmp_path / "none.toml", executable=real_executable())
    unit = dest / "hasync.service"
    key = mistake.split("=")[0]
    lines = [mistake if line.startswith(key + "=") else line for line in unit.read_text().splitlines()]
    unit.write_text("\n".join(lines) + "\n")
    result = verify(dest)
    assert result.returncode != 0 or result.stderr != ""
