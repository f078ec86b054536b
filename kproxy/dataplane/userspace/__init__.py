"""The userspace mode's dataplane: the portal rules and held ports in front of the relay
(kproxy.dataplane.relay)."""
