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
    assert "bindAddress" in ignored and "conntrack" in ignored
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
