"""Benchmarks: each prints one table, side by side with the standard tool."""
