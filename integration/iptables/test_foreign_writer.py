"""Another program writes nat and filter while the agent syncs several times a second.

The other program takes the xtables lock (`iptables-legacy -w`) and pairs every add with a delete
of the same size, so the table's entry count and byte size come back to what they were: the case
that fooled a fingerprint-only check into committing a stale copy. After every pair it reads the
tables and compares everything of its own (its chains, its rules in them, its rules in built-in
chains) with what it wrote; none of it may be dropped, reverted or resurrected, ever.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from integration.agent_harness import AgentNode, agent_node, slice_object
from integration.manifests import service_manifest

WRITER_SECONDS = 35.0
CHANGE_INTERVAL = 0.25  # one endpoint change every 0.25 s: minSyncPeriod 0s syncs each one
TABLES = ("nat", "filter")
BUILTIN = {"nat": "PREROUTING", "filter": "INPUT"}
CHAIN_POOL = 4  # foreign user chains per table, each swapped for a new one now and then


@dataclass
class ForeignTables:
    """What the other program has written: per table, its chains with their rules, and its own
    rules in a built-in chain. A rule is its source address (every rule has the same shape)."""

    chains: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    builtin: dict[str, list[str]] = field(default_factory=dict)

    def expected(self, table: str) -> dict[str, list[str]]:
        out = {
            f"-N {name}": [f"-s {ip}/32" for ip in rules]
            for name, rules in self.chains[table].items()
        }
        out[BUILTIN[table]] = [f"-s {ip}/32" for ip in self.builtin[table]]
        return out


def _foreign_view(save_text: str, table: str) -> dict[str, list[str]]:
    """The other program's part of `iptables-legacy-save -t TABLE` output, shaped as expected()."""
    view: dict[str, list[str]] = {BUILTIN[table]: []}
    for line in save_text.split("\n"):
        if line.startswith(":FOREIGN-"):
            view.setdefault(f"-N {line[1:].split()[0]}", [])
        elif line.startswith("-A FOREIGN-"):
            parts = line.split()
            view.setdefault(f"-N {parts[1]}", []).append(f"{parts[2]} {parts[3]}")
        elif line.startswith(f"-A {BUILTIN[table]} -s 10.251."):
            view[BUILTIN[table]].append(f"-s {line.split()[3]}")
    return view


class _Lost(Exception):
    """A command of the writer failed because the table lost something of the writer's."""


class BalancedWriter:
    """Adds and deletes its own rules and chains in pairs that leave the size unchanged."""

    def __init__(self, node: AgentNode, seed: int) -> None:
        self.node = node
        self.rng = random.Random(seed)
        self.state = ForeignTables()
        self.mismatches: list[str] = []
        self.pairs = 0
        self._serial = 0

    def _iptables(self, table: str, *args: str) -> None:
        """One command, under the lock. It fails only where the table lost what the writer made
        (a chain or rule gone): that is recorded, and the writer goes on from the table."""
        proc = self.node.node.run(
            "iptables-legacy",
            "-w",
            "-t",
            table,
            *args,
            env={"XTABLES_LOCKFILE": str(self.node.lock_file)},
            check=False,
        )
        if proc.returncode != 0:
            self.mismatches.append(f"`{' '.join(args)}` failed: {proc.stderr.strip()}")
            self.resync(table)
            raise _Lost

    def _address(self, marker: int) -> str:
        self._serial += 1
        return f"10.{marker}.{self._serial // 250 % 250}.{self._serial % 250 + 1}"

    def _chain_name(self, table: str) -> str:
        self._serial += 1
        return f"FOREIGN-{table[:3].upper()}-{self._serial:05d}"

    def set_up(self) -> None:
        for table in TABLES:
            self.state.chains[table] = {}
            self.state.builtin[table] = []
            for _ in range(CHAIN_POOL):
                name = self._chain_name(table)
                self._iptables(table, "-N", name)
                self.state.chains[table][name] = []
                for _ in range(3):
                    ip = self._address(250)
                    self._iptables(table, "-A", name, "-s", ip, "-j", "RETURN")
                    self.state.chains[table][name].append(ip)
            for _ in range(3):
                ip = self._address(251)
                self._iptables(table, "-A", BUILTIN[table], "-s", ip, "-j", "RETURN")
                self.state.builtin[table].append(ip)

    def _swap_rule(self, table: str) -> None:
        chains = self.state.chains[table]
        into = self.rng.choice([*chains, BUILTIN[table]])
        from_ = self.rng.choice([c for c in [*chains, BUILTIN[table]] if self._rules(table, c)])
        ip = self._address(251 if into == BUILTIN[table] else 250)
        self._iptables(table, "-A", into, "-s", ip, "-j", "RETURN")
        self._rules(table, into).append(ip)
        rules = self._rules(table, from_)
        gone = rules.pop(self.rng.randrange(len(rules)))
        self._iptables(table, "-D", from_, "-s", gone, "-j", "RETURN")

    def _swap_chain(self, table: str) -> None:
        """A new chain with one rule for an old chain with one rule: the same size."""
        chains = self.state.chains[table]
        old = [c for c, rules in chains.items() if len(rules) == 1]
        if not old:
            self._swap_rule(table)
            return
        new, ip = self._chain_name(table), self._address(250)
        self._iptables(table, "-N", new)
        self._iptables(table, "-A", new, "-s", ip, "-j", "RETURN")
        chains[new] = [ip]
        gone = self.rng.choice(old)
        self._iptables(table, "-F", gone)
        self._iptables(table, "-X", gone)
        del chains[gone]

    def _rules(self, table: str, chain: str) -> list[str]:
        if chain == BUILTIN[table]:
            return self.state.builtin[table]
        return self.state.chains[table][chain]

    def check(self) -> None:
        for table in TABLES:
            seen = self._read(table)
            if seen != self.state.expected(table):
                self.mismatches.append(f"{table} after {self.pairs} pairs: {seen!r}")
                self._adopt(seen, table)

    def resync(self, table: str) -> None:
        self._adopt(self._read(table), table)

    def _read(self, table: str) -> dict[str, list[str]]:
        return _foreign_view(self.node.node.run("iptables-legacy-save", "-t", table).stdout, table)

    def _adopt(self, seen: dict[str, list[str]], table: str) -> None:
        """Go on from what the table now holds, so one loss is reported once, not forever."""
        self.state.builtin[table] = [r.split()[1][:-3] for r in seen.get(BUILTIN[table], [])]
        self.state.chains[table] = {
            key[3:]: [r.split()[1][:-3] for r in rules]
            for key, rules in seen.items()
            if key.startswith("-N ")
        }

    def run(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            table = self.rng.choice(TABLES)
            try:
                if self.rng.random() < 0.15:
                    self._swap_chain(table)
                else:
                    self._swap_rule(table)
            except _Lost:
                continue
            self.pairs += 1
            self.check()


def _churn(node: AgentNode, stop: threading.Event) -> None:
    """Endpoint changes that make the agent commit nat over and over."""
    round_ = 0
    while not stop.is_set():
        round_ += 1
        ips = ["192.168.1.10", f"192.168.2.{round_ % 200 + 1}"]
        node.api.apply("EndpointSlice", slice_object("web", ips, 8080))
        stop.wait(CHANGE_INTERVAL)


@pytest.fixture
def node(tmp_path: Path) -> Iterator[AgentNode]:
    with agent_node("foreign", tmp_path) as built:
        yield built


def test_balanced_foreign_writer_loses_nothing(node: AgentNode) -> None:
    writer = BalancedWriter(node, seed=7)
    writer.set_up()
    node.api.apply("Service", service_manifest("web", "10.96.0.10", 80, 8080))
    node.api.apply("EndpointSlice", slice_object("web", ["192.168.1.10"], 8080))
    agent = node.start_agent()
    stop = threading.Event()
    churn = threading.Thread(target=_churn, args=(node, stop), daemon=True)
    churn.start()
    try:
        writer.run(WRITER_SECONDS)
    finally:
        stop.set()
        churn.join()
    syncs = len(agent.syncs())
    agent.terminate()
    writer.check()
    assert writer.pairs > 200, f"the writer made only {writer.pairs} pairs of changes"
    assert syncs > WRITER_SECONDS, f"the agent synced only {syncs} times"
    assert writer.mismatches == [], (
        f"{len(writer.mismatches)} of {writer.pairs} checks found the other program's rules "
        f"changed; first: {writer.mismatches[0][:2000]}"
    )
