"""The wheel: built from the sources, installed in a fresh venv, the `hasync` command works.

The dependencies resolve from the environment running the tests (a .pth file in the fresh
venv names its site-packages; --system-site-packages would name the base interpreter's,
which lacks them when the tests run from a venv), the wheel is installed with --no-deps and
no index, so only the build backend may come from PyPI.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import hasync
from hasync import cli

pytestmark = pytest.mark.packaging

ROOT = Path(__file__).resolve().parents[2]
SOURCES = ("pyproject.toml", "README.md", "hasync", "failover", "statesync", "bench")


def run(*argv: str, cwd: Path, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HASYNC_CONFIG", "HASYNC_SOCKET")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def venv(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("hsx-ops-packaging")
    src = base / "src"
    src.mkdir()
    # a copy, so the build leaves no build/ or egg-info behind in the checkout
    ignore = shutil.ignore_patterns("__pycache__", "*.egg-info", "build", "dist")
    for name in SOURCES:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=ignore)
        else:
            shutil.copy2(path, src / name)
    built = run(sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "-q", "-w", str(base / "dist"),
                cwd=base, timeout=240)
    assert built.returncode == 0, built.stdout + built.stderr
    wheels = list((base / "dist").glob("hasync-*.whl"))
    assert len(wheels) == 1
    env_dir = base / "venv"
    made = run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(env_dir), cwd=base)
    assert made.returncode == 0, made.stderr
    site = Path(run(str(env_dir / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                    cwd=base).stdout.strip())
    outer = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    # after the wheel's own path, so the wheel (not an editable checkout) is what imports
    (site / "zz-outer-env.pth").write_text("".join(f"{p}\n" for p in sorted(outer)))
    # the outer pip installs into the venv (the venv has no pip of its own: faster to make)
    installed = run(sys.executable, "-m", "pip", "--python", str(env_dir / "bin" / "python"), "install",
                    "--no-deps", "--no-index", "-q", str(wheels[0]), cwd=base, timeout=120)
    assert installed.returncode == 0, installed.stdout + installed.stderr
    return env_dir


def test_the_installed_package_is_the_wheel(venv: Path):
    found = run(str(venv / "bin" / "python"), "-c", "import hasync; print(hasync.__file__)", cwd=venv)
    assert found.returncode == 0, found.stderr
    assert found.stdout.strip().startswith(str(venv))  # not the checkout, not an editable install


def test_version(venv: Path):
    result = run(str(venv / "bin" / "hasync"), "--version", cwd=venv)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"hasync {hasync.__version__}"


def subcommands() -> list[tuple[str, ...]]:
    """Every command path of the parser: ("run",), ("group", "add"), ..."""
    import argparse

    out: list[tuple[str, ...]] = []

    def walk(parser: argparse.ArgumentParser, prefix: tuple[str, ...]) -> None:
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    out.append(prefix + (name,))
                    walk(child, prefix + (name,))

    walk(cli.build_parser(), ())
    return out


def test_help_names_every_command_and_each_help_works(venv: Path):
    exe = str(venv / "bin" / "hasync")
    top = run(exe, "--help", cwd=venv)
    assert top.returncode == 0, top.stderr
    commands = subcommands()
    assert ("install-units",) in commands and ("run",) in commands
    for path in commands:
        if len(path) == 1:
            assert f"    {path[0]} " in top.stdout, f"{path[0]} missing from hasync --help"
        result = run(exe, *path, "--help", cwd=venv)
        assert result.returncode == 0, f"hasync {' '.join(path)} --help: {result.stderr}"
        assert result.stdout.startswith("usage: hasync " + " ".join(path))


def test_install_units_from_the_wheel(venv: Path, tmp_path: Path):
    dest = tmp_path / "system"
    result = run(str(venv / "bin" / "hasync"), "--config", str(tmp_path / "absent.toml"), "install-units",
                 "--dest", str(dest), cwd=venv)
    assert result.returncode == 0, result.stderr
    assert (dest / "hasync.service").read_text() == (ROOT / "config" / "hasync.service").read_text()
    exec_conf = (dest / "hasync.service.d" / "10-exec.conf").read_text()
    assert f"ExecStart={venv / 'bin' / 'hasync'} --config {tmp_path / 'absent.toml'} run" in exec_conf
