"""What the iptables mode needs of a node (for `kproxy doctor`), in a module of its own so the
mode registry loads without the kernel libraries: the legacy x_tables, on any kernel that has
them."""

from __future__ import annotations

from kproxy.dataplane.base import NodeNeeds

IPTABLES_NEEDS = NodeNeeds("legacy")
