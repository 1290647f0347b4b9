"""What makes a lab namespace a stateful NAT firewall: sysctls and the nftables ruleset.

The ruleset is strict on purpose (forward policy drop, tcp_loose off): a session
whose conntrack state did not reach the Backup really breaks after a failover,
so the failover tests can fail.
"""

from __future__ import annotations

TABLE = "hasync_lab"

# Host-wide in every lab namespace: no IPv6, so no link-local addresses and no
# ND/MLD chatter from outside the documentation ranges.
NO_IPV6_SYSCTLS = {
    "net.ipv6.conf.all.disable_ipv6": 1,
    "net.ipv6.conf.default.disable_ipv6": 1,
}

FIREWALL_SYSCTLS = {
    "net.ipv4.ip_forward": 1,
    # answer ARP only for addresses on the asking interface, and source ARP
    # requests from that interface's own address: the floating IPs must be
    # reachable only through the node and port that hold them
    "net.ipv4.conf.all.arp_ignore": 1,
    "net.ipv4.conf.all.arp_announce": 2,
    "net.ipv4.conf.default.arp_ignore": 1,
    "net.ipv4.conf.default.arp_announce": 2,
    # mid-stream TCP packets without a conntrack entry are invalid (dropped):
    # only state synced to the Backup keeps a session alive across failover
    "net.netfilter.nf_conntrack_tcp_loose": 0,
}


def ruleset(wan_floating_ip: str) -> str:
    """The firewall's nftables ruleset (`nft -f -` input), one table only."""
    snat_to = wan_floating_ip.split("/")[0]
    return f"""\
table inet {TABLE} {{
    chain input {{
        type filter hook input priority filter; policy accept;
    }}
    chain forward {{
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        ct state invalid counter name "invalid_dropped" drop
        iifname "lan1" oifname "wan1" ct state new accept
        counter name "policy_dropped"
    }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        # forwarded LAN traffic only: the firewall's own packets (heartbeats on wan1)
        # keep their source, or the peer would drop them as coming from its own address
        iifname "lan1" oifname "wan1" snat ip to {snat_to}
    }}
    counter invalid_dropped {{ }}
    counter policy_dropped {{ }}
}}
"""


def sysctl_argv(settings: dict[str, int]) -> list[str]:
    return ["sysctl", "-q", "-w", *(f"{key}={value}" for key, value in settings.items())]
