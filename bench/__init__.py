"""Benchmarks: kproxy against iptables-legacy-restore, measured in the same run."""
