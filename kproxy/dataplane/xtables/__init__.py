"""Legacy x_tables through python-iptables (libiptc): the writer, its fake, and one dataplane per
address family. The iptables mode's rules and the userspace mode's portals both go through it."""
