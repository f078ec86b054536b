"""`make demo`: kproxy programming a simulated node, with real traffic through its rules.

Reads the manifests in integration/scenarios/demo/ (default/my-nginx, kube-system/kube-dns and
default/kubernetes, as `kubectl get -o yaml` prints them) and integration/scenarios/ingress/ (an
ingress-nginx controller exposed as NodePort 30189, and an Ingress sending /testpath to my-nginx),
builds the node in network namespaces with one namespace per endpoint pod (see netns.py), and
shows two pictures of the same scenario, one after the other:

1. the userspace mode: `kproxy sync --once` with `mode: userspace` programs the portals and
   relays in the foreground; its relay accepts each connection and dials the endpoints in turn
   (round robin), so every endpoint sees the node's address as the source;
2. the iptables mode: the relay is stopped, and as it stops kproxy hands the node over to the
   iptables mode's rules (replacing the portal chains, so no new connection meets a closed relay
   port; see docs/userspace-relay.md); `kproxy sync --once` in the iptables mode then finds
   those rules in place and changes nothing. Netfilter DNATs each connection to an endpoint
   picked at random, so every endpoint sees the client's own address.

In each picture a client pod sends requests to the Service VIPs; the demo shows which endpoint
answered each request and which source address each endpoint saw. The my-nginx endpoints are
Debian's nginx, each serving a page that names its pod and the address the request came from
(integration/nginx.py); kube-dns and the API server are small Python servers (traffic.py). After
the second picture, a client outside the node fetches /testpath through the ingress NodePort: the
controller pod runs nginx with a configuration rendered from the Ingress object (its path,
pathType and rewrite-target), which proxies to the my-nginx ClusterIP, and the demo shows which
my-nginx endpoint answered: NodePort -> controller -> ClusterIP -> endpoint, every hop real.
Prints the chains kproxy wrote, and deletes every namespace it made, whatever happens.

Exit status: 0 when every my-nginx endpoint answered in both pictures (and through the ingress)
and DNS answered, 1 otherwise, 2 when it cannot run (not root, kproxy not installed).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from integration.netns import (
    NODE_IP,
    OUTSIDE_IP,
    Namespace,
    Topology,
    kproxy_path,
    read_line,
    run_kproxy,
    stop,
    topology,
)
from integration.nginx import (
    IngressPath,
    manifest_documents,
    read_ingress_paths,
    start_ingress_controller_nginx,
    start_page,
)
from integration.traffic import ProbeResult, probe, start_server

SCENARIO = Path(__file__).parent / "scenarios" / "demo"
INGRESS_SCENARIO = Path(__file__).parent / "scenarios" / "ingress"
CLIENT_POD, CLIENT_IP = "client", "192.168.1.50"
NGINX = ("default/my-nginx", "10.104.164.89", 80)
DNS = ("kube-system/kube-dns", "10.96.0.10", 53)
API = ("default/kubernetes", "10.96.0.1", 443)
INGRESS = ("ingress-nginx/ingress-nginx-controller", 30189, "/testpath")
NODE_NAME = "node-1"
REQUESTS = 20


@dataclass(frozen=True)
class Backend:
    """One endpoint address and the ports it serves, from the EndpointSlices."""

    name: str  # the pod's name, or "node" for an endpoint on the node's own address
    ip: str
    ports: tuple[tuple[int, str], ...]  # (port, protocol)


def _documents(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if doc and doc.get("kind") == "List":
            yield from doc.get("items") or []
        elif doc:
            yield doc


def merge_scenarios(target: Path, scenarios: Sequence[Path]) -> Path:
    """One manifest directory (`target`, created) holding every scenario's files, for kproxy's
    single --manifests path."""
    target.mkdir()
    for scenario in scenarios:
        for path in sorted(scenario.glob("*.yaml")):
            shutil.copy(path, target / f"{scenario.name}-{path.name}")
    return target


def ingress_paths(scenarios: Sequence[Path]) -> list[IngressPath]:
    """The paths the ingress controller serves for the Ingress objects of the scenarios."""
    return read_ingress_paths(manifest_documents(scenarios))


def describe_path(item: IngressPath) -> str:
    """`/testpath (Prefix, rewrite-target /) -> 10.104.164.89:80`."""
    how = item.path_type + (
        f", rewrite-target {item.rewrite_target}" if item.rewrite_target else ""
    )
    return f"{item.host}{item.path} ({how}) -> {item.upstream or 'no such Service'}"


def read_backends(scenario: Path) -> list[Backend]:
    """Every endpoint of every EndpointSlice in the scenario, merged by address."""
    names: dict[str, str] = {}
    ports: dict[str, set[tuple[int, str]]] = {}
    for path in sorted(scenario.glob("*.yaml")):
        for doc in _documents(path):
            if doc.get("kind") != "EndpointSlice":
                continue
            slice_ports = {(p["port"], p.get("protocol", "TCP")) for p in doc.get("ports") or []}
            for ep in doc.get("endpoints") or []:
                ip = ep["addresses"][0]
                names[ip] = "node" if ip == NODE_IP else ep.get("targetRef", {}).get("name", ip)
                ports.setdefault(ip, set()).update(slice_ports)
    return [Backend(names[ip], ip, tuple(sorted(ports[ip]))) for ip in sorted(names)]


def start_backends(topo: Topology, backends: list[Backend]) -> None:
    """A pod namespace per endpoint pod, and a server per port: nginx's page on TCP port 80 (the
    my-nginx pods), a Python server answering `NAME PEER` on the others (kube-dns, the API)."""
    for backend in backends:
        ns = topo.node if backend.name == "node" else topo.add_pod(backend.name, backend.ip).ns
        by_port: dict[int, set[str]] = {}
        for port, protocol in backend.ports:
            by_port.setdefault(port, set()).add(protocol.lower())
        for port, protos in sorted(by_port.items()):
            proto = "both" if len(protos) > 1 else protos.pop()
            if port == 80 and proto == "tcp":
                start_page(topo, ns, backend.name, port)
            else:
                start_server(topo, ns, backend.name, port, proto)


def start_ingress_controller(topo: Topology, manifests: Sequence[Path]) -> Backend:
    """The ingress controller's pod (from the ingress scenario's EndpointSlice), running nginx
    with the configuration rendered from the Ingress objects of `manifests` on its port."""
    (controller,) = read_backends(INGRESS_SCENARIO)
    pod = topo.add_pod(controller.name, controller.ip)
    for port, _ in controller.ports:
        start_ingress_controller_nginx(topo, pod.ns, port, manifests)
    return controller


def _nginx_endpoints(backends: list[Backend]) -> dict[str, str]:
    port = NGINX[2]
    return {b.name: b.ip for b in backends if (port, "TCP") in b.ports and b.name != "node"}


def _seen_by(result: ProbeResult) -> dict[str, list[str]]:
    """Endpoint -> the source addresses it saw, in order of first appearance."""
    seen: dict[str, list[str]] = {}
    for answer, source in zip(result.sequence, result.seen, strict=True):
        if source and source not in seen.setdefault(answer, []):
            seen[answer].append(source)
    return seen


def _show_tally(title: str, result: ProbeResult, expected: dict[str, str]) -> bool:
    """Print each answer (and the source address that endpoint saw), then how many each my-nginx
    endpoint got and from where; True when all of them answered and nothing failed."""
    for i, (answer, source) in enumerate(zip(result.sequence, result.seen, strict=True), 1):
        print(f"  request {i:2}: {answer}" + (f", which saw {source}" if source else ""))
    tally = Counter(result.answers)
    seen = _seen_by(result)
    print(f"\n== tally for {title}")
    for pod, ip in sorted(expected.items()):
        saw = ", ".join(seen.get(pod, [])) or "-"
        print(f"  {pod} ({ip}:{NGINX[2]}): {tally[pod]} of {REQUESTS}, saw {saw}")
    if result.failed:
        print(f"  failed: {result.failed} (refused {result.refused}, timeout {result.timeout})")
    silent = sorted(pod for pod in expected if tally[pod] == 0)
    if silent:
        print(f"  FAILED: {', '.join(silent)} never answered")
    return not silent and not result.failed


def show_nginx(client: Namespace, backends: list[Backend], mode: str, why: str) -> bool:
    name, vip, port = NGINX
    print(f"\n== {REQUESTS} HTTP requests from pod {CLIENT_POD} ({CLIENT_IP}) to {vip}:{port}")
    result = probe(client, vip, port, "tcp", count=REQUESTS, http=True)
    ok = _show_tally(f"{name} ({mode} mode)", result, _nginx_endpoints(backends))
    print(f"  why: {why}")
    return ok


def show_ingress(
    outside: Namespace, backends: list[Backend], controller: Backend, paths: list[IngressPath]
) -> bool:
    service, node_port, path = INGRESS
    url = f"http://{NODE_IP}:{node_port}{path}"
    print(f"\n== {REQUESTS} HTTP requests from a client outside the node ({OUTSIDE_IP}) to {url}")
    print(f"  NodePort {node_port} of {service} -> nginx in ingress controller pod")
    print(f"  {controller.name} ({controller.ip}), its configuration rendered from the Ingress:")
    for item in paths:
        print(f"    {describe_path(item)}   ({NGINX[0]} ClusterIP)")
    result = probe(outside, NODE_IP, node_port, "tcp", count=REQUESTS, http=True, path=path)
    ok = _show_tally(f"{url} (via the ingress)", result, _nginx_endpoints(backends))
    seen = ", ".join(sorted(result.sources)) or "-"
    print(f"  my-nginx saw the requests coming from {seen} (the ingress controller pod)")
    return ok and set(result.sources) == {controller.ip}


def show_single(client: Namespace, service: tuple[str, str, int], proto: str) -> bool:
    name, vip, port = service
    result = probe(client, vip, port, proto)
    answer = result.sequence[0]
    saw = next(iter(result.sources), "-")
    print(f"\n== {proto.upper()} {vip}:{port} ({name}): answered by {answer}, which saw {saw}")
    return result.answered == 1


def show_services(client: Namespace) -> bool:
    """kube-dns over UDP and TCP, and the API server's Service; True when each answered."""
    ok = show_single(client, DNS, "udp")
    ok = show_single(client, DNS, "tcp") and ok
    return show_single(client, API, "tcp") and ok


USERSPACE_WHY = (
    "kproxy's relay accepted each connection and dialled the endpoints in turn (round robin), "
    f"so every endpoint saw the node's address {NODE_IP}, not the client's"
)
IPTABLES_WHY = (
    "netfilter DNATed each connection to an endpoint it picked at random (statistic "
    f"--probability), and DNAT rewrites only the destination: every endpoint saw the client's "
    f"own address {CLIENT_IP}"
)


def write_userspace_config(path: Path) -> Path:
    """`mode: userspace` and nothing else: the mode's defaults."""
    doc = {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "userspace",
    }
    path.write_text(yaml.safe_dump(doc))
    return path


@contextmanager
def userspace_relay(topo: Topology, sync: Sequence[str], lock_file: Path) -> Iterator[None]:
    """`kproxy sync --once` in userspace mode, which prints its summary and then relays in the
    foreground: running until the block ends, then stopped with SIGTERM."""
    argv = [str(kproxy_path()), "--log-level", "warning", *sync]
    proc: subprocess.Popen[str] = topo.spawn(
        topo.node, argv, env={"XTABLES_LOCKFILE": str(lock_file)}
    )
    try:
        print(read_line(proc, timeout=60.0))
        yield
    finally:
        stop(proc)
        print(
            "\n(relay stopped with SIGTERM: as it stopped, it handed the node over to the "
            "iptables mode's rules, replacing its portal chains)"
        )


def userspace_picture(
    topo: Topology, client: Namespace, backends: list[Backend], sync: list[str], workdir: Path
) -> bool:
    config = write_userspace_config(workdir / "kube-proxy-userspace.yaml")
    print("\n=== picture 1 of 2: the userspace mode (kproxy's relay picks the endpoint)")
    print(f"$ kproxy {' '.join(sync)} --config {config}   # mode: userspace")
    with userspace_relay(topo, [*sync, "--config", str(config)], workdir / "xtables.lock"):
        ok = show_nginx(client, backends, "userspace", USERSPACE_WHY)
        ok = show_services(client) and ok
    return ok


def iptables_picture(
    topo: Topology, client: Namespace, backends: list[Backend], sync: list[str], lock_file: Path
) -> bool:
    print("\n=== picture 2 of 2: the iptables mode (netfilter picks the endpoint)")
    print(
        f"$ kproxy {' '.join(sync)}   # the default mode, where kubelet writes: the relay's "
        "hand-over left its rules in legacy iptables, which is where they stay on a legacy "
        "node and from where they move on an iptables-nft node"
    )
    print(run_kproxy(topo.node, *sync, lock_file=lock_file).stdout, end="")
    ok = show_nginx(client, backends, "iptables", IPTABLES_WHY)
    return show_services(client) and ok


def run_demo(workdir: Path) -> bool:
    lock_file = workdir / "xtables.lock"
    scenarios = (SCENARIO, INGRESS_SCENARIO)
    manifests = merge_scenarios(workdir / "manifests", scenarios)
    backends = read_backends(SCENARIO)
    paths = ingress_paths(scenarios)
    with topology("demo") as topo:
        print(f"== simulated node {topo.node.name}: node address {NODE_IP}")
        start_backends(topo, backends)
        for backend in backends:
            print(f"  endpoint {backend.name:12} {backend.ip:16} ports {list(backend.ports)}")
        controller = start_ingress_controller(topo, scenarios)
        print(f"  ingress controller {controller.name} {controller.ip} (nginx), serving:")
        for item in paths:
            print(f"    {describe_path(item)}")
        client = topo.add_pod(CLIENT_POD, CLIENT_IP)

        sync = ["sync", "--once", "--manifests", str(manifests), "--hostname-override", NODE_NAME]
        print(f"  ({manifests} holds {', '.join(str(s) for s in scenarios)})")

        ok = userspace_picture(topo, client.ns, backends, sync, workdir)
        ok = iptables_picture(topo, client.ns, backends, sync, lock_file) and ok
        ok = show_ingress(topo.outside, backends, controller, paths) and ok

        print("\n$ kproxy dump   # the chains now in the node's tables")
        print(run_kproxy(topo.node, "dump", lock_file=lock_file).stdout, end="")
    return ok


def _exit_on_sigterm(signum: int, frame: object) -> None:
    sys.exit(128 + signum)  # unwinds through the topology's cleanup, unlike the default action


def main() -> int:
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    if os.geteuid() != 0:
        print(
            "the demo creates network namespaces: run it as root (sudo make demo)", file=sys.stderr
        )
        return 2
    if not kproxy_path().exists():
        print(f"{kproxy_path()} is missing: run `make venv` first", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="kproxy-demo-") as tmp:
        ok = run_demo(Path(tmp))
    print("\n== demo", "succeeded" if ok else "FAILED", "(all namespaces removed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
