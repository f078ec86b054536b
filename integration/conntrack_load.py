"""A busy conntrack table in a test namespace: real entries made with `conntrack -R` (the same
`-I` commands as one by one, in one process: about 60,000 a second here), and the table read
back with `conntrack -L` for comparison.

Each group of flows comes from clients of its own (one address per flow, in 100.64.0.0/10 or
fd64::/64), so no two entries share a tuple and every group can be told apart by its
destination, port, protocol and reply source.
"""

from __future__ import annotations

import ipaddress
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from integration.netns import Namespace

_CLIENTS = {4: ipaddress.ip_network("100.64.0.0/10"), 6: ipaddress.ip_network("fd64::/64")}
_LINE = re.compile(
    r"^(?P<proto>tcp|udp)\s.*?src=(?P<src>\S+) dst=(?P<dst>\S+) sport=(?P<sport>\d+) "
    r"dport=(?P<dport>\d+) .*?src=(?P<rsrc>\S+) "
)


@dataclass(frozen=True)
class FlowGroup:
    """`count` flows of `proto` to dst:dport, answered from `reply_src`."""

    proto: str
    dst: str
    dport: int
    reply_src: str
    count: int

    @property
    def key(self) -> tuple[str, str, int, str]:
        return (self.proto, self.dst, self.dport, self.reply_src)


def flow_commands(group: FlowGroup, first_client: int) -> list[str]:
    """The `conntrack -R` lines that make `group`'s flows, from client number `first_client` on."""
    state = " --state ESTABLISHED" if group.proto == "tcp" else ""
    lines = []
    for i in range(group.count):
        client = _CLIENTS[ipaddress.ip_address(group.dst).version][first_client + i]
        lines.append(
            f"-I -p {group.proto} -s {client} -d {group.dst} --sport 40000 --dport {group.dport}"
            f" -r {group.reply_src} -q {client} --reply-port-src {group.dport}"
            f" --reply-port-dst 40000 -t 3600{state}"
        )
    return lines


def load_flows(ns: Namespace, groups: list[FlowGroup], workdir: Path) -> None:
    """Put every group's flows into `ns`'s conntrack table."""
    lines: list[str] = []
    for group in groups:
        lines += flow_commands(group, len(lines))
    path = workdir / "conntrack-flows.txt"
    path.write_text("\n".join(lines) + "\n")
    ns.run("conntrack", "-R", str(path), timeout=600)


def flow_counts(ns: Namespace, family: int = 4) -> Counter[tuple[str, str, int, str]]:
    """How many of the loaded flows of `family` `ns` holds, by (proto, dst, dport, reply source)
    (the node's own, such as the agent's API connections, are not counted)."""
    argv = ("conntrack", "-L", "-f", f"ipv{family}")
    out = ns.run(*argv, check=False, timeout=300).stdout
    counts: Counter[tuple[str, str, int, str]] = Counter()
    for line in out.splitlines():
        m = _LINE.match(line)
        if m and ipaddress.ip_address(m["src"]) in _CLIENTS[family]:
            counts[(m["proto"], m["dst"], int(m["dport"]), m["rsrc"])] += 1
    return counts


def expected_counts(groups: list[FlowGroup], family: int = 4) -> Counter[tuple[str, str, int, str]]:
    return Counter(
        {g.key: g.count for g in groups if ipaddress.ip_address(g.dst).version == family}
    )
