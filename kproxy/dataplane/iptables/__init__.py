"""The iptables mode's dataplane: legacy x_tables through python-iptables (libiptc)."""
