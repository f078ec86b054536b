"""The iptables mode's dataplane for a whole node: it carries out an iptables NodePlan, one
family's Ruleset per family dataplane (IPv4 in this process, IPv6 in one of its own), after the
plan's sysctls."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

from kproxy.dataplane.base import ApplyResult, Dataplane, TableReport
from kproxy.dataplane.host import apply_sysctls
from kproxy.dataplane.iptables.backends import (
    choose_backend,
    open_backend_dataplanes,
    read_backend_tables,
    remove_other_backend,
)
from kproxy.dataplane.iptables.diff import owned_part
from kproxy.dataplane.leftovers import LeftoverRemoval, RemoveLeftovers
from kproxy.dataplane.nftables.node import remove_nftables_mode
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.ir import Ruleset
from kproxy.rules.saved import render_saved

SysctlWriter = Callable[[Iterable[tuple[str, str]]], None]


class IptablesNode:
    mode = "iptables"
    rule_tables: tuple[str, ...] = ("filter", "nat")

    def __init__(
        self,
        dataplanes: Mapping[int, Dataplane],
        write_sysctls: SysctlWriter = apply_sysctls,
        remove_leftovers: RemoveLeftovers | None = None,
        backend: str = "legacy",
    ) -> None:
        self.dataplanes = dataplanes
        self.backend = backend  # "legacy" or "nft" (see backends.py)
        # `cleanup` also empties the other backend: kproxy's chains may be left in either.
        self.cleanup_other: Callable[[], Sequence[TableReport]] = list
        self.write_sysctls = write_sysctls
        # After the first commit: the nftables mode's tables, when a node switches back.
        self.leftovers = LeftoverRemoval(remove_leftovers)

    @property
    def families(self) -> tuple[int, ...]:
        return tuple(sorted(self.dataplanes))

    @contextmanager
    def reading_ahead(self) -> Iterator[None]:
        with ExitStack() as stack:
            for dataplane in self.dataplanes.values():
                stack.enter_context(dataplane.reading_ahead())
            yield

    def apply(self, plan: NodePlan[Mapping[int, Ruleset]], full: bool) -> ApplyResult:
        """Sysctls first (the rules rely on them), then each family's tables."""
        self.write_sysctls(plan.sysctls)
        result = ApplyResult()
        for family, ruleset in sorted(plan.kernel.items()):
            result.tables.extend(self.dataplanes[family].apply(ruleset, full).tables)
        return self.leftovers.after_commit(result)

    def problems(self) -> list[str]:
        return []  # the kernel's tables are the data path: nothing of ours runs to fail

    def cleanup(self) -> ApplyResult:
        result = ApplyResult()
        for dataplane in self.dataplanes.values():
            result.tables.extend(dataplane.cleanup().tables)
        result.tables.extend(self.cleanup_other())
        return result


def read_iptables_live(family: int, backend: str | None = None) -> str:
    """What the kernel holds of kproxy's (and kube-proxy's) chains, as iptables-save text, from
    `backend` (None: the one holding kproxy's chains, else the node's)."""
    tables = read_backend_tables(family, backend)
    return render_saved({name: owned_part(t) for name, t in tables.items()})


@contextmanager
def open_iptables_node(lock_timeout: float, backend: str = "auto") -> Iterator[IptablesNode]:
    chosen = choose_backend(backend).backend

    def remove_leftovers() -> list[TableReport]:
        return [*remove_nftables_mode(), *remove_other_backend(chosen, lock_timeout)]

    with open_backend_dataplanes(lock_timeout, chosen) as dataplanes:
        node = IptablesNode(dataplanes, remove_leftovers=remove_leftovers, backend=chosen)
        node.cleanup_other = lambda: remove_other_backend(chosen, lock_timeout)
        yield node
