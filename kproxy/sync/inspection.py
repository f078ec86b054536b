"""What each proxy mode hands `kproxy trace` and `kproxy dump --diff`: its tables for the tracer
(live, or as planned) and the per-chain diff of what its next sync would change.

A mode plugs in through three callables on its ProxyMode (sync/modes.py):

- `trace_live(family, lock_timeout) -> Traceable`: the kernel's tables in one snapshot, every
  program's rules included, with which chains are the mode's;
- `trace_plan(plan, family) -> Traceable`: what the mode would write for a NodePlan;
- `diff(plan, family, lock_timeout) -> list[ChainDiff]`: what the next sync would change.

Both x_tables modes answer with TraceTables (rules/explain.py), which the shared tracer walks; a
mode with tables of another kind implements Traceable itself.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from kproxy.dataplane.base import ChainDiff
from kproxy.dataplane.iptables.preview import plan_chain_diffs, read_snapshot
from kproxy.plan.iptables.chains import is_written_chain
from kproxy.plan.iptables.naming import spn_text
from kproxy.plan.node_plan import NodePlan
from kproxy.plan.userspace import chains as userspace_chains
from kproxy.plan.userspace.planner import UserspaceFamily
from kproxy.plan.userspace.portals import ListenerKey, Scope
from kproxy.rules.explain import Relay, TraceTables
from kproxy.rules.ir import Ruleset
from kproxy.rules.parse import parse_table_leniently
from kproxy.rules.render import render_rule
from kproxy.rules.saved import SavedTable


def _is_kproxy_chain(name: str) -> bool:
    return is_written_chain(name) or userspace_chains.is_userspace_chain(name)


def tables_from_saved(saved: Mapping[str, SavedTable], family: int) -> TraceTables:
    """The tracer's view of tables read from the kernel (shared by both modes: the userspace
    mode's portals live in the same legacy tables)."""
    tables, unreadable = [], []
    policies: dict[tuple[str, str], str] = {}
    for name, table in saved.items():
        parsed, lines = parse_table_leniently(table)
        tables.append(parsed)
        unreadable.extend(lines)
        policies.update({(name, chain): policy for chain, policy in table.policies.items()})
    chains = frozenset(
        name for table in saved.values() for name in table.chains if _is_kproxy_chain(name)
    )
    return TraceTables(
        ruleset=Ruleset(family, tuple(tables)),
        kproxy_chains=chains,
        policies=policies,
        relay_chains=frozenset(userspace_chains.NAT_CHAINS),
        unreadable=tuple(unreadable),
        source="live",
    )


def read_live_tables(family: int, lock_timeout: float) -> TraceTables:
    return tables_from_saved(read_snapshot(family, lock_timeout), family)


def read_legacy_live_tables(family: int, lock_timeout: float) -> TraceTables:
    """The userspace mode's: its portals are always in the legacy tables."""
    return tables_from_saved(read_snapshot(family, lock_timeout, "legacy"), family)


def _planned(ruleset: Ruleset, relays: Mapping[str, Relay] | None = None) -> TraceTables:
    chains = frozenset(c.name for t in ruleset.tables for c in t.chains)
    return TraceTables(
        ruleset=ruleset,
        kproxy_chains=chains,
        relay_chains=frozenset(userspace_chains.NAT_CHAINS),
        relays=relays or {},
    )


def iptables_plan_tables(plan: NodePlan[Any], family: int) -> TraceTables:
    ruleset: Ruleset = plan.kernel[family]
    return _planned(ruleset)


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
    return _planned(part.ruleset({lis.key: 0 for lis in part.listeners}), relays)


def iptables_diff(plan: NodePlan[Any], family: int, lock_timeout: float) -> list[ChainDiff]:
    return plan_chain_diffs(plan.kernel[family], read_snapshot(family, lock_timeout))


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
