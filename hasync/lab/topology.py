"""Build and tear down the lab: two firewalls, a client, a server, two switches.

```
  client eth0 ── lsw br0 ──┬── fw1 lan1    fw2 lan1
                           └─────────────────┘
  server eth0 ── wsw br0 ──┬── fw1 wan1    fw2 wan1
                           └─────────────────┘
  fw1 lan2 ──────── HA link (one veth pair) ──────── fw2 lan2
```
Each veth is created with both ends already in their namespaces (no name
clash in the root namespace), and each namespace is configured with one
`ip -b -` batch, so a build costs a couple of dozen forks.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path
from typing import Iterator

from hasync.lab import firewall
from hasync.lab.process import (LabCommandError, ip_batch, namespace_pids, pid_in_netns, run, run_argv,
                                stop_process)
from hasync.lab.state import FIREWALLS, ROLES, Lab, list_labs, load, new_lab, state_path

# (namespace role, interface) pairs joined by a veth; the switch-side ends are
# named after what they plug into, so `ip -n <lsw> link` reads like a patch panel.
CABLES = (
    (("lsw", "fw1"), ("fw1", "lan1")),
    (("lsw", "fw2"), ("fw2", "lan1")),
    (("lsw", "host"), ("client", "eth0")),
    (("wsw", "fw1"), ("fw1", "wan1")),
    (("wsw", "fw2"), ("fw2", "wan1")),
    (("wsw", "host"), ("server", "eth0")),
    (("fw1", "lan2"), ("fw2", "lan2")),
)

SWITCH_PORTS = {"lsw": ("fw1", "fw2", "host"), "wsw": ("fw1", "fw2", "host")}


class LabBuildError(RuntimeError):
    pass


def _existing_namespaces() -> set[str]:
    out = run_argv(["ip", "netns", "list"]).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


def _cable_commands(lab: Lab) -> list[str]:
    return [
        f"link add {a_if} netns {lab.ns(a_ns)} type veth peer name {b_if} netns {lab.ns(b_ns)}"
        for (a_ns, a_if), (b_ns, b_if) in CABLES
    ]


def _switch_commands(switch: str) -> list[str]:
    cmds = ["link set lo up", "link add br0 type bridge stp_state 0", "link set br0 up"]
    for port in SWITCH_PORTS[switch]:
        cmds += [f"link set {port} master br0", f"link set {port} up"]
    return cmds


def _host_commands(lab: Lab, host: str) -> list[str]:
    cmds = ["link set lo up", f"address add {lab.addresses[host]['eth0']} dev eth0", "link set eth0 up"]
    if host == "client":
        cmds.append(f"route add default via {lab.addresses['client_gateway']}")
    return cmds


def firewall_interface_commands(lab: Lab, fw: str) -> list[str]:
    """The fw's base addresses and links up (also used to "reboot" a crashed node)."""
    cmds = ["link set lo up"]
    for ifname, address in lab.addresses[fw].items():
        cmds += [f"address add {address} dev {ifname}", f"link set {ifname} up"]
    return cmds


def _prepare_workdir(lab: Lab) -> None:
    for node in ("fw1", "fw2", "client", "server"):
        lab.node_dir(node).mkdir(parents=True, exist_ok=True)
    for fw in FIREWALLS:
        for sub in ("etc", "state"):
            (lab.node_dir(fw) / sub).mkdir(parents=True, exist_ok=True)


def build(name: str = "lab", tag: str | None = None, *, owner_pid: int | None = None) -> Lab:
    """Create the whole lab and return its record (already saved).

    The state file is written before any namespace exists, so `teardown(name)`
    can always clean up; on any failure the partial lab is torn down and a
    LabBuildError says which step failed.
    """
    if state_path(name).exists():
        raise LabBuildError(f"lab {name!r} already exists ({state_path(name)}); teardown({name!r}) first")
    tag = tag or secrets.token_hex(3)
    lab = new_lab(name, tag, owner_pid=owner_pid)
    clash = set(lab.namespaces.values()) & _existing_namespaces()
    if clash:
        raise LabBuildError(f"namespaces already exist: {sorted(clash)}; pick another tag")
    lab.save()
    step = "workdir"
    try:
        _prepare_workdir(lab)
        step = "namespaces"
        ip_batch([f"netns add {lab.ns(role)}" for role in ROLES])
        step = "sysctls and rulesets"
        for role in ROLES:
            run(lab, role, firewall.sysctl_argv(firewall.NO_IPV6_SYSCTLS))
        for fw in FIREWALLS:
            # the ruleset first: it loads nf_conntrack, which owns nf_conntrack_tcp_loose
            run(lab, fw, ["nft", "-f", "-"], input=firewall.ruleset(lab.floating_ip("wan1")))
            run(lab, fw, firewall.sysctl_argv(firewall.FIREWALL_SYSCTLS))
        step = "cables"
        ip_batch(_cable_commands(lab))
        step = "switches"
        for switch in SWITCH_PORTS:
            ip_batch(_switch_commands(switch), netns=lab.ns(switch))
        step = "hosts and firewalls"
        for host in ("client", "server"):
            ip_batch(_host_commands(lab, host), netns=lab.ns(host))
        for fw in FIREWALLS:
            ip_batch(firewall_interface_commands(lab, fw), netns=lab.ns(fw))
    except BaseException as exc:
        teardown(name)
        if isinstance(exc, Exception):
            raise LabBuildError(f"building lab {name!r} failed at {step}: {exc}") from exc
        raise
    return lab


def _keep_logs(lab: Lab) -> None:
    """HASYNC_LAB_KEEP_LOGS=DIR: copy the lab's logs to DIR/<lab name> before they go (the
    daemons' logs explain a failed test after its namespaces are gone)."""
    keep = os.environ.get("HASYNC_LAB_KEEP_LOGS")
    if not keep:
        return
    for log in Path(lab.workdir).rglob("*.log"):
        target = Path(keep) / lab.name / log.relative_to(lab.workdir)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(log, target)


def teardown(name: "str | Lab") -> None:
    """Stop every recorded process, delete every namespace, remove workdir and state.

    Idempotent and silent about parts that are already gone; processes that
    are still inside the lab's namespaces (started by anyone) are stopped by
    PID too, since a namespace with a live process never really goes away.
    """
    if isinstance(name, Lab):
        name = name.name
    try:
        lab = load(name)
    except (FileNotFoundError, ValueError):
        state_path(name).unlink(missing_ok=True)
        return
    existing = _existing_namespaces()
    ours = [ns for ns in lab.namespaces.values() if ns in existing]
    for pid in set(lab.pids.values()):
        # recorded daemons first, gracefully (they remove their floating IPs on SIGTERM)
        if isinstance(pid, int) and pid > 0 and any(pid_in_netns(pid, ns) for ns in ours):
            stop_process(pid)
    for ns in ours:
        for pid in namespace_pids(ns):
            if pid != os.getpid():
                stop_process(pid, timeout=1.0)
    ip_batch([f"netns delete {ns}" for ns in ours], force=True)
    _keep_logs(lab)
    shutil.rmtree(lab.workdir, ignore_errors=True)
    state_path(name).unlink(missing_ok=True)


def reap_orphans() -> list[str]:
    """Tear down throw-away labs whose owning process has died; returns their names.

    Labs without an owner (built for an operator or a benchmark) are left alone,
    as are labs of owners still alive (other test runs in parallel).
    """
    reaped = []
    for name in list_labs():
        try:
            owner = load(name).owner_pid
        except (FileNotFoundError, ValueError):
            continue
        if owner is not None and owner != os.getpid() and not os.path.exists(f"/proc/{owner}"):
            teardown(name)
            reaped.append(name)
    return reaped


@contextlib.contextmanager
def lab_session(name: str = "lab", tag: str | None = None, *, owner_pid: int | None = None) -> Iterator[Lab]:
    """`with lab_session(...) as lab:` builds a lab and tears it down however the block ends."""
    lab = build(name, tag, owner_pid=owner_pid)
    try:
        yield lab
    finally:
        teardown(name)


__all__ = ["build", "teardown", "reap_orphans", "lab_session", "LabBuildError", "LabCommandError"]
