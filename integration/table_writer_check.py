"""Run under `unshare -n` by iptables/test_table_writer.py (one family per process: python-iptables
builds one family's NAT targets per process). In the fresh namespace another program's rules
are restored with counters, then kproxy writes its tables through the legacy backend.

    unshare -n python -m integration.table_writer_check --family 4 --case survive

Cases:
  survive    other programs' chains, jumps, gotos, rules without a verdict, policies and counters
             are what `iptables-legacy-save -c` printed before, byte for byte, after a full sync,
             partial syncs (from the kept index) and cleanup; kproxy's tables read back as planned
  roundtrip  an image cut into chains and compiled again with no change is the same bytes, and
             the index of the compiled blob is the index read from the image
  unlocked   a writer that ignores the xtables lock changes the table between kproxy's read and
             its replace: the kernel refuses the replace, kproxy reads again, and both changes
             are in the table (nothing reverted), on the full and on the partial path
"""

from __future__ import annotations

import argparse
import os
import shlex
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from scenarios import Scenario, endpoint, endpoint_slice, service, service_port, slice_port

from kproxy.dataplane.xtables import table_writer
from kproxy.dataplane.xtables.backend import IptablesDataplane
from kproxy.dataplane.xtables.diff import TableChanges
from kproxy.dataplane.xtables.kernel_image import read_image
from kproxy.dataplane.xtables.table_blob import TableEdit
from kproxy.dataplane.xtables.table_compile import REPLACE_HEADER
from kproxy.dataplane.xtables.table_index import TableIndex, parse_index
from kproxy.errors import DataplaneError
from kproxy.model.config import ProxyConfig
from kproxy.rules.ir import Chain, Rule, Ruleset, Target

# Chains sort before kproxy's (KEEP-), between them and kubelet's (KUBF-) and after (ZZ-), so
# that kproxy's chains move every jump into them.
FOREIGN = {
    4: """*filter
:INPUT DROP [5:500]
:FORWARD ACCEPT [11:1100]
:OUTPUT ACCEPT [7:700]
:KEEP-FIRST - [0:0]
:KUBF-AFTER - [0:0]
:ZZ-LAST - [0:0]
[3:300] -A INPUT -s 10.99.0.1/32 -j KEEP-FIRST
[4:400] -A INPUT -s 10.99.0.2/32
[6:600] -A INPUT -s 10.99.0.3/32 -g ZZ-LAST
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
[2:200] -A FORWARD -j KUBF-AFTER
[9:900] -A KEEP-FIRST -j KUBF-AFTER
[8:800] -A KEEP-FIRST -s 10.1.0.0/16 -j RETURN
[1:10] -A KEEP-FIRST -m comment --comment "no verdict"
[1:100] -A KUBF-AFTER -j ZZ-LAST
-A KUBF-AFTER -d 10.2.0.0/16 -g ZZ-LAST
[5:50] -A ZZ-LAST -m comment --comment "drop it" -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [12:1200]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [13:1300]
:POSTROUTING ACCEPT [14:1400]
:DOCKER - [0:0]
:ZZ-NAT - [0:0]
[21:2100] -A PREROUTING -m addrtype --dst-type LOCAL -j DOCKER
[22:2200] -A OUTPUT ! -d 127.0.0.0/8 -m addrtype --dst-type LOCAL -j DOCKER
[23:2300] -A POSTROUTING -s 172.17.0.0/16 ! -o docker0 -j MASQUERADE
[26:2600] -A POSTROUTING -j ZZ-NAT
[24:2400] -A DOCKER -i docker0 -j RETURN
[27:2700] -A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination 172.17.0.2:80
[28:2800] -A DOCKER -p udp
[25:2500] -A ZZ-NAT -j RETURN
COMMIT
""",
    6: """*filter
:INPUT DROP [5:500]
:FORWARD ACCEPT [11:1100]
:OUTPUT ACCEPT [7:700]
:KEEP-FIRST - [0:0]
:KUBF-AFTER - [0:0]
:ZZ-LAST - [0:0]
[3:300] -A INPUT -s fd00:99::1/128 -j KEEP-FIRST
[4:400] -A INPUT -s fd00:99::2/128
[6:600] -A INPUT -s fd00:99::3/128 -g ZZ-LAST
-A INPUT -p tcp -m tcp --dport 22 -j ACCEPT
[2:200] -A FORWARD -j KUBF-AFTER
[9:900] -A KEEP-FIRST -j KUBF-AFTER
[8:800] -A KEEP-FIRST -s fd00:1::/64 -j RETURN
[1:10] -A KEEP-FIRST -m comment --comment "no verdict"
[1:100] -A KUBF-AFTER -j ZZ-LAST
-A KUBF-AFTER -d fd00:2::/64 -g ZZ-LAST
[5:50] -A ZZ-LAST -m comment --comment "drop it" -j DROP
COMMIT
*nat
:PREROUTING ACCEPT [12:1200]
:INPUT ACCEPT [0:0]
:OUTPUT ACCEPT [13:1300]
:POSTROUTING ACCEPT [14:1400]
:DOCKER - [0:0]
:ZZ-NAT - [0:0]
[21:2100] -A PREROUTING -d fd00:17::1/128 -j DOCKER
[23:2300] -A POSTROUTING -s fd00:17::/64 ! -o docker0 -j MASQUERADE
[26:2600] -A POSTROUTING -j ZZ-NAT
[24:2400] -A DOCKER -i docker0 -j RETURN
[27:2700] -A DOCKER -p tcp -m tcp --dport 8080 -j DNAT --to-destination [fd00:17::2]:80
[28:2800] -A DOCKER -p udp
[25:2500] -A ZZ-NAT -j RETURN
COMMIT
""",
}
TABLES = ("filter", "nat", "mangle")


def _tool(family: int, suffix: str = "") -> str:
    return f"{'iptables' if family == 4 else 'ip6tables'}-legacy{suffix}"


def _cluster(family: int, services: int, changed: int | None = None) -> Ruleset:
    """`services` services with three endpoints each; `changed`: that one's endpoints moved."""
    objs, slices = [], []
    for i in range(services):
        vip = f"172.30.0.{i + 1}" if family == 4 else f"fd00:30::{i + 1:x}"
        objs.append(service(f"svc{i}", vip, [service_port(80, "http")], namespace="ns"))
        base = 200 if i == changed else 1
        ips = [
            f"10.180.{i}.{base + j}" if family == 4 else f"fd00:180:{i:x}::{base + j:x}"
            for j in range(3)
        ]
        slices.append(
            endpoint_slice(
                f"svc{i}",
                f"svc{i}-x",
                [slice_port(8080, "http")],
                [endpoint(ip) for ip in ips],
                namespace="ns",
                address_type="IPv4" if family == 4 else "IPv6",
            )
        )
    cidrs = ("10.0.0.0/8",) if family == 4 else ("fd00::/16",)
    scenario = Scenario(objs, slices, ProxyConfig(cluster_cidrs=cidrs))
    return scenario.ruleset(family)


def _save(family: int) -> str:
    """filter and nat (cleanup also reads, and so creates, mangle)."""
    return "".join(
        subprocess.run(
            [_tool(family, "-save"), "-c", "-t", table], capture_output=True, text=True, check=True
        ).stdout
        for table in ("filter", "nat")
    )


def foreign_lines(family: int) -> list[str]:
    """What `iptables-legacy-save -c` prints of other programs' tables, counters included."""
    return [
        line
        for line in _save(family).splitlines()
        if not line.startswith("#") and "KUBE-" not in line
    ]


def _restore_foreign(family: int) -> None:
    subprocess.run([_tool(family, "-restore"), "-c"], input=FOREIGN[family], text=True, check=True)


def _assert_same(before: list[str], after: list[str], when: str) -> None:
    if before != after:
        diff = [f"- {line}" for line in before if line not in after]
        diff += [f"+ {line}" for line in after if line not in before]
        raise AssertionError(f"other programs' rules changed {when}:\n" + "\n".join(diff))


def _assert_planned(dp: IptablesDataplane, ruleset: Ruleset, when: str) -> None:
    again = dp.apply(ruleset, full=True)
    assert not again.changed, (when, [c.name for t in again.tables for c in t.write])


def case_survive(family: int) -> None:
    _restore_foreign(family)
    before = foreign_lines(family)
    assert "[6:600]" in "\n".join(before) and "-g ZZ-LAST" in "\n".join(before), before
    dp = IptablesDataplane(family, lock_timeout=5)
    first, second = _cluster(family, 6), _cluster(family, 5, changed=2)
    dp.apply(first, full=True)
    dp.close()
    _assert_same(before, foreign_lines(family), "by a full sync")
    _assert_planned(dp, first, "after a full sync")
    for round_, ruleset in enumerate((second, first, second)):
        dp.close()
        result = dp.apply(ruleset, full=False)
        nat = next(t for t in result.tables if t.table == "nat")
        assert not nat.read_kernel and nat.write, ("the partial path was not taken", nat)
        dp.close()
        for table in ("filter", "nat"):  # the index the next sync edits through is the image's
            kept, image = dp._tables.kept(table), read_image(family, table)
            assert kept is not None and kept.index is not None and image is not None, table
            _assert_index(kept.index, parse_index(image), table)
        _assert_same(before, foreign_lines(family), f"by partial sync {round_ + 1}")
    _assert_planned(dp, second, "after the partial syncs")
    dp.cleanup()
    dp.close()
    _assert_same(before, foreign_lines(family), "by cleanup")
    assert "KUBE-SVC" not in _save(family)


def _assert_index(got: TableIndex, want: TableIndex, table: str) -> None:
    def shape(index: TableIndex) -> tuple[Any, ...]:
        builtins = [(b.name, b.hook, b.rules, b.policy) for b in index.builtins]
        return (builtins, index.names, list(index.bounds), list(index.jump_at))

    assert shape(got) == shape(want), table
    assert (got.jump_to, list(got.fall_at), got.end) == (want.jump_to, list(want.fall_at), want.end)
    assert got.positions == want.positions, table


def case_roundtrip(family: int) -> None:
    _restore_foreign(family)
    dp = IptablesDataplane(family, lock_timeout=5, keep_copies=False)
    dp.apply(_cluster(family, 4), full=True)
    for table in ("filter", "nat"):
        image = read_image(family, table)
        assert image is not None
        index = parse_index(image)
        assert index.names and index.jump_at and index.fall_at, table
        edit = TableEdit(image, index)
        edit.apply(TableChanges(table))
        compiled = edit.compile(lambda rule, out, at: (0, 0, ""))  # no rule to write
        try:
            blob = bytes(compiled.blob[REPLACE_HEADER : compiled.size])
            assert blob == bytes(image.entries), f"{table}: the compiled blob differs"
            valid, *points = struct.unpack_from("=11I", image.hooks)
            for hook in range(5):
                if valid & (1 << hook):
                    assert compiled.hook_entry[hook] == points[hook], (table, hook)
                    assert compiled.underflow[hook] == points[5 + hook], (table, hook)
            assert compiled.num_entries == image.num_entries
            _assert_index(compiled.index, index, table)
        finally:
            compiled.close()


def case_unlocked(family: int) -> None:
    """Another writer, without the lock, adds a rule to nat right before kproxy's replace."""
    _restore_foreign(family)
    real = table_writer.replace_table
    calls: list[str] = []
    pending: list[str] = []

    def racing_replace(family_: int, table: str, *args: Any) -> None:
        calls.append(table)
        if table == "nat" and pending:
            source = pending.pop()
            env = {**os.environ, "XTABLES_LOCKFILE": os.environ["XTABLES_LOCKFILE"] + ".other"}
            rule = ["-t", "nat", "-A", "ZZ-NAT", "-s", source, "-j", "RETURN"]
            subprocess.run([_tool(family), *rule], env=env, check=True)
        real(family_, table, *args)

    setattr(table_writer, "replace_table", racing_replace)  # noqa: B010
    dp = IptablesDataplane(family, lock_timeout=5)
    sources = ("10.77.0.1/32", "10.77.0.2/32")
    if family == 6:
        sources = ("fd00:77::1/128", "fd00:77::2/128")
    for source, full, ruleset in zip(
        sources, (True, False), (_cluster(family, 3), _cluster(family, 3, changed=1)), strict=True
    ):
        dp.close()
        pending.append(source)
        calls.clear()
        dp.apply(ruleset, full=full)
        dp.close()
        assert calls.count("nat") == 2, ("the kernel did not refuse the first replace", calls)
        saved = _save(family)
        assert f"-A ZZ-NAT -s {source} -j RETURN" in saved, (full, saved)
        setattr(table_writer, "replace_table", real)  # noqa: B010
        _assert_planned(dp, ruleset, f"after the unlocked writer (full={full})")
        setattr(table_writer, "replace_table", racing_replace)  # noqa: B010


def case_refusals(family: int) -> None:
    """A chain deleted while another program's rules still jump to it, or while a new rule
    does: the write is refused, with libiptc's words, and the kernel's table is left alone."""
    _restore_foreign(family)
    dp = IptablesDataplane(family, lock_timeout=5, keep_copies=False)
    dp.apply(_cluster(family, 2), full=True)
    before = _save(family)
    writer = dp._tables
    for table, deleted, wanted in (("filter", "KUBF-AFTER", None), ("nat", "ZZ-NAT", "DOCKER")):
        image = read_image(family, table)
        assert image is not None
        for index in (None, parse_index(image)):  # the kernel path, and the kept index's
            changes = TableChanges(table, delete=[deleted])
            if wanted is not None:  # DOCKER rewritten with a rule jumping to ZZ-NAT
                changes.write = [Chain(wanted, (Rule(target=Target(deleted)),))]
            try:
                writer.write(changes, image, index)
            except DataplaneError as exc:
                assert f"can't delete chain {deleted}: a rule still jumps to it" in str(exc), exc
            else:
                raise AssertionError(f"deleting {deleted} was not refused ({table})")
    assert _save(family) == before


def _tamper(family: int) -> str:
    """Another program, holding the lock as it should, replaces kproxy's first rule in nat's
    KUBE-SERVICES with one of the same size (another destination): the table's entry count
    and size stay, its bytes do not. Returns the rule it wrote."""
    saved = subprocess.run(
        [_tool(family, "-save"), "-t", "nat"], capture_output=True, text=True, check=True
    ).stdout
    line = next(x for x in saved.splitlines() if x.startswith("-A KUBE-SERVICES -d "))
    args = shlex.split(line)[2:]
    at = args.index("-d") + 1
    args[at] = "172.30.9.9/32" if family == 4 else "fd00:30::99/128"
    subprocess.run(
        [_tool(family), "-w", "-t", "nat", "-R", "KUBE-SERVICES", "1", *args], check=True
    )
    return f"-d {args[at]}"


def case_proof(family: int) -> None:
    """A partial sync writes from what kproxy committed last only when the kernel's table is
    still what kproxy wrote: after another program's same-size edit of a kproxy chain, it
    takes the kernel path (with the image read ahead under the lock, and without) and the
    edit is repaired."""
    _restore_foreign(family)
    dp = IptablesDataplane(family, lock_timeout=5)
    first, second = _cluster(family, 4), _cluster(family, 4, changed=1)
    dp.apply(first, full=True)
    # Each round changes the rules (a sync with nothing to write checks the fingerprint only).
    for ahead, ruleset in ((True, second), (False, first), (True, second), (False, first)):
        dp.close()  # the digest of what was written is kept
        tampered = _tamper(family)
        assert tampered in _save(family)
        if ahead:
            with dp.reading_ahead():
                result = dp.apply(ruleset, full=False)
        else:
            result = dp.apply(ruleset, full=False)
        dp.close()
        nat = next(t for t in result.tables if t.table == "nat")
        assert nat.read_kernel, f"a changed table was written from memory (ahead={ahead})"
        assert tampered not in _save(family), f"the other program's edit stayed (ahead={ahead})"
        _assert_planned(dp, ruleset, f"after a tampered partial sync (ahead={ahead})")


CASES: dict[str, Callable[[int], None]] = {
    "proof": case_proof,
    "refusals": case_refusals,
    "survive": case_survive,
    "roundtrip": case_roundtrip,
    "unlocked": case_unlocked,
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--case", choices=sorted(CASES), required=True)
    args = parser.parse_args()
    CASES[args.case](args.family)
    print(f"{args.case} passed (IPv{args.family})")


if __name__ == "__main__":
    main()
