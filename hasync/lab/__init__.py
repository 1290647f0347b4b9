"""The lab: the two-firewall topology in network namespaces, fault injection, daemon configs.

See /work/shared/DESIGN.md ("The lab"). Everything runs against the real kernel;
every lab is recorded under /run/hasync/lab/<name>.json so it can be torn down
by name even after the process that built it is gone.
"""

from hasync.lab.faults import KINDS as FAULT_KINDS
from hasync.lab.faults import active_faults, fail, register_daemon_starter, restore
from hasync.lab.inspect import addresses_on, holder_of_floating_ips, link_state
from hasync.lab.keepalived import start_keepalived, write_keepalived_configs
from hasync.lab.nodeconfigs import write_hasync_configs
from hasync.lab.process import (LabCommandError, exec_argv, ip_batch, is_running, run, start_process,
                                stop_process)
from hasync.lab.state import ADDRESSES, FIREWALLS, NODES, Lab, list_labs, load, peer_of
from hasync.lab.topology import LabBuildError, build, lab_session, reap_orphans, teardown

__all__ = [
    "ADDRESSES", "FIREWALLS", "FAULT_KINDS", "NODES", "Lab", "LabBuildError", "LabCommandError",
    "active_faults", "addresses_on", "build", "exec_argv", "fail", "holder_of_floating_ips", "ip_batch",
    "is_running", "lab_session", "link_state", "list_labs", "load", "peer_of", "reap_orphans",
    "register_daemon_starter", "restore", "run", "start_keepalived", "start_process", "stop_process",
    "teardown", "write_hasync_configs", "write_keepalived_configs",
]
