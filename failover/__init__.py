"""Failover core: who is Master, floating IPs, link monitoring, heartbeats."""
