"""What the nftables mode hands `kproxy dump`, `trace` and `dump --diff` (its ProxyMode's
inspection pieces): its `kube-proxy` table as `nft` prints it, the table for the tracer (read
from the kernel in one snapshot, or as planned), and what the next sync would change in it, per
chain, set or map."""

from __future__ import annotations

import difflib
import shutil
import subprocess
from typing import Any

from kproxy.dataplane.base import ChainDiff
from kproxy.dataplane.nftables.families import NFT_FAMILY_NAMES
from kproxy.dataplane.nftables.kernel import table_exists
from kproxy.dataplane.nftables.netlink import NftNetlink
from kproxy.dataplane.nftables.readback import read_live_nft_table
from kproxy.errors import DataplaneError
from kproxy.plan.nftables import naming
from kproxy.plan.nftables.ir import Chain, NamedSet, NftTable
from kproxy.plan.nftables.render import render_nft_table
from kproxy.plan.nftables.trace import NftTraceTables
from kproxy.plan.node_plan import NodePlan

NFT_WALKED = (
    "walks kproxy's nftables table only (its base chains by hook and priority); other"
    " programs' nftables tables and any x_tables rules are not walked"
)


def read_nftables_live(family: int) -> str:
    """What the kernel holds of kproxy's table, as `nft list table` prints it (by the nft binary
    when the node has one; nothing when there is no table)."""
    with NftNetlink() as nl:
        if not table_exists(nl, family, naming.TABLE):
            return ""
    nft = shutil.which("nft")
    if nft is None:
        raise DataplaneError("reading the live table needs the nft binary; use dump --manifests")
    out = subprocess.run(
        [nft, "list", "table", NFT_FAMILY_NAMES[family], naming.TABLE],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


def nftables_plan_tables(plan: NodePlan[Any], family: int) -> NftTraceTables:
    table: NftTable = plan.kernel[family]
    return NftTraceTables(table, notes=(NFT_WALKED,))


def nftables_live_tables(family: int, lock_timeout: float) -> NftTraceTables:
    """The kernel's table (no lock: nf_tables has none; the read is one generation's)."""
    live = read_live_nft_table(family)
    notes = [NFT_WALKED]
    if live.table is None:
        notes.append(
            f"this node has no {NFT_FAMILY_NAMES[family]} {naming.TABLE} table: the nftables"
            " mode has not synced here"
        )
    if live.other_hooks:
        notes.append("other tables with base chains on these hooks (not walked):")
        notes.extend(f"  {chain}" for chain in live.other_hooks)
    unreadable = tuple(
        f"chain {chain}: a rule that is not kproxy's ({line})"
        for chain, lines in sorted(live.unreadable.items())
        for line in lines
    )
    table = live.table or NftTable(family, naming.TABLE)
    return NftTraceTables(table, source="live", notes=tuple(notes), unreadable=unreadable)


def _one_object(table: NftTable, named: NamedSet | None, chain: Chain | None) -> list[str]:
    """One set, map or chain as `nft list table` prints it inside the table."""
    one = NftTable(
        table.family,
        table.name,
        sets=(named,) if named else (),
        elements={named.name: table.elements.get(named.name, frozenset())} if named else {},
        chains=(chain,) if chain else (),
    )
    return render_nft_table(one).splitlines()[1:-1]


def _objects(
    table: NftTable | None, unreadable: dict[str, tuple[str, ...]]
) -> dict[str, list[str]]:
    if table is None:
        return {}
    out: dict[str, list[str]] = {}
    for named in table.sets:
        kind = "map" if named.verdict_map else "set"
        out[f"{kind} {named.name}"] = _one_object(table, named, None)
    for chain in table.chains:
        lines = _one_object(table, None, chain)
        extra = [
            f"\t\t# a rule kproxy cannot read ({line})" for line in unreadable.get(chain.name, ())
        ]
        out[f"chain {chain.name}"] = lines[:-1] + extra + lines[-1:]
    return out


def plan_nft_diffs(
    desired: NftTable,
    live: NftTable | None,
    unreadable: dict[str, tuple[str, ...]] | None = None,
) -> list[ChainDiff]:
    """What a full sync of `desired` would change in `live`: one unified diff per set, map or
    chain added, removed or rewritten (the affinity sets' elements are the packets' and are
    not compared)."""
    want = _objects(desired, {})
    have = _objects(live, unreadable or {})
    where = f"{desired.nft_family} {desired.name}"
    diffs = []
    for name in [*want, *(k for k in have if k not in want)]:
        old, new = have.get(name), want.get(name)
        if old == new:
            continue
        change = "added" if old is None else "removed" if new is None else "rewritten"
        lines = difflib.unified_diff(
            old or [],
            new or [],
            fromfile=f"{where} {name} (kernel)",
            tofile=f"{where} {name} (next sync)",
            lineterm="",
        )
        diffs.append(ChainDiff(desired.family, where, name, change, tuple(lines)))
    return diffs


def nftables_diff(plan: NodePlan[Any], family: int, lock_timeout: float) -> list[ChainDiff]:
    live = read_live_nft_table(family)
    return plan_nft_diffs(plan.kernel[family], live.table, live.unreadable)
