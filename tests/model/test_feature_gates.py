"""featureGates and --feature-gates: the one gate kproxy knows is read, other gates are reported
as ignored (never refused), and a value that is not a boolean is refused naming the gate."""

from __future__ import annotations

from typing import Any

import pytest

from kproxy.errors import ConfigError
from kproxy.model.config import ProxyConfig, parse_config, with_flags

GATE = "KubeProxyNFTablesLocalhostNodePorts"
BASE = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}


def test_the_gate_is_off_by_default_as_upstream_alpha() -> None:
    assert not ProxyConfig().feature_enabled(GATE)
    config, ignored = parse_config({**BASE, "featureGates": {}})
    assert not config.feature_enabled(GATE) and ignored == []


@pytest.mark.parametrize("value", [True, "true", "True", "1", "t"])
def test_the_gate_is_read_from_the_config(value: Any) -> None:
    config, ignored = parse_config({**BASE, "mode": "nftables", "featureGates": {GATE: value}})
    assert config.feature_enabled(GATE)
    assert ignored == []


def test_other_gates_are_ignored_with_their_path_named() -> None:
    config, ignored = parse_config(
        {**BASE, "featureGates": {"SomeUpstreamGate": True, GATE: False}}
    )
    assert ignored == ["featureGates.SomeUpstreamGate"]
    assert config.feature_gates == ((GATE, False),)


@pytest.mark.parametrize("value", ["maybe", 2, None, [True]])
def test_a_gate_value_that_is_not_a_boolean_is_refused(value: Any) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({**BASE, "featureGates": {GATE: value}})
    assert caught.value.field == "featureGates"
    assert GATE in str(caught.value)


def test_feature_gates_must_be_a_mapping() -> None:
    with pytest.raises(ConfigError, match="featureGates"):
        parse_config({**BASE, "featureGates": ["KubeProxyNFTablesLocalhostNodePorts"]})


def test_the_flag_sets_gates_and_wins_over_the_file() -> None:
    doc = {**BASE, "featureGates": {GATE: False}}
    config, ignored = with_flags(doc, {"--feature-gates": f"Other=true, {GATE}=true"})
    assert config.feature_enabled(GATE)
    assert ignored == ["featureGates.Other"]


def test_the_flag_adds_to_the_files_gates() -> None:
    doc = {**BASE, "mode": "nftables", "featureGates": {GATE: True}}
    config, ignored = with_flags(doc, {"--feature-gates": "Other=false"})
    assert config.feature_enabled(GATE)
    assert ignored == ["featureGates.Other"]


def test_a_malformed_flag_names_the_flag() -> None:
    with pytest.raises(ConfigError) as caught:
        with_flags(BASE, {"--feature-gates": GATE})
    assert "--feature-gates" in str(caught.value)
