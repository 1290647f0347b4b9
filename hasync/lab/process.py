"""Running commands and long-lived processes inside the lab's namespaces.

Every process is started in its own session, so its PID is also its process
group id: stopping it by that PID also reaches the children it forked (the
hasync supervisor's workers, keepalived's VRRP child) and nothing else.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import time
from typing import Sequence

from hasync.lab.state import Lab


class LabCommandError(RuntimeError):
    """A lab command failed; the message carries the command and its stderr."""


def exec_argv(lab: Lab, node: str, argv: Sequence[str]) -> list[str]:
    """`argv` prefixed so that it runs inside `node`'s namespace."""
    return ["ip", "netns", "exec", lab.ns(node), *map(str, argv)]


def run_argv(argv: Sequence[str], *, input: str | None = None, check: bool = True,
             capture: bool = True) -> subprocess.CompletedProcess:
    """Run a command to completion; on failure raise with its stderr, not just a code."""
    result = subprocess.run(
        list(map(str, argv)),
        input=input,
        text=True,
        stdout=subprocess.PIPE if capture else None,
        stderr=subprocess.PIPE if capture else None,
    )
    if check and result.returncode != 0:
        detail = (result.stderr or result.stdout or "").strip()
        raise LabCommandError(f"{' '.join(map(str, argv))!r} exited {result.returncode}: {detail}")
    return result


def run(lab: Lab, node: str, argv: Sequence[str], check: bool = True, capture: bool = True,
        input: str | None = None) -> subprocess.CompletedProcess:
    return run_argv(exec_argv(lab, node, argv), input=input, check=check, capture=capture)


def ip_batch(commands: Sequence[str], *, netns: str | None = None, force: bool = False) -> None:
    """Run many `ip` commands in one fork (`ip -b -`), optionally inside a namespace.

    `force` (`-force`) keeps going past failing lines: teardown-style batches
    must undo what they can even when part of the lab is already gone.
    """
    if not commands:
        return
    argv = ["ip"]
    if netns:
        argv += ["-n", netns]
    if force:
        argv.append("-force")
    argv += ["-b", "-"]
    run_argv(argv, input="\n".join(commands) + "\n", check=not force)


def start_process(lab: Lab, node: str, argv: Sequence[str], log_name: str) -> int:
    """Start `argv` inside `node`'s namespace; output goes to workdir/<node>/<log_name>.log.

    Returns the PID and records nothing: the caller decides where it belongs
    (lab.pids[...] for daemons) so teardown can find it.
    """
    log_dir = lab.node_dir(node)
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / f"{log_name}.log", "ab") as log:
        proc = subprocess.Popen(
            exec_argv(lab, node, argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    # Popen keeps no reference we need; the child is reaped in stop_process (or by
    # subprocess's own cleanup of forgotten children).
    return proc.pid


def _reap(pid: int) -> bool:
    """Collect `pid` if it is our exited child; True if it is gone."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == pid
    except ChildProcessError:  # not our child (or already reaped): ask the kernel
        return not _alive(pid)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False


def is_running(pid: int) -> bool:
    return not _reap(pid)


def wait_exit(pid: int, timeout: float) -> bool:
    """Wait up to `timeout` seconds for `pid` to exit (pidfd: no polling loop); True if it did."""
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        _reap(pid)
        return True
    try:
        if _reap(pid):
            return True
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        poller.poll(max(0.0, timeout) * 1000)
        return _reap(pid)
    finally:
        os.close(pidfd)


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_group_gone(pgid: int, timeout: float) -> None:
    # SIGKILLed members of the group vanish within milliseconds, but only once
    # their parent (or init) reaps them; a short poll is the only portable wait.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.005)


def freeze(pid: int) -> None:
    """SIGSTOP `pid` and its process group: from now on it runs no code (a crash's first instant)."""
    _signal_group(pid, signal.SIGSTOP)
    try:
        os.kill(pid, signal.SIGSTOP)
    except ProcessLookupError:
        pass


def kill_now(pid: int) -> None:
    """SIGKILL `pid` and its process group (a crash: no clean-up handlers run), and reap."""
    _signal_group(pid, signal.SIGKILL)
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    wait_exit(pid, 1.0)
    _wait_group_gone(pid, 1.0)


def stop_process(pid: int, timeout: float = 3.0) -> bool:
    """SIGTERM `pid`, wait up to `timeout` s, then SIGKILL its group; True if it had to be killed.

    Only the leader gets SIGTERM (it shuts its own children down, as keepalived
    and the hasync supervisor do); the group SIGKILL afterwards catches stragglers.
    """
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        _reap(pid)
        _signal_group(pid, signal.SIGKILL)
        return False
    killed = not wait_exit(pid, timeout)
    _signal_group(pid, signal.SIGKILL)
    if killed:
        wait_exit(pid, 1.0)
    _wait_group_gone(pid, 1.0)
    return killed


def pid_in_netns(pid: int, netns: str) -> bool:
    """Whether `pid` lives in named namespace `netns`: a recorded PID may have been
    reused by an unrelated process since, and must not be signalled then."""
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino == os.stat(f"/run/netns/{netns}").st_ino
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False


def namespace_pids(netns: str) -> list[int]:
    """PIDs of every process still living in `netns` (`ip netns pids`)."""
    result = run_argv(["ip", "netns", "pids", netns], check=False)
    if result.returncode != 0:
        return []
    return [int(p) for p in result.stdout.split() if p.isdigit()]
