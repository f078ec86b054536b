"""The iptables mode's dataplane for a whole node: it carries out an iptables NodePlan, one
family's Ruleset per family dataplane (IPv4 in this process, IPv6 in one of its own), after the
plan's sysctls, into the x_tables backend the node uses (legacy, or iptables-nft: see
dataplane/xtables/backends.py)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager

from kproxy.dataplane.base import ApplyResult, Dataplane
from kproxy.dataplane.host import SysctlWriter, apply_sysctls
from kproxy.dataplane.leftovers import LeftoverRemoval, RemoveLeftovers
from kproxy.dataplane.xtables.backends import (
    choose_backend,
    open_backend_dataplanes,
    remove_other_backend,
)
from kproxy.dataplane.xtables.families import FamilyTables
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.ir import Ruleset


class IptablesNode:
    def __init__(
        self,
        dataplanes: Mapping[int, Dataplane],
        write_sysctls: SysctlWriter = apply_sysctls,
        backend: str = "legacy",
        other_backend: RemoveLeftovers | None = None,
    ) -> None:
        self.dataplanes = dataplanes
        self.tables = FamilyTables(dataplanes)
        self.write_sysctls = write_sysctls
        self.backend = backend  # "legacy" or "nft"
        # After the first commit: kproxy's chains in the other backend (a node whose kubelet
        # moved between legacy and iptables-nft), as the registry removes other modes'.
        self.other_backend = LeftoverRemoval(other_backend)

    @property
    def families(self) -> tuple[int, ...]:
        return self.tables.families

    def reading_ahead(self) -> AbstractContextManager[None]:
        return self.tables.reading_ahead()

    def apply(self, plan: NodePlan[Mapping[int, Ruleset]], full: bool) -> ApplyResult:
        """Sysctls first (the rules rely on them), then each family's tables."""
        self.write_sysctls(plan.sysctls)
        return self.other_backend.after_commit(self.tables.apply(plan.kernel, full))

    def problems(self) -> list[str]:
        return []  # the kernel's tables are the data path: nothing of ours runs to fail

    def cleanup(self) -> ApplyResult:
        return self.tables.cleanup()


@contextmanager
def open_iptables_node(
    lock_timeout: float, backend: str = "auto", once: bool = False
) -> Iterator[IptablesNode]:
    """The mode on the backend `backend` names (`auto`: the one kubelet uses); `once`: for one
    sync only (nothing is kept for a next one)."""
    chosen = choose_backend(backend).backend
    with open_backend_dataplanes(lock_timeout, chosen, keep_copies=not once) as dataplanes:
        yield IptablesNode(
            dataplanes,
            backend=chosen,
            other_backend=lambda: remove_other_backend(chosen, lock_timeout),
        )
