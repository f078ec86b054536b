"""`make demo`: kproxy programming a simulated node, with real traffic through its rules.

Reads the manifests in integration/scenarios/demo/ (default/my-nginx, kube-system/kube-dns and
default/kubernetes, as `kubectl get -o yaml` prints them), builds the node in network namespaces
with one namespace per endpoint pod (see netns.py), runs `kproxy sync --once` in the node, then
sends requests to the Service VIPs from a client pod and shows which endpoint answered each.
Prints the chains kproxy wrote, and deletes every namespace it made, whatever happens.

Exit status: 0 when every my-nginx endpoint answered and DNS answered, 1 otherwise, 2 when it
cannot run (not root, kproxy not installed).
"""

from __future__ import annotations

import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from integration.netns import NODE_IP, Namespace, Topology, kproxy_path, run_kproxy, topology
from integration.traffic import probe, start_server

SCENARIO = Path(__file__).parent / "scenarios" / "demo"
CLIENT_POD, CLIENT_IP = "client", "192.168.1.50"
NGINX = ("default/my-nginx", "10.104.164.89", 80)
DNS = ("kube-system/kube-dns", "10.96.0.10", 53)
API = ("default/kubernetes", "10.96.0.1", 443)
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
    """A pod namespace per endpoint pod, and a server per port (HTTP on port 80, like nginx)."""
    for backend in backends:
        ns = topo.node if backend.name == "node" else topo.add_pod(backend.name, backend.ip).ns
        by_port: dict[int, set[str]] = {}
        for port, protocol in backend.ports:
            by_port.setdefault(port, set()).add(protocol.lower())
        for port, protos in sorted(by_port.items()):
            proto = "both" if len(protos) > 1 else protos.pop()
            start_server(topo, ns, backend.name, port, proto, http=port == 80)


def show_nginx(client: Namespace, backends: list[Backend]) -> bool:
    name, vip, port = NGINX
    print(f"\n== {REQUESTS} HTTP requests from pod {CLIENT_POD} ({CLIENT_IP}) to {vip}:{port}")
    result = probe(client, vip, port, "tcp", count=REQUESTS, http=True)
    for i, answer in enumerate(result.sequence, 1):
        print(f"  request {i:2}: {answer}")
    expected = {b.name: b.ip for b in backends if (port, "TCP") in b.ports and b.name != "node"}
    tally = Counter(result.answers)
    print(f"\n== tally for {name}")
    for pod, ip in sorted(expected.items()):
        print(f"  {pod} ({ip}:{port}): {tally[pod]} of {REQUESTS}")
    if result.failed:
        print(f"  failed: {result.failed} (refused {result.refused}, timeout {result.timeout})")
    silent = sorted(pod for pod in expected if tally[pod] == 0)
    if silent:
        print(f"  FAILED: {', '.join(silent)} never answered")
    return not silent and not result.failed


def show_single(client: Namespace, service: tuple[str, str, int], proto: str) -> bool:
    name, vip, port = service
    result = probe(client, vip, port, proto)
    answer = result.sequence[0]
    saw = next(iter(result.sources), "-")
    print(f"\n== {proto.upper()} {vip}:{port} ({name}): answered by {answer}, which saw {saw}")
    return result.answered == 1


def run_demo(lock_file: Path) -> bool:
    backends = read_backends(SCENARIO)
    with topology("demo") as topo:
        print(f"== simulated node {topo.node.name}: node address {NODE_IP}")
        start_backends(topo, backends)
        for backend in backends:
            print(f"  endpoint {backend.name:12} {backend.ip:16} ports {list(backend.ports)}")
        client = topo.add_pod(CLIENT_POD, CLIENT_IP)

        sync = ["sync", "--once", "--manifests", str(SCENARIO), "--hostname-override", "node-1"]
        print(f"\n$ kproxy {' '.join(sync)}")
        print(run_kproxy(topo.node, *sync, lock_file=lock_file).stdout, end="")

        ok = show_nginx(client.ns, backends)
        ok = show_single(client.ns, DNS, "udp") and ok
        ok = show_single(client.ns, API, "tcp") and ok

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
        ok = run_demo(Path(tmp) / "xtables.lock")
    print("\n== demo", "succeeded" if ok else "FAILED", "(all namespaces removed)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
