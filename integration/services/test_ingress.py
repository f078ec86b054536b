"""The ingress scenario (integration/scenarios/ingress/): a client outside the node fetches
/testpath through the ingress-nginx controller's NodePort; the controller pod proxies it to the
default/my-nginx ClusterIP, and kproxy's rules pick one of my-nginx's endpoints both times."""

from __future__ import annotations

import shutil

from integration.conftest import Cluster, both_modes
from integration.demo import (
    INGRESS_SCENARIO,
    SCENARIO,
    ingress_routes,
    read_backends,
    start_ingress_controller,
)
from integration.netns import NODE_IP
from integration.traffic import match_route, parse_route, probe, start_server

NODE_PORT = 30189
PATH = "/testpath"
MY_NGINX = {"my-nginx-1": "192.168.183.140", "my-nginx-2": "192.168.224.7"}
CONTROLLER_IP = "192.168.235.20"
REQUESTS = 20


def test_ingress_routes_come_from_the_ingress_object() -> None:
    assert ingress_routes((SCENARIO, INGRESS_SCENARIO)) == {PATH: "http://10.104.164.89:80"}


def test_controller_matches_paths_as_an_ingress_prefix() -> None:
    prefix, upstream = parse_route("/testpath=http://10.104.164.89:80")
    routes = {prefix: upstream}

    assert upstream == ("10.104.164.89", 80)
    assert match_route(routes, "/testpath") == upstream
    assert match_route(routes, "/testpath/index.html") == upstream
    assert match_route(routes, "/testpathology") is None
    assert match_route(routes, "/") is None


@both_modes
def test_outside_client_reaches_my_nginx_through_the_ingress_node_port(cluster: Cluster) -> None:
    for path in (SCENARIO / "my-nginx.yaml", *sorted(INGRESS_SCENARIO.glob("*.yaml"))):
        shutil.copy(path, cluster.manifests / f"{path.parent.name}-{path.name}")
    for backend in read_backends(SCENARIO):
        if backend.name in MY_NGINX:
            pod = cluster.pod(backend.name, backend.ip)
            start_server(cluster.topo, pod.ns, backend.name, 80, http=True)
    controller = start_ingress_controller(
        cluster.topo, ingress_routes((SCENARIO, INGRESS_SCENARIO))
    )
    assert controller.ip == CONTROLLER_IP
    cluster.sync()

    result = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=REQUESTS, http=True, path=PATH)

    assert result.failed == 0, result
    # All 20 on one of two endpoints: p = 2e-6.
    assert set(result.answers) == set(MY_NGINX), result
    # my-nginx was reached from the controller pod through the ClusterIP (a pod is not
    # masqueraded), not from the outside client or the node.
    assert result.sources == {CONTROLLER_IP: REQUESTS}, result
