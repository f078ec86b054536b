"""The nftables mode reads the `nftables:` section of its KubeProxyConfiguration and ignores the
`iptables:` one, as upstream: its mark bit is the one the kernel's table sets, and masquerading
follows it, with real traffic."""

from __future__ import annotations

import pytest
import yaml

from integration.conftest import Cluster
from integration.netns import NODE_IP
from integration.traffic import probe

VIP = "10.96.100.10"
PORT = 80
TARGET = 8080
CLUSTER_CIDR = "192.168.0.0/16"
CLIENT_IP = "192.168.9.9"

pytestmark = pytest.mark.parametrize("proxy_mode", ["nftables"], indirect=True)


def test_nftables_section_sets_the_mark_and_the_iptables_section_is_ignored(
    cluster: Cluster,
) -> None:
    web = cluster.backend("web-1", "192.168.1.10", TARGET)
    pod = cluster.pod("client", CLIENT_IP)
    cluster.service("web", VIP, PORT, [web], TARGET)
    cluster.configure(cluster_cidr=CLUSTER_CIDR)
    assert cluster.config_file is not None
    doc = yaml.safe_load(cluster.config_file.read_text())
    doc["nftables"] = {"masqueradeBit": 10, "masqueradeAll": False, "syncPeriod": "5s"}
    doc["iptables"] = {"masqueradeBit": 12, "masqueradeAll": True}  # not the nftables mode's
    cluster.config_file.write_text(yaml.safe_dump(doc))
    cluster.sync()

    rules = cluster.rules()
    assert "meta mark set meta mark | 0x00000400" in rules, rules
    assert "0x00004000" not in rules and "0x00001000" not in rules, rules
    # Hairpin traffic is marked with bit 10 and masqueraded on it.
    hairpin = probe(web.ns, VIP, PORT, "tcp", count=3)
    assert hairpin.answers == {"web-1": 3} and hairpin.sources == {NODE_IP: 3}, hairpin
    # iptables.masqueradeAll is not read: a pod in the cluster CIDR keeps its address.
    direct = probe(pod.ns, VIP, PORT, "tcp", count=3)
    assert direct.answers == {"web-1": 3} and direct.sources == {CLIENT_IP: 3}, direct
