import re

import pytest

from kproxy.errors import ConfigError
from kproxy.model.config import parse_config, parse_duration

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
