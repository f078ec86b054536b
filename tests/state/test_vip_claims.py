"""Who may claim an address as an externalIP or load-balancer ingress IP: never another Service's
ClusterIP on the same port (ClusterIPClaims, in the state), and only inside the config's
allowedExternalIPCIDRs (the converter)."""

from __future__ import annotations

from typing import Any

import pytest
from scenarios import service, service_port

from kproxy.errors import ConfigError
from kproxy.model.addresses import build_allow_list
from kproxy.model.config import parse_config
from kproxy.model.convert import build_service
from kproxy.model.kinds import Kind
from kproxy.model.service import NamespacedName
from kproxy.state import ingest
from kproxy.state.cluster import ClusterState

VIP = "10.96.0.10"
WEB = NamespacedName("default", "web")
THIEF = NamespacedName("default", "a-thief")


def _web(port: int = 80) -> dict[str, Any]:
    return service("web", VIP, [service_port(port)])


def _thief(port: int = 80, **fields: Any) -> dict[str, Any]:
    fields.setdefault("externalIPs", [VIP])
    return service("a-thief", "10.96.0.20", [service_port(port)], **fields)


def _apply(state: ClusterState, *objs: dict[str, Any]) -> list[str]:
    errors = ingest.replace_all(Kind.SERVICE, list(objs))(state)
    return [f"{e.obj} {e.field}: {e.problem}" for e in errors]


def _claims(state: ClusterState, key: NamespacedName) -> tuple[str, ...]:
    ports = [sp for spn, sp in state.services_map().items() if spn.service == key]
    return tuple(ip for sp in ports for ip in (*sp.external_ips, *sp.load_balancer_ips))


@pytest.mark.parametrize("web_first", [True, False])
def test_a_claim_on_another_services_cluster_ip_is_left_out_with_one_warning(
    web_first: bool,
) -> None:
    state = ClusterState()
    objs = [_web(), _thief()] if web_first else [_thief(), _web()]

    warnings = _apply(state, *objs)

    assert _claims(state, THIEF) == ()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("Service default/a-thief spec.externalIPs: 10.96.0.10 is ")
    assert "ClusterIP of Service default/web (port 80/TCP)" in warnings[0]
    # The same objects again (a relist, an unchanged update): nothing new to warn about.
    assert _apply(state, *objs) == []


def test_an_ingress_ip_claim_names_its_field() -> None:
    state = ClusterState()
    warnings = _apply(state, _web(), _thief(externalIPs=[], lb_ingress=[VIP]))
    assert _claims(state, THIEF) == ()
    assert [w.split(":")[0] for w in warnings] == [
        "Service default/a-thief status.loadBalancer.ingress"
    ]


def test_a_claim_on_another_port_of_that_address_is_kept() -> None:
    """Upstream's ClusterIP rule wins only for its own port; the claim on another port matches
    no packet of the ClusterIP's service."""
    state = ClusterState()
    assert _apply(state, _web(80), _thief(443)) == []
    assert _claims(state, THIEF) == (VIP,)


def test_a_services_own_cluster_ip_as_its_external_ip_is_kept() -> None:
    state = ClusterState()
    assert _apply(state, _thief(externalIPs=["10.96.0.20"])) == []
    assert _claims(state, THIEF) == ("10.96.0.20",)


def test_the_claim_comes_back_when_the_holder_goes_and_the_claimer_is_resynced() -> None:
    state = ClusterState()
    _apply(state, _web(), _thief())
    state.take_changes()

    ingest.remove(Kind.SERVICE, _web())(state)

    assert _claims(state, THIEF) == (VIP,)
    assert state.take_changes() == {WEB, THIEF}  # the claimer's rules are rewritten too
    # Taken again later: one new warning.
    assert len(ingest.upsert(Kind.SERVICE, _web())(state)) == 1
    assert _claims(state, THIEF) == ()


def test_other_claims_of_the_same_service_stay() -> None:
    state = ClusterState()
    _apply(state, _web(), _thief(externalIPs=[VIP, "203.0.113.7"]))
    assert _claims(state, THIEF) == ("203.0.113.7",)


ALLOWED = ["203.0.113.0/28", "2001:db8::/64"]


def test_addresses_outside_the_allow_list_are_left_out_naming_the_field() -> None:
    obj = service(
        "web",
        VIP,
        [service_port(80)],
        externalIPs=["203.0.113.1", "198.51.100.1", "2001:db8::5", "2001:db9::5"],
        lb_ingress=["203.0.113.2", "203.0.113.99"],
    )

    info = build_service(obj, build_allow_list(tuple(ALLOWED)))

    (port,) = info.ports
    assert port.external_ips == ("203.0.113.1", "2001:db8::5")
    assert port.load_balancer_ips == ("203.0.113.2",)
    assert [(e.field, e.problem.split(" is ")[0]) for e in info.skipped] == [
        ("spec.externalIPs[1]", "198.51.100.1"),
        ("spec.externalIPs[3]", "2001:db9::5"),
        ("status.loadBalancer.ingress[1].ip", "203.0.113.99"),
    ]
    assert all("allowedExternalIPCIDRs" in e.problem for e in info.skipped)
    # No allow-list: every address, as upstream.
    assert build_service(obj).skipped == ()


def test_an_empty_allow_list_allows_none() -> None:
    obj = service("web", VIP, [service_port(80)], externalIPs=["203.0.113.1"])
    (port,) = build_service(obj, build_allow_list(())).ports
    assert port.external_ips == ()


def test_the_state_applies_its_allow_list() -> None:
    state = ClusterState()
    state.allowed_vips = build_allow_list(("203.0.113.0/28",))
    warnings = _apply(state, _thief(externalIPs=["203.0.113.1", "198.51.100.1"]))
    assert _claims(state, THIEF) == ("203.0.113.1",)
    assert [w.split(":")[0] for w in warnings] == ["Service default/a-thief spec.externalIPs[1]"]


def test_config_reads_the_allow_list() -> None:
    base = {"apiVersion": "kubeproxy.config.k8s.io/v1alpha1", "kind": "KubeProxyConfiguration"}
    assert parse_config(base)[0].allowed_external_ip_cidrs is None
    config, ignored = parse_config({**base, "allowedExternalIPCIDRs": ["203.0.113.5/24", "::1"]})
    assert config.allowed_external_ip_cidrs == ("203.0.113.0/24", "::1/128")
    assert ignored == []
    assert parse_config({**base, "allowedExternalIPCIDRs": []})[0].allowed_external_ip_cidrs == ()
    assert (
        parse_config({**base, "allowedExternalIPCIDRs": None})[0].allowed_external_ip_cidrs is None
    )


@pytest.mark.parametrize(
    ("value", "where"),
    [
        ("203.0.113.0/24", "allowedExternalIPCIDRs"),
        (["203.0.113.0/24", "nope"], r"allowedExternalIPCIDRs\[1\]"),
        (["203.0.113.0/24,10.0.0.0/8"], r"allowedExternalIPCIDRs\[0\]"),
        ([7], r"allowedExternalIPCIDRs\[0\]"),
    ],
)
def test_config_refuses_a_bad_allow_list_naming_the_field(value: Any, where: str) -> None:
    with pytest.raises(ConfigError, match=rf"^config field {where}:"):
        parse_config({"allowedExternalIPCIDRs": value})
