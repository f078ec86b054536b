"""What the userspace mode hands `kproxy trace` and `dump --diff` (its ProxyMode's
inspection pieces): its portal rules live in the same x_tables as the iptables mode's, so the
x_tables readers serve, with the portal chains marked as handing packets to the relay and the
proxy ports the running agent bound read back from the kernel's rules."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kproxy.dataplane.base import ChainDiff
from kproxy.dataplane.xtables.preview import (
    plan_chain_diffs,
    planned_tables,
    read_snapshot,
    read_xtables_live,
    tables_from_saved,
)
from kproxy.plan.iptables.naming import spn_text
from kproxy.plan.node_plan import NodePlan
from kproxy.plan.userspace import chains as userspace_chains
from kproxy.plan.userspace.planner import UserspaceFamily
from kproxy.plan.userspace.portals import ListenerKey, Scope
from kproxy.rules.explain import Relay, TraceTables
from kproxy.rules.ir import Ruleset
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable

RELAY_CHAINS = frozenset(userspace_chains.NAT_CHAINS)


def read_userspace_live(family: int) -> str:
    """`kproxy dump`'s text: the portals are always legacy rules."""
    return read_xtables_live(family, "legacy")


def userspace_live_tables(family: int, lock_timeout: float) -> TraceTables:
    """The portals are always legacy rules, whatever backend the iptables mode uses."""
    saved = read_snapshot(family, lock_timeout, "legacy")
    return tables_from_saved(saved, family, RELAY_CHAINS)


def relay_key(service: str, external: bool) -> str:
    """How TraceTables.relays names a listener: a service port split by its traffic policies
    has a second listener for NodePort, external and load-balancer traffic."""
    return f"{service} external" if external else service


def userspace_plan_tables(plan: NodePlan[Any], family: int) -> TraceTables:
    """The portals as planned: the listeners are not bound, so each has proxy port 0."""
    part: UserspaceFamily = plan.kernel.families[family]
    relays = {
        relay_key(spn_text(lis.name), lis.scope is Scope.EXTERNAL): Relay(
            tuple(str(ep) for ep in lis.endpoints if ep.ready), lis.affinity_seconds
        )
        for lis in part.listeners
    }
    ruleset = part.ruleset({lis.key: 0 for lis in part.listeners})
    return planned_tables(ruleset, RELAY_CHAINS, relays)


_MARKER = 99999  # not a port: stands for the proxy port in a listener's rendered rules


def live_proxy_ports(
    part: UserspaceFamily, saved: Mapping[str, SavedTable]
) -> dict[ListenerKey, int]:
    """The proxy port each planned listener has in the kernel's portal rules (the running
    agent bound it); a listener without portal rules yet gets 0."""
    live = [line for table in saved.values() for lines in table.chains.values() for line in lines]
    ports: dict[ListenerKey, int] = {}
    for lis in part.listeners:
        ports[lis.key] = 0
        for pattern in _port_patterns(part.ruleset({lis.key: _MARKER})):
            found = next((m for m in map(pattern.fullmatch, live) if m), None)
            if found:
                ports[lis.key] = int(found.group(1))
                break
    return ports


def _port_patterns(ruleset: Ruleset) -> list[re.Pattern[str]]:
    """Each rule holding the marker, as a pattern that captures the port in its place."""
    patterns = []
    for table in ruleset.tables:
        for chain in table.chains:
            for rule in chain.rules:
                text = render_rule(chain.name, rule)
                if str(_MARKER) in text:
                    escaped = re.escape(text).replace(str(_MARKER), r"(\d+)")
                    patterns.append(re.compile(escaped))
    return patterns


def userspace_diff(plan: NodePlan[Any], family: int, lock_timeout: float) -> list[ChainDiff]:
    """The portals the next sync would write, with the proxy ports the agent has bound."""
    part: UserspaceFamily = plan.kernel.families[family]
    saved = read_snapshot(family, lock_timeout, "legacy")  # the portals are legacy rules
    return plan_chain_diffs(part.ruleset(live_proxy_ports(part, saved)), saved)
