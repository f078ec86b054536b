"""The iptables mode's dataplane for a whole node: it carries out an iptables NodePlan, one
family's Ruleset per family dataplane (IPv4 in this process, IPv6 in one of its own), after the
plan's sysctls."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.dataplane.host import SysctlWriter, apply_sysctls
from kproxy.dataplane.xtables.families import FamilyTables, open_dataplanes
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.ir import Ruleset


class IptablesNode:
    def __init__(
        self, dataplanes: Mapping[int, Dataplane], write_sysctls: SysctlWriter = apply_sysctls
    ) -> None:
        self.dataplanes = dataplanes
        self.tables = FamilyTables(dataplanes)
        self.write_sysctls = write_sysctls

    @property
    def families(self) -> tuple[int, ...]:
        return self.tables.families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return self.tables.reading_ahead()

    def apply(self, plan: NodePlan[Mapping[int, Ruleset]], full: bool) -> ApplyResult:
        """Sysctls first (the rules rely on them), then each family's tables."""
        self.write_sysctls(plan.sysctls)
        return self.tables.apply(plan.kernel, full)

    def problems(self) -> list[str]:
        return []  # the kernel's tables are the data path: nothing of ours runs to fail

    def cleanup(self) -> ApplyResult:
        return self.tables.cleanup()


@contextmanager
def open_iptables_node(lock_timeout: float) -> Iterator[IptablesNode]:
    with open_dataplanes(lock_timeout) as dataplanes:
        yield IptablesNode(dataplanes)
