"""What the iptables mode hands `kproxy trace` and `dump --diff` (its ProxyMode's
inspection pieces; `dump` reads preview.read_xtables_live): its tables for the tracer (live or as
planned) and what the next sync would change, per chain."""

from __future__ import annotations

from typing import Any

from kproxy.dataplane.base import ChainDiff
from kproxy.dataplane.xtables.preview import (
    plan_chain_diffs,
    planned_tables,
    read_snapshot,
    tables_from_saved,
)
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.explain import TraceTables
from kproxy.rules.ir import Ruleset


def iptables_live_tables(family: int, lock_timeout: float) -> TraceTables:
    return tables_from_saved(read_snapshot(family, lock_timeout), family)


def iptables_plan_tables(plan: NodePlan[Any], family: int) -> TraceTables:
    ruleset: Ruleset = plan.kernel[family]
    return planned_tables(ruleset)


def iptables_diff(plan: NodePlan[Any], family: int, lock_timeout: float) -> list[ChainDiff]:
    return plan_chain_diffs(plan.kernel[family], read_snapshot(family, lock_timeout))
