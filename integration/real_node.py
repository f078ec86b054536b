"""What a real node holds before kproxy starts, seeded into every simulated node by default.

No node is clean: kubelet and the CNI write their chains through iptables-nft (the `iptables` of
Debian 12, Ubuntu 22.04+, RHEL 8+), Docker still writes legacy x_tables, and a firewall keeps an
nftables table of its own. `seed()` writes a small, faithful sample of each:

- kubelet (iptables-nft, or legacy on a legacy node: `ForeignRules.kubelet`; IPv4 and IPv6):
  `KUBE-FIREWALL` with its rule, jumped from INPUT and OUTPUT; `KUBE-KUBELET-CANARY` in mangle,
  nat and filter; `KUBE-IPTABLES-HINT` in mangle, the chain by which kube-proxy learns which
  backend kubelet uses;
- a CNI (in kubelet's backend): `CNI-HOSTPORT-DNAT` jumped from nat PREROUTING and OUTPUT for local
  addresses, a Calico-style `cali-FORWARD` jumped from FORWARD;
- Docker (legacy): `DOCKER` and `DOCKER-USER` in filter, `DOCKER` in nat;
- a firewalld-like `inet firewalld` table with a base chain on the input hook.

Every rule lets the tests' traffic through (kubelet's drops only martian traffic to 127.0.0.0/8, as
on a real node). `ForeignRules.changes()` compares each of these chains, rules and tables with what
was seeded; `topology()` asserts there is no change when a test ends, so a test that programs a
node proves on the way out that kproxy left its neighbours alone. A test that removes a neighbour's
rules on purpose (standing for another program) says so with `forget()`.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # netns imports this module
    from integration.netns import Namespace

_KERNEL_HAS_IPV6 = Path("/proc/sys/net/ipv6").exists()

# kubelet's own rule, in iptables-save form, as kubelet writes it (pkg/kubelet's iptables util).
_KUBELET_TABLES = """\
*mangle
:KUBE-IPTABLES-HINT - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*nat
:KUBE-KUBELET-CANARY - [0:0]
COMMIT
*filter
:KUBE-FIREWALL - [0:0]
:KUBE-KUBELET-CANARY - [0:0]
-A INPUT -j KUBE-FIREWALL
-A OUTPUT -j KUBE-FIREWALL
{firewall_rule}COMMIT
"""
_KUBELET_FIREWALL_RULE4 = (
    "-A KUBE-FIREWALL ! -s 127.0.0.0/8 -d 127.0.0.0/8 "
    '-m comment --comment "block incoming localnet connections" '
    "-m conntrack ! --ctstate RELATED,ESTABLISHED,DNAT -j DROP\n"
)

# A CNI's: portmap's hostport chain and Calico's forward chain (its rule only sets mark bits
# Calico owns, which kproxy's 0x4000 masquerade bit does not overlap).
_CNI_TABLES = """\
*nat
:CNI-HOSTPORT-DNAT - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
-A OUTPUT -m addrtype --dst-type LOCAL -j CNI-HOSTPORT-DNAT
COMMIT
*filter
:cali-FORWARD - [0:0]
-A FORWARD -m comment --comment "cali:wUHhoiAYhphO9Mso" -j cali-FORWARD
-A cali-FORWARD -m comment --comment "cali:vjrMJCRpqwy5oRoX" -j MARK --set-xmark 0x0/0xe0000
COMMIT
"""

# Docker's, in the legacy tables (its RETURN rules keep every packet's fate to the rest).
_DOCKER_TABLES = """\
*nat
:DOCKER - [0:0]
-A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
-A DOCKER -i docker0 -j RETURN
COMMIT
*filter
:DOCKER - [0:0]
:DOCKER-USER - [0:0]
-A FORWARD -j DOCKER-USER
-A DOCKER-USER -j RETURN
COMMIT
"""

FIREWALL_TABLE = "firewalld"
_FIREWALL_RULESET = f"""\
table inet {FIREWALL_TABLE} {{
    chain filter_INPUT {{
        type filter hook input priority filter + 10; policy accept;
        ct state established,related accept
        iifname "lo" accept
    }}
}}
"""

# The backend of kubelet's and the CNI's chains on the default simulated node: iptables-nft, as
# on most nodes, so the iptables mode's `auto` writes iptables-nft in most tests; a legacy node
# is `topology(kubelet="legacy")` (test_iptables_nft.py runs its set on both), and
# KPROXY_TEST_KUBELET=legacy runs any test on one.
DEFAULT_KUBELET = os.environ.get("KPROXY_TEST_KUBELET", "nft")

_BUILTIN_CHAINS = frozenset({"PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"})
_COUNTERS = re.compile(r" \[\d+:\d+\]$")


def _chains_of(save_text: str) -> set[str]:
    """The user-defined chains an iptables-save text declares."""
    names = {line[1:].split()[0] for line in save_text.splitlines() if line.startswith(":")}
    return names - _BUILTIN_CHAINS


def _lines_about(save_text: str, chains: set[str]) -> list[str]:
    """From one table's iptables-save text: the declarations of `chains`, every rule in them, and
    every rule elsewhere that jumps to one of them (counters left out). One table at a time: a
    comment may hold a line such as `*filter` that is no table header."""
    found = []
    for raw in save_text.splitlines():
        line = _COUNTERS.sub("", raw)
        words = line.split()
        if len(words) < 2:
            continue
        declares = words[0].startswith(":") and words[0][1:] in chains
        in_or_to = words[0] == "-A" and (
            words[1] in chains or (words[-2] in ("-j", "-g") and words[-1] in chains)
        )
        if declares or in_or_to:
            found.append(line)
    return found


@dataclass(frozen=True)
class _Writer:
    """One backend's writer of seeded rules: its restore and save commands and its rules."""

    name: str
    restore: str
    save: str
    rules: str

    def chains(self) -> set[str]:
        return _chains_of(self.rules)

    def tables(self) -> set[str]:
        return {line[1:] for line in self.rules.splitlines() if line.startswith("*")}


def _writer(name: str, backend: str, rules: str, family: int = 4) -> _Writer:
    tool = f"{'iptables' if family == 4 else 'ip6tables'}-{backend}"
    return _Writer(name, f"{tool}-restore", f"{tool}-save", rules)


def _writers(kubelet: str = "nft") -> list[_Writer]:
    """kubelet's and the CNI's in `kubelet`'s backend (nft, or legacy on a legacy node), Docker's
    always in legacy."""
    kubelet4 = _KUBELET_TABLES.format(firewall_rule=_KUBELET_FIREWALL_RULE4)
    writers = [
        _writer(f"iptables-{kubelet}", kubelet, kubelet4),
        _writer(f"iptables-{kubelet} (CNI)", kubelet, _CNI_TABLES),
        _writer("iptables-legacy (Docker)", "legacy", _DOCKER_TABLES),
    ]
    if _KERNEL_HAS_IPV6:
        # kubelet's IPv6 firewall rule exists only with IPv6 localnet routing; its chains do not.
        kubelet6 = _KUBELET_TABLES.format(firewall_rule="")
        writers.append(_writer(f"ip6tables-{kubelet}", kubelet, kubelet6, family=6))
    return writers


@dataclass
class ForeignRules:
    """The neighbours' rules seeded into one node namespace, and what they looked like then."""

    ns: Namespace
    lock_file: Path
    # The backend kubelet and the CNI write (`nft`, as on most nodes, or `legacy`): the one the
    # iptables mode's `auto` picks (kubelet's KUBE-IPTABLES-HINT is there).
    kubelet: str = "nft"
    _seeded: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    _forgotten: set[str] = field(default_factory=set)

    def seed(self) -> None:
        env = {"XTABLES_LOCKFILE": str(self.lock_file)}
        for writer in _writers(self.kubelet):
            self.ns.run(writer.restore, "-w", "--noflush", input=writer.rules, env=env)
        self.ns.run("nft", "-f", "-", input=_FIREWALL_RULESET)
        self._seeded = self._read()

    def forget(self, what: str) -> None:
        """Stop comparing a part a test removes on purpose: `iptables-legacy nat`, ..., or
        `nft firewalld`."""
        known = {f"{writer} {table}" for writer, tables in self._seeded.items() for table in tables}
        if what not in known:
            raise ValueError(f"{what!r} is not a seeded part; seeded: {sorted(known)}")
        self._forgotten.add(what)

    def _read(self) -> dict[str, dict[str, list[str]]]:
        state: dict[str, dict[str, list[str]]] = {}
        env = {"XTABLES_LOCKFILE": str(self.lock_file)}
        chains: dict[str, set[str]] = {}
        tables: dict[str, set[str]] = {}
        for writer in _writers(self.kubelet):
            chains.setdefault(writer.save, set()).update(writer.chains())
            tables.setdefault(writer.save, set()).update(writer.tables())
        for save, names in tables.items():
            state[save.removesuffix("-save")] = {
                table: _lines_about(self.ns.run(save, "-t", table, env=env).stdout, chains[save])
                for table in sorted(names)
            }
        listing = self.ns.run("nft", "list", "table", "inet", FIREWALL_TABLE, check=False)
        state["nft"] = {FIREWALL_TABLE: listing.stdout.splitlines() or [listing.stderr.strip()]}
        return state

    def changes(self) -> list[str]:
        """Every seeded part that is not exactly as it was seeded, with what it is now."""
        now = self._read()
        problems = []
        for writer, tables in self._seeded.items():
            for table, lines in tables.items():
                part = f"{writer} {table}"
                current = now.get(writer, {}).get(table, [])
                if part not in self._forgotten and current != lines:
                    problems.append(
                        f"{part} changed:\n  seeded:\n    "
                        + "\n    ".join(lines)
                        + "\n  now:\n    "
                        + "\n    ".join(current or ["(nothing)"])
                    )
        return problems
