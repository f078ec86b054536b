"""Reading kproxy's `kube-proxy` table from the kernel into the IR in one snapshot (for `kproxy
trace` and `dump --diff`): every dump of the table between two reads of the ruleset generation,
again if the generation moved meanwhile. Also the other tables' base chains on the same hooks,
which the tracer names but does not walk. Read-only: nothing is ever written."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.decode import (
    Undecodable,
    decode_chain,
    decode_element,
    decode_rule,
    decode_set,
    text_of,
    udata_comment,
)
from kproxy.dataplane.nftables.families import NFPROTO, NFT_FAMILIES, NFT_FAMILY_NAMES
from kproxy.dataplane.nftables.kernel import (
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETSET,
    NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE,
    dump_rules,
    read_generation,
)
from kproxy.dataplane.nftables.netlink import NftNetlink, iter_attrs
from kproxy.errors import DataplaneError
from kproxy.plan.nftables import naming
from kproxy.plan.nftables.ir import Element, NamedSet, NftTable, Rule

_ATTEMPTS = 5


@dataclass(frozen=True)
class LiveNftTable:
    """kproxy's table as the kernel held it (None: there is none), the rules of it that are
    not kproxy's encodings (per chain, by handle), and the other tables' base chains on the
    hooks a packet of this family passes."""

    family: int
    table: NftTable | None
    unreadable: dict[str, tuple[str, ...]] = field(default_factory=dict)
    other_hooks: tuple[str, ...] = ()


def _attrs(data: bytes) -> dict[int, bytes]:
    return dict(iter_attrs(data))


def _read_once(nl: NftNetlink, family: int) -> LiveNftTable:
    fam = NFPROTO[family]
    name = naming.TABLE
    others = _other_base_chains(nl, family)
    head = nl.request(NFT_MSG_GETTABLE, fam, e.table_name_attrs(name))
    if head is None:
        return LiveNftTable(family, None, other_hooks=others)
    table_attr = e.table_name_attrs(name)
    chain_attrs = [_attrs(msg.attrs) for msg in nl.dump(NFT_MSG_GETCHAIN, fam, table_attr)]
    rules: dict[str, list[Rule]] = {}
    unreadable: dict[str, list[str]] = {}
    for msg in dump_rules(nl, family, name, [text_of(attrs[3]) for attrs in chain_attrs]):
        attrs = _attrs(msg.attrs)
        chain = text_of(attrs[2])
        handle = int.from_bytes(attrs.get(3, b"")[:8], "big")
        try:
            rules.setdefault(chain, []).append(
                decode_rule(attrs.get(4, b""), attrs.get(7, b""), family)
            )
        except Undecodable as exc:
            unreadable.setdefault(chain, []).append(f"handle {handle}: {exc}")
    chains = tuple(
        decode_chain(attrs, tuple(rules.get(text_of(attrs[3]), ()))) for attrs in chain_attrs
    )
    sets: list[NamedSet] = []
    for msg in nl.dump(NFT_MSG_GETSET, fam, table_attr):
        attrs = _attrs(msg.attrs)
        if not text_of(attrs[2]).startswith("__"):  # anonymous: another writer's rule's
            sets.append(decode_set(attrs))
    elements: dict[str, frozenset[Element]] = {}
    for named in sets:
        if named.dynamic:
            continue  # the packets' (affinity): neither planned nor compared
        found = set(_elements(nl, fam, name, named))
        if found:
            elements[named.name] = frozenset(found)
    table = NftTable(
        family=family,
        name=name,
        comment=udata_comment(_attrs(head.attrs).get(6, b""), 0),
        sets=tuple(sets),
        elements=elements,
        chains=chains,
    )
    return LiveNftTable(family, table, {c: tuple(lines) for c, lines in unreadable.items()}, others)


def _elements(nl: NftNetlink, fam: int, table: str, named: NamedSet) -> Iterator[Element]:
    for msg in nl.dump(NFT_MSG_GETSETELEM, fam, e.element_list_attrs(table, named.name)):
        for kind, value in iter_attrs(msg.attrs):
            if kind != 3:  # NFTA_SET_ELEM_LIST_ELEMENTS
                continue
            for _kind, element in iter_attrs(value):
                attrs = _attrs(element)
                key = _attrs(attrs.get(1, b"")).get(1, b"")
                yield decode_element(key, attrs.get(2, b""), named)


def _other_base_chains(nl: NftNetlink, family: int) -> tuple[str, ...]:
    """`family table chain (hook H, priority P)` of every other table's base chain that a
    packet of `family` passes (its own family's tables and the inet ones)."""
    found = []
    for msg in nl.dump(NFT_MSG_GETCHAIN, 0, b""):
        attrs = _attrs(msg.attrs)
        fam = NFT_FAMILIES.get(msg.family, str(msg.family))
        table = text_of(attrs.get(1, b""))
        if 4 not in attrs or fam not in (NFT_FAMILY_NAMES[family], "inet"):
            continue
        if fam == NFT_FAMILY_NAMES[family] and table == naming.TABLE:
            continue
        chain = decode_chain(attrs, ())
        if chain.hook is not None:
            hook = chain.hook
            found.append(f"{fam} {table} {chain.name} (hook {hook.hook}, priority {hook.priority})")
    return tuple(sorted(found))


def read_live_nft_table(family: int, open_netlink: Callable[[], Any] = NftNetlink) -> LiveNftTable:
    """kproxy's table of `family` in one snapshot of the ruleset."""
    if os.geteuid() != 0:
        raise DataplaneError(
            "reading the live tables needs root (CAP_NET_ADMIN); without root, give "
            "--manifests PATH to work on what kproxy would write instead"
        )
    try:
        with open_netlink() as nl:
            for _ in range(_ATTEMPTS):
                before = read_generation(nl)
                live = _read_once(nl, family)
                if read_generation(nl) == before:
                    return live
    except PermissionError as exc:
        raise DataplaneError(
            f"reading the nftables table needs CAP_NET_ADMIN ({exc}); run as root, or use"
            " --manifests"
        ) from exc
    raise DataplaneError(
        f"the nftables ruleset changed during each of {_ATTEMPTS} reads: try again"
    )
