"""Run under `unshare -n` by test_fast_path.py: for random clusters, every entry the template
fast path builds must equal, byte for byte, the entry python-iptables builds for the same rule;
and the rules read back from the kernel after an apply must be exactly the planned ones.

    unshare -n python -m integration.fast_path_check --family 4 --examples 200
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "iptables"))

from scenarios import Scenario
from test_properties import clusters

from kproxy.dataplane.xtables.backend import IptablesDataplane
from kproxy.dataplane.xtables.entries import _finished, build_rule
from kproxy.rules.render import render_rule


def _handles_with_chains(dp: IptablesDataplane, scenario: Scenario, family: int) -> None:
    """Declare the ruleset's chains in the (uncommitted) handles so jumps to them resolve."""
    iptc: Any = dp._iptc
    for table in scenario.ruleset(family).tables:
        handle = (iptc.Table if family == 4 else iptc.Table6)(table.name, autocommit=False)
        handle.refresh()
        for chain in table.chains:
            if not handle.is_chain(chain.name):
                handle.create_chain(chain.name)


def check(family: int, examples: int) -> int:
    dp = IptablesDataplane(family)
    compared = [0]

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(clusters())
    def same_entries(scenario: Scenario) -> None:
        dp.close()  # let the last apply's background reader finish (it holds the lock)
        _handles_with_chains(dp, scenario, family)
        ruleset = scenario.ruleset(family)
        for table in ruleset.tables:
            pairs = [(c.name, r) for c in table.chains for r in c.rules]
            pairs += [(j.chain, j.rule) for j in table.jumps]
            for chain, rule in pairs:
                fast = bytes(dp._tables.entries.entry(rule))
                slow = bytes(_finished(build_rule(dp._iptc, family, rule)))
                assert fast == slow, f"entry differs for {render_rule(chain, rule)}"
                compared[0] += 1
        # Drop the chains declared above (never committed) before applying for real.
        for table in ruleset.tables:
            handle = (dp._iptc.Table if family == 4 else dp._iptc.Table6)(table.name)
            handle.refresh()
            dp._tables.forget(table.name)
        # And through the kernel: what is read back is what was planned.
        dp.apply(ruleset, full=True)
        again = dp.apply(ruleset, full=True)
        assert not again.changed, [c.name for t in again.tables for c in t.write]

    same_entries()
    return compared[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--family", type=int, choices=(4, 6), default=4)
    parser.add_argument("--examples", type=int, default=200)
    args = parser.parse_args()
    compared = check(args.family, args.examples)
    print(f"compared {compared} entries over {args.examples} clusters (IPv{args.family})")


if __name__ == "__main__":
    main()
