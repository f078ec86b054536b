"""Golden tests of the nftables mode: scenario -> the `kube-proxy` table as `nft list table`
prints it, compared with tests/golden/nftables_*.nft.

After a deliberate change, regenerate with
`KPROXY_UPDATE_GOLDEN=1 .venv/bin/pytest tests/nftables/test_nftables_golden.py` and review the diff
(chain, set and map names, hooks and priorities, verdicts) before keeping it. The integration
oracle test checks that `nft -f` loads this text into what kproxy writes over netlink."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import scenarios

GOLDEN = scenarios.GOLDEN
SUFFIX = ".nft"


def _rendered(name: str, family: int = 4) -> Callable[[], str]:
    return lambda: scenarios.SCENARIOS[name]().render_nft(family)


GOLDEN_CASES: dict[str, Callable[[], str]] = {
    "nftables_single_service": _rendered("single_service"),
    "nftables_multi_port": _rendered("multi_port"),
    "nftables_no_endpoints": _rendered("no_endpoints"),
    "nftables_terminating_fallback": _rendered("terminating_fallback"),
    "nftables_affinity": _rendered("affinity"),
    "nftables_masquerade_all": _rendered("masquerade_all"),
    "nftables_external_cluster": lambda: scenarios.external(
        source_ranges=("203.0.113.0/24", "192.168.1.0/24")
    ).render_nft(),
    "nftables_external_local": lambda: scenarios.external(etp="Local").render_nft(),
    "nftables_external_local_no_local_endpoint": lambda: scenarios.external(
        etp="Local", local_endpoint=False
    ).render_nft(),
    "nftables_internal_local_no_local_endpoint": lambda: scenarios.external(
        itp="Local", local_endpoint=False
    ).render_nft(),
    "nftables_dual_stack_ipv6": _rendered("dual_stack", 6),
    "nftables_topology": lambda: scenarios.topology().render_nft(),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_nftables_golden(name: str) -> None:
    scenarios.assert_golden(name, GOLDEN_CASES[name](), SUFFIX)


def test_every_nftables_golden_file_has_a_case() -> None:
    assert {p.stem for p in GOLDEN.glob("*" + SUFFIX)} <= set(GOLDEN_CASES)
