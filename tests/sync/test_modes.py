"""The mode registry (sync/modes.py): each registered mode provides every piece the rest of the
agent asks of it, and the config's modes, the `--proxy-mode` help and the default are the
registry's. The pieces that touch no kernel are called; those that do are checked for their
shape (the kernel tests in integration/ call them)."""

from __future__ import annotations

import inspect
from functools import partial

import pytest

from kproxy.dataplane.base import ApplyResult, NodeNeeds
from kproxy.dataplane.iptables.node import IptablesNode
from kproxy.dataplane.xtables.fake import FakeDataplane
from kproxy.errors import ConfigError
from kproxy.health.healthz import ProxyHealth
from kproxy.health.metrics import ProxyMetrics
from kproxy.model.config import ProxyConfig
from kproxy.model.config_fields import BY_PATH
from kproxy.model.config_values import DEFAULT_MODE, MODE_SECTIONS, parse_mode
from kproxy.model.node import NodeInfo
from kproxy.plan.node_plan import NodePlan
from kproxy.rules.explain import Traceable
from kproxy.sync.loop import StateBox, SyncLoop
from kproxy.sync.modes import MODES, Deferred, other_modes_leftovers, proxy_mode, remove_every_mode
from tests import scenarios
from tests.conftest import Leftovers


def test_the_config_names_the_registrys_modes() -> None:
    assert set(MODE_SECTIONS) == set(MODES)
    assert DEFAULT_MODE in MODES and proxy_mode(ProxyConfig(mode="")).name == DEFAULT_MODE
    help_text = BY_PATH["mode"].help
    assert all(name in help_text for name in MODES), help_text
    for name in MODES:
        assert parse_mode(name, "mode") == name
    with pytest.raises(ConfigError, match="kproxy implements"):
        parse_mode("ipvs", "mode")


@pytest.mark.parametrize("name", sorted(MODES))
def test_each_mode_provides_every_piece(name: str) -> None:
    mode = MODES[name]
    assert mode.name == name
    scenario = scenarios.single_service()
    config = ProxyConfig(mode=name)
    state = scenario.state()
    plan = mode.planner(config).plan(
        state.services_map(), state.endpoints_map(), scenario.node, (4,)
    )
    assert isinstance(plan, NodePlan) and plan.mode == name and plan.families == (4,)
    # The rules gauges count this plan's rules under the mode's tables.
    assert mode.rule_tables and sum(plan.stats.rules.get(t, 0) for t in mode.rule_tables) > 0
    assert isinstance(mode.render_plan(plan, 4), str) and mode.render_plan(plan, 4)
    traced: Traceable = mode.trace_plan(plan, 4)
    assert isinstance(traced.endpoint_addresses(), set) and callable(traced.explain)
    assert isinstance(mode.needs, NodeNeeds) and mode.needs.tables in (
        "legacy",
        "xtables",
        "nftables",
    )
    assert isinstance(mode.serves_in_process, bool)
    # What reads or writes the kernel: called by the integration tests; here, their shape.
    for piece, arity in [
        (mode.open_dataplane, 2),
        *((place.remove, 1) for place in mode.leftovers),
        (mode.read_live, 1),
        (mode.trace_live, 2),
        (mode.diff, 3),
    ]:
        # A Deferred piece names a function that exists, with that arity.
        function = piece.target() if isinstance(piece, Deferred) else piece
        params = inspect.signature(function).parameters.values()
        required = [p for p in params if p.default is inspect.Parameter.empty]
        assert len(required) == arity, (name, piece)


@pytest.mark.parametrize("name", sorted(MODES))
def test_each_modes_stop_leaves_a_loop_of_another_dataplane_alone(name: str) -> None:
    health, metrics = ProxyHealth(timeout=60.0), ProxyMetrics()
    box = StateBox("node-a", health, metrics)
    box.state = scenarios.single_service().state()
    box.state.node = NodeInfo(name="node-a")
    fake = FakeDataplane()
    node = IptablesNode({4: fake}, write_sysctls=lambda sysctls: None)
    loop = SyncLoop(box, ProxyConfig(), MODES["iptables"], node, metrics, health)
    assert loop.sync() is not None
    before = fake.read()
    MODES[name].on_stop(loop)
    assert fake.read() == before


def test_each_mode_removes_only_the_other_modes_leftovers(leftovers: Leftovers) -> None:
    calls: list[str] = []
    for where in ("legacy", "iptables-nft", "nftables"):
        leftovers.removals[where] = partial(lambda w: calls.append(w) or [], where)
    ran = {}
    for name, mode in MODES.items():
        calls.clear()
        for removal in other_modes_leftovers(mode, 5.0):
            removal.after_commit(ApplyResult())
        ran[name] = list(calls)
    # The iptables mode writes either x_tables backend (and empties the other one itself); the
    # userspace mode's portals are legacy rules, so it removes the iptables mode's iptables-nft
    # chains; neither removes the legacy tables, where each one's commits replace the other's.
    assert ran == {
        "iptables": ["nftables"],
        "nftables": ["legacy", "iptables-nft"],
        "userspace": ["iptables-nft", "nftables"],
    }
    calls.clear()
    remove_every_mode(5.0)  # `kproxy cleanup`
    assert calls == ["legacy", "iptables-nft", "nftables"]
