"""One conntrack target for the agent and the doctor, from the config's defaults."""

from __future__ import annotations

from kproxy.dataplane.host import conntrack_max_target
from kproxy.doctor.judges import ConntrackLimits, conntrack_limits, judge_conntrack
from kproxy.model.config import ProxyConfig


def test_target_scales_with_cpus_and_never_drops_below_min() -> None:
    assert conntrack_max_target(32768, 131072, 2) == 131072
    assert conntrack_max_target(32768, 131072, 8) == 262144
    assert conntrack_max_target(32768, None, 1) == 32768


def test_no_max_per_core_leaves_the_node_limit_whatever_min_says() -> None:
    assert conntrack_max_target(None, 262144, 4) is None
    assert conntrack_max_target(0, 262144, 4) is None


def test_doctor_limits_default_to_the_config() -> None:
    assert ConntrackLimits() == conntrack_limits(ProxyConfig())


def test_doctor_judges_the_target_the_agent_sets() -> None:
    limits = ConntrackLimits(1000, 3000)
    wanted = conntrack_max_target(1000, 3000, 4)
    assert wanted == 4000
    assert judge_conntrack(wanted, 4, limits).status == "ok"
    assert judge_conntrack(wanted - 1, 4, limits).status == "warn"
