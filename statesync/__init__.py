"""Replication service: conntrack entries and config over ZeroMQ."""
