"""hasync: active/passive high availability for Linux firewalls.

The command, the daemon's process shell, the node config and the lab live here;
the failover core is in `failover`, replication in `statesync`.
"""

__version__ = "0.1.0"
