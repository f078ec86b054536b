"""Golden tests: scenario -> rendered iptables-save text, compared with tests/golden/*.rules.

After a deliberate change to the planner or renderer, regenerate with
`KPROXY_UPDATE_GOLDEN=1 .venv/bin/pytest tests/iptables/test_golden.py` and review the diff
line by line against upstream kube-proxy's iptables proxier (chain order, jump order, comments)
before keeping it."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import scenarios

from kproxy.plan.iptables import naming
from kproxy.plan.iptables.ruleset import LARGE_CLUSTER_ENDPOINTS
from kproxy.rules.render import render_ruleset

GOLDEN = scenarios.GOLDEN


def large_cluster_excerpt() -> str:
    """Only the lines of the small service in a ruleset past the large-cluster threshold."""
    scenario = scenarios.large_cluster()
    ruleset = scenario.ruleset()
    state = scenario.state()
    small = {spn: eps for spn, eps in state.endpoints_map().items() if spn.service.name == "small"}
    wanted = {naming.service_chain(spn) for spn in small}
    wanted |= {naming.endpoint_chain(spn, ep) for spn, eps in small.items() for ep in eps}
    lines = []
    for line in render_ruleset(ruleset).splitlines():
        words = line.split()
        chain = (
            words[1] if line.startswith("-A ") else line[1:].split()[0] if line[:1] == ":" else ""
        )
        if chain in wanted or (chain == "KUBE-SERVICES" and "ns7/small" in line):
            lines.append(line)
    return "\n".join(lines) + "\n"


def _rendered(name: str) -> Callable[[], str]:
    return lambda: scenarios.SCENARIOS[name]().render()


GOLDEN_CASES: dict[str, Callable[[], str]] = {
    "single_service": _rendered("single_service"),
    "multi_port": _rendered("multi_port"),
    "no_endpoints": _rendered("no_endpoints"),
    "terminating_fallback": _rendered("terminating_fallback"),
    "affinity": _rendered("affinity"),
    "masquerade_all": _rendered("masquerade_all"),
    "large_cluster_excerpt": large_cluster_excerpt,
    # Every other service type and policy: NodePort, externalIP and a LoadBalancer IP with source
    # ranges (one of which holds the node's IP), under each external policy.
    "external_cluster": lambda: scenarios.external(
        source_ranges=("203.0.113.0/24", "192.168.1.0/24")
    ).render(),
    "external_local": lambda: scenarios.external(etp="Local").render(),
    "external_local_no_local_endpoint": lambda: scenarios.external(
        etp="Local", local_endpoint=False
    ).render(),
    "internal_local_no_local_endpoint": lambda: scenarios.external(
        itp="Local", local_endpoint=False
    ).render(),
    "dual_stack_ipv6": lambda: scenarios.dual_stack().render(family=6),
    "topology": lambda: scenarios.topology().render(),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden(name: str) -> None:
    scenarios.assert_golden(name, GOLDEN_CASES[name]())


def test_large_cluster_scenario_is_past_the_threshold() -> None:
    state = scenarios.large_cluster().state()
    assert sum(len(eps) for eps in state.endpoints_map().values()) > LARGE_CLUSTER_ENDPOINTS


def test_every_golden_file_has_a_case() -> None:
    # userspace_*.rules belong to tests/userspace/test_userspace_golden.py.
    iptables = {p.stem for p in GOLDEN.glob("*.rules") if not p.stem.startswith("userspace_")}
    assert iptables <= set(GOLDEN_CASES)
