"""What the iptables mode needs of a node (for `kproxy doctor`), in a module of its own so the
mode registry loads without the kernel libraries: x_tables rules in the backend kubelet uses
(legacy or iptables-nft, dataplane/xtables/backends.py), on any kernel that has it."""

from __future__ import annotations

from kproxy.dataplane.base import NodeNeeds

IPTABLES_NEEDS = NodeNeeds("xtables")
