from hypothesis import given
from hypothesis import strategies as st

from kproxy.model.endpoint import Endpoint
from kproxy.model.service import NamespacedName, Protocol, ServicePortName
from kproxy.plan.iptables import naming


def spn(ns: str, name: str, port: str, proto: Protocol) -> ServicePortName:
    return ServicePortName(NamespacedName(ns, name), port, proto)


# Names every operator has seen in `iptables-save` on a kubeadm cluster (reference section 2).
KNOWN_SERVICE_CHAINS = [
    (spn("kube-system", "kube-dns", "dns", Protocol.UDP), "KUBE-SVC-TCOU7JCQXEZGVUNU"),
    (spn("kube-system", "kube-dns", "dns-tcp", Protocol.TCP), "KUBE-SVC-ERIFXISQEP7F7OF4"),
    (spn("default", "kubernetes", "https", Protocol.TCP), "KUBE-SVC-NPX46M4PTMTKRN6Y"),
]


def test_service_chain_names_match_upstream() -> None:
    for name, expected in KNOWN_SERVICE_CHAINS:
        assert naming.service_chain(name) == expected


def test_port_name_string_omits_colon_for_unnamed_port() -> None:
    assert str(spn("default", "my-nginx", "", Protocol.TCP)) == "default/my-nginx"
    assert str(spn("kube-system", "kube-dns", "dns", Protocol.UDP)) == "kube-system/kube-dns:dns"


def test_svc_svl_ext_fw_share_the_hash() -> None:
    name = spn("ns1", "svc1", "p80", Protocol.TCP)
    suffixes = {
        naming.service_chain(name)[len("KUBE-SVC-") :],
        naming.local_service_chain(name)[len("KUBE-SVL-") :],
        naming.external_chain(name)[len("KUBE-EXT-") :],
        naming.firewall_chain(name)[len("KUBE-FW-") :],
    }
    assert len(suffixes) == 1


def test_protocol_changes_the_hash() -> None:
    tcp = spn("kube-system", "kube-dns", "dns", Protocol.TCP)
    udp = spn("kube-system", "kube-dns", "dns", Protocol.UDP)
    assert naming.service_chain(tcp) != naming.service_chain(udp)


def test_endpoint_chain_depends_on_endpoint_and_uses_bracketed_ipv6() -> None:
    name = spn("ns", "svc", "http", Protocol.TCP)
    a = naming.endpoint_chain(name, Endpoint("10.0.0.1", 80))
    b = naming.endpoint_chain(name, Endpoint("10.0.0.2", 80))
    assert a != b and a.startswith("KUBE-SEP-")
    assert str(Endpoint("fd00::1", 80)) == "[fd00::1]:80"


@given(
    ns=st.from_regex(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True),
    name=st.from_regex(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?", fullmatch=True),
    port=st.from_regex(r"([a-z0-9]([-a-z0-9]{0,13}[a-z0-9])?)?", fullmatch=True),
    proto=st.sampled_from(list(Protocol)),
    ip=st.ip_addresses(v=4).map(str),
    number=st.integers(1, 65535),
)
def test_chain_names_are_stable_and_short(
    ns: str, name: str, port: str, proto: Protocol, ip: str, number: int
) -> None:
    s = spn(ns, name, port, proto)
    chains = [
        naming.service_chain(s),
        naming.local_service_chain(s),
        naming.external_chain(s),
        naming.firewall_chain(s),
        naming.endpoint_chain(s, Endpoint(ip, number)),
    ]
    assert all(len(c) <= naming.MAX_CHAIN_NAME for c in chains)
    assert naming.service_chain(s) == naming.service_chain(spn(ns, name, port, proto))
    assert all(naming.is_service_chain(c) for c in chains)
