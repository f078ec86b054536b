"""The ingress scenario (integration/scenarios/ingress/) with real parts: a client outside the node
fetches /testpath through the ingress-nginx controller's NodePort; the controller pod runs
Debian's nginx with a configuration rendered from the Ingress objects, which proxies to the
default/my-nginx ClusterIP, and kproxy's rules pick one of my-nginx's endpoints (nginx too, each
serving a page naming its pod and the address it saw) both times."""

from __future__ import annotations

import shutil
from typing import Any

import yaml

from integration.conftest import Cluster, both_modes
from integration.demo import INGRESS_SCENARIO, SCENARIO, read_backends, start_ingress_controller
from integration.netns import NODE_IP, Namespace
from integration.nginx import IngressPath, manifest_documents, read_ingress_paths, start_page
from integration.traffic import probe

NODE_PORT = 30189
PATH = "/testpath"
MY_NGINX = {"my-nginx-1": "192.168.183.140", "my-nginx-2": "192.168.224.7"}
CONTROLLER_IP = "192.168.235.20"
REQUESTS = 20


def test_ingress_paths_come_from_the_ingress_object() -> None:
    assert read_ingress_paths(manifest_documents((SCENARIO, INGRESS_SCENARIO))) == [
        IngressPath("", PATH, "Prefix", "10.104.164.89:80", rewrite_target="/")
    ]


def _seed(cluster: Cluster, *extra: dict[str, Any]) -> None:
    """The seed's my-nginx and ingress manifests (plus `extra` objects) for kproxy and the
    controller, my-nginx's pods running nginx, and the controller's pod running nginx."""
    for path in (SCENARIO / "my-nginx.yaml", *sorted(INGRESS_SCENARIO.glob("*.yaml"))):
        shutil.copy(path, cluster.manifests / f"{path.parent.name}-{path.name}")
    if extra:
        (cluster.manifests / "extra.yaml").write_text(yaml.safe_dump_all(extra))
    for backend in read_backends(SCENARIO):
        if backend.name in MY_NGINX:
            pod = cluster.pod(backend.name, backend.ip)
            start_page(cluster.topo, pod.ns, backend.name, 80)
    controller = start_ingress_controller(cluster.topo, [cluster.manifests])
    assert controller.ip == CONTROLLER_IP
    cluster.sync()


def _curl(ns: Namespace, path: str, host: str | None = None) -> tuple[int, str]:
    """`curl http://NODE:30189PATH` from `ns`: the status and the body."""
    args = ["curl", "-sS", "--max-time", "5", "-w", "\n%{http_code}"]
    args += ["-H", f"Host: {host}"] if host else []
    out = ns.run(*args, f"http://{NODE_IP}:{NODE_PORT}{path}").stdout
    body, _, status = out.rpartition("\n")
    return int(status), body


@both_modes
def test_outside_client_reaches_my_nginx_through_the_ingress_node_port(cluster: Cluster) -> None:
    _seed(cluster)

    status, body = _curl(cluster.outside, PATH)
    assert status == 200 and body.split()[0] in MY_NGINX, body
    result = probe(cluster.outside, NODE_IP, NODE_PORT, "tcp", count=REQUESTS, http=True, path=PATH)

    assert result.failed == 0, result
    # All 20 on one of two endpoints: p = 2e-6.
    assert set(result.answers) == set(MY_NGINX), result
    # my-nginx was reached from the controller pod through the ClusterIP (a pod is not
    # masqueraded), not from the outside client or the node.
    assert result.sources == {CONTROLLER_IP: REQUESTS}, result


def _hosted_ingress() -> dict[str, Any]:
    """A second Ingress, for one host: an Exact path rewritten to /, and a path whose Service
    does not exist."""
    path: dict[str, Any] = {"pathType": "Exact", "path": "/exact"}
    path["backend"] = {"service": {"name": "my-nginx", "port": {"number": 80}}}
    missing: dict[str, Any] = {"pathType": "Prefix", "path": "/missing"}
    missing["backend"] = {"service": {"name": "absent", "port": {"number": 80}}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "Ingress",
        "metadata": {
            "name": "hosted",
            "namespace": "default",
            "annotations": {"nginx.ingress.kubernetes.io/rewrite-target": "/"},
        },
        "spec": {
            "ingressClassName": "nginx",
            "rules": [{"host": "web.example", "http": {"paths": [path, missing]}}],
        },
    }


def test_the_controller_follows_host_path_type_and_rewrite_target(cluster: Cluster) -> None:
    _seed(cluster, _hosted_ingress())
    outside = cluster.outside
    # Prefix /testpath, element-wise, rewritten to / (my-nginx serves only / and /index.html).
    for path in (PATH, f"{PATH}/", f"{PATH}/index.html"):
        status, body = _curl(outside, path)
        pod, seen = body.split()
        assert status == 200 and pod in MY_NGINX and seen == CONTROLLER_IP, (path, body)
    for path in (f"{PATH}ology", "/", "/exact"):
        assert _curl(outside, path)[0] == 404, path  # no rule of the default server
    # The host's rules, and only its: Exact matches the path alone.
    assert _curl(outside, "/exact", host="web.example")[0] == 200
    assert _curl(outside, "/exact/x", host="web.example")[0] == 404
    assert _curl(outside, PATH, host="web.example")[0] == 404
    assert _curl(outside, "/missing/x", host="web.example")[0] == 503
