"""`hasync install-units`: put the systemd unit (shipped in the wheel) where systemd finds it.

The unit itself is installed unchanged (it is the package's; local changes go into
drop-ins). What depends on this installation goes into `hasync.service.d/` drop-ins:
- `10-exec.conf`: ExecStart= with the `hasync` executable actually installed and the
  config path given, when they differ from the unit's /usr/local/bin/hasync and
  /etc/hasync/hasync.toml (a venv, another prefix);
- `20-paths.conf`: ReadWritePaths= for the replicated config paths and a state
  directory outside /var/lib/hasync, which ProtectSystem=strict would make read-only.
Nothing is started or enabled here: the output says which systemctl commands to run.
"""

from __future__ import annotations

import glob
import os
import shutil
import sys
import tempfile
from importlib import resources
from pathlib import Path

from hasync import config as cfgmod

UNIT_NAME = "hasync.service"
DEFAULT_DEST = Path("/etc/systemd/system")
UNIT_EXECUTABLE = "/usr/local/bin/hasync"  # what the shipped unit's ExecStart names
_EXEC_DROPIN = "10-exec.conf"
_PATHS_DROPIN = "20-paths.conf"
_GENERATED = "# written by `hasync install-units`; it rewrites this file, edit a drop-in of your own\n"


def unit_text() -> str:
    """The unit file as shipped in the package (hasync/data/hasync.service)."""
    return resources.files("hasync").joinpath("data", UNIT_NAME).read_text(encoding="utf-8")


def installed_executable() -> str:
    """The absolute path of the `hasync` command being run (or found on PATH)."""
    argv0 = sys.argv[0] if sys.argv and sys.argv[0] else ""
    if os.path.basename(argv0) == "hasync" and os.path.isfile(argv0):
        return os.path.abspath(argv0)
    found = shutil.which("hasync")
    return os.path.abspath(found) if found else UNIT_EXECUTABLE


def writable_dirs(cfg: cfgmod.NodeConfig) -> list[str]:
    """The directories hasync writes outside the unit's own (state, runtime, /etc/hasync)."""
    dirs: list[str] = []
    for path in cfg.sync.replicated_paths if cfg.sync.enabled else ():
        dirs.append(_directory_written(path))
    if cfg.state_dir != cfgmod.DEFAULT_STATE_DIR:
        dirs.append(str(cfg.state_dir))
    if cfg.control_socket.startswith("/"):
        dirs.append(str(Path(cfg.control_socket).parent))
    if cfg.path is not None:
        dirs.append(str(Path(cfg.path).absolute().parent))  # group add/edit rewrites the config
    covered = ("/etc/hasync", "/var/lib/hasync", "/run/hasync")
    out: list[str] = []
    for d in dirs:
        if not any(d == c or d.startswith(c + "/") for c in covered) and d not in out:
            out.append(d)
    return out


def _directory_written(path: str) -> str:
    # a glob: its fixed prefix directory; a directory: itself; a file: its parent,
    # since an atomic write (temp file + rename) needs the directory writable
    if glob.has_magic(path):
        fixed = []
        for part in Path(path).parts:
            if glob.has_magic(part):
                break
            fixed.append(part)
        return str(Path(*fixed))
    return path if os.path.isdir(path) else str(Path(path).parent)


def exec_dropin(executable: str, config_path: Path) -> str | None:
    if executable == UNIT_EXECUTABLE and config_path == cfgmod.DEFAULT_CONFIG_PATH:
        return None
    return (f"{_GENERATED}[Service]\nExecStart=\n"
            f"ExecStart={_quote(executable)} --config {_quote(str(config_path))} run\n")


def paths_dropin(dirs: list[str]) -> str | None:
    if not dirs:
        return None
    # '-': a path missing at start (not yet replicated) must not fail the service start
    return f"{_GENERATED}[Service]\n" + "".join(f"ReadWritePaths=-{_quote(d)}\n" for d in dirs)


def _quote(text: str) -> str:
    # systemd unit syntax: double quotes with C escapes; plain words need none
    if text and not any(c in text for c in ' \t"\'\\%$'):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%").replace("$", "$$")
    return f'"{escaped}"'


def install(dest: Path = DEFAULT_DEST, config_path: Path | None = None,
            executable: str | None = None) -> list[Path]:
    """Write the unit and its drop-ins into `dest`; returns the files written.

    The config (if it exists) is read only to learn the paths to make writable; an
    invalid one is an error (the daemon would refuse it anyway).
    """
    config_path = Path(config_path or cfgmod.DEFAULT_CONFIG_PATH).absolute()
    executable = executable or installed_executable()
    dirs = writable_dirs(cfgmod.load(config_path)) if config_path.exists() else []
    dropin_dir = dest / f"{UNIT_NAME}.d"
    written = [_write(dest / UNIT_NAME, unit_text())]
    for name, text in ((_EXEC_DROPIN, exec_dropin(executable, config_path)),
                       (_PATHS_DROPIN, paths_dropin(dirs))):
        target = dropin_dir / name
        if text is None:
            target.unlink(missing_ok=True)  # a stale one from an earlier install would mislead
        else:
            written.append(_write(target, text))
    return written


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
