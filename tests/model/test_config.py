import dataclasses
import re
from pathlib import Path

import pytest

from kproxy.errors import ConfigError
from kproxy.model.config import (
    ConntrackConfig,
    ProxyConfig,
    parse_config,
    parse_duration,
    with_flags,
)
from kproxy.model.config_fields import FIELDS, render_field_table, suggest_field

KUBEADM_CONFIG = {
    "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
    "kind": "KubeProxyConfiguration",
    "bindAddress": "0.0.0.0",
    "clusterCIDR": "10.244.0.0/16",
    "conntrack": {"maxPerCore": None, "min": None},
    "iptables": {
        "masqueradeAll": True,
        "masqueradeBit": 15,
        "minSyncPeriod": "0s",
        "syncPeriod": "1m30s",
        "localhostNodePorts": None,
    },
    "mode": "",
}


def test_kubeadm_style_config_is_read_and_unused_fields_named() -> None:
    config, ignored = parse_config(KUBEADM_CONFIG)
    assert config.cluster_cidrs == ("10.244.0.0/16",)
    assert config.masquerade_all is True
    assert config.masquerade_mark == "0x8000/0x8000"
    assert config.sync_period == 90.0
    assert "bindAddress" not in ignored and "conntrack" not in ignored
    assert config.bind_address == ""  # 0.0.0.0 names no address
    assert config.conntrack.max_per_core == 32768  # null: kube-proxy's default
    assert not any(field.startswith("iptables.") for field in ignored)
    assert config.localhost_nodeports is True  # null in the file keeps the default
    assert "clusterCIDR" not in ignored


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"mode": "ipvs"}, "mode"),
        ({"iptables": {"masqueradeBit": 32}}, "iptables.masqueradeBit"),
        ({"iptables": {"masqueradeAll": "yes"}}, "iptables.masqueradeAll"),
        ({"clusterCIDR": "10.0.0.0/33"}, "clusterCIDR"),
        ({"iptables": {"syncPeriod": "soon"}}, "iptables.syncPeriod"),
        ({"kind": "KubeletConfiguration"}, "kind"),
        ({"detectLocalMode": "Magic"}, "detectLocalMode"),
        ({"detectLocalMode": "BridgeInterface"}, "detectLocal.bridgeInterface"),
        ({"nodePortAddresses": ["10.0.0.0/40"]}, "nodePortAddresses[0]"),
    ],
)
def test_bad_values_are_refused_naming_the_field(doc: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse_config(doc)


def test_durations() -> None:
    assert parse_duration("1m0s", "f") == 60.0
    assert parse_duration("500ms", "f") == 0.5
    assert parse_duration("2h", "f") == 7200.0


def test_conntrack_client_connection_and_oom_fields() -> None:
    config, ignored = parse_config(
        {
            "bindAddress": "192.168.1.10",
            "clientConnection": {"kubeconfig": "/var/lib/kube-proxy/kubeconfig.conf", "qps": 5},
            "conntrack": {
                "maxPerCore": 0,
                "min": 262144,
                "tcpEstablishedTimeout": "12h0m0s",
                "tcpCloseWaitTimeout": "1h0m0s",
                "udpTimeout": "0s",
            },
            "oomScoreAdj": -500,
        }
    )
    assert config.bind_address == "192.168.1.10"
    assert config.kubeconfig == "/var/lib/kube-proxy/kubeconfig.conf"
    assert config.conntrack.max_per_core is None and config.conntrack.min == 262144
    assert config.conntrack.tcp_established_timeout == 43200
    assert config.conntrack.udp_timeout is None  # 0s leaves the kernel's value
    assert config.oom_score_adj == -500
    assert ignored == ["clientConnection.qps"]


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ({"conntrack": {"min": -1}}, "conntrack.min"),
        ({"conntrack": {"udpTimeout": "often"}}, "conntrack.udpTimeout"),
        ({"bindAddress": "node-1"}, "bindAddress"),
        ({"oomScoreAdj": 5000}, "oomScoreAdj"),
    ],
)
def test_bad_node_fields_are_refused(doc: dict[str, object], field: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(field)):
        parse_config(doc)


def test_config_error_carries_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"iptables": {"masqueradeBit": 32}})
    assert caught.value.field == "iptables.masqueradeBit"
    assert caught.value.problem == "32 must be an integer from 0 to 31"
    assert (
        str(caught.value)
        == "config field iptables.masqueradeBit: 32 must be an integer from 0 to 31"
    )


def test_a_negative_duration_is_refused_as_negative() -> None:
    with pytest.raises(ConfigError, match=r"iptables\.minSyncPeriod: '-1s' is negative"):
        parse_config({"iptables": {"minSyncPeriod": "-1s"}})
    assert parse_duration("-0s", "f") == 0.0
    assert parse_duration("+1m30s", "f") == 90.0
    with pytest.raises(ConfigError, match="is not a duration"):
        parse_duration("-", "f")


def test_flag_errors_name_the_flag_by_the_error_field() -> None:
    with pytest.raises(ConfigError) as caught:
        with_flags({}, {"--nodeport-addresses": "primary,10.0.0.0/40"})
    assert str(caught.value).startswith("--nodeport-addresses: '10.0.0.0/40' is not a CIDR")
    assert caught.value.field == "nodePortAddresses[1]"
    # The same field from the file keeps the file's name.
    with pytest.raises(ConfigError, match=r"^config field iptables\.syncPeriod:"):
        with_flags({"iptables": {"syncPeriod": "soon"}}, {"--masquerade-all": True})


@pytest.mark.parametrize(
    ("ignored", "suggestion"),
    [
        ("clusterCidr", "clusterCIDR"),
        ("masqueradeAll", "iptables.masqueradeAll"),
        ("iptables.syncperiod", "iptables.syncPeriod"),
        ("conntrack.maxPerCor", "conntrack.maxPerCore"),
        ("metricsBindAdress", "metricsBindAddress"),
        ("iptable", "iptables"),
        ("featureGate", "featureGates"),
        ("configSyncPeriod", None),
        ("showHiddenMetricsForVersion", None),
        ("clientConnection.qps", None),
        ("winkernel", None),
    ],
)
def test_an_ignored_field_near_a_known_one_gets_a_suggestion(
    ignored: str, suggestion: str | None
) -> None:
    assert suggest_field(ignored) == suggestion


def test_ignored_fields_are_named_at_every_level() -> None:
    _, ignored = parse_config(
        {"clusterCidr": "10.0.0.0/8", "iptables": {"syncperiod": "1s"}, "detectLocal": {"x": 1}}
    )
    assert ignored == ["clusterCidr", "detectLocal.x", "iptables.syncperiod"]


def test_every_field_sets_a_real_attribute_and_every_attribute_has_a_field() -> None:
    attrs = {f.attr for f in FIELDS if f.attr}
    top = {f.name for f in dataclasses.fields(ProxyConfig)} - {"conntrack"}
    conntrack = {f"conntrack.{f.name}" for f in dataclasses.fields(ConntrackConfig)}
    assert attrs == top | conntrack
    flags = [f.flag for f in FIELDS if f.flag]
    assert len(flags) == len(set(flags))


def test_readme_field_table_is_the_field_table() -> None:
    readme = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    begin = readme.index("<!-- generated from kproxy/model/config_fields.py")
    begin = readme.index("\n", begin) + 1
    end = readme.index("<!-- end of generated table -->")
    # On a mismatch, paste kproxy.model.config_fields.render_field_table() into
    # docs/configuration.md.
    assert readme[begin:end] == render_field_table()
