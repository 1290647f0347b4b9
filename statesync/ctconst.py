"""ctnetlink constants and precompiled layouts.

Numbers follow include/uapi/linux/netfilter/nfnetlink_conntrack.h,
nfnetlink_compat.h and nf_conntrack_common.h (checked against the installed
headers; CTA_TIMESTAMP_EVENT is newer than them). Values inside conntrack
attributes are big-endian; netlink headers are host order.
"""

import struct

# --- netlink / nfnetlink framing --------------------------------------------------
NETLINK_NETFILTER = 12
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x001
NLM_F_MULTI = 0x002
NLM_F_ACK = 0x004
NLM_F_DUMP = 0x300
NLM_F_REPLACE = 0x100
NLM_F_EXCL = 0x200
NLM_F_CREATE = 0x400
NLA_F_NESTED = 0x8000
NLA_TYPE_MASK = 0x3FFF

NFNL_SUBSYS_CTNETLINK = 1
NFNL_SUBSYS_CTNETLINK_EXP = 2
IPCTNL_MSG_CT_NEW = 0
IPCTNL_MSG_CT_GET = 1
IPCTNL_MSG_CT_DELETE = 2
IPCTNL_MSG_EXP_NEW = 0
IPCTNL_MSG_EXP_GET = 1
IPCTNL_MSG_EXP_DELETE = 2
CT_NEW = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW
CT_GET = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
CT_DELETE = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE
EXP_NEW = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_NEW
EXP_GET = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_GET
EXP_DELETE = (NFNL_SUBSYS_CTNETLINK_EXP << 8) | IPCTNL_MSG_EXP_DELETE

# multicast groups (enum nfnetlink_groups); bind() takes the bit 1 << (group - 1)
NFNLGRP_CONNTRACK_NEW = 1
NFNLGRP_CONNTRACK_UPDATE = 2
NFNLGRP_CONNTRACK_DESTROY = 3
NFNLGRP_CONNTRACK_EXP_NEW = 4
NFNLGRP_CONNTRACK_EXP_UPDATE = 5
NFNLGRP_CONNTRACK_EXP_DESTROY = 6


def group_bit(group: int) -> int:
    return 1 << (group - 1)


CT_EVENT_GROUPS = (
    group_bit(NFNLGRP_CONNTRACK_NEW)
    | group_bit(NFNLGRP_CONNTRACK_UPDATE)
    | group_bit(NFNLGRP_CONNTRACK_DESTROY)
)

# --- conntrack attributes (enum ctattr_type and the nested enums) -----------------
CTA_TUPLE_ORIG = 1
CTA_TUPLE_REPLY = 2
CTA_STATUS = 3
CTA_PROTOINFO = 4
CTA_HELP = 5
CTA_NAT_SRC = 6
CTA_TIMEOUT = 7
CTA_MARK = 8
CTA_COUNTERS_ORIG = 9
CTA_COUNTERS_REPLY = 10
CTA_USE = 11
CTA_ID = 12
CTA_NAT_DST = 13
CTA_TUPLE_MASTER = 14
CTA_SEQ_ADJ_ORIG = 15
CTA_SEQ_ADJ_REPLY = 16
CTA_SECMARK = 17
CTA_ZONE = 18
CTA_SECCTX = 19
CTA_TIMESTAMP = 20
CTA_MARK_MASK = 21
CTA_LABELS = 22
CTA_LABELS_MASK = 23
CTA_SYNPROXY = 24
CTA_FILTER = 25
CTA_STATUS_MASK = 26
CTA_TIMESTAMP_EVENT = 27  # newer than some installed uapi headers

CTA_TUPLE_IP = 1
CTA_TUPLE_PROTO = 2
CTA_TUPLE_ZONE = 3
CTA_IP_V4_SRC = 1
CTA_IP_V4_DST = 2
CTA_IP_V6_SRC = 3
CTA_IP_V6_DST = 4
CTA_PROTO_NUM = 1
CTA_PROTO_SRC_PORT = 2
CTA_PROTO_DST_PORT = 3
CTA_PROTO_ICMP_ID = 4
CTA_PROTO_ICMP_TYPE = 5
CTA_PROTO_ICMP_CODE = 6
CTA_PROTO_ICMPV6_ID = 7
CTA_PROTO_ICMPV6_TYPE = 8
CTA_PROTO_ICMPV6_CODE = 9
CTA_PROTOINFO_TCP = 1
CTA_PROTOINFO_DCCP = 2
CTA_PROTOINFO_SCTP = 3
CTA_PROTOINFO_TCP_STATE = 1
CTA_PROTOINFO_TCP_WSCALE_ORIGINAL = 2
CTA_PROTOINFO_TCP_WSCALE_REPLY = 3
CTA_PROTOINFO_TCP_FLAGS_ORIGINAL = 4
CTA_PROTOINFO_TCP_FLAGS_REPLY = 5
CTA_PROTOINFO_SCTP_STATE = 1
CTA_PROTOINFO_SCTP_VTAG_ORIGINAL = 2
CTA_PROTOINFO_SCTP_VTAG_REPLY = 3
CTA_HELP_NAME = 1
CTA_COUNTERS_PACKETS = 1
CTA_COUNTERS_BYTES = 2

# enum ip_conntrack_status
IPS_EXPECTED = 1 << 0
IPS_SEEN_REPLY = 1 << 1
IPS_ASSURED = 1 << 2
IPS_CONFIRMED = 1 << 3
IPS_SRC_NAT = 1 << 4
IPS_DST_NAT = 1 << 5
IPS_SEQ_ADJUST = 1 << 6
IPS_SRC_NAT_DONE = 1 << 7
IPS_DST_NAT_DONE = 1 << 8
IPS_DYING = 1 << 9
IPS_FIXED_TIMEOUT = 1 << 10

# enum tcp_conntrack
TCP_CONNTRACK_NONE = 0
TCP_CONNTRACK_SYN_SENT = 1
TCP_CONNTRACK_SYN_RECV = 2
TCP_CONNTRACK_ESTABLISHED = 3
TCP_CONNTRACK_FIN_WAIT = 4
TCP_CONNTRACK_CLOSE_WAIT = 5
TCP_CONNTRACK_LAST_ACK = 6
TCP_CONNTRACK_TIME_WAIT = 7
TCP_CONNTRACK_CLOSE = 8
TCP_CONNTRACK_SYN_SENT2 = 9
TCP_STATE_NAMES = (
    "NONE", "SYN_SENT", "SYN_RECV", "ESTABLISHED", "FIN_WAIT", "CLOSE_WAIT",
    "LAST_ACK", "TIME_WAIT", "CLOSE", "SYN_SENT2",
)
SCTP_CONNTRACK_ESTABLISHED = 4  # enum sctp_conntrack: NONE, CLOSED, COOKIE_WAIT, COOKIE_ECHOED, ESTABLISHED

IPPROTO_ICMP = 1
IPPROTO_TCP = 6
IPPROTO_UDP = 17
IPPROTO_ICMPV6 = 58
IPPROTO_SCTP = 132

# Top-level attributes forwarded to the create/update path. Measured on 6.18
# (tests/lab/test_ctnetlink.py::test_kernel_create_rules): the kernel ignores
# CTA_ID, CTA_USE, counters, CTA_TIMESTAMP(_EVENT) and accepts them, but they are
# state the receiving kernel owns, so they are not sent. A whitelist keeps any
# attribute a future kernel adds to events off the create path.
# CTA_TUPLE_MASTER is only valid on create (EOPNOTSUPP on update) and is handled apart.
KEPT_ATTRS = frozenset({
    CTA_TUPLE_ORIG, CTA_TUPLE_REPLY, CTA_STATUS, CTA_PROTOINFO, CTA_HELP, CTA_TIMEOUT,
    CTA_MARK, CTA_ZONE, CTA_SEQ_ADJ_ORIG, CTA_SEQ_ADJ_REPLY, CTA_LABELS, CTA_SYNPROXY,
})

# event kinds (CtEvent.kind)
EV_NEW = 1
EV_UPDATE = 2
EV_DESTROY = 3

# --- precompiled layouts ----------------------------------------------------------
NLMSGHDR = struct.Struct("=IHHII")  # len, type, flags, seq, portid
NFGEN_HDR = struct.Struct("=IHHIIBBH")  # nlmsghdr + nfgenmsg (family, version, res_id)
NLA_HDR = struct.Struct("=HH")  # len, type
NLMSGERR = struct.Struct("=i")  # error code after an nlmsghdr of type NLMSG_ERROR
BE16 = struct.Struct(">H")
BE32 = struct.Struct(">I")
BE64 = struct.Struct(">Q")
U8 = struct.Struct("B")
NLMSGHDR_LEN = NLMSGHDR.size
NFGEN_HDR_LEN = NFGEN_HDR.size  # 20
