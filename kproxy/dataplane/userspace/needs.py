"""What the userspace mode needs of a node (for `kproxy doctor`), in a module of its own so the
mode registry loads without the kernel libraries: its portals are legacy x_tables rules, on any
kernel that has them."""

from __future__ import annotations

from kproxy.dataplane.base import NodeNeeds

USERSPACE_NEEDS = NodeNeeds("legacy")
