"""Legacy x_tables, kproxy's rules encoded by python-iptables and each table replaced from the
kernel's own image of it: the writer, its fake, and one dataplane per address family. The
iptables mode's rules and the userspace mode's portals both go through it."""
