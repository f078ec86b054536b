"""What the nftables mode needs of a node (for `kproxy doctor` and the check as it opens), in a
module of its own so the mode registry loads without the kernel libraries: one nf_tables table
of kproxy's own per family, on kernels since MIN_KERNEL."""

from __future__ import annotations

from kproxy.dataplane.base import NodeNeeds

MIN_KERNEL = (5, 13)
NFTABLES_NEEDS = NodeNeeds("nftables", MIN_KERNEL)
