"""Debian's nginx in the pod namespaces of the seed's scenario: the my-nginx endpoints and the
ingress-nginx controller, every hop a real server.

    python -m integration.nginx page --name my-nginx-1 --port 80
    python -m integration.nginx ingress-controller --port 80 --manifests DIR [--manifests DIR]

`page` serves one page naming its pod, `my-nginx-1 PEER_IP` (the peer through an SSI echo of
`$remote_addr`), at `/` and `/index.html`; any other path is nginx's 404. That is the answer
traffic.py's probe reads (who answered, which source address it saw).

`ingress-controller` renders an nginx configuration from the Ingress objects in the manifest
directories, as ingress-nginx does for `ingressClassName: nginx`: a server per rule host (rules
without one go to the default server), per path a location by its pathType (`Exact`: that path;
`Prefix`: that path element-wise, so /testpath matches /testpath and /testpath/x, not /testpathx;
`ImplementationSpecific`: as Prefix), proxying to the backend Service's ClusterIP and port, so the
node's rules pick the endpoint; `nginx.ingress.kubernetes.io/rewrite-target` replaces the matched
path (`/`: /testpath -> /, /testpath/x -> /x). A path no rule matches gets 404, a backend Service
that does not exist 503.

Each runs nginx (`daemon off`) from a directory of its own, prints `ready` once nginx listens,
and removes the directory when stopped (SIGTERM, as the topology stops its processes).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen
from typing import Any, NoReturn

import yaml

from integration.netns import Namespace, Topology, read_line

READY = "ready"
REWRITE_TARGET = "nginx.ingress.kubernetes.io/rewrite-target"
INGRESS_CLASS = "nginx"
_START_SECONDS = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
_ENV = {"PYTHONPATH": str(REPO_ROOT), "PYTHONDONTWRITEBYTECODE": "1"}


def nginx_binary() -> str:
    found = shutil.which("nginx") or ("/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else "")
    if not found:
        raise RuntimeError("nginx is missing: install Debian's nginx (`make deps`)")
    return found


# --- configuration ----------------------------------------------------------------------------


def render_conf(root: Path, servers: str) -> str:
    """A whole nginx.conf running from `root` (pid, logs, temp files), with `servers` in http."""
    temp = "\n".join(
        f"    {kind}_temp_path {root}/{kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""daemon off;
user root;
worker_processes 1;
pid {root}/nginx.pid;
error_log {root}/error.log warn;
events {{ worker_connections 512; }}
http {{
    access_log off;
{temp}
    proxy_connect_timeout 2s;
    proxy_read_timeout 5s;
{servers}}}
"""


def render_page_server(root: Path, name: str, port: int) -> str:
    """my-nginx: one page naming the pod and the address the request came from."""
    html = root / "html"
    html.mkdir(exist_ok=True)
    (html / "index.html").write_text(f'{name} <!--# echo var="remote_addr" -->\n')
    return f"""    server {{
        listen {port};
        root {html};
        index index.html;
        default_type text/html;
        ssi on;
    }}
"""


@dataclass(frozen=True)
class IngressPath:
    """One path of one Ingress rule, resolved to its backend Service's ClusterIP and port."""

    host: str  # "" for a rule without one (the default server)
    path: str
    path_type: str  # Exact, Prefix or ImplementationSpecific
    upstream: str | None  # `ip:port`, None when the backend Service is not there
    rewrite_target: str | None = None


def _service_ports(docs: Iterable[Mapping[str, Any]]) -> dict[tuple[str, str], tuple[str, dict]]:
    """(namespace, name) -> (ClusterIP, port name -> number) of every Service."""
    found = {}
    for doc in docs:
        if doc.get("kind") != "Service":
            continue
        meta, spec = doc["metadata"], doc.get("spec") or {}
        ports = {p.get("name", ""): p["port"] for p in spec.get("ports") or []}
        found[(meta.get("namespace", "default"), meta["name"])] = (spec.get("clusterIP", ""), ports)
    return found


def _upstream(service: Mapping[str, Any], known: tuple[str, dict] | None) -> str | None:
    if known is None or not known[0] or known[0] == "None":
        return None
    cluster_ip, ports = known
    port = service.get("port") or {}
    number = port.get("number") or ports.get(port.get("name", ""))
    return f"{cluster_ip}:{number}" if number else None


def read_ingress_paths(docs: Sequence[Mapping[str, Any]]) -> list[IngressPath]:
    """Every path of every Ingress of the nginx class (or of none), in document order."""
    services = _service_ports(docs)
    paths = []
    for doc in docs:
        if doc.get("kind") != "Ingress":
            continue
        spec, meta = doc.get("spec") or {}, doc["metadata"]
        if spec.get("ingressClassName", INGRESS_CLASS) != INGRESS_CLASS:
            continue
        namespace = meta.get("namespace", "default")
        rewrite = (meta.get("annotations") or {}).get(REWRITE_TARGET)
        for rule in spec.get("rules") or []:
            for item in (rule.get("http") or {}).get("paths") or []:
                service = item["backend"]["service"]
                paths.append(
                    IngressPath(
                        host=rule.get("host", ""),
                        path=item.get("path") or "/",
                        path_type=item.get("pathType", "ImplementationSpecific"),
                        upstream=_upstream(service, services.get((namespace, service["name"]))),
                        rewrite_target=rewrite,
                    )
                )
    return paths


def _proxy(upstream: str | None, uri: str) -> str:
    if upstream is None:
        return "return 503;"
    return (
        f"proxy_pass http://{upstream}{uri}; proxy_set_header Host $host; "
        "proxy_set_header X-Forwarded-For $remote_addr;"
    )


def _locations(item: IngressPath) -> Iterator[tuple[str, str]]:
    """(location match, body) of one path. A rewrite target is the URI of proxy_pass, which
    replaces the part of the request's path the location matched."""
    target = item.rewrite_target
    if item.path_type == "Exact" or item.path != "/":
        yield f"= {item.path}", _proxy(item.upstream, target or "")
    if item.path_type != "Exact":
        prefix = item.path.rstrip("/") + "/"
        uri = (target.rstrip("/") + "/") if target else ""
        yield prefix, _proxy(item.upstream, uri)


def render_ingress_servers(paths: Sequence[IngressPath], port: int) -> str:
    """The controller's servers: one per host, the first Ingress path of a location winning."""
    hosts: dict[str, dict[str, str]] = {"": {}}
    for item in paths:
        locations = hosts.setdefault(item.host, {})
        for match, body in _locations(item):
            locations.setdefault(match, body)
    servers = []
    for host, locations in hosts.items():
        locations.setdefault("/", "return 404;")  # ingress-nginx's default backend
        listen = f"listen {port} default_server;" if not host else f"listen {port};"
        lines = [f"    server {{\n        {listen}\n        server_name {host or '_'};"]
        lines += [f"        location {match} {{ {body} }}" for match, body in locations.items()]
        servers.append("\n".join(lines) + "\n    }\n")
    return "".join(servers)


def manifest_documents(directories: Iterable[Path]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for directory in directories:
        for path in sorted(Path(directory).glob("*.yaml")):
            for doc in yaml.safe_load_all(path.read_text()):
                if doc and doc.get("kind") == "List":
                    docs.extend(doc.get("items") or [])
                elif doc:
                    docs.append(doc)
    return docs


# --- running nginx ----------------------------------------------------------------------------


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def run_nginx(root: Path, servers: str, port: int) -> int:
    """nginx with `servers` from `root` until it exits or this process is stopped."""
    conf = root / "nginx.conf"
    conf.write_text(render_conf(root, servers))
    proc = subprocess.Popen([nginx_binary(), "-p", str(root), "-c", str(conf)])
    deadline = time.monotonic() + _START_SECONDS
    while not _listening(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            log = root / "error.log"
            print(f"nginx did not start: {log.read_text() if log.exists() else proc.returncode}")
            proc.kill()
            return 1
        time.sleep(0.02)
    print(READY, flush=True)
    try:
        return proc.wait()
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait()


def _exit_on_sigterm(signum: int, frame: object) -> NoReturn:
    sys.exit(128 + signum)  # unwinds through the finally blocks that stop nginx and clean up


def start_page(topo: Topology, ns: Namespace, name: str, port: int) -> Popen[str]:
    """nginx serving `name`'s page on `port` in `ns`, listening when this returns."""
    return _start(topo, ns, f"nginx {name}", ["page", "--name", name, "--port", str(port)])


def start_ingress_controller_nginx(
    topo: Topology, ns: Namespace, port: int, manifests: Sequence[Path]
) -> Popen[str]:
    """nginx in `ns` on `port` serving the Ingress objects of `manifests`."""
    args = ["ingress-controller", "--port", str(port)]
    for directory in manifests:
        args += ["--manifests", str(directory)]
    return _start(topo, ns, "the ingress controller's nginx", args)


def _start(topo: Topology, ns: Namespace, what: str, args: Sequence[str]) -> Popen[str]:
    nginx_binary()  # a clear error here rather than in the namespace
    proc = topo.spawn(ns, [sys.executable, "-m", "integration.nginx", *args], env=_ENV)
    line = read_line(proc, timeout=30.0)
    if line != READY:
        raise RuntimeError(f"{what} in {ns.name} said {line!r} instead of {READY!r}")
    return proc


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m integration.nginx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    page = sub.add_parser("page", help="serve a page naming the pod")
    page.add_argument("--name", required=True)
    page.add_argument("--port", type=int, default=80)
    ctl = sub.add_parser("ingress-controller", help="serve the Ingress objects of manifests")
    ctl.add_argument("--port", type=int, default=80)
    ctl.add_argument("--manifests", type=Path, action="append", default=[])
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="kproxy-nginx-") as tmp:
        root = Path(tmp)
        if args.command == "page":
            servers = render_page_server(root, args.name, args.port)
        else:
            paths = read_ingress_paths(manifest_documents(args.manifests))
            servers = render_ingress_servers(paths, args.port)
        return run_nginx(root, servers, args.port)


if __name__ == "__main__":
    sys.exit(main())
