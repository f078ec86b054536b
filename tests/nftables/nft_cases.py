"""What nf_tables refuses, as transactions on a small table and the errno of each: the unit tests
check the fake against this list, and it was checked against the real kernel by running this
module as root inside a throwaway network namespace
(`ip netns exec NS python tests/nftables/nft_cases.py`, which prints each case's errno on the
kernel next to the expected one)."""

from __future__ import annotations

import contextlib
import errno
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from kproxy.dataplane.nftables import encode as e
from kproxy.dataplane.nftables.delta import (
    NFT_MSG_DELCHAIN,
    NFT_MSG_DELRULE,
    NFT_MSG_DELSET,
    NFT_MSG_DELSETELEM,
    NFT_MSG_DELTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWSET,
    NFT_MSG_NEWSETELEM,
    NFT_MSG_NEWTABLE,
)
from kproxy.dataplane.nftables.kernel import (
    NFT_MSG_GETCHAIN,
    NFT_MSG_GETRULE,
    NFT_MSG_GETSET,
    NFT_MSG_GETSETELEM,
    NFT_MSG_GETTABLE,
)
from kproxy.dataplane.nftables.netlink import (
    NLM_F_APPEND,
    NLM_F_CREATE,
    NLM_F_EXCL,
    NetlinkError,
    NftNetlink,
    iter_attrs,
)
from kproxy.dataplane.nftables.templates import attr
from kproxy.plan.nftables.ir import (
    Chain,
    Element,
    Hook,
    Key,
    Lookup,
    NamedSet,
    Rule,
    Update,
    Verdict,
)

IP = 2
GOLDEN = Path(__file__).parents[1] / "golden" / "nft_fake_dumps.json"
T = "kpt-fake"
Msg = tuple[int, int, int, bytes]

SET = NamedSet("addresses", ("ipv4_addr",))
MAP = NamedSet("services", ("ipv4_addr", "inet_proto", "inet_service"), verdict_map=True)
BASE = Chain("input", (), Hook("filter", "input", 0))
ELEMENT = Element(("10.0.0.1", "tcp", "80"), Verdict("goto", "svc"))


def table(flags: int = NLM_F_CREATE) -> Msg:
    return (NFT_MSG_NEWTABLE, flags, IP, e.table_attrs(T))


def chain(c: Chain | str, flags: int = NLM_F_CREATE) -> Msg:
    return (NFT_MSG_NEWCHAIN, flags, IP, e.chain_attrs(T, c if isinstance(c, Chain) else Chain(c)))


def rule(chain_name: str, *statements: object, table_name: str = T) -> Msg:
    r = Rule(tuple(statements))  # type: ignore[arg-type]
    flags = NLM_F_CREATE | NLM_F_APPEND
    return (NFT_MSG_NEWRULE, flags, IP, e.rule_attrs(table_name, chain_name, r, 4))


def named_set(s: NamedSet, flags: int = NLM_F_CREATE) -> Msg:
    return (NFT_MSG_NEWSET, flags, IP, e.set_attrs(T, s, 1))


def elements(s: NamedSet, *els: Element, flags: int = NLM_F_CREATE) -> Msg:
    (attrs,) = e.element_batches(T, s.name, list(els))
    return (NFT_MSG_NEWSETELEM, flags, IP, attrs)


def del_elements(s: NamedSet, *els: Element) -> Msg:
    (attrs,) = e.element_batches(T, s.name, list(els), with_data=False)
    return (NFT_MSG_DELSETELEM, 0, IP, attrs)


def del_chain(name: str) -> Msg:
    return (NFT_MSG_DELCHAIN, 0, IP, e.chain_name_attrs(T, name))


# A table with a base chain, a regular chain `svc`, a set and a verdict map (goto svc).
SETUP: list[Msg] = [
    table(),
    chain(BASE),
    chain("svc"),
    named_set(SET),
    named_set(MAP),
    elements(SET, Element(("10.0.0.9",))),
    elements(MAP, ELEMENT),
]


@dataclass(frozen=True)
class Case:
    name: str
    setup: tuple[Msg, ...]  # one transaction after SETUP
    refused: tuple[Msg, ...]  # the transaction judged
    code: int  # the kernel's errno (0: accepted)


def case(name: str, code: int, *refused: Msg, setup: tuple[Msg, ...] = ()) -> Case:
    return Case(name, setup, refused, code)


CASES = (
    case(
        "delete a missing table", errno.ENOENT, (NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs("x"))
    ),
    case("delete a missing chain", errno.ENOENT, del_chain("missing")),
    case("delete a missing set", errno.ENOENT, (NFT_MSG_DELSET, 0, IP, e.set_name_attrs(T, "x"))),
    case("delete a missing element", errno.ENOENT, del_elements(SET, Element(("10.0.0.8",)))),
    case(
        "flush a missing chain", errno.ENOENT, (NFT_MSG_DELRULE, 0, IP, e.rule_chain_attrs(T, "x"))
    ),
    case("a rule in a missing chain", errno.ENOENT, rule("missing", Verdict("accept"))),
    case(
        "a rule in a missing table",
        errno.ENOENT,
        rule("svc", Verdict("accept"), table_name="missing"),
    ),
    case("a jump to a missing chain", errno.ENOENT, rule("svc", Verdict("jump", "missing"))),
    case("a goto to a missing chain", errno.ENOENT, rule("svc", Verdict("goto", "missing"))),
    case(
        "a map element going to a missing chain",
        errno.ENOENT,
        elements(MAP, Element(("10.0.0.2", "tcp", "80"), Verdict("goto", "missing"))),
    ),
    case("a jump to a base chain", errno.EOPNOTSUPP, rule("svc", Verdict("jump", "input"))),
    case("a lookup of a missing set", errno.ENOENT, rule("svc", Lookup((Key.SADDR,), "x"))),
    case(
        "delete a chain a rule jumps to",
        errno.EBUSY,
        del_chain("other"),
        setup=(chain("other"), rule("svc", Verdict("jump", "other"))),
    ),
    case("delete a chain a map element goes to", errno.EBUSY, del_chain("svc")),
    case(
        "delete a set a rule looks up",
        errno.EBUSY,
        (NFT_MSG_DELSET, 0, IP, e.set_name_attrs(T, SET.name)),
        setup=(rule("svc", Lookup((Key.SADDR,), SET.name), Verdict("accept")),),
    ),
    case(
        "a map element with a key of the wrong length",
        errno.EINVAL,
        elements(MAP, Element(("10.0.0.2",), Verdict("goto", "svc"))),
    ),
    case(
        "a set element with a key of another type",
        errno.EINVAL,
        elements(SET, Element(("tcp", "80"))),
    ),
    case("a map element without a verdict", errno.EINVAL, elements(MAP, Element(ELEMENT.key))),
    case(
        "a set element with a verdict",
        errno.EINVAL,
        elements(SET, Element(("10.0.0.2",), Verdict("accept"))),
    ),
    case("an existing table with NLM_F_EXCL", errno.EEXIST, table(NLM_F_CREATE | NLM_F_EXCL)),
    case(
        "an existing chain with NLM_F_EXCL", errno.EEXIST, chain("svc", NLM_F_CREATE | NLM_F_EXCL)
    ),
    case(
        "an existing set with NLM_F_EXCL", errno.EEXIST, named_set(SET, NLM_F_CREATE | NLM_F_EXCL)
    ),
    case(
        "an existing element with NLM_F_EXCL",
        errno.EEXIST,
        elements(MAP, ELEMENT, flags=NLM_F_CREATE | NLM_F_EXCL),
    ),
    case(
        "an existing element with another verdict",
        errno.EEXIST,
        elements(MAP, Element(ELEMENT.key, Verdict("drop"))),
    ),
    case(
        "a loop of jumps from a base chain",
        errno.EMLINK,
        rule("b", Verdict("jump", "a")),
        setup=(
            chain("a"),
            chain("b"),
            rule("input", Verdict("jump", "a")),
            rule("a", Verdict("jump", "b")),
        ),
    ),
    case(
        "an existing set again with another definition",
        errno.EEXIST,
        named_set(NamedSet(SET.name, ("ipv4_addr",), flags=("timeout",), timeout=60)),
    ),
    case(
        "an existing set again with another key",
        errno.EEXIST,
        named_set(NamedSet(SET.name, ("ipv6_addr",))),
    ),
    case(
        "an existing regular chain again with a hook",
        errno.EOPNOTSUPP,
        chain(Chain("svc", (), Hook("filter", "output", 0))),
    ),
    case(
        "an existing base chain again with another priority",
        errno.EOPNOTSUPP,
        chain(Chain("input", (), Hook("filter", "input", 10))),
    ),
    # Accepted, for contrast:
    case("delete a table and all it holds", 0, (NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs(T))),
    case("an existing table, chain, set and element again", 0, *SETUP[:3], elements(MAP, ELEMENT)),
    case(
        "delete a chain with rules nothing jumps to",
        0,
        del_chain("other"),
        setup=(chain("other"), rule("other", Verdict("accept"))),
    ),
    case(
        "a loop of chains no base chain reaches",
        0,
        chain("a"),
        chain("b"),
        rule("a", Verdict("jump", "b")),
        rule("b", Verdict("jump", "a")),
    ),
    case(
        "delete an element and the chain it went to",
        0,
        del_elements(MAP, ELEMENT),
        del_chain("svc"),
    ),
)


# Dumps: (what, message type, attributes): the errno or how many answers, on the SETUP table
# beside another table with one chain.
OTHER = "kpt-other"
DUMPS = (
    ("the rules of a missing chain", 7, e.rule_chain_attrs(T, "missing")),
    ("the rules of a chain", 7, e.rule_chain_attrs(T, "svc")),
    ("the rules of a chain of a missing table", 7, e.rule_chain_attrs("missing", "svc")),
    ("the elements of a missing set", 13, e.element_list_attrs(T, "missing")),
    ("the elements of a set", 13, e.element_list_attrs(T, MAP.name)),
    ("the chains of a table (unfiltered)", 4, e.table_name_attrs(T)),
    ("the chains of a missing table (unfiltered)", 4, e.table_name_attrs("missing")),
    ("the sets of a table", 10, e.table_name_attrs(T)),
)


def probe_dumps(nl: NftNetlink) -> list[tuple[str, str]]:
    """Each dump's errno name, or how many answers (before the request's filtering)."""
    from kproxy.dataplane.nftables import netlink

    nl.transact([*SETUP, rule("svc", Verdict("accept")), rule("svc", Verdict("drop"))])
    nl.transact([(NFT_MSG_NEWTABLE, NLM_F_CREATE, IP, e.table_attrs(OTHER))])
    nl.transact([(NFT_MSG_NEWCHAIN, NLM_F_CREATE, IP, e.chain_name_attrs(OTHER, "c"))])
    out = []
    keep = netlink.answers
    netlink.answers = lambda msg, family, request: True  # count what the kernel sends
    try:
        for what, kind, attrs in DUMPS:
            try:
                out.append((what, str(len(nl.dump(kind, IP, attrs)))))
            except NetlinkError as exc:
                out.append((what, errno.errorcode[exc.errno or 0]))
    finally:
        netlink.answers = keep
    for name in (T, OTHER):
        nl.transact([(NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs(name))])
    return out


# A table with every kind of object kproxy writes, to compare the dumps' bytes: a commented
# base chain jumping to a chain, rules with a comment, a lookup and an update, a timeout set.
AFFINITY = NamedSet("affinity", ("ipv4_addr",), flags=("dynamic", "timeout"), timeout=10800)
DUMPED: list[Msg] = [
    *SETUP,
    named_set(AFFINITY),
    chain(Chain("output", (), Hook("nat", "output", -100), "kproxy's output")),
    rule("input", Verdict("jump", "svc")),
    rule("input", Lookup((Key.SADDR,), SET.name), Verdict("accept")),
    (
        NFT_MSG_NEWRULE,
        NLM_F_CREATE | NLM_F_APPEND,
        IP,
        e.rule_attrs(
            T, "svc", Rule((Update(AFFINITY.name, Key.SADDR), Verdict("accept")), "remember"), 4
        ),
    ),
]


def snapshot(nl: NftNetlink) -> dict[str, list[str]]:
    """Every dump of the DUMPED table, each message's attributes in hex (but the sets' attribute
    19, a name the kernel makes up for the set's backend)."""
    nl.transact(DUMPED)
    table = e.table_name_attrs(T)
    get = nl.request(NFT_MSG_GETTABLE, IP, table)
    out = {"table": [get.attrs.hex() if get else ""]}
    out["chains"] = [m.attrs.hex() for m in nl.dump(NFT_MSG_GETCHAIN, IP, table)]
    for name in ("input", "svc", "output"):
        rules = nl.dump(NFT_MSG_GETRULE, IP, e.rule_chain_attrs(T, name))
        out[f"rules {name}"] = [m.attrs.hex() for m in rules]
    sets = nl.dump(NFT_MSG_GETSET, IP, table)
    out["sets"] = [
        b"".join(attr(k, v) for k, v in iter_attrs(m.attrs) if k != 19).hex() for m in sets
    ]
    for s in (SET, MAP, AFFINITY):
        found = nl.dump(NFT_MSG_GETSETELEM, IP, e.element_list_attrs(T, s.name))
        out[f"elements {s.name}"] = [m.attrs.hex() for m in found]
    nl.transact([(NFT_MSG_DELTABLE, 0, IP, table)])
    return out


def run(case: Case, nl: NftNetlink) -> int:
    """The errno of the case's transaction (0: accepted), from a fresh SETUP."""
    with contextlib.suppress(NetlinkError):
        nl.transact([(NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs(T))])
    nl.transact(SETUP)
    if case.setup:
        nl.transact(case.setup)
    try:
        nl.transact(case.refused)
    except NetlinkError as exc:
        return exc.errno
    return 0


def main(open_netlink: Callable[[], NftNetlink] = NftNetlink) -> int:
    wrong = 0
    with open_netlink() as nl:
        for c in CASES:
            got = run(c, nl)
            mark = "ok" if got == c.code else "DIFFERS"
            wrong += got != c.code
            print(f"{mark:8} {errno.errorcode.get(got, '0'):10} {c.name} (expected {c.code})")
        nl.transact([(NFT_MSG_DELTABLE, 0, IP, e.table_name_attrs(T))])
        for what, answer in probe_dumps(nl):
            print(f"dump     {answer:10} {what}")
    return wrong


if __name__ == "__main__":
    if sys.argv[1:] == ["--record"]:  # the kernel's dumps, for test_nftables_fake.py
        with NftNetlink() as nl:
            GOLDEN.write_text(json.dumps(snapshot(nl), indent=1) + "\n")
        sys.exit(0)
    sys.exit(1 if main() else 0)
